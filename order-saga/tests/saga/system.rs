//! The whole system as real processes: the provider and the four services, each spawned from
//! the `order-saga` binary on port 0 with a fresh database and a stream prefix of its own,
//! so tests can kill one with SIGKILL and start it again under the same instance name.

use std::{collections::HashMap, process::Stdio, time::Duration};

use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};
use uuid::Uuid;

pub use test_support::polling::poll_until;

/// How long a saga may take to end in the tests (its steps answer in milliseconds).
pub const SAGA_WAIT: Duration = Duration::from_secs(30);

/// A process of the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Provider,
    Inventory,
    Payment,
    Shipping,
    Orders,
}

impl Role {
    fn subcommand(self) -> &'static str {
        match self {
            Self::Provider => "provider",
            Self::Inventory => "inventory",
            Self::Payment => "payment",
            Self::Shipping => "shipping",
            Self::Orders => "orders",
        }
    }
}

/// Extra flags per process, and how many instances of each service.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub flags: HashMap<Role, Vec<String>>,
    pub instances: HashMap<Role, usize>,
    /// A Redis of the test's own (one it may stop), instead of the shared one.
    pub redis_url: Option<String>,
}

impl Options {
    pub fn flag(mut self, role: Role, flag: &str, value: &str) -> Self {
        let flags = self.flags.entry(role).or_default();
        flags.push(flag.to_owned());
        flags.push(value.to_owned());
        self
    }

    pub fn instances(mut self, role: Role, count: usize) -> Self {
        self.instances.insert(role, count);
        self
    }
}

/// One running process.
pub struct Proc {
    child: Child,
    pub address: String,
    args: Vec<String>,
}

impl Proc {
    async fn spawn(args: Vec<String>) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_order-saga"))
            .args(&args)
            .env("LOG_FORMAT", "json")
            .env(
                "RUST_LOG",
                std::env::var("SAGA_LOG").unwrap_or_else(|_| "warn,order_saga=info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("cannot start order-saga");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let address = tokio::time::timeout(Duration::from_secs(20), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                let log: Value = serde_json::from_str(&line).unwrap_or_default();
                if log["fields"]["message"] == "listening" {
                    return log["fields"]["addr"].as_str().unwrap().to_owned();
                }
            }
            panic!("order-saga {} exited before listening", args[0]);
        })
        .await
        .unwrap_or_else(|_| panic!("order-saga {} did not listen within 20 s", args[0]));
        // Keep draining its log so it never blocks on a full pipe; SAGA_LOG=<filter> shows it.
        let echo = std::env::var_os("SAGA_LOG")
            .is_some()
            .then(|| args[0].clone());
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(name) = &echo {
                    eprintln!("[{name}] {line}");
                }
            }
        });
        Proc {
            child,
            address: format!("http://{address}"),
            args,
        }
    }

    /// SIGKILL: no shutdown, nothing flushed.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("cannot kill");
    }

    /// SIGTERM, and the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("still running");
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        tokio::time::timeout(Duration::from_secs(15), self.child.wait())
            .await
            .expect("did not stop within 15 s")
            .unwrap()
    }

    /// The same command line again (same instance name), on a new port.
    pub async fn restart(&mut self) {
        let _ = self.child.kill().await;
        *self = Proc::spawn(self.args.clone()).await;
    }
}

/// The system under test.
pub struct System {
    pub procs: HashMap<Role, Vec<Proc>>,
    pub pool: PgPool,
    pub database_url: String,
    pub redis_url: String,
    pub prefix: String,
    pub http: reqwest::Client,
}

impl System {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(options: Options) -> Self {
        let redis_url = match options.redis_url.clone() {
            Some(url) => url,
            None => test_support::require_redis().await,
        };
        let database_url = test_support::fresh_database("saga_test").await;
        let prefix = format!("saga-test-{}", Uuid::now_v7().simple());
        let mut procs: HashMap<Role, Vec<Proc>> = HashMap::new();
        let provider = Proc::spawn(with(
            vec!["provider".into(), "--listen".into(), "127.0.0.1:0".into()],
            options.flags.get(&Role::Provider),
        ))
        .await;
        procs.insert(Role::Provider, vec![provider]);
        for role in [Role::Inventory, Role::Payment, Role::Shipping, Role::Orders] {
            for i in 0..options.instances.get(&role).copied().unwrap_or(1) {
                let args = service_args(
                    role,
                    &format!("{}-{i}", role.subcommand()),
                    &database_url,
                    &redis_url,
                    &prefix,
                    &procs,
                );
                let proc = Proc::spawn(with(args, options.flags.get(&role))).await;
                procs.entry(role).or_default().push(proc);
            }
        }
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&database_url)
            .await
            .expect("cannot connect to the test database");
        System {
            procs,
            pool,
            database_url,
            redis_url,
            prefix,
            http: reqwest::Client::new(),
        }
    }

    /// One more instance of `role`, named `instance`, whose database is `database_url`.
    pub async fn spawn(&self, role: Role, instance: &str, database_url: &str) -> Proc {
        let args = service_args(
            role,
            instance,
            database_url,
            &self.redis_url,
            &self.prefix,
            &self.procs,
        );
        Proc::spawn(args).await
    }

    pub fn url(&self, role: Role, path: &str) -> String {
        format!("{}{path}", self.procs[&role][0].address)
    }

    /// A product with `stock` units at `price` minor units (EUR).
    pub async fn product(&self, stock: i64, price: i64) -> Uuid {
        self.product_in(stock, price, "EUR").await
    }

    /// A product with `stock` units at `price` minor units of `currency`.
    pub async fn product_in(&self, stock: i64, price: i64, currency: &str) -> Uuid {
        let response = self
            .http
            .post(self.url(Role::Inventory, "/v1/products"))
            .json(&json!({
                "sku": format!("sku-{}", Uuid::now_v7().simple()),
                "name": "Widget",
                "price": price,
                "currency": currency,
                "stock": stock,
            }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        let body: Value = response.json().await.unwrap();
        body["id"].as_str().unwrap().parse().unwrap()
    }

    /// POSTs an order body with a fresh key; the response.
    pub async fn post_order(&self, body: &Value) -> reqwest::Response {
        self.http
            .post(self.url(Role::Orders, "/v1/orders"))
            .header("idempotency-key", Uuid::now_v7().to_string())
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// Orders `quantity` of `product`; the new order's id.
    pub async fn order(
        &self,
        product: Uuid,
        quantity: i64,
        payment_method: &str,
        country: &str,
    ) -> Uuid {
        let response = self
            .post_order(&order_body(product, quantity, payment_method, country))
            .await;
        assert_eq!(response.status(), 201, "{}", response.text().await.unwrap());
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["status"], "pending");
        body["id"].as_str().unwrap().parse().unwrap()
    }

    pub async fn get_order(&self, id: Uuid) -> Value {
        self.http
            .get(self.url(Role::Orders, &format!("/v1/orders/{id}")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until the order is terminal; the order.
    pub async fn finished(&self, id: Uuid) -> Value {
        poll_until(&format!("order {id} to finish"), SAGA_WAIT, async || {
            let status: Option<String> =
                sqlx::query_scalar("SELECT status FROM orders.orders WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&self.pool)
                    .await
                    .ok()
                    .flatten();
            status.filter(|s| s != "pending")
        })
        .await;
        self.get_order(id).await
    }

    /// Waits until no order is pending.
    pub async fn all_finished(&self, within: Duration) {
        poll_until("every order to finish", within, async || {
            let pending: i64 =
                sqlx::query_scalar("SELECT count(*) FROM orders.orders WHERE status = 'pending'")
                    .fetch_one(&self.pool)
                    .await
                    .ok()?;
            (pending == 0).then_some(())
        })
        .await;
    }

    /// Every invariant holds.
    pub async fn assert_invariants(&self) {
        let violations = order_saga::invariants::check(&self.pool, Duration::from_secs(2))
            .await
            .unwrap();
        assert!(
            violations.is_empty(),
            "invariants broken:\n{}",
            violations
                .iter()
                .map(|v| format!("  {v}\n"))
                .collect::<String>()
        );
    }

    /// The provider's books.
    pub async fn provider_summary(&self) -> Value {
        self.http
            .get(self.url(Role::Provider, "/v1/summary"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Changes the provider's behaviour.
    pub async fn provider_behaviour(&self, behaviour: Value) {
        let response = self
            .http
            .put(self.url(Role::Provider, "/admin/behaviour"))
            .json(&behaviour)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "{}",
            response.text().await.unwrap()
        );
    }

    pub async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    /// Product stock: (available, held, sold).
    pub async fn stock(&self, product: Uuid) -> (i32, i32, i32) {
        sqlx::query_as("SELECT available, held, sold FROM inventory.products WHERE id = $1")
            .bind(product)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

/// The command line of a service instance in the system of `procs`.
fn service_args(
    role: Role,
    instance: &str,
    database_url: &str,
    redis_url: &str,
    prefix: &str,
    procs: &HashMap<Role, Vec<Proc>>,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        role.subcommand().into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--database-url".into(),
        database_url.to_owned(),
        "--redis-url".into(),
        redis_url.to_owned(),
        "--stream-prefix".into(),
        prefix.to_owned(),
        "--instance".into(),
        instance.to_owned(),
        // Tests wait for redeliveries; production waits longer.
        "--reclaim-idle".into(),
        "1s".into(),
        "--reclaim-every".into(),
        "200ms".into(),
        // Tests run side by side against one PostgreSQL (max_connections 100).
        "--database-pool-size".into(),
        "4".into(),
    ];
    match role {
        Role::Payment => args.extend([
            "--provider-url".into(),
            procs[&Role::Provider][0].address.clone(),
        ]),
        Role::Orders => args.extend([
            "--inventory-url".into(),
            procs[&Role::Inventory][0].address.clone(),
        ]),
        _ => {}
    }
    args
}

fn with(mut args: Vec<String>, extra: Option<&Vec<String>>) -> Vec<String> {
    args.extend(extra.into_iter().flatten().cloned());
    args
}

/// An order body.
pub fn order_body(product: Uuid, quantity: i64, payment_method: &str, country: &str) -> Value {
    json!({
        "customer_id": "customer-1",
        "items": [{"product_id": product, "quantity": quantity}],
        "payment_method": payment_method,
        "shipping_address": {
            "name": "Ada Lovelace", "line1": "1 Analytical Row", "city": "London",
            "postal_code": "N1 1AA", "country": country
        }
    })
}

/// The steps of an order as (step, status) pairs, in order.
pub fn steps(order: &Value) -> Vec<(String, String)> {
    order["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["step"].as_str().unwrap().to_owned(),
                s["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}
