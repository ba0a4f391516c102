//! The sliding-window counter with per-key anchors (ADR 0006), as pure arithmetic.
//!
//! A key's windows start at its first request and follow each other every `window`. The state
//! is the current window's start, the previous window's count and the current count. The
//! estimate of requests in the last `window` is `previous × (window − elapsed) / window +
//! current`; a request is admitted, and counted, only if the estimate plus one stays within
//! the limit. After two windows without a request the key starts afresh, anchored at its next
//! request. `sliding_window.lua` is the same algorithm for Redis; the two must agree
//! decision for decision (a test checks it), so all arithmetic here is in integers, and the
//! Lua script does the same operations on doubles, which are exact below 2^53.

/// One key's counters. Times in microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WindowState {
    /// Start of the current window.
    pub start: u64,
    /// Requests admitted in the window before it.
    pub previous: u64,
    /// Requests admitted in the current one.
    pub current: u64,
}

/// What one decision found; durations in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Verdict {
    /// Admitted (and counted).
    pub allowed: bool,
    /// How many more would be admitted right now.
    pub remaining: u64,
    /// Until the current window ends (and, when refused, at least `retry_after`).
    pub reset: u64,
    /// When refused: until the earliest instant one request would be admitted.
    pub retry_after: Option<u64>,
}

/// Decides one request at `now` against `limit` per `window` (both ≥ 1); returns the verdict
/// and the state to store when the request was admitted (nothing changes when refused).
pub(crate) fn decide(
    state: Option<WindowState>,
    now: u64,
    window: u64,
    limit: u64,
) -> (Verdict, Option<WindowState>) {
    let (mut now, mut state) = (
        now,
        state.unwrap_or(WindowState {
            start: now,
            previous: 0,
            current: 0,
        }),
    );
    if now < state.start {
        // Another replica whose clock runs ahead opened this window: count the request at
        // the window's first instant rather than in the past.
        now = state.start;
    }
    let passed = (now - state.start) / window;
    if passed == 1 {
        state = WindowState {
            start: state.start + window,
            previous: state.current,
            current: 0,
        };
    } else if passed >= 2 {
        // Two quiet windows leave nothing to count: start afresh, anchored now, as after the
        // Redis key expired.
        state = WindowState {
            start: now,
            previous: 0,
            current: 0,
        };
    }
    let elapsed = now - state.start;
    let left = window - elapsed;
    let (previous, current, limit_w) = (
        u128::from(state.previous),
        u128::from(state.current),
        u128::from(limit),
    );
    let (w, left_w) = (u128::from(window), u128::from(left));
    // previous × left / window + current + 1 ≤ limit, multiplied through by window.
    let allowed = previous * left_w + (current + 1) * w <= limit_w * w;
    let counted = current + u128::from(allowed);
    // floor(limit − previous × left / window) − counted, never below zero.
    let room = (limit_w * w).saturating_sub(previous * left_w) / w;
    let remaining = narrow(room.saturating_sub(counted));
    if allowed {
        state.current += 1;
        let verdict = Verdict {
            allowed,
            remaining,
            reset: left,
            retry_after: None,
        };
        return (verdict, Some(state));
    }
    let retry_after = retry_after(state, elapsed, window, limit);
    let verdict = Verdict {
        allowed,
        remaining,
        reset: left.max(retry_after),
        retry_after: Some(retry_after),
    };
    (verdict, None)
}

/// For a refused request: the microseconds from `elapsed` into the current window until the
/// first instant the estimate leaves room for one more.
fn retry_after(state: WindowState, elapsed: u64, window: u64, limit: u64) -> u64 {
    let (previous, current, w, limit) = (
        u128::from(state.previous),
        u128::from(state.current),
        u128::from(window),
        u128::from(limit),
    );
    // Within this window, the previous window's weight decays: the earliest elapsed time e
    // with previous × (window − e) ≤ (limit − current − 1) × window.
    if current < limit && previous > 0 {
        let at = w - ((limit - current - 1) * w / previous).min(w);
        if at < w {
            return narrow(at) - elapsed;
        }
    }
    // Otherwise in the next window, where the current count becomes the previous one.
    // With nothing counted now, the next window starts empty: its first instant admits.
    let at = ((limit - 1) * w)
        .checked_div(current)
        .map_or(0, |room| w - room.min(w));
    window - elapsed + narrow(at)
}

fn narrow(value: u128) -> u64 {
    u64::try_from(value).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: u64 = 60_000_000;
    const SECOND: u64 = 1_000_000;

    /// Runs `count` requests at `now`; returns how many were admitted.
    fn burst(state: &mut Option<WindowState>, now: u64, count: u32, limit: u64) -> u32 {
        let mut admitted = 0;
        for _ in 0..count {
            let (verdict, next) = decide(*state, now, MINUTE, limit);
            if let Some(next) = next {
                *state = Some(next);
                admitted += 1;
            }
            assert_eq!(verdict.allowed, next.is_some());
        }
        admitted
    }

    #[test]
    fn a_burst_either_side_of_a_minute_passes_once_when_the_window_is_anchored_at_the_first() {
        let mut state = None;
        let t = 1_000 * MINUTE - SECOND; // hh:mm:59
        assert_eq!(burst(&mut state, t, 100, 100), 100);
        assert_eq!(burst(&mut state, t + 2 * SECOND, 100, 100), 0);
    }

    #[test]
    fn a_burst_straddling_the_keys_own_boundary_passes_about_the_limit() {
        let mut state = None;
        let anchor = 1_000 * MINUTE;
        assert_eq!(burst(&mut state, anchor, 1, 100), 1);
        assert_eq!(burst(&mut state, anchor + 59 * SECOND, 100, 100), 99);
        // One second into the next window the previous 100 weigh 100 × 59/60 = 98.3.
        assert_eq!(burst(&mut state, anchor + 61 * SECOND, 100, 100), 1);
    }

    #[test]
    fn retry_after_is_the_first_instant_that_admits() {
        let cases = [
            (vec![(0, 10)], 10, 30),         // next window, once 1 of the 10 has decayed
            (vec![(0, 7), (70, 4)], 10, 75), // later in this window
            (vec![(0, 1)], 1, 30),           // two windows on
        ];
        for (setup, limit, at) in cases {
            let mut state = None;
            let base = 5_000 * MINUTE;
            for (at, count) in setup {
                burst(&mut state, base + at * SECOND, count, limit);
            }
            let now = base + at * SECOND;
            let (verdict, _) = decide(state, now, MINUTE, limit);
            let wait = verdict.retry_after.expect("refused");
            assert!(!decide(state, now + wait - 1, MINUTE, limit).0.allowed);
            assert!(decide(state, now + wait, MINUTE, limit).0.allowed);
            assert!(verdict.reset >= wait);
        }
    }

    #[test]
    fn remaining_counts_what_would_still_pass_now() {
        let mut state = None;
        let (verdict, next) = decide(state, 0, MINUTE, 5);
        assert_eq!(verdict.remaining, 4);
        state = next;
        for _ in 0..4 {
            state = decide(state, 0, MINUTE, 5).1.or(state);
        }
        let (verdict, _) = decide(state, 30 * SECOND, MINUTE, 5);
        assert!(!verdict.allowed);
        assert_eq!(verdict.remaining, 0);
        // Halfway into the next window, half of the previous five still weigh: 2.5 → 2 left
        // after this one.
        let (verdict, _) = decide(state, 90 * SECOND, MINUTE, 5);
        assert!(verdict.allowed);
        assert_eq!(verdict.remaining, 1);
        assert_eq!(verdict.reset, 30 * SECOND);
    }

    #[test]
    fn a_clock_behind_the_anchor_counts_at_the_anchor() {
        let (_, state) = decide(None, 10 * SECOND, MINUTE, 2);
        let (verdict, next) = decide(state, 9 * SECOND, MINUTE, 2);
        assert!(verdict.allowed);
        assert_eq!(next.map(|s| (s.start, s.current)), Some((10 * SECOND, 2)));
    }

    #[test]
    fn after_two_quiet_windows_the_key_starts_afresh() {
        let (_, state) = decide(None, 0, MINUTE, 1);
        let (verdict, next) = decide(state, 2 * MINUTE + 1, MINUTE, 1);
        assert!(verdict.allowed);
        assert_eq!(
            next.map(|s| (s.start, s.previous)),
            Some((2 * MINUTE + 1, 0))
        );
    }
}
