//! The id of each request: made or taken from the client at the edge, carried in a task-local
//! so that log lines, problem+json bodies, audit rows and proxied requests all name it without
//! passing it along by hand. Its own module, so that [`crate::http`] (which sets it) and
//! [`crate::problem`] (which reports it) both depend on it and not on each other.

use axum::http::HeaderName;

/// The request id header, read from clients and set on every response.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

tokio::task_local! {
    static REQUEST_ID: String;
}

/// The current request's id, or `None` outside a request (tests, background tasks).
pub fn current() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// Runs `fut` with `id` as the current request id.
///
/// A plain function returning the scoped future, not an `async fn`: an `async fn` keeps
/// its future argument in its own state beside the copy it awaits, which doubled the
/// size of every request's future (and the bytes copied to move it).
pub fn scope<F: std::future::Future>(
    id: String,
    fut: F,
) -> tokio::task::futures::TaskLocalFuture<String, F> {
    REQUEST_ID.scope(id, fut)
}

/// A new request id: a UUIDv7 (time-ordered, so logs sort by it), hyphenated without the
/// formatting machinery `to_string` goes through.
pub fn new() -> String {
    let mut buffer = uuid::Uuid::encode_buffer();
    uuid::Uuid::now_v7()
        .hyphenated()
        .encode_lower(&mut buffer)
        .to_owned()
}

/// Keeps a client's id when it is short printable ASCII, so it is safe in logs and headers.
pub fn accept_client_id(value: &str) -> bool {
    (1..=128).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_request_ids_are_kept_only_when_safe() {
        assert!(accept_client_id("abc-123"));
        assert!(!accept_client_id(""));
        assert!(!accept_client_id("has space"));
        assert!(!accept_client_id("line\nbreak"));
        assert!(!accept_client_id(&"x".repeat(129)));
    }
}
