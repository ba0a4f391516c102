//! Waiting for something a test cannot be told about directly (a background task's effect, a
//! metric, a listener closing): ask again until it holds, and fail saying what never came,
//! instead of sleeping a fixed time and hoping the other side was done.

use std::time::Duration;

/// How long to wait between two attempts: short against the waits tests make.
const INTERVAL: Duration = Duration::from_millis(10);

/// Calls `attempt` until it returns `Some`, and returns that; panics naming `what` when
/// `limit` passes first.
pub async fn poll_until<T>(
    what: &str,
    limit: Duration,
    mut attempt: impl AsyncFnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = attempt().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited {limit:?} for {what}, in vain"
        );
        tokio::time::sleep(INTERVAL).await;
    }
}
