//! The future that starts a graceful shutdown (SIGTERM, what orchestrators send, or Ctrl-C),
//! and the first step every service takes once it fires: leaving the balancers' rotation.

use std::{
    future::Future,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

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
