//! The PostgreSQL and Redis the load test runs services against: where they are, starting
//! a local one that is installed but stopped (through `scripts/ensure-backends`, the same
//! code `scripts/test` runs), and a database made for one run and dropped after it.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context, bail};
use sqlx::{Connection as _, Executor, PgConnection};

/// The PostgreSQL server runs use: `LOADTEST_DATABASE_URL`, else `TEST_DATABASE_URL`, else
/// the local one.
pub fn postgres_url() -> String {
    std::env::var("LOADTEST_DATABASE_URL")
        .or_else(|_| std::env::var("TEST_DATABASE_URL"))
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The Redis runs use: `LOADTEST_REDIS_URL`, else `TEST_REDIS_URL`, else the local one.
pub fn redis_url() -> String {
    std::env::var("LOADTEST_REDIS_URL")
        .or_else(|_| std::env::var("TEST_REDIS_URL"))
        .unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A backend a scenario needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Redis,
}

impl Backend {
    /// The name `scripts/ensure-backends` takes.
    fn script_name(self) -> &'static str {
        match self {
            Self::Postgres => "postgres",
            Self::Redis => "redis",
        }
    }

    /// Its URL, for messages.
    pub fn url(self) -> String {
        match self {
            Self::Postgres => postgres_url(),
            Self::Redis => redis_url(),
        }
    }

    /// Whether it answers now (within 3 s).
    pub async fn answers(self) -> anyhow::Result<()> {
        let url = self.url();
        let attempt = async {
            match self {
                Self::Postgres => {
                    let connection = PgConnection::connect(&url).await?;
                    connection.close().await?;
                }
                Self::Redis => {
                    let mut connection = redis_connection(&url).await?;
                    let _: String = redis::cmd("PING").query_async(&mut connection).await?;
                }
            }
            anyhow::Ok(())
        };
        tokio::time::timeout(Duration::from_secs(3), attempt)
            .await
            .context("no answer within 3 s")?
    }

    /// Makes sure it answers: when it does not, runs `scripts/ensure-backends`, which starts
    /// a local server that is installed but stopped, and asks again. The error says how to
    /// get it running.
    pub async fn ensure(self) -> anyhow::Result<()> {
        let Err(first) = self.answers().await else {
            return Ok(());
        };
        let url = self.url();
        let Some(script) = ensure_script() else {
            bail!(
                "{self:?} does not answer at {url} ({first:#}), and scripts/ensure-backends, which \
                 starts a local one, was not found: run from the repository root, or start it \
                 yourself"
            );
        };
        println!(
            "{self:?} does not answer at {url}; running {}",
            script.display()
        );
        let env_name = match self {
            Self::Postgres => "TEST_DATABASE_URL",
            Self::Redis => "TEST_REDIS_URL",
        };
        let status = tokio::process::Command::new(&script)
            .arg(self.script_name())
            .env(env_name, &url)
            .stdin(Stdio::null())
            .status()
            .await
            .with_context(|| format!("failed to run {}", script.display()))?;
        if !status.success() {
            bail!("{self:?} is needed at {url} and could not be started (see above)");
        }
        self.answers()
            .await
            .with_context(|| format!("{self:?} was started but does not answer at {url}"))
    }
}

/// `scripts/ensure-backends` of the checkout this binary was built from, else of the
/// current directory.
fn ensure_script() -> Option<PathBuf> {
    let built_from = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/ensure-backends");
    [built_from, PathBuf::from("scripts/ensure-backends")]
        .into_iter()
        .find(|path| path.is_file())
}

/// A connection to the Redis at `url`.
pub async fn redis_connection(url: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    redis::Client::open(url)
        .with_context(|| format!("{url} is not a Redis URL"))?
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("Redis is not reachable at {url}"))
}

/// A database made for one run, dropped after it.
pub struct Database {
    admin_url: String,
    name: String,
    /// Its URL.
    pub url: String,
}

impl Database {
    /// Creates `<label>_loadtest_<uuid>` on [`postgres_url`].
    pub async fn create(label: &str) -> anyhow::Result<Self> {
        let admin_url = postgres_url();
        let mut conn = PgConnection::connect(&admin_url).await.with_context(|| {
            format!("PostgreSQL is not reachable at {admin_url}; set LOADTEST_DATABASE_URL")
        })?;
        let name = format!("{label}_loadtest_{}", uuid::Uuid::now_v7().simple());
        conn.execute(format!("CREATE DATABASE {name}").as_str())
            .await
            .with_context(|| format!("failed to create the database {name}"))?;
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

    /// Its name (for `pg_stat_database`).
    pub fn name(&self) -> &str {
        &self.name
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
