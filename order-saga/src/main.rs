//! The order-saga binary: one subcommand per process (`orders`, `inventory`, `payment`,
//! `shipping`, `provider`), `all` of them in one, and the `dead-letters` operator command.

use clap::{Parser, Subcommand};
use order_saga::{
    all::{AllSettings, DeadLetterCommand, dead_letter_command},
    inventory::{self, InventorySettings},
    orders::{self, OrdersSettings},
    payment::{self, PaymentSettings},
    provider::{self, ProviderSettings},
    shipping::{self, ShippingSettings},
};

#[derive(Debug, Parser)]
#[command(
    name = "order-saga",
    version,
    about = "Orders over an orchestrated saga: orders, inventory, payment, shipping and a fake payment provider"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The orders service: the API buyers call and the saga's orchestrator (port 8083).
    Orders(OrdersSettings),
    /// The inventory service: products, stock and holds (port 8084).
    Inventory(InventorySettings),
    /// The payment service: payments per order, through the provider (port 8085).
    Payment(PaymentSettings),
    /// The shipping service: shipments per order (port 8086).
    Shipping(ShippingSettings),
    /// The fake external payment provider, its failures set by flags (port 8089).
    Provider(ProviderSettings),
    /// Every service and the provider in one process, for local trials.
    All(AllSettings),
    /// Lists or replays dead letters.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let shutdown = common::shutdown::signal();
    match cli.command {
        Command::Orders(settings) => {
            common::telemetry::init(&settings.shared.telemetry);
            orders::build(settings)
                .await?
                .run_until_stopped(shutdown)
                .await
        }
        Command::Inventory(settings) => {
            common::telemetry::init(&settings.shared.telemetry);
            inventory::build(settings)
                .await?
                .run_until_stopped(shutdown)
                .await
        }
        Command::Payment(settings) => {
            common::telemetry::init(&settings.shared.telemetry);
            payment::build(settings)
                .await?
                .run_until_stopped(shutdown)
                .await
        }
        Command::Shipping(settings) => {
            common::telemetry::init(&settings.shared.telemetry);
            shipping::build(settings)
                .await?
                .run_until_stopped(shutdown)
                .await
        }
        Command::Provider(settings) => {
            common::telemetry::init(&settings.telemetry);
            provider::Application::build(settings)
                .await?
                .run_until_stopped(shutdown)
                .await
        }
        Command::All(settings) => run_all(settings, shutdown).await,
        Command::DeadLetters(command) => dead_letter_command(command).await,
    }
}

/// Every process of the system in this one, stopping together.
async fn run_all(
    settings: AllSettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    #[derive(Parser)]
    struct One<T: clap::Args> {
        #[command(flatten)]
        settings: T,
    }
    let provider: One<ProviderSettings> = provider_settings(&settings)?;
    common::telemetry::init(&provider.settings.telemetry);
    let provider_url = format!("http://{}", settings.provider_listen);
    let inventory_url = format!("http://{}", settings.inventory_listen);
    let inventory: One<InventorySettings> =
        settings.service("inventory", settings.inventory_listen, &[])?;
    let payment: One<PaymentSettings> = settings.service(
        "payment",
        settings.payment_listen,
        &["--provider-url".into(), provider_url],
    )?;
    let shipping: One<ShippingSettings> =
        settings.service("shipping", settings.shipping_listen, &[])?;
    let orders: One<OrdersSettings> = settings.service(
        "orders",
        settings.orders_listen,
        &["--inventory-url".into(), inventory_url],
    )?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.changed().await;
        }
    };
    let provider = provider::Application::build(provider.settings).await?;
    let inventory = inventory::build(inventory.settings).await?;
    let payment = payment::build(payment.settings).await?;
    let shipping = shipping::build(shipping.settings).await?;
    let orders = orders::build(orders.settings).await?;
    let runs = futures_util::future::try_join5(
        provider.run_until_stopped(stopped()),
        inventory.run_until_stopped(stopped()),
        payment.run_until_stopped(stopped()),
        shipping.run_until_stopped(stopped()),
        orders.run_until_stopped(stopped()),
    );
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(());
    });
    runs.await.map(|_| ())
}

fn provider_settings<T: Parser>(settings: &AllSettings) -> anyhow::Result<T> {
    T::try_parse_from([
        "provider".to_owned(),
        "--listen".into(),
        settings.provider_listen.to_string(),
    ])
    .map_err(Into::into)
}
