//! What the services' integration tests, the load test and the benches share, so each
//! backend is reached, each token minted and each error checked the same way, compiled once.
//!
//! # Layout
//! - this file: a fresh PostgreSQL database per test and the test Redis (a clear panic,
//!   never a skip, when either is down), and a private `redis-server` a test may kill.
//! - [`access_token`]: access tokens signed with the fixture keys, as the gateway issues them.
//! - [`problem_json`]: the assertion on an `application/problem+json` response.
//! - [`forwarder`]: a TCP forwarder to cut a service off from its backend and back.
//! - [`free_port`]: a loopback port nothing listens on.
//! - [`polling`]: waiting, with a deadline, for a condition to hold.

pub mod access_token;
pub mod forwarder;
pub mod free_port;
pub mod polling;
pub mod problem_json;

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use sqlx::{Connection, Executor, PgConnection};
use uuid::Uuid;

/// The PostgreSQL server tests use (`TEST_DATABASE_URL`, else the local one).
pub fn test_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The Redis tests share (`TEST_REDIS_URL`, else the local one).
pub fn test_redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The shared test Redis's URL once it answers `PING`; panics saying how to start it when it
/// does not, so a test or bench fails with instructions instead of deep in a Redis error.
pub async fn require_redis() -> String {
    let url = test_redis_url();
    let reachable = async {
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    if let Err(error) = tokio::time::timeout(Duration::from_secs(3), reachable)
        .await
        .unwrap_or_else(|_| Err((redis::ErrorKind::Io, "timed out").into()))
    {
        panic!(
            "Redis is not reachable at {url} ({error}). Start it with \
             `redis-server --daemonize yes --save '' --appendonly no`, or point TEST_REDIS_URL \
             at a running server (scripts/test does both)."
        );
    }
    url
}

/// A new, empty database named `{label}_{uuid}` for one test; its URL. Panics saying how to
/// start PostgreSQL when it does not answer.
///
/// The test does not drop it: the service it spawned may still hold connections when it
/// ends, and a failed test's data is worth a look. `scripts/test` drops them all after the
/// run (`scripts/drop-test-databases`; the UUIDv7 in the name dates each one).
pub async fn fresh_database(label: &str) -> String {
    let admin = test_database_url();
    let mut conn = PgConnection::connect(&admin).await.unwrap_or_else(|error| {
        panic!(
            "PostgreSQL is not reachable at {admin} ({error}). Start it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, \
             or point TEST_DATABASE_URL at a running server (scripts/test does both)."
        )
    });
    let name = format!("{label}_{}", Uuid::now_v7().simple());
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("cannot create a test database");
    let (base, _) = admin
        .rsplit_once('/')
        .expect("TEST_DATABASE_URL has no database");
    format!("{base}/{name}")
}

/// A private Redis a test may kill without disturbing the others; killed when dropped.
pub struct PrivateRedis {
    port: u16,
    child: Child,
}

impl PrivateRedis {
    /// Starts `redis-server` on `port` (nothing saved to disk) and waits until it accepts.
    pub fn start(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start redis-server (Debian package redis-server)");
        let redis = Self { port, child };
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("private redis-server did not start on port {port}");
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Freezes it (SIGSTOP): its connections stay open and nothing answers, as when a
    /// connection is half open. [`PrivateRedis::thaw`] lets it go on.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen Redis go on (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("cannot run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Stops it (a test restarts it with [`PrivateRedis::start`] on the same port).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
