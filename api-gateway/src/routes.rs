//! The route table: which upstream a path goes to, who may call it, and path normalisation.
//!
//! Every request path is normalised once, before anything looks at it, and the normalised
//! form is both what the table matches and what the upstream receives: the gateway forwards
//! exactly the path it authorised. Normalising means:
//!
//! - percent-encoded unreserved characters are decoded (`/api/%6Frders` is `/api/orders`),
//!   and the remaining escapes are upper-cased;
//! - an encoded `/` or `\`, a raw `\`, and control characters are refused, since upstreams
//!   disagree about what they mean;
//! - empty segments are dropped (`//` is `/`), `.` segments are dropped, and `..` removes
//!   the segment before it (RFC 3986 §5.2.4); a `..` that would climb above `/` is refused.
//!
//! Rules match by method and by path prefix on segment boundaries (`/api/orders` matches
//! `/api/orders` and `/api/orders/7`, never `/api/ordersx`); the longest matching prefix
//! wins, so rule order does not matter. A path no rule matches is refused: deny by default.
//! A rule naming `GET` covers `HEAD` too, unless another rule for its prefix names `HEAD`.

use axum::http::Method;
use serde::Deserialize;

use crate::limiter::Quota;

/// Why a path was refused before any matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an absolute path, or a `%` not followed by two hex digits.
    #[error("the path is malformed")]
    Malformed,
    /// `%2F`, `%5C` or a raw `\`: a separator some upstream would read differently.
    #[error("the path contains an encoded or backslash separator")]
    EncodedSeparator,
    /// A control character, raw or encoded.
    #[error("the path contains a control character")]
    ControlCharacter,
    /// More `..` segments than there are segments to climb.
    #[error("the path climbs above the root")]
    AboveRoot,
}

/// Whether `path` is already in canonical form, so that [`normalize`] would return it
/// unchanged; checked without allocating, since nearly every client sends such paths. A
/// `false` only means "ask `normalize`": a path with `%` is never taken as canonical here.
pub fn is_normal(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if path
        .bytes()
        .any(|b| matches!(b, b'%' | b'\\' | 0..=0x1f | 0x7f))
    {
        return false;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        match segment {
            "." | ".." => return false,
            // An empty segment is a doubled slash, except as the last (a trailing slash).
            "" if segments.peek().is_some() => return false,
            _ => {}
        }
    }
    true
}

/// `path` in its one canonical form (see the module documentation).
pub fn normalize(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(PathError::Malformed);
    }
    // Pass 1: decode what may be decoded.
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        match byte {
            b'%' => {
                let (Some(high), Some(low)) = (
                    bytes.get(i + 1).and_then(|b| hex(*b)),
                    bytes.get(i + 2).and_then(|b| hex(*b)),
                ) else {
                    return Err(PathError::Malformed);
                };
                let value = high << 4 | low;
                match value {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
                    b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                        decoded.push(char::from(b));
                    }
                    b => {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        decoded.push('%');
                        decoded.push(char::from(HEX[usize::from(b >> 4)]));
                        decoded.push(char::from(HEX[usize::from(b & 0xf)]));
                    }
                }
                i += 3;
            }
            b'\\' => return Err(PathError::EncodedSeparator),
            0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            _ => {
                // Multi-byte UTF-8 is copied whole; `path` is a `&str`, so it is valid.
                let width = utf8_width(byte);
                decoded.push_str(&path[i..i + width]);
                i += width;
            }
        }
    }
    // Pass 2: segments.
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for segment in decoded.split('/').skip(1) {
        trailing_slash = false;
        match segment {
            "" | "." => trailing_slash = true,
            ".." => {
                segments.pop().ok_or(PathError::AboveRoot)?;
                trailing_slash = true;
            }
            segment => segments.push(segment),
        }
    }
    let mut normalized = String::with_capacity(decoded.len());
    for segment in &segments {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if trailing_slash || segments.is_empty() {
        normalized.push('/');
    }
    Ok(normalized)
}

fn hex(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

fn utf8_width(first: u8) -> usize {
    match first {
        0xf0.. => 4,
        0xe0.. => 3,
        0xc0.. => 2,
        _ => 1,
    }
}

/// True when `prefix` covers `path` on a segment boundary.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || prefix.ends_with('/') || rest.starts_with('/'),
        None => false,
    }
}

/// One RBAC rule, as written in the gateway's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Methods the rule covers; empty means every method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// The path prefix (segment boundaries).
    pub prefix: String,
    /// Any one of these roles allows the request; `"*"` allows any authenticated caller.
    pub roles: Vec<String>,
    /// A quota of its own for this route instead of the caller's default.
    #[serde(default)]
    pub limit: Option<Quota>,
}

/// A rule ready for matching.
#[derive(Debug, Clone)]
pub struct Rule {
    /// A stable name for logs, metrics and the rate-limit key: `METHODS prefix`.
    pub name: String,
    methods: Vec<Method>,
    /// Whether `HEAD` is allowed as `GET` is: the rule names `GET`, and no rule for the same
    /// prefix names `HEAD` itself (RFC 9110 §9.3.2: `HEAD` is `GET` without the body).
    head_as_get: bool,
    prefix: String,
    roles: Vec<String>,
    /// The route's own quota, if it has one.
    pub limit: Option<Quota>,
}

impl Rule {
    /// Whether a caller holding `roles` may use this route.
    pub fn allows<S: AsRef<str>>(&self, roles: &[S]) -> bool {
        self.roles
            .iter()
            .any(|needed| needed == "*" || roles.iter().any(|held| held.as_ref() == needed))
    }

    /// The roles this route accepts.
    pub fn roles(&self) -> &[String] {
        &self.roles
    }

    fn covers(&self, method: &Method, path: &str) -> bool {
        let named = self.methods.is_empty()
            || self.methods.contains(method)
            || (self.head_as_get && method == Method::HEAD);
        named && prefix_matches(&self.prefix, path)
    }
}

/// An upstream's place in the path space.
#[derive(Debug, Clone, Deserialize)]
pub struct Mount {
    /// The upstream's name.
    pub name: String,
    /// The public prefix, stripped before forwarding: `/api/orders/7` → `/7`.
    pub prefix: String,
}

/// The matched upstream and the path it receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    /// The upstream's name.
    pub upstream: &'a str,
    /// The path after the mount prefix (at least `/`).
    pub path: &'a str,
}

/// Rules and mounts, sorted for longest-prefix matching.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    rules: Vec<Rule>,
    mounts: Vec<Mount>,
}

/// A configuration mistake in the route table, reported at start.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// A prefix that is not a normalised absolute path.
    #[error("prefix {0:?} is not a normalised absolute path")]
    BadPrefix(String),
    /// A method name that is not one.
    #[error("method {0:?} is not an HTTP method")]
    BadMethod(String),
    /// A rule that nobody could satisfy.
    #[error("rule for {0:?} lists no roles (use \"*\" for any authenticated caller)")]
    NoRoles(String),
}

impl RouteTable {
    /// Checks and sorts the configured rules and mounts.
    pub fn new(rules: Vec<RuleSpec>, mounts: Vec<Mount>) -> Result<Self, TableError> {
        let check_prefix = |prefix: &str| {
            let canonical = normalize(prefix).map_err(|_| TableError::BadPrefix(prefix.into()))?;
            let same = canonical == prefix || canonical.trim_end_matches('/') == prefix;
            same.then_some(())
                .ok_or_else(|| TableError::BadPrefix(prefix.into()))
        };
        let mut built = Vec::with_capacity(rules.len());
        for spec in rules {
            check_prefix(&spec.prefix)?;
            if spec.roles.is_empty() {
                return Err(TableError::NoRoles(spec.prefix));
            }
            let methods = spec
                .methods
                .iter()
                .map(|m| {
                    Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| TableError::BadMethod(m.clone()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let name = if methods.is_empty() {
                format!("* {}", spec.prefix)
            } else {
                let names: Vec<&str> = methods.iter().map(Method::as_str).collect();
                format!("{} {}", names.join(","), spec.prefix)
            };
            built.push(Rule {
                name,
                head_as_get: methods.contains(&Method::GET) && !methods.contains(&Method::HEAD),
                methods,
                prefix: spec.prefix,
                roles: spec.roles,
                limit: spec.limit,
            });
        }
        // A rule that names HEAD for a prefix decides HEAD there, not a GET rule beside it.
        let head_rules: Vec<String> = built
            .iter()
            .filter(|rule| rule.methods.contains(&Method::HEAD))
            .map(|rule| rule.prefix.clone())
            .collect();
        for rule in &mut built {
            rule.head_as_get &= !head_rules.contains(&rule.prefix);
        }
        for mount in &mounts {
            check_prefix(&mount.prefix)?;
        }
        let mut mounts = mounts;
        // Longest prefix first; among equals, rules naming methods before catch-alls.
        built.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then(a.methods.is_empty().cmp(&b.methods.is_empty()))
        });
        mounts.sort_by_key(|m| std::cmp::Reverse(m.prefix.len()));
        Ok(Self {
            rules: built,
            mounts,
        })
    }

    /// The rule for `method` on the normalised `path`; `None` means nobody may.
    pub fn rule(&self, method: &Method, path: &str) -> Option<&Rule> {
        self.rules.iter().find(|rule| rule.covers(method, path))
    }

    /// The upstream mounted at the normalised `path`, and the path it receives.
    pub fn target<'a>(&'a self, path: &'a str) -> Option<Target<'a>> {
        self.mounts.iter().find_map(|mount| {
            let prefix = mount.prefix.trim_end_matches('/');
            let rest = path.strip_prefix(prefix)?;
            let rest = match rest {
                "" => "/",
                rest if rest.starts_with('/') => rest,
                _ => return None,
            };
            Some(Target {
                upstream: &mount.name,
                path: rest,
            })
        })
    }

    /// The mounts, longest prefix first.
    pub fn mounts(&self) -> &[Mount] {
        &self.mounts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path of up to seven characters over an alphabet with each special case: the
    /// fast check never calls a path canonical that `normalize` would change or refuse, and
    /// without `%` the two agree exactly.
    #[test]
    fn the_fast_check_agrees_with_normalize_on_every_short_path() {
        const ALPHABET: [char; 7] = ['/', 'a', '.', '%', '2', '\\', '\u{1}'];
        let mut paths = vec![String::from("/")];
        let mut checked = 0;
        for _ in 0..6 {
            let mut longer = Vec::with_capacity(paths.len() * ALPHABET.len());
            for path in &paths {
                for c in ALPHABET {
                    let mut next = path.clone();
                    next.push(c);
                    longer.push(next);
                }
            }
            for path in paths.iter().chain(&longer) {
                let unchanged = normalize(path).as_deref() == Ok(path.as_str());
                if is_normal(path) {
                    assert!(
                        unchanged,
                        "{path:?} taken as canonical, normalize: {:?}",
                        normalize(path)
                    );
                } else if !path.contains('%') {
                    assert!(
                        !unchanged,
                        "{path:?} is canonical but the fast check said no"
                    );
                }
                checked += 1;
            }
            paths = longer;
        }
        assert!(checked > 100_000, "only {checked} paths checked");
        assert!(is_normal("/api/orders/42") && is_normal("/") && is_normal("/api/x/"));
        assert!(!is_normal("api") && !is_normal("//api") && !is_normal("/api/./x"));
    }

    #[test]
    fn normalisation_decodes_collapses_and_resolves() {
        for (raw, expected) in [
            ("/", "/"),
            ("/api/orders", "/api/orders"),
            ("/api/orders/", "/api/orders/"),
            ("//api///orders", "/api/orders"),
            ("/api/./orders", "/api/orders"),
            ("/api/metrics/../orders", "/api/orders"),
            ("/api/metrics/%2e%2e/orders", "/api/orders"),
            ("/api/metrics/%2E%2E/orders", "/api/orders"),
            ("/api/metrics/.%2e/orders", "/api/orders"),
            ("/%61pi/%6Frders", "/api/orders"),
            ("/api/orders/..", "/api/"),
            ("/api/orders/a%20b", "/api/orders/a%20b"),
            ("/api/orders/a%2bb", "/api/orders/a%2Bb"),
            ("/api/orders/ü", "/api/orders/ü"),
            ("/api/orders/%C3%BC", "/api/orders/%C3%BC"),
            ("/a/b/../../c", "/c"),
        ] {
            assert_eq!(normalize(raw).as_deref(), Ok(expected), "{raw}");
        }
    }

    #[test]
    fn normalisation_refuses_what_upstreams_would_read_differently() {
        for (raw, error) in [
            ("api/orders", PathError::Malformed),
            ("", PathError::Malformed),
            ("/api/%zz", PathError::Malformed),
            ("/api/%4", PathError::Malformed),
            ("/api/orders%2f..%2fadmin", PathError::EncodedSeparator),
            ("/api/orders%2F7", PathError::EncodedSeparator),
            ("/api/orders%5c7", PathError::EncodedSeparator),
            ("/api\\orders", PathError::EncodedSeparator),
            ("/api/orders%00", PathError::ControlCharacter),
            ("/api/orders%0a", PathError::ControlCharacter),
            ("/..", PathError::AboveRoot),
            ("/api/../../etc/passwd", PathError::AboveRoot),
            ("/%2e%2e/x", PathError::AboveRoot),
        ] {
            assert_eq!(normalize(raw), Err(error), "{raw}");
        }
    }

    fn rule(methods: &[&str], prefix: &str, roles: &[&str]) -> RuleSpec {
        RuleSpec {
            methods: methods.iter().map(|m| m.to_string()).collect(),
            prefix: prefix.into(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            limit: None,
        }
    }

    fn table() -> RouteTable {
        RouteTable::new(
            vec![
                rule(&[], "/api/orders", &["user", "admin"]),
                rule(&["DELETE"], "/api/orders", &["admin"]),
                rule(&["GET"], "/api/metrics", &["*"]),
                rule(&["POST"], "/api/metrics/v1/events", &["metrics:write"]),
            ],
            vec![
                Mount {
                    name: "orders".into(),
                    prefix: "/api/orders".into(),
                },
                Mount {
                    name: "metrics".into(),
                    prefix: "/api/metrics".into(),
                },
            ],
        )
        .unwrap()
    }

    #[test]
    fn longest_prefix_and_method_decide() {
        let table = table();
        let name = |method: Method, path: &str| table.rule(&method, path).map(|r| r.name.clone());
        assert_eq!(name(Method::GET, "/api/orders/7").unwrap(), "* /api/orders");
        assert_eq!(
            name(Method::DELETE, "/api/orders/7").unwrap(),
            "DELETE /api/orders"
        );
        assert_eq!(
            name(Method::GET, "/api/metrics/v1/aggregates").unwrap(),
            "GET /api/metrics"
        );
        assert_eq!(
            name(Method::POST, "/api/metrics/v1/events/batch").unwrap(),
            "POST /api/metrics/v1/events"
        );
        // Deny by default: no rule for POST elsewhere under /api/metrics, nor other paths.
        assert_eq!(name(Method::POST, "/api/metrics/v1/aggregates"), None);
        assert_eq!(name(Method::GET, "/api/ordersx"), None);
        assert_eq!(name(Method::GET, "/api/analytics/x"), None);
    }

    #[test]
    fn head_follows_get_unless_a_rule_names_head() {
        let table = table();
        let name = |method: Method, path: &str| table.rule(&method, path).map(|r| r.name.clone());
        assert_eq!(
            name(Method::HEAD, "/api/metrics/v1/aggregates").unwrap(),
            "GET /api/metrics"
        );
        // POST's rule says nothing of HEAD; the longest GET rule above it decides.
        assert_eq!(
            name(Method::HEAD, "/api/metrics/v1/events").unwrap(),
            "GET /api/metrics"
        );
        assert_eq!(name(Method::HEAD, "/api/unmounted"), None);

        let rule = |methods: &[&str], roles: &[&str]| rule(methods, "/api/reports", roles);
        // Listed in either order, a rule naming HEAD decides HEAD for its prefix.
        for rules in [
            vec![rule(&["GET"], &["reader"]), rule(&["HEAD"], &["auditor"])],
            vec![rule(&["HEAD"], &["auditor"]), rule(&["GET"], &["reader"])],
        ] {
            let table = RouteTable::new(rules, vec![]).unwrap();
            let head = table.rule(&Method::HEAD, "/api/reports/1").unwrap();
            assert!(head.allows(&["auditor"]) && !head.allows(&["reader"]));
            let get = table.rule(&Method::GET, "/api/reports/1").unwrap();
            assert!(get.allows(&["reader"]) && !get.allows(&["auditor"]));
        }
        // A rule without GET grants no HEAD.
        let table = RouteTable::new(vec![rule(&["POST"], &["writer"])], vec![]).unwrap();
        assert!(table.rule(&Method::HEAD, "/api/reports").is_none());
    }

    #[test]
    fn roles_allow_and_star_means_any_authenticated_caller() {
        let table = table();
        let delete = table.rule(&Method::DELETE, "/api/orders/7").unwrap();
        assert!(delete.allows(&["admin"]));
        assert!(!delete.allows(&["user"]));
        assert!(!delete.allows::<&str>(&[]));
        let read = table
            .rule(&Method::GET, "/api/metrics/v1/aggregates")
            .unwrap();
        assert!(read.allows::<&str>(&[]));
    }

    #[test]
    fn mounts_strip_their_prefix_on_segment_boundaries() {
        let table = table();
        assert_eq!(
            table.target("/api/orders/7/items"),
            Some(Target {
                upstream: "orders",
                path: "/7/items"
            })
        );
        assert_eq!(
            table.target("/api/orders"),
            Some(Target {
                upstream: "orders",
                path: "/"
            })
        );
        assert_eq!(table.target("/api/ordersx"), None);
        assert_eq!(table.target("/auth/login"), None);
    }

    #[test]
    fn bad_tables_are_refused_at_start() {
        let spec = |prefix: &str, roles: Vec<String>| RuleSpec {
            methods: vec![],
            prefix: prefix.into(),
            roles,
            limit: None,
        };
        assert!(matches!(
            RouteTable::new(vec![spec("/api/../x", vec!["a".into()])], vec![]),
            Err(TableError::BadPrefix(_))
        ));
        assert!(matches!(
            RouteTable::new(vec![spec("/api", vec![])], vec![]),
            Err(TableError::NoRoles(_))
        ));
        let mut bad_method = spec("/api", vec!["a".into()]);
        bad_method.methods = vec!["GE T".into()];
        assert!(matches!(
            RouteTable::new(vec![bad_method], vec![]),
            Err(TableError::BadMethod(_))
        ));
    }
}
