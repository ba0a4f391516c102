//! The WebSocket protocol's frames and close codes (`docs/websocket-protocol.md`).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Close codes the server sends.
pub mod close {
    /// The server is shutting down; reconnect (to another node) with `last_id`.
    pub const GOING_AWAY: u16 = 1001;
    /// The client broke the WebSocket framing rules (unmasked frames, bad opcodes, ...).
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A client frame was larger than the limit (64 KiB by default).
    pub const TOO_BIG: u16 = 1009;
    /// The server failed in a way the client cannot fix; reconnect later.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// The access token expired; get a new one and reconnect with `last_id`.
    pub const TOKEN_EXPIRED: u16 = 4001;
    /// No pong or other frame arrived within the heartbeat timeout.
    pub const HEARTBEAT_TIMEOUT: u16 = 4002;
    /// The client did not read fast enough and its send queue filled; reconnect with `last_id`.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// The client sent frames faster than allowed.
    pub const RATE_LIMITED: u16 = 4029;
    /// This node lost its cross-node feed, so it may have missed notifications; reconnect
    /// with `last_id` to recover them.
    pub const RESYNC: u16 = 4503;

    /// The reason text sent with `code`.
    pub fn reason(code: u16) -> &'static str {
        match code {
            GOING_AWAY => "server shutting down",
            POLICY_VIOLATION => "policy violation",
            TOO_BIG => "frame too large",
            INTERNAL_ERROR => "internal error",
            TOKEN_EXPIRED => "token expired",
            HEARTBEAT_TIMEOUT => "heartbeat timeout",
            SLOW_CONSUMER => "slow consumer",
            RATE_LIMITED => "too many frames",
            RESYNC => "resync required",
            _ => "",
        }
    }

    /// The Prometheus label for `code`.
    pub fn label(code: u16) -> &'static str {
        match code {
            GOING_AWAY => "shutdown",
            POLICY_VIOLATION => "policy_violation",
            TOO_BIG => "too_big",
            INTERNAL_ERROR => "internal_error",
            TOKEN_EXPIRED => "token_expired",
            HEARTBEAT_TIMEOUT => "heartbeat_timeout",
            SLOW_CONSUMER => "slow_consumer",
            RATE_LIMITED => "rate_limited",
            RESYNC => "resync",
            _ => "other",
        }
    }
}

/// A frame from the client.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// An application-level ping (browsers cannot send WebSocket pings); answered by `pong`.
    Ping {
        /// Echoed back in the pong.
        #[serde(default)]
        nonce: Option<String>,
    },
}

/// A control frame from the server (notifications are encoded by [`crate::notification::Frame`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame<'a> {
    /// The first frame of every connection.
    Welcome {
        /// Whom the token authenticated.
        user_id: &'a str,
        /// This connection's id on its node, for support.
        connection_id: u64,
        /// How often the server pings.
        heartbeat_interval_ms: u64,
        /// When the token expires (the connection closes with 4001 then), seconds since the epoch.
        token_expires_at: i64,
    },
    /// After a recovery: every missed notification was sent before this frame.
    Recovered {
        /// How many were sent.
        count: usize,
        /// False when more were missed than one recovery sends; page the rest through history.
        complete: bool,
    },
    /// The answer to a client `ping`.
    Pong {
        /// The ping's nonce.
        #[serde(skip_serializing_if = "Option::is_none")]
        nonce: Option<&'a str>,
    },
    /// A client frame was refused; the connection stays open.
    Error {
        /// `malformed`, `unknown_type`, `binary_unsupported`.
        code: &'a str,
        /// What was wrong.
        detail: &'a str,
    },
}

impl ServerFrame<'_> {
    /// The frame as JSON text.
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }
}

/// Why a client frame was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameError {
    /// The `error` frame's `code`.
    pub code: &'static str,
    /// Its `detail`.
    pub detail: String,
}

/// Parses a client text frame.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    match serde_json::from_str::<ClientFrame>(text) {
        Ok(frame) => Ok(frame),
        Err(error) => {
            // Tell "valid JSON, unknown type" apart from "not what we speak at all".
            let kind = serde_json::from_str::<serde_json::Value>(text)
                .ok()
                .and_then(|v| v.get("type").and_then(|t| t.as_str().map(str::to_owned)));
            match kind {
                Some(kind) if kind != "ping" => Err(FrameError {
                    code: "unknown_type",
                    detail: format!("unknown frame type {:?}", truncate(&kind, 64)),
                }),
                _ => Err(FrameError {
                    code: "malformed",
                    detail: truncate(&error.to_string(), 200).to_owned(),
                }),
            }
        }
    }
}

fn truncate(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Query parameters of `GET /v1/ws`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectParams {
    /// The access token, for browsers that cannot set `Authorization`.
    pub token: Option<String>,
    /// The id of the last notification the client saw; everything after it is replayed.
    pub last_id: Option<Uuid>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_frames_parse_or_say_why_not() {
        assert_eq!(
            parse_client_frame(r#"{"type":"ping","nonce":"7"}"#),
            Ok(ClientFrame::Ping {
                nonce: Some("7".into())
            })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"ping"}"#),
            Ok(ClientFrame::Ping { nonce: None })
        );
        assert_eq!(
            parse_client_frame(r#"{"type":"subscribe"}"#)
                .unwrap_err()
                .code,
            "unknown_type"
        );
        for bad in [
            "",
            "{",
            "[]",
            "null",
            r#"{"type":7}"#,
            r#"{"type":"ping","x":1}"#,
        ] {
            assert_eq!(
                parse_client_frame(bad).unwrap_err().code,
                "malformed",
                "{bad}"
            );
        }
        let long = format!(r#"{{"type":"{}"}}"#, "é".repeat(100));
        assert!(parse_client_frame(&long).unwrap_err().detail.len() < 100);
    }

    #[test]
    fn server_frames_are_tagged_by_type() {
        let text = ServerFrame::Recovered {
            count: 2,
            complete: true,
        }
        .encode();
        assert_eq!(text, r#"{"type":"recovered","count":2,"complete":true}"#);
        assert_eq!(
            ServerFrame::Pong { nonce: None }.encode(),
            r#"{"type":"pong"}"#
        );
    }
}
