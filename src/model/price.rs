//! Prices (docs/design.md §5): what a price feed yields and the placement engine reads. Every price carries
//! its source and fetch time, so a decision can say how old the numbers behind it were.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::UnixMillis;

/// A cloud that sells compute, transfer and storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Cloud {
    Aws,
    Azure,
}

impl Cloud {
    pub fn as_str(self) -> &'static str {
        match self {
            Cloud::Aws => "aws",
            Cloud::Azure => "azure",
        }
    }
}

/// Whether an hourly price is for on-demand or spot capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Market {
    OnDemand,
    Spot,
}

impl Market {
    /// `on-demand` or `spot`, as people (and the capacity tables) write it.
    pub fn as_str(self) -> &'static str {
        match self {
            Market::OnDemand => "on-demand",
            Market::Spot => "spot",
        }
    }

    /// The inverse of [`Market::as_str`].
    pub fn parse(text: &str) -> Option<Market> {
        [Market::OnDemand, Market::Spot].into_iter().find(|m| m.as_str() == text)
    }
}

/// Where a price came from and when it was fetched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Provenance {
    /// e.g. `azure-retail-prices`, `aws-price-list`, `snapshot:config/prices/snapshot.json`.
    pub source: String,
    #[schema(value_type = i64)]
    pub fetched_at: UnixMillis,
}

/// The hourly price of one instance type in one region (Linux, shared tenancy).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ComputePrice {
    pub cloud: Cloud,
    /// `us-east-1`, `westeurope`.
    pub region: String,
    /// `p5.48xlarge`, `Standard_NC24ads_A100_v4`.
    pub instance_type: String,
    pub market: Market,
    pub usd_per_hour: f64,
    #[serde(flatten)]
    pub provenance: Provenance,
}

/// Where data leaving a region goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Destination {
    /// Out to the internet (also: to another cloud, or to an on-prem site).
    Internet,
    /// To another region of the same cloud.
    InterRegion,
}

/// The price of moving one GB out of a region (first paid tier).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EgressPrice {
    pub cloud: Cloud,
    pub region: String,
    pub destination: Destination,
    pub usd_per_gb: f64,
    #[serde(flatten)]
    pub provenance: Provenance,
}

/// The price of keeping one GB for a month (standard/hot tier, first tier).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StoragePrice {
    pub cloud: Cloud,
    pub region: String,
    pub usd_per_gb_month: f64,
    #[serde(flatten)]
    pub provenance: Provenance,
}

/// Everything placement needs to know about prices, as of one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PriceSnapshot {
    /// Changes whenever the prices do (e.g. a hash or a sequence number); decisions record it.
    pub id: String,
    /// When the oldest feed behind it was fetched.
    #[schema(value_type = i64)]
    pub fetched_at: UnixMillis,
    /// The feeds it was built from.
    pub sources: Vec<String>,
    #[serde(default)]
    pub compute: Vec<ComputePrice>,
    #[serde(default)]
    pub egress: Vec<EgressPrice>,
    #[serde(default)]
    pub storage: Vec<StoragePrice>,
}

impl PriceSnapshot {
    /// The hourly price of an instance type, when known.
    pub fn compute(&self, cloud: Cloud, region: &str, instance_type: &str, market: Market) -> Option<&ComputePrice> {
        self.compute
            .iter()
            .find(|p| p.cloud == cloud && p.region == region && p.instance_type == instance_type && p.market == market)
    }

    /// $/GB out of a region.
    pub fn egress(&self, cloud: Cloud, region: &str, destination: Destination) -> Option<&EgressPrice> {
        self.egress.iter().find(|p| p.cloud == cloud && p.region == region && p.destination == destination)
    }

    /// $/GB-month in a region.
    pub fn storage(&self, cloud: Cloud, region: &str) -> Option<&StoragePrice> {
        self.storage.iter().find(|p| p.cloud == cloud && p.region == region)
    }
}
