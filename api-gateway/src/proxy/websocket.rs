//! WebSocket tunnels: once the upstream has answered an upgrade with 101, the client's
//! connection and the upstream's are spliced byte for byte until either side closes or the
//! gateway shuts down. Frames are not parsed: the notifier speaks WebSocket, the gateway only
//! authenticates the upgrade request.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

/// The live tunnels: a gauge of them and the signal that closes them all.
pub(super) struct Tunnels {
    open: Gauge,
    stop: CancellationToken,
}

impl Tunnels {
    pub(super) fn new(open: Gauge) -> Self {
        Self {
            open,
            stop: CancellationToken::new(),
        }
    }

    /// Closes every tunnel, and any opened from now on (the gateway is shutting down).
    pub(super) fn close_all(&self) {
        self.stop.cancel();
    }

    /// Splices `client` and `upstream` once both upgrades complete, in a task of its own.
    pub(super) fn spawn(&self, upstream_name: &str, client: OnUpgrade, upstream: OnUpgrade) {
        let open = self.open.clone();
        let stop = self.stop.clone();
        let upstream_name = upstream_name.to_owned();
        tokio::spawn(async move {
            open.inc();
            let _open = scopeguard(move || {
                open.dec();
            });
            let upgraded = tokio::select! {
                () = stop.cancelled() => return,
                upgraded = async { tokio::try_join!(client, upstream) } => upgraded,
            };
            let (client, upstream) = match upgraded {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::debug!(%error, upstream = %upstream_name, "WebSocket upgrade did not complete");
                    return;
                }
            };
            let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
            tokio::select! {
                () = stop.cancelled() => {
                    tracing::debug!(upstream = %upstream_name, "closing WebSocket tunnel for shutdown");
                }
                copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {
                    if let Err(error) = copied {
                        tracing::debug!(%error, upstream = %upstream_name, "WebSocket tunnel ended with an error");
                    }
                }
            }
        });
    }
}

/// Runs `f` when dropped, so the gauge is decremented on every way out of the task.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
