//! The gateway: the tenants' HTTP/JSON API (in progress).

pub mod api;

use std::future::Future;

use tokio::net::TcpListener;

use crate::config::GatewayConfig;

/// Serves the gateway on `listener` until `shutdown` resolves.
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let _ = (config, listener);
    shutdown.await;
    Ok(())
}
