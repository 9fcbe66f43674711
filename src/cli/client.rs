//! The tenants' CLI: a client of the gateway's HTTP API. (in progress)

use clap::Subcommand;

#[derive(Subcommand)]
pub enum ClientCommand {}

pub async fn run(cmd: ClientCommand) -> anyhow::Result<i32> {
    match cmd {}
}
