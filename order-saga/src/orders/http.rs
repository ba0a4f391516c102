//! The orders API.
//!
//! | route | purpose |
//! |---|---|
//! | `POST /v1/orders` | create an order (`Idempotency-Key` required); answers once it is durable |
//! | `GET /v1/orders` | orders, newest first, keyset-paginated |
//! | `GET /v1/orders/{id}` | one order with its lines and every step of its saga |
//! | `POST /v1/orders/{id}/cancel` | cancel until the shipment is being booked |

use axum::{
    Json, Router,
    body::Bytes,
    extract::{RawQuery, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use common::{
    http::{PageSize, read_body},
    problem::Problem,
};
use serde_json::json;

use super::{
    Orders,
    new_order::{NewOrder, idempotency_key},
    saga::{Event, Ignored},
    store::{self, Created, PricedLine},
};
use crate::{
    api::{PathUuid, fields, page, query_params},
    error::Result,
};

const PAGE: PageSize = PageSize {
    default: 20,
    max: 200,
};

/// The orders routes.
pub fn router(orders: Orders) -> Router {
    Router::new()
        .route("/v1/orders", post(create).get(list))
        .route("/v1/orders/{id}", get(one))
        .route("/v1/orders/{id}/cancel", post(cancel))
        .with_state(orders)
}

#[tracing::instrument(skip_all)]
async fn create(
    State(orders): State<Orders>,
    headers: HeaderMap,
    body: std::result::Result<Bytes, BytesRejection>,
) -> Result<Response> {
    let key = idempotency_key(&headers)?;
    let body = read_body(body)?;
    let fingerprint = store::fingerprint(&body);
    let order = NewOrder::parse(fields(&headers, Ok(body))?)?;
    let (lines, currency) = match price(&orders, &order).await {
        Ok(priced) => priced,
        // A retry of a stored order needs no prices: its first answer (or the 422 for another
        // body) stands even while inventory is unreachable. A new order gets the refusal.
        Err(refused) => {
            let mut conn = orders.pool.acquire().await?;
            return match store::earlier_use(&mut conn, &key, &fingerprint).await? {
                Some(earlier) => answer(&orders, earlier),
                None => Err(refused),
            };
        }
    };
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() == 55 && v.is_ascii())
        .map(str::to_owned);
    let created = store::create(
        &orders.pool,
        &key,
        &fingerprint,
        &order,
        &lines,
        currency.as_deref().unwrap_or("EUR"),
        traceparent,
        &orders.prefix,
        &orders.limits,
    )
    .await?;
    answer(&orders, created)
}

/// The order's lines at the catalogue's prices, and their one currency.
async fn price(orders: &Orders, order: &NewOrder) -> Result<(Vec<PricedLine>, Option<String>)> {
    let mut lines = Vec::with_capacity(order.items.len());
    let mut currency: Option<String> = None;
    for (i, item) in order.items.iter().enumerate() {
        let field = format!("items[{i}].product_id");
        let price = orders
            .catalog
            .price(item.product_id)
            .await?
            .ok_or_else(|| Problem::invalid_field(&field, "is not a product of the catalogue"))?;
        match &currency {
            Some(c) if *c != price.currency => {
                return Err(Problem::invalid_field(
                    &field,
                    format!(
                        "is priced in {}, the order in {c}; one currency per order",
                        price.currency
                    ),
                )
                .into());
            }
            _ => currency = Some(price.currency.clone()),
        }
        lines.push(PricedLine {
            product_id: item.product_id,
            quantity: item.quantity,
            unit_price: price.price,
        });
    }
    Ok((lines, currency))
}

/// The response to what creating an order came to.
fn answer(orders: &Orders, created: Created) -> Result<Response> {
    match created {
        Created::Answer {
            status,
            body,
            replayed,
        } => {
            if !replayed {
                orders.relay.wake();
                orders.metrics.created.inc();
            }
            let location = format!("/v1/orders/{}", body["id"].as_str().unwrap_or_default());
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::CREATED);
            let mut response = (status, [(header::LOCATION, location)], Json(body)).into_response();
            if replayed {
                response.headers_mut().insert(
                    "idempotent-replayed",
                    header::HeaderValue::from_static("true"),
                );
            }
            Ok(response)
        }
        Created::InFlight => Err(Problem::new(
            StatusCode::CONFLICT,
            "idempotency-key-in-flight",
            "Request in progress",
            "a request with this Idempotency-Key is still being processed; retry later",
        )
        .with_field("Idempotency-Key")
        .with_retry_after(1)
        .into()),
        Created::KeyReused => Err(Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "idempotency-key-reused",
            "Idempotency-Key reused",
            "this Idempotency-Key was used for a different request body",
        )
        .with_field("Idempotency-Key")
        .into()),
    }
}

async fn list(State(orders): State<Orders>, RawQuery(query): RawQuery) -> Result<Response> {
    let params = query_params(query.as_deref(), &["limit", "cursor"])?;
    let page = page(&params, PAGE)?;
    let (items, more) = store::list(&orders.pool, page.cursor, page.limit).await?;
    let next = more
        .then(|| items.last().map(|o| o["id"].clone()))
        .flatten();
    Ok(Json(json!({ "items": items, "next_cursor": next })).into_response())
}

async fn one(State(orders): State<Orders>, PathUuid(id): PathUuid) -> Result<Response> {
    let order = store::get(&orders.pool, id)
        .await?
        .ok_or_else(Problem::not_found)?;
    Ok(Json(order).into_response())
}

async fn cancel(State(orders): State<Orders>, PathUuid(id): PathUuid) -> Result<Response> {
    let mut tx = orders.pool.begin().await?;
    let applied = store::apply(
        &mut tx,
        id,
        Event::CancelRequested,
        &orders.prefix,
        &orders.limits,
    )
    .await?;
    match applied {
        None => return Err(Problem::not_found().into()),
        Some(Err(Ignored::Terminal)) => {
            return Err(conflict("the order is already finished").into());
        }
        Some(Err(_)) => {
            return Err(conflict(
                "the shipment is being booked or the order is already being cancelled",
            )
            .into());
        }
        Some(Ok(_)) => {}
    }
    tx.commit().await?;
    orders.relay.wake();
    let order = store::get(&orders.pool, id)
        .await?
        .ok_or_else(Problem::not_found)?;
    Ok((StatusCode::ACCEPTED, Json(order)).into_response())
}

fn conflict(detail: &str) -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "cannot-cancel",
        "Cannot cancel",
        detail,
    )
}
