//! The fields of a JSON request body, taken one at a time and parsed into domain types, so
//! that a refusal names the field at fault and a field the endpoint does not know is refused
//! rather than ignored.

use serde_json::{Map, Value};

use crate::problem::Problem;

/// A JSON object body (from [`super::json_object`]) whose fields are still to be taken.
///
/// [`Self::required`], [`Self::optional`] and [`Self::nullable`] each hand one field's value
/// to a parser (typically a newtype's `parse`) that says, as a `detail`, why a value is
/// refused; the problem then names the field. [`Self::finish`] refuses what is left over.
#[derive(Debug)]
pub struct JsonFields(Map<String, Value>);

impl From<Map<String, Value>> for JsonFields {
    fn from(object: Map<String, Value>) -> Self {
        Self(object)
    }
}

impl JsonFields {
    /// A field that must be present (`null` goes to `parse`): absent, it is a 422 saying `is required`.
    pub fn required<T>(
        &mut self,
        name: &str,
        parse: impl FnOnce(Value) -> Result<T, String>,
    ) -> Result<T, Problem> {
        let value = self
            .0
            .remove(name)
            .ok_or_else(|| Problem::invalid_field(name, "is required"))?;
        parse(value).map_err(|detail| Problem::invalid_field(name, detail))
    }

    /// A field that may be left out (`None`). An explicit `null` goes to `parse`, which
    /// decides whether it means "left out" or is refused.
    pub fn optional<T>(
        &mut self,
        name: &str,
        parse: impl FnOnce(Value) -> Result<T, String>,
    ) -> Result<Option<T>, Problem> {
        self.0
            .remove(name)
            .map(parse)
            .transpose()
            .map_err(|detail| Problem::invalid_field(name, detail))
    }

    /// A field that may be left out or sent as `null`, both meaning `None`.
    pub fn nullable<T>(
        &mut self,
        name: &str,
        parse: impl FnOnce(Value) -> Result<T, String>,
    ) -> Result<Option<T>, Problem> {
        match self.0.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(value) => parse(value)
                .map(Some)
                .map_err(|detail| Problem::invalid_field(name, detail)),
        }
    }

    /// Refuses a field nothing asked for, naming it: `"is not a field of {what}"`.
    pub fn finish(self, what: &str) -> Result<(), Problem> {
        match self.0.keys().next() {
            Some(unknown) => Err(Problem::invalid_field(
                unknown,
                format!("is not a field of {what}"),
            )),
            None => Ok(()),
        }
    }
}

/// A field's value as a string, or `must be a string`; for [`JsonFields`] parsers.
pub fn string(value: Value) -> Result<String, String> {
    match value {
        Value::String(text) => Ok(text),
        _ => Err("must be a string".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields(value: Value) -> JsonFields {
        match value {
            Value::Object(object) => JsonFields::from(object),
            _ => unreachable!("a test body is an object"),
        }
    }

    #[test]
    fn fields_are_taken_and_parsed() {
        let mut body = fields(json!({"name": "a", "size": 3}));
        assert_eq!(body.required("name", string).unwrap(), "a");
        let size = body.optional("size", |v| v.as_u64().ok_or("must be a number".to_owned()));
        assert_eq!(size.unwrap(), Some(3));
        assert_eq!(body.optional("colour", string).unwrap(), None);
        body.finish("a thing").unwrap();
    }

    #[test]
    fn a_missing_required_field_is_named() {
        let problem = fields(json!({})).required("name", string).unwrap_err();
        assert_eq!(problem.status, 422);
        assert_eq!(problem.field.as_deref(), Some("name"));
        assert_eq!(problem.detail, "is required");
    }

    #[test]
    fn a_refused_value_is_named_with_the_parsers_reason() {
        let problem = fields(json!({"name": 5}))
            .required("name", string)
            .unwrap_err();
        assert_eq!(problem.field.as_deref(), Some("name"));
        assert_eq!(problem.detail, "must be a string");
        let problem = fields(json!({"name": null}))
            .optional("name", string)
            .unwrap_err();
        assert_eq!(problem.field.as_deref(), Some("name"));
    }

    #[test]
    fn null_and_absent_are_the_same_to_a_nullable_field() {
        let mut body = fields(json!({"owner": null, "limit": 5}));
        assert_eq!(body.nullable("owner", string).unwrap(), None);
        assert_eq!(body.nullable("missing", string).unwrap(), None);
        let problem = body.nullable("limit", string).unwrap_err();
        assert_eq!(problem.field.as_deref(), Some("limit"));
        body.finish("a thing").unwrap();
    }

    #[test]
    fn a_field_left_over_is_refused_by_name() {
        let mut body = fields(json!({"name": "a", "nmae": "b"}));
        body.required("name", string).unwrap();
        let problem = body.finish("a thing").unwrap_err();
        assert_eq!(problem.field.as_deref(), Some("nmae"));
        assert_eq!(problem.detail, "is not a field of a thing");
    }
}
