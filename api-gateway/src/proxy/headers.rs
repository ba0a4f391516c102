//! Header rewriting between client and upstream: what an upstream may trust (identity set by
//! the gateway alone), what belongs to one connection only (hop-by-hop), and what follows a
//! request across services (request id, `traceparent`, `X-Forwarded-*`).

use std::{fmt::Write as _, net::IpAddr};

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};

/// The authenticated subject, set by the gateway only.
pub static X_USER_ID: HeaderName = HeaderName::from_static("x-user-id");
/// The subject's roles, comma-joined, set by the gateway only.
pub static X_USER_ROLES: HeaderName = HeaderName::from_static("x-user-roles");
/// A client's API key: the gateway's business, never an upstream's.
pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// W3C trace context.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
/// The client addresses a request passed through.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// The scheme the client used.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// The host the client asked for.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");

/// Whether a request asks to become a WebSocket (`Upgrade: websocket` with
/// `Connection: upgrade`, both case-insensitive tokens of comma-separated lists, RFC 9110
/// §7.6.1 and §7.8). The one test of the gateway: what it proxies as a tunnel is what may
/// carry its access token as `?token=`.
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let upgrade = headers
        .get_all(header::UPGRADE)
        .iter()
        .any(|v| contains_token(v, "websocket"));
    upgrade
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| contains_token(v, "upgrade"))
}

fn contains_token(value: &HeaderValue, token: &str) -> bool {
    value.to_str().is_ok_and(|v| {
        v.split(',')
            .any(|part| part.trim().eq_ignore_ascii_case(token))
    })
}

/// Removes the headers that describe one connection (RFC 9110 §7.6.1): `Connection` and every
/// header it names, `Keep-Alive`, `Proxy-Authenticate`, `Proxy-Authorization`, `TE`,
/// `Trailer`, `Transfer-Encoding` and `Upgrade`. For a WebSocket upgrade, `Upgrade` and
/// `Connection: upgrade` are kept, since the upgrade is what is being proxied.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Headers named by Connection are removed first.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            // The usual tokens name no other header: skipping them keeps the common
            // `Connection: keep-alive` from allocating.
            .filter(|name| {
                !name.eq_ignore_ascii_case("keep-alive") && !name.eq_ignore_ascii_case("close")
            })
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in named {
            if keep_upgrade && name == header::UPGRADE {
                continue;
            }
            headers.remove(&name);
        }
        headers.remove(header::CONNECTION);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(header::PROXY_AUTHENTICATE);
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove(header::TE);
    headers.remove(header::TRAILER);
    headers.remove(header::TRANSFER_ENCODING);
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Replaces whatever identity a client claimed with the one the gateway established.
/// Fails only when the subject cannot be a header value (control characters).
pub fn set_identity(headers: &mut HeaderMap, subject: &str, roles: &[String]) -> Result<(), ()> {
    headers.remove(&X_USER_ID);
    headers.remove(&X_USER_ROLES);
    headers.remove(&X_API_KEY);
    let subject = HeaderValue::from_str(subject).map_err(|_| ())?;
    let roles = HeaderValue::from_str(&roles.join(",")).map_err(|_| ())?;
    headers.insert(X_USER_ID.clone(), subject);
    headers.insert(X_USER_ROLES.clone(), roles);
    Ok(())
}

/// Sets `X-Request-Id`: the current request's id (from the gateway's request context), else a
/// safe id the client sent, else a new UUIDv7.
pub fn set_request_id(headers: &mut HeaderMap) {
    let id = common::request_id::current()
        .and_then(|id| HeaderValue::try_from(id).ok())
        .or_else(|| {
            headers
                .get(&common::request_id::X_REQUEST_ID)
                .filter(|v| v.to_str().is_ok_and(common::request_id::accept_client_id))
                .cloned()
        })
        .unwrap_or_else(|| {
            HeaderValue::try_from(common::request_id::new())
                .expect("a UUID is a valid header value")
        });
    headers.insert(common::request_id::X_REQUEST_ID.clone(), id);
}

/// Sets `traceparent`: a valid incoming one keeps its trace id and flags and gets a new parent
/// id (the gateway's own span); anything else is replaced by a new trace.
pub fn set_traceparent(headers: &mut HeaderMap) {
    let incoming = headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent);
    let (trace_id, flags) = match incoming {
        Some((trace_id, flags)) => (trace_id, flags),
        // W3C Trace Context asks for random trace ids: 122 random bits of a UUIDv4, drawn
        // from a thread-local generator (a UUIDv7 takes the clock and a shared counter).
        None => (uuid::Uuid::new_v4().as_u128(), 0x01),
    };
    let value = format_traceparent(trace_id, new_span_id(), flags);
    headers.insert(
        TRACEPARENT.clone(),
        HeaderValue::try_from(value).expect("hex is a valid header value"),
    );
}

/// The trace id and flags of a valid version-00 `traceparent` (W3C Trace Context §3.2).
pub fn parse_traceparent(value: &str) -> Option<(u128, u8)> {
    let value = value.trim();
    let mut parts = value.split('-');
    let version = parts.next()?;
    let trace_id = parts.next()?;
    let parent_id = parts.next()?;
    let flags = parts.next()?;
    let lower_hex = |s: &str, len: usize| {
        s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let well_formed = lower_hex(version, 2)
        && lower_hex(trace_id, 32)
        && lower_hex(parent_id, 16)
        && lower_hex(flags, 2);
    if !well_formed
        || version == "ff"
        // Version 00 has exactly four fields; later versions may append more.
        || (version == "00" && parts.next().is_some())
    {
        return None;
    }
    let trace_id = u128::from_str_radix(trace_id, 16).ok()?;
    let parent_id = u64::from_str_radix(parent_id, 16).ok()?;
    if trace_id == 0 || parent_id == 0 {
        return None;
    }
    Some((trace_id, u8::from_str_radix(flags, 16).ok()?))
}

/// `00-{trace id}-{parent id}-{flags}` in lower-case hex (written by hand: this runs on
/// every proxied request, and `format!` with three padded hex fields costs several times as
/// much).
pub fn format_traceparent(trace_id: u128, parent_id: u64, flags: u8) -> String {
    fn hex(out: &mut Vec<u8>, value: u128, digits: u32) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for shift in (0..digits).rev() {
            out.push(HEX[((value >> (shift * 4)) & 0xf) as usize]);
        }
    }
    let mut value = Vec::with_capacity(55);
    value.extend_from_slice(b"00-");
    hex(&mut value, trace_id, 32);
    value.push(b'-');
    hex(&mut value, u128::from(parent_id), 16);
    value.push(b'-');
    hex(&mut value, u128::from(flags), 2);
    String::from_utf8(value).expect("hex digits are ASCII")
}

/// A new, non-zero 64-bit span id: the two halves of a random UUIDv4 folded together (the
/// high half holds its four version bits, the low half its two variant bits, in different
/// places, so every bit of the fold is random).
fn new_span_id() -> u64 {
    let random = uuid::Uuid::new_v4().as_u128();
    let id = (random as u64) ^ ((random >> 64) as u64);
    if id == 0 { 1 } else { id }
}

/// Appends the client's address to `X-Forwarded-For` (keeping what earlier proxies wrote),
/// records the original `Host` in `X-Forwarded-Host`, and sets `X-Forwarded-Proto`.
pub fn set_forwarded(headers: &mut HeaderMap, client: Option<IpAddr>, scheme: &'static str) {
    if let Some(ip) = client {
        let mut value = String::with_capacity(64);
        for earlier in headers.get_all(&X_FORWARDED_FOR) {
            if let Ok(earlier) = earlier.to_str() {
                value.push_str(earlier.trim());
                value.push_str(", ");
            }
        }
        push_ip(&mut value, ip);
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(X_FORWARDED_FOR.clone(), value);
        }
    }
    headers.remove(&X_FORWARDED_HOST);
    if let Some(host) = headers.remove(header::HOST) {
        headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    // The gateway listens on plain HTTP; TLS, when there is any, ends in front of it, and a
    // trusted proxy there says so (see `client_ip::TrustedProxies::scheme`).
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(scheme));
}

/// Writes `ip` as `Display` would; IPv4 by hand, since `Display` goes through the formatting
/// machinery with padding support, which cost ~1K instructions on every proxied request
/// (callgrind, `scripts/gateway-instructions`).
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(digits.format(octet));
            }
        }
        IpAddr::V6(_) => {
            let _ = write!(out, "{ip}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "10.20.3.199",
            "::1",
            "2001:db8::5",
            "::ffff:10.0.0.1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut written = String::new();
            push_ip(&mut written, ip);
            assert_eq!(written, ip.to_string());
        }
    }

    #[test]
    fn generated_span_ids_are_non_zero_and_differ() {
        let ids: std::collections::HashSet<u64> = (0..1_000).map(|_| new_span_id()).collect();
        assert_eq!(ids.len(), 1_000);
        assert!(!ids.contains(&0));
    }

    #[test]
    fn connection_named_headers_and_fixed_hop_by_hop_headers_go() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, X-Secret".parse().unwrap());
        headers.insert("x-secret", "1".parse().unwrap());
        headers.insert("keep-alive", "timeout=5".parse().unwrap());
        headers.insert(header::TE, "trailers".parse().unwrap());
        headers.insert(header::UPGRADE, "h2c".parse().unwrap());
        headers.insert(header::PROXY_AUTHORIZATION, "Basic x".parse().unwrap());
        headers.insert(header::AUTHORIZATION, "Bearer t".parse().unwrap());
        strip_hop_by_hop(&mut headers, false);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert_eq!(headers[header::AUTHORIZATION], "Bearer t");
    }

    fn upgrade_headers(connection: &[&str], upgrade: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for value in connection {
            headers.append(header::CONNECTION, value.parse().unwrap());
        }
        for value in upgrade {
            headers.append(header::UPGRADE, value.parse().unwrap());
        }
        headers
    }

    #[test]
    fn a_websocket_upgrade_is_recognised_whatever_the_case_and_token_order() {
        for (connection, upgrade) in [
            (&["Upgrade"][..], &["websocket"][..]),
            (&["upgrade"], &["WebSocket"]),
            (&["UPGRADE"], &["WEBSOCKET"]),
            (&["keep-alive, Upgrade"], &["websocket"]),
            (&["keep-alive,upgrade"], &["websocket"]),
            (&["keep-alive", "Upgrade"], &["websocket"]),
            (&["Upgrade"], &["h2c, websocket"]),
        ] {
            assert!(
                is_websocket_upgrade(&upgrade_headers(connection, upgrade)),
                "{connection:?} {upgrade:?}"
            );
        }
    }

    #[test]
    fn anything_short_of_both_headers_is_not_a_websocket_upgrade() {
        for (connection, upgrade) in [
            (&[][..], &["websocket"][..]),
            (&["Upgrade"], &[]),
            (&["keep-alive"], &["websocket"]),
            (&["Upgrade"], &["h2c"]),
            (&["Upgraded"], &["websocket"]),
            (&["Upgrade"], &["websocket2"]),
        ] {
            assert!(
                !is_websocket_upgrade(&upgrade_headers(connection, upgrade)),
                "{connection:?} {upgrade:?}"
            );
        }
        let mut not_ascii = upgrade_headers(&["Upgrade"], &[]);
        not_ascii.insert(
            header::UPGRADE,
            HeaderValue::from_bytes(b"websocket\xff").unwrap(),
        );
        assert!(!is_websocket_upgrade(&not_ascii));
    }

    #[test]
    fn a_websocket_upgrade_keeps_its_upgrade_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(is_websocket_upgrade(&headers));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers[header::UPGRADE], "websocket");
        assert_eq!(headers[header::CONNECTION], "upgrade");
    }

    #[test]
    fn traceparent_validation_follows_the_w3c_rules() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            parse_traceparent(good),
            Some((0x4bf92f3577b34da6a3ce929d0e0e4736, 1))
        );
        for bad in [
            "",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
        assert_eq!(format_traceparent(0xab, 0xcd, 1).len(), 55);
        assert_eq!(
            format_traceparent(
                0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
                0xb7ad_6b71_6920_3331,
                1
            ),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(
            format_traceparent(u128::MAX, u64::MAX, 0xff),
            format!("00-{}-{}-ff", "f".repeat(32), "f".repeat(16))
        );
    }
}
