//! The notification-server binary: read settings, start telemetry, serve until SIGTERM.

use clap::Parser;
use notification_server::{settings::Settings, startup::Application};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    common::telemetry::init(&settings.telemetry);
    let application = Application::build(settings).await?;
    application
        .run_until_stopped(common::shutdown::signal())
        .await
}
