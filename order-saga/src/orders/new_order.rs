//! A new order as a buyer sends it, parsed at the edge into types the rest of the service
//! can trust: every field checked and named when refused, nothing persisted until all pass.

use common::{
    http::JsonFields, http::json_fields::string, problem::Problem, storable::StorableText,
};
use serde_json::Value;
use uuid::Uuid;

use crate::messages::{Address, Line};

/// Most lines an order may have.
pub const MAX_ITEMS: usize = 100;
/// Most units of one product per order.
pub const MAX_QUANTITY: i64 = 1_000;

/// A valid new order, before prices are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    /// The buyer.
    pub customer_id: StorableText,
    /// What, without duplicate products.
    pub items: Vec<Line>,
    /// The buyer's payment method token.
    pub payment_method: StorableText,
    /// Where to.
    pub shipping_address: Address,
}

impl NewOrder {
    /// Parses the body's fields; the problem names the first field at fault.
    pub fn parse(mut body: JsonFields) -> Result<Self, Problem> {
        let customer_id = body.required("customer_id", |v| text(v, 64))?;
        let items = body.required("items", Ok)?;
        let items = items_of(items)?;
        let payment_method = body.required("payment_method", |v| text(v, 64))?;
        let address = body.required("shipping_address", Ok)?;
        let shipping_address = address_of(address)?;
        body.finish("an order")?;
        Ok(Self {
            customer_id,
            items,
            payment_method,
            shipping_address,
        })
    }
}

fn items_of(value: Value) -> Result<Vec<Line>, Problem> {
    let Value::Array(items) = value else {
        return Err(Problem::invalid_field("items", "must be an array of items"));
    };
    if items.is_empty() {
        return Err(Problem::invalid_field("items", "must not be empty"));
    }
    if items.len() > MAX_ITEMS {
        return Err(Problem::invalid_field(
            "items",
            format!("must have at most {MAX_ITEMS} items"),
        ));
    }
    let mut lines: Vec<Line> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = |name: &str| format!("items[{i}].{name}");
        let Value::Object(item) = item else {
            return Err(Problem::invalid_field(
                &format!("items[{i}]"),
                "must be an object",
            ));
        };
        let mut item = JsonFields::from(item);
        let product_id = item
            .required("product_id", |v| {
                string(v).and_then(|s| {
                    Uuid::parse_str(&s).map_err(|_| "must be a product id (a UUID)".into())
                })
            })
            .map_err(|p| p.with_field(at("product_id")))?;
        let quantity = item
            .required("quantity", |v| {
                v.as_i64()
                    .filter(|q| (1..=MAX_QUANTITY).contains(q))
                    .ok_or_else(|| format!("must be an integer from 1 to {MAX_QUANTITY}"))
            })
            .map_err(|p| p.with_field(at("quantity")))?;
        item.finish("an item").map_err(|p| {
            let unknown = p.field.clone().unwrap_or_default();
            p.with_field(at(&unknown))
        })?;
        if lines.iter().any(|l| l.product_id == product_id) {
            return Err(Problem::invalid_field(
                &at("product_id"),
                "appears twice; send one item per product with the total quantity",
            ));
        }
        lines.push(Line {
            product_id,
            quantity: quantity as i32,
        });
    }
    Ok(lines)
}

fn address_of(value: Value) -> Result<Address, Problem> {
    let Value::Object(address) = value else {
        return Err(Problem::invalid_field(
            "shipping_address",
            "must be an object",
        ));
    };
    let mut address = JsonFields::from(address);
    let field = |name: &str| format!("shipping_address.{name}");
    let mut take = |name: &str, max: usize| {
        address
            .required(name, |v| text(v, max))
            .map(StorableText::into_string)
            .map_err(|p| p.with_field(field(name)))
    };
    let name = take("name", 200)?;
    let line1 = take("line1", 200)?;
    let city = take("city", 100)?;
    let postal_code = take("postal_code", 20)?;
    let country = take("country", 2)?;
    if country.len() != 2 || !country.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(Problem::invalid_field(
            &field("country"),
            "must be an ISO 3166-1 alpha-2 code such as DE",
        ));
    }
    address.finish("an address").map_err(|p| {
        let unknown = p.field.clone().unwrap_or_default();
        p.with_field(field(&unknown))
    })?;
    Ok(Address {
        name,
        line1,
        city,
        postal_code,
        country,
    })
}

/// A non-blank string of at most `max` characters that PostgreSQL can store.
fn text(value: Value, max: usize) -> Result<StorableText, String> {
    crate::inventory::http::text(value, max)
}

/// The `Idempotency-Key` header: 1 to 255 visible ASCII characters.
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<String, Problem> {
    let raw = headers.get("idempotency-key").ok_or_else(|| {
        Problem::malformed("the Idempotency-Key header is required; send a unique value per order and repeat it on retries")
            .with_field("Idempotency-Key")
    })?;
    let key = raw
        .to_str()
        .ok()
        .map(|k| k.trim_matches('"'))
        .filter(|k| {
            !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| (0x21..=0x7e).contains(&b))
        })
        .ok_or_else(|| {
            Problem::malformed("the Idempotency-Key must be 1 to 255 visible ASCII characters")
                .with_field("Idempotency-Key")
        })?;
    Ok(key.to_owned())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse(value: Value) -> Result<NewOrder, Problem> {
        let Value::Object(object) = value else {
            unreachable!()
        };
        NewOrder::parse(JsonFields::from(object))
    }

    fn valid() -> Value {
        json!({
            "customer_id": "c-1",
            "items": [{"product_id": Uuid::nil(), "quantity": 2}],
            "payment_method": "pm_card_ok",
            "shipping_address": {"name": "A", "line1": "B 1", "city": "C", "postal_code": "1", "country": "DE"}
        })
    }

    #[test]
    fn a_valid_order_parses() {
        let order = parse(valid()).unwrap();
        assert_eq!(order.items[0].quantity, 2);
        assert_eq!(order.shipping_address.country, "DE");
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            ("/items", json!([]), "items"),
            ("/items/0/quantity", json!(0), "items[0].quantity"),
            ("/items/0/quantity", json!(1e300), "items[0].quantity"),
            ("/items/0/quantity", json!(1001), "items[0].quantity"),
            ("/items/0/product_id", json!("nope"), "items[0].product_id"),
            ("/customer_id", json!("a\u{0}b"), "customer_id"),
            ("/customer_id", json!("x".repeat(65)), "customer_id"),
            (
                "/shipping_address/country",
                json!("de"),
                "shipping_address.country",
            ),
            ("/shipping_address/zip", json!("1"), "shipping_address.zip"),
        ];
        for (pointer, value, field) in cases {
            let mut body = valid();
            *body
                .pointer_mut(pointer)
                .map(|v| v as &mut Value)
                .unwrap_or(&mut Value::Null) = value.clone();
            if body.pointer(pointer).is_none() {
                body["shipping_address"]["zip"] = value.clone();
            }
            let problem = parse(body).unwrap_err();
            assert_eq!(problem.field.as_deref(), Some(field), "{pointer} = {value}");
        }
        let mut twice = valid();
        twice["items"] = json!([{"product_id": Uuid::nil(), "quantity": 1}, {"product_id": Uuid::nil(), "quantity": 1}]);
        assert_eq!(
            parse(twice).unwrap_err().field.as_deref(),
            Some("items[1].product_id")
        );
    }
}
