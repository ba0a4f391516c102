//! WebSocket tunnels: once the upstream has answered an upgrade with 101, the client's
//! connection and the upstream's are spliced byte for byte until either side closes or the
//! gateway shuts down. Frames are not parsed: the notifier speaks WebSocket, the gateway only
//! authenticates the upgrade request.
//!
//! When one side closes, its end is passed on (the other side's write half is shut down) and
//! the other direction gets [`LINGER`] to finish, time for the close handshake's last frame;
//! then the tunnel ends. Waiting for both sides instead let a client that never closed hold
//! a task and two sockets until the gateway stopped, after the upstream had long gone.

use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// How long the other direction may go on once one side of a tunnel has closed.
pub(super) const LINGER: Duration = Duration::from_secs(2);

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
            tokio::select! {
                () = stop.cancelled() => {
                    tracing::debug!(upstream = %upstream_name, "closing WebSocket tunnel for shutdown");
                }
                copied = splice(TokioIo::new(client), TokioIo::new(upstream)) => {
                    if let Err(error) = copied {
                        tracing::debug!(%error, upstream = %upstream_name, "WebSocket tunnel ended with an error");
                    }
                }
            }
        });
    }
}

/// Copies both ways until one side closes, passes the close on, and gives the other
/// direction [`LINGER`] to end too.
async fn splice<C, U>(client: C, upstream: U) -> std::io::Result<()>
where
    C: AsyncRead + AsyncWrite,
    U: AsyncRead + AsyncWrite,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let to_upstream = async {
        let copied = tokio::io::copy(&mut client_read, &mut upstream_write).await;
        let _ = upstream_write.shutdown().await;
        copied.map(drop)
    };
    let to_client = async {
        let copied = tokio::io::copy(&mut upstream_read, &mut client_write).await;
        let _ = client_write.shutdown().await;
        copied.map(drop)
    };
    tokio::pin!(to_upstream, to_client);
    let (first, rest) = tokio::select! {
        ended = &mut to_upstream => (ended, tokio::time::timeout(LINGER, to_client).await),
        ended = &mut to_client => (ended, tokio::time::timeout(LINGER, to_upstream).await),
    };
    // A direction still open after the linger is simply dropped with the tunnel.
    first.and(rest.unwrap_or(Ok(())))
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
