//! DDSketch (Masson, Rim, Lee; VLDB 2019): mergeable quantiles with a relative error bound.
//!
//! A value `v > 0` lands in bin `ceil(ln v / ln γ)` with `γ = (1 + α) / (1 − α)`; every value
//! in a bin is within relative error `α` of the bin's representative `2γ^i / (γ + 1)`. So a
//! quantile read from the sketch is within `α` (1 %) of the true value at that rank, for any
//! distribution, and two sketches merge by adding bins, which is what lets per-minute
//! sketches combine into any window.
//!
//! Bins are a dense `Vec` spanning the lowest to the highest bin seen, capped at
//! [`MAX_BINS`] per sign: past the cap the lowest bins collapse into one, so memory is
//! bounded whatever the input (1,024 bins at 1 % cover a 10⁸·⁹ ratio of magnitudes, e.g.
//! 1 µs to 13 min). Values with `|v| < 1e-9` count as zero.

/// The relative error bound of every quantile.
pub const RELATIVE_ACCURACY: f64 = 0.01;
/// The most bins one sign's store keeps (4 KiB at 4 bytes a bin).
pub const MAX_BINS: usize = 1024;
/// Magnitudes below this count as zero.
pub const MIN_INDEXABLE: f64 = 1e-9;

const GAMMA: f64 = (1.0 + RELATIVE_ACCURACY) / (1.0 - RELATIVE_ACCURACY);
/// Bins grow in steps of this many, to avoid one reallocation per new bin.
const GROWTH_STEP: usize = 32;

fn multiplier() -> f64 {
    1.0 / GAMMA.ln()
}

/// A bin counter: `u32` in the per-minute sketches (half the memory), `u64` when merging a
/// window, so sums over many minutes cannot overflow.
pub trait Count: Copy + Default + Into<u64> + 'static {
    /// Adds `n`, saturating rather than wrapping.
    fn add_count(&mut self, n: u64);
}

impl Count for u32 {
    #[inline]
    fn add_count(&mut self, n: u64) {
        *self = u32::try_from(u64::from(*self).saturating_add(n)).unwrap_or(u32::MAX);
    }
}

impl Count for u64 {
    #[inline]
    fn add_count(&mut self, n: u64) {
        *self = self.saturating_add(n);
    }
}

/// Bins of one sign, dense between `offset` and `offset + bins.len() - 1`.
#[derive(Clone, Debug, Default)]
struct Store<C> {
    offset: i32,
    bins: Vec<C>,
}

impl<C: Count> Store<C> {
    fn is_empty(&self) -> bool {
        self.bins.is_empty()
    }

    /// Makes room for `index` and returns the bin position it maps to (collapsed indexes
    /// map to the lowest bin).
    fn position(&mut self, index: i32) -> usize {
        if self.bins.is_empty() {
            self.offset = index;
            self.reserve_bins(1);
            self.bins.push(C::default());
            return 0;
        }
        let len = self.bins.len() as i32;
        if index < self.offset {
            let highest = self.offset + len - 1;
            let new_offset = index.max(highest - MAX_BINS as i32 + 1);
            if new_offset < self.offset {
                let grow = (self.offset - new_offset) as usize;
                self.reserve_bins(self.bins.len() + grow);
                self.bins
                    .splice(0..0, std::iter::repeat_n(C::default(), grow));
                self.offset = new_offset;
            }
            return (index.max(self.offset) - self.offset) as usize;
        }
        if index >= self.offset + len {
            let wanted = (index - self.offset + 1) as usize;
            if wanted > MAX_BINS {
                self.collapse_below(index - MAX_BINS as i32 + 1);
            }
            let wanted = (index - self.offset + 1) as usize;
            self.reserve_bins(wanted);
            self.bins.resize(wanted, C::default());
        }
        (index - self.offset) as usize
    }

    /// Makes room for `len` bins, growing in steps of [`GROWTH_STEP`] and never past
    /// [`MAX_BINS`]: `Vec`'s own growth (in `resize` or `splice`) doubles, which could take the
    /// capacity past the cap.
    fn reserve_bins(&mut self, len: usize) {
        if len > self.bins.capacity() {
            let target = len.next_multiple_of(GROWTH_STEP).min(MAX_BINS).max(len);
            self.bins.reserve_exact(target - self.bins.len());
        }
    }

    /// Folds every bin below `new_offset` into the bin at `new_offset`.
    fn collapse_below(&mut self, new_offset: i32) {
        let shift = (new_offset - self.offset) as usize;
        let mut collapsed: u64 = 0;
        for c in self.bins.iter().take(shift) {
            collapsed = collapsed.saturating_add((*c).into());
        }
        if shift >= self.bins.len() {
            self.bins.clear();
            self.bins.push(C::default());
        } else {
            self.bins.drain(..shift);
        }
        self.offset = new_offset;
        self.bins[0].add_count(collapsed);
    }

    #[inline]
    fn add(&mut self, index: i32) {
        let position = self.position(index);
        self.bins[position].add_count(1);
    }

    fn total(&self) -> u64 {
        self.bins.iter().map(|&c| c.into()).sum()
    }

    fn clear(&mut self) {
        self.bins.clear();
    }

    fn release(&mut self) {
        self.bins = Vec::new();
    }

    fn heap_bytes(&self) -> usize {
        self.bins.capacity() * std::mem::size_of::<C>()
    }
}

impl Store<u64> {
    /// Adds every bin of `other` into this store.
    fn merge<D: Count>(&mut self, other: &Store<D>) {
        if other.is_empty() {
            return;
        }
        // Make room for both ends; the high end first, so a collapse keeps the top.
        self.position(other.offset + other.bins.len() as i32 - 1);
        self.position(other.offset);
        // Bins of `other` below our lowest (collapsed) bin fold into it.
        let skipped = ((self.offset - other.offset).max(0) as usize).min(other.bins.len());
        let folded: u64 = other.bins[..skipped].iter().map(|&c| c.into()).sum();
        self.bins[0] += folded;
        if skipped < other.bins.len() {
            let start = (other.offset + skipped as i32 - self.offset) as usize;
            for (slot, &count) in self.bins[start..].iter_mut().zip(&other.bins[skipped..]) {
                *slot += count.into();
            }
        }
    }
}

/// A quantile sketch with counter type `C`; see the module docs.
#[derive(Clone, Debug, Default)]
pub struct DdSketch<C: Count> {
    positive: Store<C>,
    negative: Store<C>,
    zero: u64,
}

/// The sketch kept per event type and minute.
pub type MinuteSketch = DdSketch<u32>;
/// The sketch a query merges minutes into.
pub type WindowSketch = DdSketch<u64>;

impl<C: Count> DdSketch<C> {
    /// Records one value. Non-finite values are the caller's to refuse; here they are ignored.
    #[inline]
    pub fn add(&mut self, value: f64) {
        if !value.is_finite() {
            return;
        }
        let magnitude = value.abs();
        if magnitude < MIN_INDEXABLE {
            self.zero += 1;
            return;
        }
        let index = (magnitude.ln() * multiplier()).ceil() as i32;
        if value > 0.0 {
            self.positive.add(index);
        } else {
            self.negative.add(index);
        }
    }

    /// How many values were recorded.
    pub fn count(&self) -> u64 {
        self.positive.total() + self.negative.total() + self.zero
    }

    /// Forgets every value but keeps the allocation, for reusing a ring slot.
    pub fn clear(&mut self) {
        self.positive.clear();
        self.negative.clear();
        self.zero = 0;
    }

    /// Forgets every value and frees the bins.
    pub fn release(&mut self) {
        self.positive.release();
        self.negative.release();
        self.zero = 0;
    }

    /// Heap memory held, for the memory accounting in the README.
    pub fn heap_bytes(&self) -> usize {
        self.positive.heap_bytes() + self.negative.heap_bytes()
    }
}

impl WindowSketch {
    /// Adds `other` (e.g. one minute) into this window.
    pub fn merge<D: Count>(&mut self, other: &DdSketch<D>) {
        self.positive.merge(&other.positive);
        self.negative.merge(&other.negative);
        self.zero += other.zero;
    }

    /// The value at quantile `q` (0 ≤ q ≤ 1), within [`RELATIVE_ACCURACY`] of the recorded
    /// value of rank `floor(q · (n − 1))`; `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 || !(0.0..=1.0).contains(&q) {
            return None;
        }
        let rank = (q * (total - 1) as f64).floor() as u64;
        let mut seen = 0u64;
        // Most negative first: the negative store's highest index is the largest magnitude.
        for (position, &count) in self.negative.bins.iter().enumerate().rev() {
            seen += count;
            if seen > rank {
                return Some(-representative(self.negative.offset + position as i32));
            }
        }
        seen += self.zero;
        if seen > rank {
            return Some(0.0);
        }
        for (position, &count) in self.positive.bins.iter().enumerate() {
            seen += count;
            if seen > rank {
                return Some(representative(self.positive.offset + position as i32));
            }
        }
        None
    }
}

/// The value every member of bin `index` is within the relative accuracy of.
fn representative(index: i32) -> f64 {
    2.0 * GAMMA.powi(index) / (GAMMA + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator, so the tests need no dependency and never flake.
    struct SplitMix(u64);
    impl SplitMix {
        fn next_f64(&mut self) -> f64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        }
    }

    fn assert_within_bound(values: &mut [f64], sketch: &WindowSketch) {
        values.sort_by(f64::total_cmp);
        for q in [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0] {
            let exact = values[(q * (values.len() - 1) as f64).floor() as usize];
            let estimate = sketch.quantile(q).unwrap();
            let error = if exact == 0.0 {
                estimate.abs()
            } else {
                ((estimate - exact) / exact).abs()
            };
            assert!(
                error <= RELATIVE_ACCURACY + 1e-12,
                "q={q}: exact {exact}, estimate {estimate}, relative error {error}"
            );
        }
    }

    #[test]
    fn quantiles_of_a_heavy_tailed_distribution_are_within_one_percent() {
        let mut rng = SplitMix(7);
        let mut minutes = vec![MinuteSketch::default(); 10];
        let mut values = Vec::new();
        for i in 0..100_000 {
            // Log-uniform over six decades: the kind of spread latencies have.
            let value = 10f64.powf(rng.next_f64() * 6.0 - 3.0);
            minutes[i % 10].add(value);
            values.push(value);
        }
        let mut window = WindowSketch::default();
        for minute in &minutes {
            window.merge(minute);
        }
        assert_eq!(window.count(), 100_000);
        assert_within_bound(&mut values, &window);
    }

    #[test]
    fn negative_zero_and_positive_values_keep_their_order() {
        let mut rng = SplitMix(11);
        let mut sketch = WindowSketch::default();
        let mut values = Vec::new();
        for i in 0..20_000 {
            let value = match i % 5 {
                0 => 0.0,
                1 | 2 => -(rng.next_f64() * 1000.0 + 0.5),
                _ => rng.next_f64() * 50.0 + 1.0,
            };
            sketch.add(value);
            values.push(value);
        }
        assert_within_bound(&mut values, &sketch);
    }

    #[test]
    fn memory_stays_bounded_whatever_the_spread() {
        let mut sketch = MinuteSketch::default();
        for exponent in -9..=300 {
            sketch.add(10f64.powi(exponent));
            sketch.add(1.5 * 10f64.powi(exponent));
        }
        assert!(sketch.positive.bins.len() <= MAX_BINS);
        assert!(sketch.heap_bytes() <= MAX_BINS * 4);
        assert_eq!(sketch.count(), 2 * 310, "collapsing keeps every count");
        let mut window = WindowSketch::default();
        window.merge(&sketch);
        let top = window.quantile(1.0).unwrap();
        assert!(
            ((top - 1.5e300) / 1.5e300).abs() <= RELATIVE_ACCURACY,
            "the top is never collapsed: {top}"
        );
    }

    #[test]
    fn growing_downwards_never_reserves_past_the_cap() {
        // 992 ascending bins, then a value 32 bins lower (the case that used to double).
        let mut sketch = MinuteSketch::default();
        for i in 0..992 {
            sketch.add(GAMMA.powi(i));
        }
        sketch.add(GAMMA.powi(-32));
        assert!(
            sketch.heap_bytes() <= MAX_BINS * 4,
            "{} bytes",
            sketch.heap_bytes()
        );
        for i in 0..3000 {
            sketch.add(GAMMA.powi(-i));
        }
        assert!(
            sketch.heap_bytes() <= MAX_BINS * 4,
            "{} bytes",
            sketch.heap_bytes()
        );
    }

    #[test]
    fn merging_windows_that_collapsed_differently_keeps_every_count() {
        let mut low = MinuteSketch::default();
        let mut high = MinuteSketch::default();
        for i in 0..1000 {
            low.add(1e-6 * (1.0 + f64::from(i)));
            high.add(1e12 * (1.0 + f64::from(i)));
        }
        let mut window = WindowSketch::default();
        window.merge(&low);
        window.merge(&high);
        window.merge(&low);
        assert_eq!(window.count(), 3000);
        assert!(window.positive.bins.len() <= MAX_BINS);
    }

    #[test]
    fn empty_sketch_has_no_quantile_and_out_of_range_q_is_refused() {
        let sketch = WindowSketch::default();
        assert_eq!(sketch.quantile(0.5), None);
        let mut one = WindowSketch::default();
        one.add(42.0);
        assert_eq!(one.quantile(1.5), None);
        assert!((one.quantile(0.5).unwrap() - 42.0).abs() / 42.0 <= RELATIVE_ACCURACY);
    }
}
