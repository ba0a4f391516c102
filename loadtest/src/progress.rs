//! Progress of a long phase on the terminal: its name, the seconds gone and the expected
//! length, refreshed in place on a terminal and every ten seconds in a log. It runs on a
//! thread of its own, so it never waits behind the load on the runtime, and costs one
//! wake-up a second.

use std::{
    io::{IsTerminal, Write},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

/// Shows a phase's progress until dropped.
pub struct Progress {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Progress {
    /// Starts showing `label` with its `expected` length (`at_most`, when the phase may run
    /// longer, e.g. until the host is quiet).
    pub fn start(label: impl Into<String>, expected: Duration, at_most: Option<Duration>) -> Self {
        let label = label.into();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("progress".into())
                .spawn(move || show(&label, expected, at_most, &stop))
                .ok()
        };
        Self { stop, thread }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn show(label: &str, expected: Duration, at_most: Option<Duration>, stop: &AtomicBool) {
    let terminal = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut last_logged = 0;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        let gone = started.elapsed().as_secs();
        let line = line(label, gone, expected, at_most);
        if terminal {
            eprint!("\r{line}\x1b[K");
        } else if gone >= last_logged + 10 {
            last_logged = gone;
            eprintln!("{line}");
        }
    }
    let gone = started.elapsed().as_secs_f64();
    if terminal {
        eprint!("\r\x1b[K");
    }
    eprintln!("  {label}: done in {gone:.0} s");
    let _ = std::io::stderr().flush();
}

/// `  label [#####.....] 12/30 s (up to 120 s)`.
fn line(label: &str, gone: u64, expected: Duration, at_most: Option<Duration>) -> String {
    const WIDTH: u64 = 20;
    let expected_s = expected.as_secs().max(1);
    let filled = (gone.min(expected_s) * WIDTH / expected_s) as usize;
    let bar = format!(
        "{}{}",
        "#".repeat(filled),
        ".".repeat(WIDTH as usize - filled)
    );
    let limit = at_most.map_or(String::new(), |d| format!(" (up to {} s)", d.as_secs()));
    format!("  {label} [{bar}] {gone}/{expected_s} s{limit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_the_expected_length_and_stays_full_past_it() {
        let expected = Duration::from_secs(20);
        assert_eq!(
            line("paced", 0, expected, None),
            "  paced [....................] 0/20 s"
        );
        assert!(line("paced", 10, expected, None).contains("[##########..........] 10/20 s"));
        let late = line("paced", 45, expected, Some(Duration::from_secs(120)));
        assert!(
            late.contains("[####################] 45/20 s (up to 120 s)"),
            "{late}"
        );
    }
}
