//! The inventory's admin API: create products, add stock, read products and an order's hold.
//!
//! | route | purpose |
//! |---|---|
//! | `POST /v1/products` | a product with its price and opening stock |
//! | `GET /v1/products` | products, keyset-paginated by id |
//! | `GET /v1/products/{id}` | one product with available, held, sold |
//! | `POST /v1/products/{id}/stock` | add received units |
//! | `GET /v1/holds?order_id=` | what an order holds |

use axum::{
    Json, Router,
    body::Bytes,
    extract::{RawQuery, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use common::{
    http::{PageSize, json_fields::string},
    problem::Problem,
    storable::StorableText,
};
use serde_json::{Value, json};
use sqlx::{PgPool, Row, postgres::PgRow};
use uuid::Uuid;

use crate::{
    api::{PathUuid, fields, page, query_params, uuid_param},
    error::Result,
};

const PAGE: PageSize = PageSize {
    default: 50,
    max: 500,
};

/// The largest stock one request may add, and a product may hold (PostgreSQL `integer`).
pub const MAX_STOCK: i64 = 1_000_000_000;

/// The inventory's routes.
pub fn router(pool: PgPool) -> Router {
    Router::new()
        .route("/v1/products", post(create_product).get(list_products))
        .route("/v1/products/{id}", get(get_product))
        .route("/v1/products/{id}/stock", post(add_stock))
        .route("/v1/holds", get(holds))
        .with_state(pool)
}

async fn create_product(
    State(pool): State<PgPool>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let mut body = fields(&headers, body)?;
    let sku = body.required("sku", |v| text(v, 64))?;
    let name = body.required("name", |v| text(v, 200))?;
    let price = body.required("price", |v| integer(v, 0, 10_000_000_000))?;
    let currency = body.required("currency", currency)?;
    let stock = body.required("stock", |v| integer(v, 0, MAX_STOCK))?;
    body.finish("a product")?;
    let id = Uuid::now_v7();
    let row = sqlx::query(
        "INSERT INTO products (id, sku, name, price, currency, available, received)
         VALUES ($1, $2, $3, $4, $5, $6, $6)
         ON CONFLICT (sku) DO NOTHING
         RETURNING *",
    )
    .bind(id)
    .bind(sku.as_str())
    .bind(name.as_str())
    .bind(price)
    .bind(&currency)
    .bind(stock as i32)
    .fetch_optional(&pool)
    .await?;
    let Some(row) = row else {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "conflict",
            "Conflict",
            "a product with this sku exists",
        )
        .with_field("sku")
        .into());
    };
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/v1/products/{id}"))],
        Json(product(&row)),
    )
        .into_response())
}

async fn list_products(State(pool): State<PgPool>, RawQuery(query): RawQuery) -> Result<Response> {
    let params = query_params(query.as_deref(), &["limit", "cursor"])?;
    let page = page(&params, PAGE)?;
    let rows = sqlx::query(
        "SELECT * FROM products WHERE $1::uuid IS NULL OR id > $1 ORDER BY id LIMIT $2",
    )
    .bind(page.cursor)
    .bind(page.limit as i64 + 1)
    .fetch_all(&pool)
    .await?;
    let more = rows.len() > page.limit;
    let items: Vec<Value> = rows.iter().take(page.limit).map(product).collect();
    let next = more
        .then(|| items.last().map(|p| p["id"].clone()))
        .flatten();
    Ok(Json(json!({ "items": items, "next_cursor": next })).into_response())
}

async fn get_product(State(pool): State<PgPool>, PathUuid(id): PathUuid) -> Result<Response> {
    let row = sqlx::query("SELECT * FROM products WHERE id = $1")
        .bind(id)
        .fetch_optional(&pool)
        .await?
        .ok_or_else(Problem::not_found)?;
    Ok(Json(product(&row)).into_response())
}

async fn add_stock(
    State(pool): State<PgPool>,
    PathUuid(id): PathUuid,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let mut body = fields(&headers, body)?;
    let add = body.required("add", |v| integer(v, 1, MAX_STOCK))?;
    body.finish("a stock addition")?;
    let row = sqlx::query(
        "UPDATE products SET available = available + $2, received = received + $2
         WHERE id = $1 AND received + $2 <= $3 RETURNING *",
    )
    .bind(id)
    .bind(add as i32)
    .bind(MAX_STOCK as i32)
    .fetch_optional(&pool)
    .await?;
    match row {
        Some(row) => Ok(Json(product(&row)).into_response()),
        None => {
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM products WHERE id = $1)")
                    .bind(id)
                    .fetch_one(&pool)
                    .await?;
            if exists {
                Err(Problem::invalid_field(
                    "add",
                    format!("a product holds at most {MAX_STOCK} units"),
                )
                .into())
            } else {
                Err(Problem::not_found().into())
            }
        }
    }
}

async fn holds(State(pool): State<PgPool>, RawQuery(query): RawQuery) -> Result<Response> {
    let params = query_params(query.as_deref(), &["order_id"])?;
    let order_id = uuid_param(&params, "order_id")?;
    let hold = sqlx::query("SELECT * FROM holds WHERE order_id = $1")
        .bind(order_id)
        .fetch_optional(&pool)
        .await?
        .ok_or_else(Problem::not_found)?;
    let lines: Vec<Value> = sqlx::query("SELECT product_id, quantity FROM hold_lines WHERE order_id = $1 ORDER BY product_id")
        .bind(order_id)
        .fetch_all(&pool)
        .await?
        .iter()
        .map(|l| json!({ "product_id": l.get::<Uuid, _>("product_id"), "quantity": l.get::<i32, _>("quantity") }))
        .collect();
    Ok(Json(json!({
        "order_id": order_id,
        "state": hold.get::<String, _>("state"),
        "reason": hold.get::<Option<String>, _>("reason"),
        "expires_at": hold.get::<chrono::DateTime<chrono::Utc>, _>("expires_at"),
        "lines": lines,
    }))
    .into_response())
}

fn product(row: &PgRow) -> Value {
    json!({
        "id": row.get::<Uuid, _>("id"),
        "sku": row.get::<String, _>("sku"),
        "name": row.get::<String, _>("name"),
        "price": row.get::<i64, _>("price"),
        "currency": row.get::<String, _>("currency"),
        "available": row.get::<i32, _>("available"),
        "held": row.get::<i32, _>("held"),
        "sold": row.get::<i32, _>("sold"),
    })
}

/// A non-empty string of at most `max` characters that PostgreSQL can store.
pub fn text(value: Value, max: usize) -> std::result::Result<StorableText, String> {
    let text = string(value)?;
    if text.trim().is_empty() {
        return Err("must not be empty".into());
    }
    if text.chars().count() > max {
        return Err(format!("must be at most {max} characters"));
    }
    StorableText::parse("", text).map_err(|refused| refused.detail().to_owned())
}

/// An integer from `min` to `max` (a JSON number without fraction or exponent overflow).
pub fn integer(value: Value, min: i64, max: i64) -> std::result::Result<i64, String> {
    value
        .as_i64()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| format!("must be an integer from {min} to {max}"))
}

/// An ISO 4217 code: three upper-case letters.
pub fn currency(value: Value) -> std::result::Result<String, String> {
    let code = string(value)?;
    if code.len() == 3 && code.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(code)
    } else {
        Err("must be an ISO 4217 code such as EUR".into())
    }
}
