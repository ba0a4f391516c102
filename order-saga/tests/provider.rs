//! The fake payment provider and the payment service's client against it, over real HTTP:
//! the provider runs in-process on port 0 and is stopped and restarted like the real
//! process. Each test proves its claim through the provider's own totals (`/v1/summary`),
//! so "exactly one charge" is counted, not assumed.

use std::time::Duration;

use order_saga::{
    payment::client::{Authorization, PaymentError, ProviderClient, ProviderClientSettings},
    provider::{Application, ProviderSettings},
};
use prometheus_client::{encoding::text::encode, registry::Registry};
use serde_json::{Value, json};
use test_support::{polling::poll_until, problem_json::problem};
use tokio::{sync::oneshot, task::JoinHandle};
use uuid::Uuid;

/// A provider running in this process.
struct TestProvider {
    port: u16,
    url: String,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl TestProvider {
    async fn spawn() -> Self {
        Self::spawn_on(0).await
    }

    async fn spawn_on(port: u16) -> Self {
        let mut settings = ProviderSettings::for_tests();
        settings.serve.listen = ([127, 0, 0, 1], port).into();
        let app = Application::build(settings)
            .await
            .expect("the provider did not start");
        let port = app.port();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run_until_stopped(async {
            let _ = stopped.await;
        }));
        Self {
            port,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Stops the provider and waits until its listener is closed.
    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    async fn summary(&self) -> Value {
        self.http
            .get(format!("{}/v1/summary", self.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn behave(&self, behaviour: Value) {
        let response = self
            .http
            .put(format!("{}/admin/behaviour", self.url))
            .json(&behaviour)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }

    async fn authorize_raw(&self, key: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}/v1/authorizations", self.url))
            .header("idempotency-key", key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    /// Client settings that fail fast: short timeout, millisecond backoffs.
    fn client_settings(&self) -> ProviderClientSettings {
        let mut settings = ProviderClientSettings::new(self.url.parse().unwrap());
        settings.provider_timeout = Duration::from_millis(300);
        settings.provider_attempts = 4;
        settings.provider_backoff = Duration::from_millis(5);
        settings.provider_backoff_max = Duration::from_millis(20);
        settings.provider_breaker_failures = 10;
        settings.provider_breaker_open_for = Duration::from_millis(500);
        settings
    }
}

/// A client over `settings` and the registry its metrics are in.
fn client(settings: ProviderClientSettings) -> (ProviderClient, Registry) {
    let mut registry = Registry::with_prefix("order_saga_payment");
    let client = ProviderClient::new(settings, &mut registry).unwrap();
    (client, registry)
}

/// The value of the metric line starting with `series`, if present.
fn metric(registry: &Registry, series: &str) -> Option<f64> {
    let mut text = String::new();
    encode(&mut text, registry).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

fn card(amount: i64) -> Value {
    json!({"amount": amount, "currency": "EUR", "payment_method": "pm_card_ok"})
}

#[tokio::test]
async fn one_key_makes_one_authorization_and_another_body_under_it_is_refused() {
    let provider = TestProvider::spawn().await;

    let first = provider.authorize_raw("k-1", card(1999)).await;
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["status"], "authorized");
    assert_eq!(first["amount"], 1999);
    let again = provider.authorize_raw("k-1", card(1999)).await;
    assert_eq!(again.status(), 201, "a repeat gets the first answer");
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);

    let other = provider.authorize_raw("k-1", card(2000)).await;
    problem(other, 422, Some("Idempotency-Key")).await;

    // The same through the client: one order, asked twice, is one authorization.
    let (client, _registry) = client(provider.client_settings());
    let order = Uuid::now_v7();
    let one = client.authorize(order, 500, "EUR", "pm_card_ok").await;
    let two = client.authorize(order, 500, "EUR", "pm_card_ok").await;
    assert!(
        matches!(one, Ok(Authorization::Authorized { .. })),
        "{one:?}"
    );
    assert_eq!(one, two);

    let summary = provider.summary().await;
    assert_eq!(summary["authorizations"], 2, "{summary}");
    assert_eq!(summary["authorized_amount"], 1999 + 500, "{summary}");
    assert_eq!(summary["replays"], 2, "{summary}");

    let Ok(Authorization::Authorized { provider_id }) = one else {
        unreachable!()
    };
    let found: Value = provider
        .http
        .get(format!("{}/v1/authorizations/{provider_id}", provider.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found["idempotency_key"], format!("order-{order}-authorize"));
}

#[tokio::test]
async fn a_decline_is_an_answer_and_is_not_retried() {
    let provider = TestProvider::spawn().await;
    let (client, registry) = client(provider.client_settings());

    let answer = client
        .authorize(Uuid::now_v7(), 700, "EUR", "pm_card_declined")
        .await
        .unwrap();
    assert!(
        matches!(&answer, Authorization::Declined { reason, .. } if reason == "card_declined"),
        "{answer:?}"
    );
    let summary = provider.summary().await;
    assert_eq!(summary["authorize_requests"], 1, "{summary}");
    assert_eq!(summary["declined"], 1, "{summary}");
    assert_eq!(summary["authorized"], 0, "{summary}");
    assert_eq!(
        metric(
            &registry,
            "order_saga_payment_provider_calls_total{operation=\"authorize\",outcome=\"declined\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(&registry, "order_saga_payment_provider_retries_total"),
        None,
        "nothing was retried"
    );
}

#[tokio::test]
async fn a_lost_answer_is_looked_up_so_the_customer_is_charged_once() {
    let provider = TestProvider::spawn().await;
    // Every payment call is carried out, then hangs far past the client's 300 ms.
    provider
        .behave(json!({"timeout_rate": 1.0, "hang_for_ms": 5000}))
        .await;
    let (client, registry) = client(provider.client_settings());
    let order = Uuid::now_v7();

    let answer = client.authorize(order, 4200, "EUR", "pm_card_ok").await;
    let Ok(Authorization::Authorized { provider_id }) = answer else {
        panic!("expected the lookup to find the authorization, got {answer:?}")
    };
    let summary = provider.summary().await;
    assert_eq!(
        summary["authorize_requests"], 1,
        "found by lookup, not sent again: {summary}"
    );
    assert_eq!(summary["authorizations"], 1, "{summary}");
    assert_eq!(summary["injected_timeouts"], 1, "{summary}");

    client.capture(order, &provider_id).await.unwrap();
    // Calm again, the saga captures a second time (a redelivered command): no second charge.
    provider.behave(json!({"timeout_rate": 0.0})).await;
    client.capture(order, &provider_id).await.unwrap();

    let summary = provider.summary().await;
    assert_eq!(summary["captures"], 1, "{summary}");
    assert_eq!(summary["captured_amount"], 4200, "{summary}");
    assert_eq!(summary["authorizations"], 1, "{summary}");
    assert_eq!(
        metric(
            &registry,
            "order_saga_payment_provider_retries_total{operation=\"authorize\",reason=\"timeout\"}"
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn server_errors_are_retried_until_the_provider_answers() {
    let provider = TestProvider::spawn().await;
    provider.behave(json!({"fail_next": 2})).await;
    let (client, registry) = client(provider.client_settings());

    let answer = client
        .authorize(Uuid::now_v7(), 300, "EUR", "pm_card_ok")
        .await;
    assert!(
        matches!(answer, Ok(Authorization::Authorized { .. })),
        "{answer:?}"
    );
    let summary = provider.summary().await;
    assert_eq!(summary["authorize_requests"], 3, "{summary}");
    assert_eq!(summary["injected_errors"], 2, "{summary}");
    assert_eq!(summary["authorizations"], 1, "{summary}");
    assert_eq!(
        metric(
            &registry,
            "order_saga_payment_provider_retries_total{operation=\"authorize\",reason=\"server_error\"}"
        ),
        Some(2.0)
    );

    // When every attempt fails, the call is unavailable (retryable later) and made nothing.
    provider.behave(json!({"error_rate": 1.0})).await;
    let error = client
        .authorize(Uuid::now_v7(), 300, "EUR", "pm_card_ok")
        .await
        .unwrap_err();
    assert!(
        matches!(error, PaymentError::Unavailable { .. }),
        "{error:?}"
    );
    assert!(error.is_retryable());
    let summary = provider.summary().await;
    assert_eq!(summary["authorize_requests"], 3 + 4, "{summary}");
    assert_eq!(summary["authorizations"], 1, "{summary}");
}

#[tokio::test]
async fn a_refusal_is_not_retried() {
    let provider = TestProvider::spawn().await;
    let (client, _registry) = client(provider.client_settings());
    let order = Uuid::now_v7();
    let Authorization::Authorized { provider_id } = client
        .authorize(order, 900, "EUR", "pm_card_ok")
        .await
        .unwrap()
    else {
        panic!("expected an authorization")
    };
    client.capture(order, &provider_id).await.unwrap();

    let error = client.void(order, &provider_id).await.unwrap_err();
    assert!(
        matches!(&error, PaymentError::Rejected { status: 409, reason } if reason.contains("captured")),
        "{error:?}"
    );
    assert!(!error.is_retryable());
    client.refund(order, &provider_id).await.unwrap();
    let summary = provider.summary().await;
    assert_eq!(summary["voids"], 0, "{summary}");
    assert_eq!(summary["refunded_amount"], 900, "{summary}");
}

#[tokio::test]
async fn a_stopped_provider_opens_the_breaker_and_calls_fail_fast_until_it_is_back() {
    let mut provider = TestProvider::spawn().await;
    let mut settings = provider.client_settings();
    settings.provider_attempts = 3;
    settings.provider_breaker_failures = 3;
    let (client, registry) = client(settings);
    let state = "order_saga_payment_provider_breaker_state";
    assert_eq!(metric(&registry, state), Some(0.0));

    provider.stop().await;
    let error = client
        .authorize(Uuid::now_v7(), 100, "EUR", "pm_card_ok")
        .await
        .unwrap_err();
    assert!(
        matches!(error, PaymentError::Unavailable { .. }),
        "{error:?}"
    );
    assert_eq!(metric(&registry, state), Some(1.0));
    assert!(client.breaker_open());

    let error = client
        .authorize(Uuid::now_v7(), 100, "EUR", "pm_card_ok")
        .await
        .unwrap_err();
    assert!(
        matches!(error, PaymentError::CircuitOpen { retry_in } if retry_in <= Duration::from_millis(500)),
        "{error:?}"
    );
    assert!(error.is_retryable());
    assert_eq!(
        metric(
            &registry,
            "order_saga_payment_provider_calls_total{operation=\"authorize\",outcome=\"circuit_open\"}"
        ),
        Some(1.0)
    );

    // Back on the same port: once open_for has passed, a probe goes through and closes it.
    let provider = TestProvider::spawn_on(provider.port).await;
    let order = Uuid::now_v7();
    let answer = poll_until(
        "the breaker to let a probe through",
        Duration::from_secs(3),
        async || match client.authorize(order, 100, "EUR", "pm_card_ok").await {
            Err(PaymentError::CircuitOpen { .. }) => None,
            other => Some(other),
        },
    )
    .await;
    assert!(
        matches!(answer, Ok(Authorization::Authorized { .. })),
        "{answer:?}"
    );
    assert_eq!(metric(&registry, state), Some(0.0));
    assert_eq!(provider.summary().await["authorizations"], 1);
}

#[tokio::test]
async fn bad_input_gets_a_problem_and_changes_nothing() {
    let provider = TestProvider::spawn().await;
    let url = format!("{}/v1/authorizations", provider.url);
    let post = |key: Option<&str>, body: &str| {
        let mut request = provider
            .http
            .post(&url)
            .header("content-type", "application/json")
            .body(body.to_owned());
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        request.send()
    };
    let good = r#"{"amount": 100, "currency": "EUR", "payment_method": "pm_card_ok"}"#;

    problem(post(Some("k"), "{not json").await.unwrap(), 400, None).await;
    problem(
        post(None, good).await.unwrap(),
        400,
        Some("Idempotency-Key"),
    )
    .await;
    let long = "k".repeat(256);
    problem(
        post(Some(&long), good).await.unwrap(),
        400,
        Some("Idempotency-Key"),
    )
    .await;
    for (body, field) in [
        (
            r#"{"amount": -5, "currency": "EUR", "payment_method": "pm_card_ok"}"#,
            "amount",
        ),
        (
            r#"{"amount": 0, "currency": "EUR", "payment_method": "pm_card_ok"}"#,
            "amount",
        ),
        (
            r#"{"amount": 1.5, "currency": "EUR", "payment_method": "pm_card_ok"}"#,
            "amount",
        ),
        (
            r#"{"currency": "EUR", "payment_method": "pm_card_ok"}"#,
            "amount",
        ),
        (
            r#"{"amount": 100, "currency": "eur", "payment_method": "pm_card_ok"}"#,
            "currency",
        ),
        (
            r#"{"amount": 100, "currency": "EUR", "payment_method": ""}"#,
            "payment_method",
        ),
        (
            r#"{"amount": 100, "currency": "EUR", "payment_method": "pm", "tip": 1}"#,
            "tip",
        ),
    ] {
        problem(post(Some("k"), body).await.unwrap(), 422, Some(field)).await;
    }
    let no_type = provider
        .http
        .post(&url)
        .header("idempotency-key", "k")
        .body(good)
        .send()
        .await
        .unwrap();
    problem(no_type, 415, None).await;

    let get = |path: String| provider.http.get(format!("{}{path}", provider.url)).send();
    problem(
        get("/v1/authorizations".into()).await.unwrap(),
        400,
        Some("idempotency_key"),
    )
    .await;
    problem(
        get("/v1/authorizations?idempotency_key=nope".into())
            .await
            .unwrap(),
        404,
        None,
    )
    .await;
    problem(
        get("/v1/authorizations/not-a-uuid".into()).await.unwrap(),
        404,
        None,
    )
    .await;
    problem(
        get(format!("/v1/authorizations/{}", Uuid::now_v7()))
            .await
            .unwrap(),
        404,
        None,
    )
    .await;
    let capture = provider
        .http
        .post(format!(
            "{}/v1/authorizations/{}/capture",
            provider.url,
            Uuid::now_v7()
        ))
        .header("idempotency-key", "c")
        .send()
        .await
        .unwrap();
    problem(capture, 404, None).await;
    let admin = provider
        .http
        .put(format!("{}/admin/behaviour", provider.url))
        .json(&json!({"decline_rate": 2}))
        .send()
        .await
        .unwrap();
    problem(admin, 422, Some("decline_rate")).await;

    let summary = provider.summary().await;
    assert_eq!(summary["authorize_requests"], 0, "{summary}");
    assert_eq!(summary["authorizations"], 0, "{summary}");
    let behaviour: Value = get("/admin/behaviour".into())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        behaviour["decline_rate"], 0.0,
        "a refused change changes nothing"
    );

    // The same key is still free: nothing was stored under it.
    assert_eq!(post(Some("k"), good).await.unwrap().status(), 201);
    let metrics = get("/metrics".into()).await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(
            "order_saga_provider_operations_total{operation=\"authorize\",outcome=\"authorized\"} 1"
        ),
        "{metrics}"
    );
}
