//! The check every test of an error response makes: RFC 9457 `application/problem+json`
//! with the expected status, in the header and the body alike (DESIGN.md, "Errors").

use serde_json::Value;

/// Asserts that `response` is a problem+json answer with `status` (and, when given, names
/// `field` as the input at fault); its body, for the test's own checks.
pub async fn problem(response: reqwest::Response, status: u16, field: Option<&str>) -> Value {
    assert_eq!(response.status(), status);
    assert_eq!(
        response.headers()["content-type"],
        "application/problem+json"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], status, "{body}");
    if let Some(field) = field {
        assert_eq!(body["field"], field, "{body}");
    }
    body
}
