//! RFC 9457 `application/problem+json`, the one error shape every service answers with.
//!
//! A [`Problem`] carries only what the client may see; services log the internal cause of a
//! 5xx before turning it into one. The `request_id` member is filled from the request
//! context (see [`crate::request_id`]), so a client can quote it in a bug report.

use axum::{
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use serde_json::{Map, Value};

/// The media type of every error body.
pub const CONTENT_TYPE: &str = "application/problem+json";

/// A problem detail. Build with [`Problem::new`] and the `with_*` methods.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// The kind of problem, e.g. `invalid-field`, sent as the URN `urn:problem:invalid-field`
    /// in the `type` member; each kind is documented in `docs/api/`.
    #[serde(rename = "type", serialize_with = "serialize_kind")]
    pub kind: &'static str,
    /// A short summary that is the same for every occurrence of this kind.
    pub title: &'static str,
    /// The HTTP status, repeated in the body for clients that lose the header.
    #[serde(serialize_with = "serialize_status")]
    pub status: StatusCode,
    /// What went wrong this time, in words a client developer can act on.
    pub detail: String,
    /// The one input field at fault, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The id of the request, echoed from `X-Request-Id` or generated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<Box<str>>,
    /// Extension members, flattened into the body (e.g. a batch's per-event `errors`).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Box<Map<String, Value>>>,
    /// Seconds after which a retry may succeed; sent as the `Retry-After` header.
    #[serde(skip)]
    pub retry_after_secs: Option<u32>,
}

fn serialize_kind<S: serde::Serializer>(kind: &&'static str, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("urn:problem:{kind}"))
}

fn serialize_status<S: serde::Serializer>(status: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u16(status.as_u16())
}

impl Problem {
    /// A problem of kind `urn:problem:{slug}`.
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            title,
            status,
            detail: detail.into(),
            field: None,
            request_id: crate::request_id::current().map(String::into_boxed_str),
            extensions: None,
            retry_after_secs: None,
        }
    }

    /// Names the input field at fault.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Adds an extension member.
    pub fn with_extension(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.extensions
            .get_or_insert_default()
            .insert(name.to_owned(), value.into());
        self
    }

    /// Asks the client to wait this long before retrying (429 and 503).
    pub fn with_retry_after(mut self, secs: u32) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }

    /// 400: the body or query could not be read at all.
    pub fn malformed(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "malformed-request",
            "Malformed request",
            detail,
        )
    }

    /// 422: the input was read but one field is not acceptable.
    pub fn invalid_field(field: &str, detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-field",
            "Invalid field",
            detail,
        )
        .with_field(field)
    }

    /// 413: the body is larger than this endpoint accepts.
    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload-too-large",
            "Payload too large",
            detail,
        )
    }

    /// 404 for a path no route matches.
    pub fn not_found() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not-found",
            "Not found",
            "no resource at this path",
        )
    }

    /// 503 while the service sheds load or shuts down.
    pub fn unavailable(detail: impl Into<String>, retry_after_secs: u32) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Service unavailable",
            detail,
        )
        .with_retry_after(retry_after_secs)
    }

    /// 500. The caller logs the cause; the client learns only the request id.
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            "the server failed to handle this request; quote the request_id when reporting it",
        )
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self).unwrap_or_else(|_| b"{}".to_vec());
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if let Some(secs) = self.retry_after_secs {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// The fallback handler: unknown paths get a 404 problem instead of an empty body.
pub async fn not_found() -> Problem {
    Problem::not_found()
}

/// The method fallback: a known path with the wrong method gets a 405 problem.
pub async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "this path does not accept that method",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_every_rfc_member_and_the_field() {
        let problem = Problem::invalid_field("value", "value must be a finite number");
        let json = serde_json::to_value(&problem).unwrap();
        assert_eq!(json["type"], "urn:problem:invalid-field");
        assert_eq!(json["title"], "Invalid field");
        assert_eq!(json["status"], 422);
        assert_eq!(json["detail"], "value must be a finite number");
        assert_eq!(json["field"], "value");
        assert!(json.get("request_id").is_none(), "no request context here");
    }

    #[test]
    fn response_carries_media_type_and_retry_after() {
        let response = Problem::unavailable("overloaded", 2).into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "2");
    }
}
