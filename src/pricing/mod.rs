//! Price feeds (docs/design.md §5): the Azure Retail Prices API, AWS price data and the snapshot file behind
//! one [`PriceFeed`] trait, and the [`PriceBook`] that refreshes them in the background and merges
//! what they give into one [`PriceSnapshot`] for placement.
//!
//! - [`AzureRetailPriceFeed`]: public JSON, OData `$filter`, `NextPageLink` paging.
//! - [`AwsPriceFeed`]: the Price List Query API (`GetProducts`, each price a JSON document inside a
//!   string) and EC2 `DescribeSpotPriceHistory` (XML), both SigV4-signed (`aws-sigv4`, see `sigv4`).
//! - [`SnapshotFileFeed`]: `config/prices/snapshot.json`, dated, for offline use and as the fallback.
//!
//! A feed yields only what it can vouch for: a row it cannot tell apart from another one (an
//! ambiguous match) or cannot read (a malformed row) leaves that price missing, with a warning,
//! and the book falls back to the snapshot file for it. A feed that fails outright keeps its last
//! good prices in the book.
//!
//! [`PriceSnapshot`]: crate::model::price::PriceSnapshot

mod aws;
mod azure;
mod book;
pub(crate) mod http;
mod price_list;
pub(crate) mod sigv4;
mod snapshot;
mod spot;

#[cfg(test)]
mod aws_tests;
#[cfg(test)]
mod azure_tests;
#[cfg(test)]
mod book_tests;
#[cfg(test)]
mod fixture_server;

use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;

use crate::model::UnixMillis;
use crate::model::price::{Cloud, ComputePrice, EgressPrice, StoragePrice};

pub use aws::{AWS_FEED_NAME, AwsFeedSettings, AwsPriceFeed};
pub use azure::{AZURE_FEED_NAME, AzureFeedSettings, AzureRetailPriceFeed};
pub use book::{FeedStatus, PriceBook, PricingSettings, RefreshOutcome};
pub use snapshot::{SnapshotFileFeed, read_snapshot, write_snapshot_atomically};

/// What placement needs priced: instance types per region (and whether their spot price matters
/// too) and the regions whose egress and storage prices it needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Wanted {
    pub compute: Vec<WantedInstance>,
    pub regions: Vec<WantedRegion>,
}

/// One instance type in one region. The on-demand price is always wanted; the spot price too when
/// `spot` is set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WantedInstance {
    pub cloud: Cloud,
    pub region: String,
    pub instance_type: String,
    pub spot: bool,
}

/// A region whose egress (internet and inter-region) and storage prices are wanted.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WantedRegion {
    pub cloud: Cloud,
    pub region: String,
}

impl Wanted {
    /// The instance types wanted in `cloud`, sorted, one entry per region and type (spot wanted when
    /// any entry wants it).
    pub fn instances(&self, cloud: Cloud) -> Vec<WantedInstance> {
        let mut out: Vec<WantedInstance> = self.compute.iter().filter(|w| w.cloud == cloud).cloned().collect();
        out.sort();
        // Sorted by (region, type, spot): of equal (region, type) the last one has the largest `spot`.
        out.dedup_by(|later, kept| {
            let same = later.region == kept.region && later.instance_type == kept.instance_type;
            if same {
                kept.spot |= later.spot;
            }
            same
        });
        out
    }

    /// The regions of `cloud` whose egress and storage are wanted, sorted and without duplicates.
    pub fn regions(&self, cloud: Cloud) -> Vec<&str> {
        let mut out: Vec<&str> = self.regions.iter().filter(|r| r.cloud == cloud).map(|r| r.region.as_str()).collect();
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// What one fetch of one feed gave.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeedPrices {
    pub compute: Vec<ComputePrice>,
    pub egress: Vec<EgressPrice>,
    pub storage: Vec<StoragePrice>,
    /// Prices the feed refused to give (ambiguous matches, no rows) and rows it skipped (malformed);
    /// each was also logged with `tracing::warn!`.
    pub warnings: Vec<String>,
}

impl FeedPrices {
    /// Records a warning and logs it.
    pub(crate) fn warn(&mut self, feed: &str, message: String) {
        tracing::warn!(feed, "{message}");
        self.warnings.push(message);
    }
}

/// A source of prices.
///
/// Every price a feed yields carries a [`Provenance`](crate::model::price::Provenance) whose source
/// is the feed's [`name`](PriceFeed::name) or starts with the name and a colon
/// (`aws:spot-price-history`), so the book can tell which feed a persisted price came from.
#[async_trait]
pub trait PriceFeed: Send + Sync {
    /// A short stable name: `azure-retail-prices`, `aws`, `snapshot:config/prices/snapshot.json`.
    fn name(&self) -> &str;

    /// Fetches the prices `wanted` asks for. An `Err` means nothing this fetch gave can be trusted
    /// (the book keeps the last good prices); a price the feed could not pin down is left out of an
    /// `Ok` with a warning instead.
    async fn fetch(&self, wanted: &Wanted) -> Result<FeedPrices, PricingError>;
}

/// Whether `source` (a price's provenance) belongs to the feed called `feed`.
pub(crate) fn source_of_feed(source: &str, feed: &str) -> bool {
    source == feed || source.strip_prefix(feed).is_some_and(|rest| rest.starts_with(':'))
}

/// Why a feed gave nothing.
#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    #[error("{what}: {message}")]
    Http { what: String, message: String },
    #[error("{what}: http status {status}{}", body_suffix(body))]
    Status { what: String, status: u16, body: String },
    #[error("{what}: {message}")]
    Parse { what: String, message: String },
    #[error("{what}: no aws credentials: {message}")]
    Credentials { what: String, message: String },
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("price feeds: {0}")]
    Config(String),
}

fn body_suffix(body: &str) -> String {
    let body = body.trim();
    if body.is_empty() {
        return String::new();
    }
    let cut: String = body.chars().take(300).collect();
    format!(": {cut}")
}

/// Now, in Unix milliseconds.
pub(crate) fn now_ms() -> UnixMillis {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as UnixMillis).unwrap_or(0)
}

/// A price read from a feed: finite and not negative.
pub(crate) fn valid_price(value: f64) -> bool {
    value.is_finite() && value >= 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_belong_to_their_feed_by_name_or_prefix() {
        assert!(source_of_feed("aws", "aws"));
        assert!(source_of_feed("aws:spot-price-history", "aws"));
        assert!(!source_of_feed("aws-other", "aws"));
        assert!(!source_of_feed("azure-retail-prices", "aws"));
    }

    #[test]
    fn wanted_lists_one_cloud_without_duplicates() {
        let instance = |cloud, region: &str, t: &str| WantedInstance {
            cloud,
            region: region.into(),
            instance_type: t.into(),
            spot: false,
        };
        let wanted = Wanted {
            compute: vec![
                instance(Cloud::Aws, "us-east-1", "p5.48xlarge"),
                instance(Cloud::Azure, "eastus", "Standard_NC24ads_A100_v4"),
                WantedInstance { spot: true, ..instance(Cloud::Aws, "us-east-1", "p5.48xlarge") },
            ],
            regions: vec![
                WantedRegion { cloud: Cloud::Aws, region: "us-east-1".into() },
                WantedRegion { cloud: Cloud::Aws, region: "us-east-1".into() },
                WantedRegion { cloud: Cloud::Azure, region: "eastus".into() },
            ],
        };
        let aws = wanted.instances(Cloud::Aws);
        assert_eq!(aws.len(), 1);
        assert!(aws[0].spot, "spot is wanted when any entry wants it");
        assert_eq!(wanted.regions(Cloud::Aws), vec!["us-east-1"]);
        assert_eq!(wanted.regions(Cloud::Azure), vec!["eastus"]);
    }
}
