//! A PostgreSQL database made for one load-test run, dropped after it.

use anyhow::Context;
use sqlx::{Connection as _, Executor, PgConnection};

/// A database made for one run, dropped after it.
pub struct Database {
    admin_url: String,
    name: String,
    /// Its URL.
    pub url: String,
}

impl Database {
    /// Creates `<label>_loadtest_<uuid>` on `LOADTEST_DATABASE_URL` (or `TEST_DATABASE_URL`).
    pub async fn create(label: &str) -> anyhow::Result<Self> {
        let admin_url = std::env::var("LOADTEST_DATABASE_URL")
            .or_else(|_| std::env::var("TEST_DATABASE_URL"))
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let mut conn = PgConnection::connect(&admin_url).await.with_context(|| {
            format!("PostgreSQL is not reachable at {admin_url}; set LOADTEST_DATABASE_URL")
        })?;
        let name = format!("{label}_loadtest_{}", uuid::Uuid::now_v7().simple());
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await?;
        let (base, _) = admin_url
            .rsplit_once('/')
            .context("the database URL names no database")?;
        let url = format!("{base}/{name}");
        Ok(Self {
            admin_url,
            name,
            url,
        })
    }

    /// Drops it (best effort).
    pub async fn drop_it(&self) {
        if let Ok(mut conn) = PgConnection::connect(&self.admin_url).await {
            let _ = conn
                .execute(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name).as_str())
                .await;
        }
    }
}
