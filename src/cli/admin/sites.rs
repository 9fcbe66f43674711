//! `hybroker admin sites [list|get SITE]`: the elastic sites' cloud capacity from the broker's
//! admin service, printed as the tenants' `hybroker sites` prints it (JSON in the gateway's shape).

use std::time::SystemTime;

use tonic::transport::Channel;

use super::connection::status_error;
use crate::cli::client::sites::{SitesCommand, site_details, sites_table};
use crate::cli::report::{Output, print_json};
use crate::gateway::api::{SiteCapacity, SiteList};
use crate::proto::{self, admin_service_client::AdminServiceClient};

/// Runs `admin sites …` (no subcommand: list).
pub(super) async fn sites(channel: Channel, command: Option<SitesCommand>, out: Output) -> anyhow::Result<()> {
    let mut client = AdminServiceClient::new(channel);
    let command = command.unwrap_or(SitesCommand::List);
    let site = match &command {
        SitesCommand::List => String::new(),
        SitesCommand::Get { site } => site.clone(),
    };
    let answer = client.list_sites(proto::ListSitesRequest { site }).await.map_err(status_error)?;
    let sites: Vec<SiteCapacity> = answer.into_inner().sites.into_iter().map(SiteCapacity::from).collect();
    match command {
        SitesCommand::List => match out {
            Output::Json => print_json(&SiteList { sites }),
            Output::Table => print!("{}", sites_table(&sites)),
        },
        SitesCommand::Get { site } => {
            let Some(found) = sites.into_iter().find(|s| s.site == site) else {
                anyhow::bail!("site {site} has no capacity provider");
            };
            match out {
                Output::Json => print_json(&found),
                Output::Table => print!("{}", site_details(&found, SystemTime::now())),
            }
        }
    }
    Ok(())
}
