//! The api-gateway binary: read settings, start telemetry, serve until SIGTERM.

use api_gateway::{settings::Settings, startup::Application};
use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let settings = Settings::parse();
    common::telemetry::init(&settings.telemetry);
    let application = Application::build(settings).await?;
    application
        .run_until_stopped(common::shutdown::signal())
        .await
}
