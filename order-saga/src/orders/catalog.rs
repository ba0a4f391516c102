//! Prices, read from the inventory service when an order is created. A product's price
//! and currency do not change once created (the inventory API offers no way to), so each
//! is fetched once per process and kept.

use std::{collections::HashMap, sync::Arc, time::Duration};

use common::problem::Problem;
use parking_lot::RwLock;
use serde::Deserialize;
use uuid::Uuid;

/// A product's price.
#[derive(Debug, Clone, Deserialize)]
pub struct Price {
    /// Minor units.
    pub price: i64,
    /// ISO 4217.
    pub currency: String,
}

/// The prices of the inventory at `base`; cheap to clone.
#[derive(Clone)]
pub struct Catalog {
    base: String,
    http: reqwest::Client,
    known: Arc<RwLock<HashMap<Uuid, Price>>>,
}

impl Catalog {
    /// Prices from the inventory service at `base` (`http://host:port`).
    pub fn new(base: &str, timeout: Duration) -> anyhow::Result<Self> {
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http: reqwest::Client::builder().timeout(timeout).build()?,
            known: Arc::default(),
        })
    }

    /// The price of `product`: `Ok(None)` when inventory does not know it; a 503 problem when
    /// inventory cannot be asked.
    pub async fn price(&self, product: Uuid) -> Result<Option<Price>, Problem> {
        if let Some(price) = self.known.read().get(&product) {
            return Ok(Some(price.clone()));
        }
        let unavailable = |error: &dyn std::fmt::Display| {
            tracing::warn!(%error, "inventory unreachable for a price");
            Problem::unavailable(
                "the inventory service is unavailable; nothing was changed",
                1,
            )
        };
        let response = self
            .http
            .get(format!("{}/v1/products/{product}", self.base))
            .send()
            .await
            .map_err(|e| unavailable(&e))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(unavailable(&response.status()));
        }
        let price: Price = response.json().await.map_err(|e| unavailable(&e))?;
        self.known.write().insert(product, price.clone());
        Ok(Some(price))
    }
}
