//! The body of `POST /admin/api-keys` as domain types: once parsed, a key's name, roles and
//! quota are known to be acceptable, and each parser's refusal is the `detail` of a problem
//! naming its field (see `common::http::JsonFields`).

use common::storable::StorableText;
use serde_json::Value;
use uuid::Uuid;

use super::{MAX_KEY_LIMIT, MAX_NAME_CHARS, MAX_ROLES};

/// A key's name: a label for people, 1 to [`MAX_NAME_CHARS`] characters, not blank, without
/// control characters (it is shown in lists and logs).
pub struct KeyName(StorableText);

impl KeyName {
    /// The name, or why it is refused.
    pub fn parse(name: String) -> Result<Self, String> {
        if name.trim().is_empty() {
            Err("must not be empty".into())
        } else if name.chars().count() > MAX_NAME_CHARS {
            Err(format!("must be at most {MAX_NAME_CHARS} characters"))
        } else if name.chars().any(char::is_control) {
            // U+0000 is a control character too: PostgreSQL could not store it.
            Err("must not contain control characters".into())
        } else {
            StorableText::parse("name", name)
                .map(Self)
                .map_err(|refusal| refusal.detail().to_owned())
        }
    }

    /// As the store keeps it.
    pub fn as_storable(&self) -> &StorableText {
        &self.0
    }
}

/// A key's roles: at most [`MAX_ROLES`], each 1 to 64 characters of `A-Z a-z 0-9 : . _ -`
/// (they travel to upstreams comma-joined in `X-User-Roles`), duplicates dropped.
#[derive(Default)]
pub struct KeyRoles(Vec<String>);

impl KeyRoles {
    /// The roles of a JSON array, or why it is refused (`null` included: leave it out).
    pub fn parse(value: Value) -> Result<Self, String> {
        let Value::Array(items) = value else {
            return Err("must be an array of strings".into());
        };
        if items.len() > MAX_ROLES {
            return Err(format!("must have at most {MAX_ROLES} roles"));
        }
        let mut roles = Vec::with_capacity(items.len());
        for item in items {
            match item {
                Value::String(role)
                    if (1..=64).contains(&role.len())
                        && role
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b":._-".contains(&b)) =>
                {
                    if !roles.contains(&role) {
                        roles.push(role);
                    }
                }
                _ => return Err("each role is 1-64 characters of A-Z a-z 0-9 : . _ -".into()),
            }
        }
        Ok(Self(roles))
    }

    /// As the store keeps them.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

/// The user a key acts for.
pub fn owner_id(value: Value) -> Result<Uuid, String> {
    value
        .as_str()
        .and_then(|owner| owner.parse::<Uuid>().ok())
        .ok_or_else(|| "must be a user id (UUID)".into())
}

/// A key's own quota, `{"limit": n, "window": "1m"}`: 1 to [`MAX_KEY_LIMIT`] requests per a
/// window of 1 s to 1 d, one the limiter can enforce.
pub struct KeyQuota(pub crate::limiter::Quota);

impl KeyQuota {
    /// The quota of `{"limit", "window"}`, or why it is refused.
    pub fn parse(value: Value) -> Result<Self, String> {
        let Value::Object(object) = value else {
            return Err("must be an object {\"limit\": n, \"window\": \"1m\"}".into());
        };
        let count = object
            .get("limit")
            .and_then(Value::as_u64)
            .filter(|n| (1..=MAX_KEY_LIMIT).contains(n))
            .ok_or_else(|| format!("limit.limit must be 1 to {MAX_KEY_LIMIT}"))?;
        let window = object
            .get("window")
            .and_then(Value::as_str)
            .and_then(|w| common::config::parse_duration(w).ok())
            .filter(|w| {
                (std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(86_400))
                    .contains(w)
            })
            .ok_or("limit.window must be a duration from 1s to 1d, like \"1m\"")?;
        if object.len() > 2 {
            return Err("has fields other than limit and window".into());
        }
        crate::limiter::Quota::new(count as u32, window).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn names_are_labels_without_blanks_or_control_characters() {
        assert_eq!(
            KeyName::parse("ci deploys".into())
                .unwrap()
                .as_storable()
                .as_str(),
            "ci deploys"
        );
        let refusals = [
            ("   ", "must not be empty"),
            ("a\u{7}b", "must not contain control characters"),
        ];
        for (name, reason) in refusals {
            assert_eq!(KeyName::parse(name.into()).err().as_deref(), Some(reason));
        }
        let long = "é".repeat(MAX_NAME_CHARS + 1);
        assert!(KeyName::parse(long).is_err());
        assert!(KeyName::parse("é".repeat(MAX_NAME_CHARS)).is_ok());
    }

    #[test]
    fn roles_are_a_bounded_list_of_plain_names_without_repeats() {
        let roles = KeyRoles::parse(json!(["reader", "ops:deploy", "reader"])).unwrap();
        assert_eq!(roles.as_slice(), ["reader", "ops:deploy"]);
        for bad in [
            json!("reader"),
            json!(null),
            json!([""]),
            json!(["a b"]),
            json!([1]),
        ] {
            assert!(KeyRoles::parse(bad.clone()).is_err(), "{bad}");
        }
        let too_many: Vec<String> = (0..=MAX_ROLES).map(|i| format!("r{i}")).collect();
        assert!(KeyRoles::parse(json!(too_many)).is_err());
    }

    #[test]
    fn a_quota_is_a_count_per_window_the_limiter_can_enforce() {
        let quota = KeyQuota::parse(json!({"limit": 600, "window": "1m"})).unwrap();
        assert_eq!(quota.0.limit, 600);
        assert_eq!(quota.0.window, std::time::Duration::from_secs(60));
        for bad in [
            json!(5),
            json!({"limit": 0, "window": "1m"}),
            json!({"limit": MAX_KEY_LIMIT + 1, "window": "1m"}),
            json!({"limit": 5, "window": "500ms"}),
            json!({"limit": 5, "window": "2d"}),
            json!({"limit": 5}),
            json!({"limit": 5, "window": "1m", "burst": 2}),
        ] {
            assert!(KeyQuota::parse(bad.clone()).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_owner_is_a_user_id() {
        let id = Uuid::now_v7();
        assert_eq!(owner_id(json!(id.to_string())), Ok(id));
        assert!(owner_id(json!("alice")).is_err());
        assert!(owner_id(json!(7)).is_err());
    }
}
