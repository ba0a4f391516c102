//! A TCP forwarder between a service and its backend, to cut the backend off mid-test as a
//! network partition would, and to bring it back on the same port.

use tokio::{
    net::{TcpListener, TcpStream},
    task::{JoinHandle, JoinSet},
};

/// Forwards every connection to `127.0.0.1:<port>` on to an upstream address.
pub struct Forwarder {
    /// The port it listens on; give the service this one instead of the backend's.
    pub port: u16,
    task: JoinHandle<()>,
}

impl Forwarder {
    /// Forwards a port the kernel picks to `upstream` (`host:port`).
    pub async fn start(upstream: String) -> Self {
        Self::start_on(0, upstream).await
    }

    /// Forwards `port` (0: one the kernel picks) to `upstream`: after [`Forwarder::cut`],
    /// the same port again, so the service's URL works once more.
    pub async fn start_on(port: u16, upstream: String) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap_or_else(|error| panic!("cannot listen on 127.0.0.1:{port}: {error}"));
        let port = listener.local_addr().expect("local address").port();
        let task = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                while connections.try_join_next().is_some() {}
            }
        });
        Self { port, task }
    }

    /// Closes every connection and the listener (dropping the task drops them all): the
    /// backend is unreachable through this port until a new forwarder listens on it.
    pub async fn cut(mut self) {
        self.task.abort();
        let _ = (&mut self.task).await;
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
