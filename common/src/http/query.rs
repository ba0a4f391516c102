//! A query string read strictly: parameters decoded, strangers and repeats refused with a 400
//! naming them, so a typo is never silently ignored.

use std::collections::HashMap;

use crate::problem::Problem;

/// The query string as parameters, refusing any not in `allowed` (400 naming it).
pub fn query_params(
    raw: Option<&str>,
    allowed: &[&str],
) -> Result<HashMap<String, String>, Problem> {
    let mut params = HashMap::new();
    for pair in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let name = decode(name).ok_or_else(|| {
            Problem::malformed("the query string is not valid percent-encoded UTF-8")
        })?;
        let value = decode(value).ok_or_else(|| {
            Problem::malformed("the query string is not valid percent-encoded UTF-8")
                .with_field(name.clone())
        })?;
        if !allowed.contains(&name.as_str()) {
            return Err(Problem::malformed(format!(
                "unknown query parameter {name:?}; this endpoint takes {}",
                allowed.join(", ")
            ))
            .with_field(name));
        }
        if params.insert(name.clone(), value).is_some() {
            return Err(
                Problem::malformed(format!("query parameter {name:?} is given twice"))
                    .with_field(name),
            );
        }
    }
    Ok(params)
}

fn decode(raw: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut input = raw.bytes();
    while let Some(byte) = input.next() {
        match byte {
            b'+' => bytes.push(b' '),
            b'%' => {
                let hex = [input.next()?, input.next()?];
                let hex = std::str::from_utf8(&hex).ok()?;
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
            }
            other => bytes.push(other),
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_decoded_and_strangers_refused() {
        let params = query_params(Some("limit=5&cursor=a%2Fb+c"), &["limit", "cursor"]).unwrap();
        assert_eq!(params["cursor"], "a/b c");
        let refused = query_params(Some("limt=5"), &["limit"]).unwrap_err();
        assert_eq!(refused.field.as_deref(), Some("limt"));
        assert!(query_params(Some("limit=%ff"), &["limit"]).is_err());
        assert!(query_params(Some("limit=%4"), &["limit"]).is_err());
        assert!(query_params(Some("limit=1&limit=2"), &["limit"]).is_err());
    }
}
