//! `hybroker catalog`: the instance catalog placement uses (README "Placement → instance catalog").
//!
//! - `catalog show [--catalog FILE] [--region R]`: the types, their GPUs and regions.
//! - `catalog refresh --out FILE`: a catalog file from the providers' APIs where credentials
//!   exist — EC2 `DescribeInstanceTypes` + `DescribeInstanceTypeOfferings` in each `--aws-region`
//!   (credentials from the AWS default chain), Azure `Microsoft.Compute/skus` of
//!   `--azure-subscription` (credentials from `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`,
//!   `AZURE_CLIENT_SECRET`). A cloud not asked keeps its entries from the base catalog (the
//!   built-in one unless `--base FILE`). The file is checked as the broker checks it before it is
//!   written.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::capacity::aws::catalog::{AwsCatalogQuery, describe_catalog as describe_aws};
use crate::capacity::azure::skus::{AzureCatalogQuery, SKUS_API_VERSION, describe_catalog as describe_azure};
use crate::config::azure_env::azure_credential_from_env;
use crate::model::capacity::AzureCredential;
use crate::model::catalog::{Catalog, CatalogEntry, CatalogFile};
use crate::model::price::Cloud;

#[derive(Subcommand)]
pub enum CatalogCommand {
    /// Print the catalog's instance types: GPUs, vCPUs, memory and the regions that offer them.
    Show {
        /// A catalog file (default: the built-in one).
        #[arg(long)]
        catalog: Option<PathBuf>,
        /// Only the types offered in this region.
        #[arg(long)]
        region: Option<String>,
    },
    /// Write a catalog file from the providers' APIs (EC2, Azure resource SKUs).
    Refresh(RefreshArgs),
}

#[derive(Args)]
pub struct RefreshArgs {
    /// Where to write the catalog (JSON; `[placement] catalog = "FILE"` loads it).
    #[arg(long)]
    pub out: PathBuf,
    /// An AWS region whose offerings to ask (repeat for more).
    #[arg(long = "aws-region")]
    pub aws_regions: Vec<String>,
    /// One EC2 endpoint for every region (an emulator); default: each region's own.
    #[arg(long)]
    pub aws_endpoint: Option<String>,
    /// The Azure subscription whose resource SKUs to list.
    #[arg(long)]
    pub azure_subscription: Option<String>,
    /// Keep only these Azure locations (repeat; default: every location the subscription sees).
    #[arg(long = "azure-location")]
    pub azure_locations: Vec<String>,
    /// Resource Manager's base URL (default: the public cloud's).
    #[arg(long)]
    pub azure_endpoint: Option<String>,
    /// Microsoft Entra's authority (default: the public cloud's).
    #[arg(long)]
    pub azure_authority: Option<String>,
    /// Extra trusted roots for Resource Manager and Entra (PEM).
    #[arg(long)]
    pub azure_ca_file: Option<PathBuf>,
    /// A CPU-only type to keep (repeat); the base catalog's CPU types are kept anyway.
    #[arg(long = "cpu-type")]
    pub cpu_types: Vec<String>,
    /// The catalog whose entries a cloud not asked keeps (default: the built-in one).
    #[arg(long)]
    pub base: Option<PathBuf>,
}

pub async fn run(command: CatalogCommand) -> anyhow::Result<()> {
    match command {
        CatalogCommand::Show { catalog, region } => {
            let catalog = match catalog {
                Some(path) => load(&path)?,
                None => Catalog::builtin(),
            };
            print!("{}", show(&catalog, region.as_deref()));
            Ok(())
        }
        CatalogCommand::Refresh(args) => refresh(args).await,
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Catalog> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    Catalog::parse(&text).with_context(|| format!("catalog {}", path.display()))
}

/// The catalog as a table, one type a line.
fn show(catalog: &Catalog, region: Option<&str>) -> String {
    let mut out = format!("catalog {}\n", catalog.as_of());
    out += &format!(
        "{:<6} {:<28} {:>4} {:<14} {:>5} {:>7}  REGIONS\n",
        "CLOUD", "TYPE", "GPUS", "MODEL", "VCPUS", "MEM_GIB"
    );
    for t in catalog.types().iter().filter(|t| region.is_none_or(|r| catalog.offered_in(t.name, r))) {
        out += &format!(
            "{:<6} {:<28} {:>4} {:<14} {:>5} {:>7}  {}\n",
            t.cloud.as_str(),
            t.name,
            t.gpus,
            t.gpu_model.unwrap_or("-"),
            t.vcpus,
            t.memory_gib,
            catalog.regions(t.name).join(",")
        );
    }
    out
}

async fn refresh(args: RefreshArgs) -> anyhow::Result<()> {
    if args.aws_regions.is_empty() && args.azure_subscription.is_none() {
        anyhow::bail!("nothing to ask: give --aws-region (repeatable) and/or --azure-subscription");
    }
    let base = match &args.base {
        Some(path) => load(path)?,
        None => Catalog::builtin(),
    };
    let base = base.file().clone();
    let today = today();
    let cpu_types = |cloud: Cloud| -> Vec<String> {
        let kept = base.instance_types.iter().filter(|e| e.cloud == cloud && e.gpus == 0).map(|e| e.name.clone());
        kept.chain(args.cpu_types.iter().cloned()).collect()
    };
    let mut refreshed: Vec<CatalogEntry> = Vec::new();
    let mut sources = std::collections::BTreeMap::new();
    let mut asked = Vec::new();
    if !args.aws_regions.is_empty() {
        let query = AwsCatalogQuery {
            regions: args.aws_regions.clone(),
            endpoint: args.aws_endpoint.clone(),
            static_credentials: None,
            cpu_types: cpu_types(Cloud::Aws),
            source: "ec2-api".into(),
        };
        let got = describe_aws(&query).await.context("aws")?;
        let at = args.aws_endpoint.as_deref().map(|e| format!(" at {e}")).unwrap_or_default();
        sources.insert(
            "ec2-api".to_owned(),
            format!(
                "EC2 DescribeInstanceTypes and DescribeInstanceTypeOfferings (LocationType=region){at} on {today}, in \
                 the regions {}; the regions are those asked, not every region",
                args.aws_regions.join(", ")
            ),
        );
        println!("aws: {} types; skipped {} gpu types without a known model", got.entries.len(), got.skipped.len());
        refreshed.extend(got.entries);
        asked.push(Cloud::Aws);
    }
    if let Some(subscription) = &args.azure_subscription {
        let credential = azure_credential_from_env(&AzureCredential::default())
            .map_err(|problems| anyhow::anyhow!("azure credential: {}", problems.join("; ")))?;
        let query = AzureCatalogQuery {
            subscription_id: subscription.clone(),
            credential,
            endpoint: args.azure_endpoint.clone(),
            authority: args.azure_authority.clone(),
            ca_file: args.azure_ca_file.clone(),
            locations: args.azure_locations.clone(),
            cpu_types: cpu_types(Cloud::Azure),
            source: "azure-skus".into(),
        };
        let got = describe_azure(&query).await.context("azure")?;
        sources.insert(
            "azure-skus".to_owned(),
            format!(
                "Microsoft.Compute/skus (api-version {SKUS_API_VERSION}) of subscription {subscription} on {today}: the \
                 locations it may use; gpu models from the size names"
            ),
        );
        println!(
            "azure: {} types; skipped {} gpu sizes: {}",
            got.entries.len(),
            got.skipped.len(),
            got.skipped.join(", ")
        );
        refreshed.extend(got.entries);
        asked.push(Cloud::Azure);
    }
    let kept: Vec<CatalogEntry> = base.instance_types.iter().filter(|e| !asked.contains(&e.cloud)).cloned().collect();
    for e in &kept {
        if let Some(s) = base.sources.get(&e.source) {
            sources.insert(e.source.clone(), s.clone());
        }
    }
    let file = CatalogFile {
        as_of: today,
        note: "Written by `hybroker catalog refresh`: shapes and the regions that offer them, as the providers' APIs \
               answered; clouds not asked are kept from the base catalog."
            .into(),
        sources,
        instance_types: kept.into_iter().chain(refreshed).collect(),
    };
    let catalog = Catalog::from_file(file).context("the refreshed catalog")?;
    let text = serde_json::to_string_pretty(catalog.file())? + "\n";
    crate::private_files::write_atomically(&args.out, &text)?;
    println!("wrote {}: {} instance types (catalog {})", args.out.display(), catalog.types().len(), catalog.as_of());
    Ok(())
}

/// Today (UTC) as `YYYY-MM-DD`.
fn today() -> String {
    let d = time::OffsetDateTime::now_utc().date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_lists_the_types_of_a_region() {
        let c = Catalog::builtin();
        let all = show(&c, None);
        assert!(all.starts_with(&format!("catalog {}\n", c.as_of())), "{all}");
        assert_eq!(all.lines().count(), c.types().len() + 2);
        let eu = show(&c, Some("eu-west-1"));
        assert!(eu.contains("p4d.24xlarge") && !eu.contains("p4de.24xlarge") && !eu.contains("Standard_"), "{eu}");
        assert!(today().len() == 10 && today().starts_with("20"));
    }
}
