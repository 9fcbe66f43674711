//! The Azure Retail Prices API (`GET {base}/api/retail/prices`, public, no authentication).
//!
//! One OData `$filter` per region and SKU (and per region for bandwidth and storage); every page is
//! read by following `NextPageLink` verbatim until it is null. The rows that matter differ only by
//! suffixes and a `type`, so they are told apart explicitly:
//! - `type`: only `Consumption`; `Reservation` (the price of a whole term, although the unit says
//!   "1 Hour") and `DevTestConsumption` rows are skipped;
//! - Windows: a " Windows" suffix on `productName` (the meter name is the same as Linux's): skipped;
//! - Spot: a " Spot" suffix on `meterName`/`skuName`; " Low Priority" ones are skipped.
//!
//! When a filter still leaves several candidate rows for one price, the price is refused (left
//! missing, with a warning naming the SKU and the rows), never guessed. Rows that don't parse are
//! skipped with a warning.

use std::fmt::Write as _;

use async_trait::async_trait;
use serde::Deserialize;

use super::http::{self, percent_encode};
use super::{FeedPrices, PriceFeed, PricingError, Wanted, now_ms, valid_price};
use crate::model::price::{Cloud, ComputePrice, Destination, EgressPrice, Market, Provenance, StoragePrice};
use crate::model::retry::RetryPolicy;

/// The feed's name and its prices' source.
pub const AZURE_FEED_NAME: &str = "azure-retail-prices";
/// Internet egress with Microsoft-network routing (the default routing preference).
const EGRESS_PRODUCT: &str = "Rtn Preference: MGN";
const EGRESS_METER: &str = "Standard Data Transfer Out";
const INTER_REGION_PRODUCT: &str = "Inter-Region";
/// Hot LRS blobs in a general-purpose v2 account (the default kind).
const STORAGE_PRODUCT: &str = "General Block Blob v2";
const STORAGE_SKU: &str = "Hot LRS";
const STORAGE_METER: &str = "Hot LRS Data Stored";

/// Where the Azure feed reads and how it retries.
#[derive(Debug, Clone, PartialEq)]
pub struct AzureFeedSettings {
    /// `https://prices.azure.com`; a local server in tests.
    pub base_url: String,
    pub retry: RetryPolicy,
    /// The most pages one filter may take (a guard against a `NextPageLink` loop).
    pub max_pages: usize,
}

impl Default for AzureFeedSettings {
    fn default() -> Self {
        Self { base_url: "https://prices.azure.com".into(), retry: http::default_retry_policy(), max_pages: 200 }
    }
}

/// Prices from the Azure Retail Prices API.
#[derive(Debug, Clone)]
pub struct AzureRetailPriceFeed {
    base_url: String,
    http: reqwest::Client,
    retry: RetryPolicy,
    max_pages: usize,
}

/// One page of the API's answer.
#[derive(Deserialize)]
struct Page {
    #[serde(rename = "Items")]
    items: Vec<serde_json::Value>,
    #[serde(rename = "NextPageLink")]
    next_page_link: Option<String>,
}

/// The fields of a row the feed reads.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    currency_code: String,
    tier_minimum_units: f64,
    retail_price: f64,
    arm_region_name: String,
    meter_id: String,
    meter_name: String,
    product_name: String,
    sku_name: String,
    unit_of_measure: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    arm_sku_name: String,
}

impl Row {
    /// For messages: enough to find the row in the API's answer.
    fn describe(&self) -> String {
        format!(
            "[{} / {} / {} / {} {} {}]",
            self.meter_id, self.product_name, self.meter_name, self.kind, self.retail_price, self.unit_of_measure
        )
    }
}

impl AzureRetailPriceFeed {
    /// A feed with its own HTTP client.
    pub fn new(settings: AzureFeedSettings) -> Result<Self, PricingError> {
        Ok(Self::with_client(settings, http::client()?))
    }

    /// A feed on a given client.
    pub fn with_client(settings: AzureFeedSettings, http: reqwest::Client) -> Self {
        let base_url = settings.base_url.trim_end_matches('/').to_string();
        Self { base_url, http, retry: settings.retry, max_pages: settings.max_pages.max(1) }
    }

    /// Every row `filter` matches, over all pages; malformed rows are skipped with a warning.
    async fn rows(&self, filter: &str, prices: &mut FeedPrices) -> Result<Vec<Row>, PricingError> {
        let mut url = format!("{}/api/retail/prices?$filter={}", self.base_url, percent_encode(filter));
        let mut rows = Vec::new();
        for page_number in 1..=self.max_pages {
            let what = format!("azure retail prices ({filter}, page {page_number})");
            let body = http::send_with_retries(&self.retry, &what, || Ok(self.http.get(&url))).await?;
            let page: Page = serde_json::from_str(&body)
                .map_err(|e| PricingError::Parse { what: what.clone(), message: e.to_string() })?;
            for (index, item) in page.items.into_iter().enumerate() {
                match serde_json::from_value::<Row>(item) {
                    Ok(row) if !valid_price(row.retail_price) || !row.tier_minimum_units.is_finite() => prices
                        .warn(AZURE_FEED_NAME, format!("{what}: skipping malformed row {index}: bad price or tier")),
                    Ok(row) if row.currency_code != "USD" => prices.warn(
                        AZURE_FEED_NAME,
                        format!("{what}: skipping row {index}: currency {} is not usd", row.currency_code),
                    ),
                    Ok(row) => rows.push(row),
                    Err(e) => prices.warn(AZURE_FEED_NAME, format!("{what}: skipping malformed row {index}: {e}")),
                }
            }
            match page.next_page_link {
                Some(next) if !next.is_empty() => url = next,
                _ => return Ok(rows),
            }
        }
        Err(PricingError::Parse {
            what: format!("azure retail prices ({filter})"),
            message: format!("still more pages after {}", self.max_pages),
        })
    }

    async fn compute(
        &self,
        region: &str,
        sku: &str,
        spot: bool,
        provenance: &Provenance,
        prices: &mut FeedPrices,
    ) -> Result<(), PricingError> {
        let filter = format!(
            "serviceName eq 'Virtual Machines' and armRegionName eq '{}' and armSkuName eq '{}'",
            odata(region),
            odata(sku)
        );
        let rows = self.rows(&filter, prices).await?;
        let markets: &[Market] = if spot { &[Market::OnDemand, Market::Spot] } else { &[Market::OnDemand] };
        for &market in markets {
            let candidates: Vec<&Row> = rows
                .iter()
                .filter(|row| {
                    row.arm_sku_name.eq_ignore_ascii_case(sku)
                        && row.arm_region_name.eq_ignore_ascii_case(region)
                        && vm_market(row) == Some(market)
                })
                .collect();
            let label = format!("{sku} ({}) in {region}", market_name(market));
            let Some(row) = single(&label, &candidates, prices) else { continue };
            if row.unit_of_measure != "1 Hour" {
                prices.warn(AZURE_FEED_NAME, format!("{label}: unexpected unit {:?}", row.unit_of_measure));
                continue;
            }
            prices.compute.push(ComputePrice {
                cloud: Cloud::Azure,
                region: region.to_string(),
                instance_type: sku.to_string(),
                market,
                usd_per_hour: row.retail_price,
                provenance: provenance.clone(),
            });
        }
        Ok(())
    }

    async fn egress(&self, region: &str, provenance: &Provenance, prices: &mut FeedPrices) -> Result<(), PricingError> {
        let filter = format!("serviceName eq 'Bandwidth' and armRegionName eq '{}'", odata(region));
        let rows = self.rows(&filter, prices).await?;
        let rows: Vec<&Row> =
            rows.iter().filter(|r| r.kind == "Consumption" && r.arm_region_name.eq_ignore_ascii_case(region)).collect();

        let internet: Vec<&Row> =
            rows.iter().copied().filter(|r| r.product_name == EGRESS_PRODUCT && r.meter_name == EGRESS_METER).collect();
        let label = format!("internet egress from {region}");
        if let Some(price) = first_paid_tier(&label, &internet, prices) {
            prices.egress.push(egress(region, Destination::Internet, price, provenance));
        }

        // Several meters (within a continent, to other continents): the model has one inter-region
        // price per source region, so it takes the dearest first paid tier, an upper bound.
        let mut meters: Vec<&str> =
            rows.iter().filter(|r| r.product_name == INTER_REGION_PRODUCT).map(|r| r.meter_name.as_str()).collect();
        meters.sort_unstable();
        meters.dedup();
        let mut dearest: Option<f64> = None;
        for meter in meters {
            let tiers: Vec<&Row> = rows
                .iter()
                .copied()
                .filter(|r| r.product_name == INTER_REGION_PRODUCT && r.meter_name == meter)
                .collect();
            let label = format!("inter-region egress from {region} ({meter})");
            if let Some(price) = first_paid_tier(&label, &tiers, prices) {
                dearest = Some(dearest.map_or(price, |d: f64| d.max(price)));
            }
        }
        match dearest {
            Some(price) => prices.egress.push(egress(region, Destination::InterRegion, price, provenance)),
            None => prices.warn(AZURE_FEED_NAME, format!("no inter-region egress price for {region}")),
        }
        Ok(())
    }

    async fn storage(
        &self,
        region: &str,
        provenance: &Provenance,
        prices: &mut FeedPrices,
    ) -> Result<(), PricingError> {
        let filter = format!(
            "serviceName eq 'Storage' and armRegionName eq '{}' and skuName eq '{STORAGE_SKU}' and meterName eq \
             '{STORAGE_METER}'",
            odata(region)
        );
        let rows = self.rows(&filter, prices).await?;
        let rows: Vec<&Row> = rows
            .iter()
            .filter(|r| {
                r.kind == "Consumption"
                    && r.product_name == STORAGE_PRODUCT
                    && r.sku_name == STORAGE_SKU
                    && r.meter_name == STORAGE_METER
                    && r.arm_region_name.eq_ignore_ascii_case(region)
            })
            .collect();
        let lowest = rows.iter().map(|r| r.tier_minimum_units).fold(f64::INFINITY, f64::min);
        let first: Vec<&Row> = rows.into_iter().filter(|r| r.tier_minimum_units == lowest).collect();
        if let Some(row) = single(&format!("hot lrs storage in {region}"), &first, prices) {
            prices.storage.push(StoragePrice {
                cloud: Cloud::Azure,
                region: region.to_string(),
                usd_per_gb_month: row.retail_price,
                provenance: provenance.clone(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl PriceFeed for AzureRetailPriceFeed {
    fn name(&self) -> &str {
        AZURE_FEED_NAME
    }

    async fn fetch(&self, wanted: &Wanted) -> Result<FeedPrices, PricingError> {
        let provenance = Provenance { source: AZURE_FEED_NAME.to_string(), fetched_at: now_ms() };
        let mut prices = FeedPrices::default();
        for instance in wanted.instances(Cloud::Azure) {
            self.compute(&instance.region, &instance.instance_type, instance.spot, &provenance, &mut prices).await?;
        }
        for region in wanted.regions(Cloud::Azure) {
            self.egress(region, &provenance, &mut prices).await?;
            self.storage(region, &provenance, &mut prices).await?;
        }
        Ok(prices)
    }
}

/// The market of a Linux pay-as-you-go VM row; `None` for every other kind of row.
fn vm_market(row: &Row) -> Option<Market> {
    let suffixed = |suffix: &str| row.meter_name.ends_with(suffix) || row.sku_name.ends_with(suffix);
    if row.kind != "Consumption" || row.product_name.ends_with(" Windows") || suffixed(" Low Priority") {
        return None;
    }
    Some(if suffixed(" Spot") { Market::Spot } else { Market::OnDemand })
}

fn market_name(market: Market) -> &'static str {
    match market {
        Market::OnDemand => "on-demand",
        Market::Spot => "spot",
    }
}

/// The one candidate row, or a warning (none, or several: refused, not guessed).
fn single<'a>(label: &str, candidates: &[&'a Row], prices: &mut FeedPrices) -> Option<&'a Row> {
    match candidates {
        [row] => Some(row),
        [] => {
            prices.warn(AZURE_FEED_NAME, format!("no price for {label}: no matching row"));
            None
        }
        rows => {
            let mut listed = String::new();
            for row in rows {
                let _ = write!(listed, " {}", row.describe());
            }
            let message = format!("refusing to guess the price of {label}: {} rows match:{listed}", rows.len());
            prices.warn(AZURE_FEED_NAME, message);
            None
        }
    }
}

/// The price of the lowest tier that isn't free (the free allowance comes first).
fn first_paid_tier(label: &str, tiers: &[&Row], prices: &mut FeedPrices) -> Option<f64> {
    let lowest =
        tiers.iter().filter(|r| r.retail_price > 0.0).map(|r| r.tier_minimum_units).fold(f64::INFINITY, f64::min);
    let rows: Vec<&Row> =
        tiers.iter().copied().filter(|r| r.retail_price > 0.0 && r.tier_minimum_units == lowest).collect();
    single(label, &rows, prices).map(|r| r.retail_price)
}

fn egress(region: &str, destination: Destination, usd_per_gb: f64, provenance: &Provenance) -> EgressPrice {
    EgressPrice {
        cloud: Cloud::Azure,
        region: region.to_string(),
        destination,
        usd_per_gb,
        provenance: provenance.clone(),
    }
}

/// A value for inside an OData string literal (quotes doubled).
fn odata(value: &str) -> String {
    value.replace('\'', "''")
}
