//! The future that starts a graceful shutdown (SIGTERM, what orchestrators send, or Ctrl-C),
//! the first step every service takes once it fires (leaving the balancers' rotation), and
//! [`Background`], the tasks of a service that stop together at one moment of it.

use std::{
    future::Future,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// Clears `ready` (what `/readyz` reports), then keeps the service serving for `delay`
/// (SHUTDOWN_READINESS_DELAY) so load balancers see `/readyz` fail and stop sending before
/// the listener closes. Await it in the shutdown future, before anything stops.
pub async fn withdraw_readiness(ready: &AtomicBool, delay: Duration) {
    ready.store(false, Ordering::Release);
    if !delay.is_zero() {
        tracing::info!(readiness_delay = ?delay, "shutdown started: not ready, still serving");
        tokio::time::sleep(delay).await;
    }
}

/// Completes on the first SIGTERM or Ctrl-C (SIGINT). Pass it to `run_until_stopped`.
///
/// The handlers are installed when this is called, not when the future is first polled, so
/// a signal that arrives while the service is still starting is not lost to the default
/// action (which would kill the process without draining). Call it inside the runtime.
pub fn signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let terminate = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (terminate, interrupt) {
                (Ok(mut terminate), Ok(mut interrupt)) => tokio::select! {
                    _ = terminate.recv() => tracing::info!("SIGTERM received, shutting down"),
                    _ = interrupt.recv() => tracing::info!("Ctrl-C received, shutting down"),
                },
                (terminate, interrupt) => {
                    let error = terminate.err().or(interrupt.err()).map(|e| e.to_string());
                    tracing::error!(
                        ?error,
                        "cannot listen for SIGTERM/SIGINT; only a kill stops this process"
                    );
                    std::future::pending::<()>().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    async {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::info!("Ctrl-C received, shutting down");
        } else {
            std::future::pending::<()>().await;
        }
    }
}

/// Background tasks that stop at the same moment of a shutdown: a token they watch and a
/// tracker to wait for them. A service keeps one per moment and names it for it (say
/// `with_server` for health checks and listeners that end when serving ends, `after_drain`
/// for writers that must flush what the last requests recorded), so the order of stopping
/// reads as the order of the [`Background::stop`] calls instead of hand-kept tokens.
#[derive(Debug, Clone, Default)]
pub struct Background {
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Background {
    /// No tasks yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `task(stop)` until it ends; `stop` is cancelled by [`Background::stop`], and the
    /// task should return soon after.
    pub fn spawn<F>(&self, task: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(task(self.stop.clone()));
    }

    /// Asks every task to stop, without waiting.
    pub fn cancel(&self) {
        self.stop.cancel();
    }

    /// Asks every task to stop and waits until all have ended, for at most `limit`; false
    /// when some were still running then (they are left to the runtime's end).
    pub async fn stop(&self, limit: Duration) -> bool {
        self.cancel();
        self.tasks.close();
        tokio::time::timeout(limit, self.tasks.wait()).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn stop_cancels_every_task_and_waits_for_each_to_end() {
        let background = Background::new();
        let ended = Arc::new(AtomicUsize::new(0));
        for _ in 0..3 {
            let ended = Arc::clone(&ended);
            background.spawn(|stop| async move {
                stop.cancelled().await;
                // A task may take a moment to wind down (a flush); stop waits for it.
                tokio::time::sleep(Duration::from_millis(50)).await;
                ended.fetch_add(1, Ordering::SeqCst);
            });
        }
        assert!(background.stop(Duration::from_secs(1)).await);
        assert_eq!(ended.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ignores_stop_is_reported_after_the_limit() {
        let background = Background::new();
        background.spawn(|_stop| std::future::pending::<()>());
        assert!(!background.stop(Duration::from_millis(100)).await);
    }
}
