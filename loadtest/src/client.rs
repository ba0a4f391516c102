//! A minimal HTTP/1.1 keep-alive client for load generation.
//!
//! Requests are prepared once as bytes and written as they are; a response is read just far
//! enough to learn its status and skip its body. This keeps the generator's CPU cost low,
//! which matters when it shares two cores with the service it measures.

use anyhow::{Context, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Runs the future `make` builds on a thread of its own, in a current-thread runtime, and
/// returns its output. A client that times requests must not share a runtime with thousands
/// of other tasks: there its wake-ups wait in their queue, and that wait is charged to the
/// service it measures.
pub async fn on_own_thread<T, F>(
    name: &str,
    make: impl FnOnce() -> F + Send + 'static,
) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: Future<Output = anyhow::Result<T>>,
{
    let (done, outcome) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("failed to build a client runtime")
                .and_then(|runtime| runtime.block_on(make()));
            let _ = done.send(result);
        })
        .context("failed to start a client thread")?;
    outcome.await.context("the client thread panicked")?
}

/// Builds a complete request.
pub fn request(method: &str, path: &str, content_type: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = format!(
        "{method} {path} HTTP/1.1\r\nHost: loadtest\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Builds a complete JSON request with one extra header (e.g. an `Idempotency-Key`).
pub fn with_header(method: &str, path: &str, header: (&str, &str), body: &[u8]) -> Vec<u8> {
    let (name, value) = header;
    let mut bytes = format!(
        "{method} {path} HTTP/1.1\r\nHost: loadtest\r\n{name}: {value}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Builds a complete request carrying `Authorization: Bearer <token>`.
pub fn authorized(method: &str, path: &str, token: &str, body: Option<&[u8]>) -> Vec<u8> {
    let body = body.unwrap_or_default();
    let mut bytes = format!(
        "{method} {path} HTTP/1.1\r\nHost: loadtest\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// One keep-alive connection.
pub struct Connection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

impl Connection {
    /// Connects to `address`.
    pub async fn open(address: &str) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(address)
            .await
            .with_context(|| format!("failed to connect to {address}"))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buffer: Vec::with_capacity(16 * 1024),
        })
    }

    /// Sends `request` and returns the response status and body.
    pub async fn send(&mut self, request: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
        self.stream.write_all(request).await?;
        self.buffer.clear();
        let header_end = loop {
            if let Some(end) = find(&self.buffer, b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 8192];
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                bail!("connection closed by the server");
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        };
        let head = std::str::from_utf8(&self.buffer[..header_end])
            .context("response head is not UTF-8")?;
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .context("no status line")?;
        let length = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        while self.buffer.len() < header_end + length {
            let mut chunk = [0u8; 8192];
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                bail!("connection closed mid-body");
            }
            self.buffer.extend_from_slice(&chunk[..read]);
        }
        Ok((
            status,
            self.buffer[header_end..header_end + length].to_vec(),
        ))
    }

    /// A header of the last response [`Connection::send`] read (e.g. a 429's `Retry-After`).
    pub fn header(&self, name: &str) -> Option<&str> {
        let end = find(&self.buffer, b"\r\n\r\n")?;
        let head = std::str::from_utf8(&self.buffer[..end]).ok()?;
        head.lines().skip(1).find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then_some(value.trim())
        })
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
