//! `hybroker admin backup DIR` and `hybroker admin restore DIR`: run on the broker's host with its
//! config (found as the broker finds it); no connection to the broker is needed. See
//! [`crate::broker::backup`] for what a backup holds.

use std::path::PathBuf;

use clap::Args;

use super::report::{EXIT_OK, Output, print_json};
use crate::broker::backup::{self, MANIFEST};
use crate::config::BrokerConfig;

#[derive(Args)]
pub struct BackupArgs {
    /// A new or empty directory for the backup (made 0700).
    pub dir: PathBuf,
    /// The broker's config: this, else `HYBROKER_CONFIG`, else `./config/broker.toml`, else
    /// `/etc/hybroker/broker.toml`.
    #[arg(long, env = "HYBROKER_CONFIG")]
    pub config: Option<PathBuf>,
}

fn load(config: Option<PathBuf>) -> anyhow::Result<(BrokerConfig, PathBuf)> {
    let path = crate::config::find(config, "broker")?;
    // Not the broker's start-up checks: a restore runs before the broker's certificate exists.
    Ok((BrokerConfig::load_for_planning(&path)?, path))
}

/// Takes a backup while the broker runs.
pub async fn backup(args: BackupArgs, out: Output) -> anyhow::Result<i32> {
    let (config, path) = load(args.config)?;
    let manifest = backup::backup(&config, &path, &args.dir, env!("HYBROKER_VERSION")).await?;
    match out {
        Output::Json => print_json(&manifest),
        Output::Table => {
            let dir = args.dir.display();
            println!("backed up {} jobs (schema {}) to {dir}:", manifest.jobs, manifest.schema_version);
            for file in &manifest.files {
                println!("  {:<28} {:>12} bytes  from {}", file.name, file.bytes, file.source);
            }
            println!(
                "{MANIFEST} has each file's SHA-256. Keep the directory private: it holds the CA and secrets keys."
            );
            println!("restore on a stopped broker: hybroker admin restore {dir} --config <its broker.toml>");
        }
    }
    Ok(EXIT_OK)
}

/// Puts a backup back where the config says, for a broker that is not running.
pub async fn restore(args: BackupArgs, out: Output) -> anyhow::Result<i32> {
    let (config, _) = load(args.config)?;
    let restored = backup::restore(&config, &args.dir).await?;
    match out {
        Output::Json => print_json(
            &restored
                .iter()
                .map(|(name, to, written)| serde_json::json!({"name": name, "to": to, "written": written}))
                .collect::<Vec<_>>(),
        ),
        Output::Table => {
            for (name, to, written) in &restored {
                let what = if *written { "restored" } else { "already there" };
                println!("  {name:<28} {what:<14} {}", to.display());
            }
            println!("start the broker; re-issue its own certificate from the restored CA if this is a new host");
        }
    }
    Ok(EXIT_OK)
}
