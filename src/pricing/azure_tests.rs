//! The Azure Retail Prices feed against a local server serving the API's own format.

use std::time::Duration;

use super::fixture_server::{FixtureServer, Recorded, Reply};
use super::{AzureFeedSettings, AzureRetailPriceFeed, FeedPrices, PriceFeed, PricingError};
use super::{Wanted, WantedInstance, WantedRegion};
use crate::model::price::{Cloud, Destination, Market};
use crate::model::retry::{RetryLimit, RetryPolicy};

const H100: &str = "Standard_ND96isr_H100_v5";
const A100: &str = "Standard_NC24ads_A100_v4";

fn feed(server: &FixtureServer, max_attempts: u32) -> AzureRetailPriceFeed {
    let retry = RetryPolicy::exponential(Duration::from_millis(1), Duration::from_millis(20))
        .with_limit(RetryLimit::Tries(max_attempts));
    AzureRetailPriceFeed::new(AzureFeedSettings { base_url: format!("{}/", server.base), retry, max_pages: 10 })
        .unwrap()
}

fn vm(region: &str, sku: &str, spot: bool) -> Wanted {
    Wanted {
        compute: vec![WantedInstance { cloud: Cloud::Azure, region: region.into(), instance_type: sku.into(), spot }],
        regions: Vec::new(),
    }
}

/// A request for the VM prices of `sku` in `region` (the decoded `$filter`), first page or not.
fn vm_filter(region: &str, sku: &str, first_page: bool) -> impl Fn(&Recorded) -> bool + Send + Sync + 'static {
    let expected =
        format!("serviceName eq 'Virtual Machines' and armRegionName eq '{region}' and armSkuName eq '{sku}'");
    move |r: &Recorded| {
        r.path == "/api/retail/prices"
            && r.query("$filter") == Some(expected.as_str())
            && r.query("$skip").is_none() == first_page
    }
}

fn price(prices: &FeedPrices, region: &str, sku: &str, market: Market) -> Option<f64> {
    prices
        .compute
        .iter()
        .find(|p| p.region == region && p.instance_type == sku && p.market == market)
        .map(|p| p.usd_per_hour)
}

#[tokio::test]
async fn follows_next_page_links_and_tells_windows_spot_reservation_and_devtest_rows_apart() {
    let server = FixtureServer::start().await;
    server.route(vm_filter("eastus", H100, true), vec![Reply::fixture("azure/vm-nd96isr-h100-v5-eastus-page1.json")]);
    server.route(vm_filter("eastus", H100, false), vec![Reply::fixture("azure/vm-nd96isr-h100-v5-eastus-page2.json")]);

    let prices = feed(&server, 1).fetch(&vm("eastus", H100, true)).await.unwrap();

    // Page 1 holds Windows (102.736), a 1-year reservation, a DevTest spot row and Low Priority;
    // the Linux pay-as-you-go and spot prices are on page 2, reached only through NextPageLink.
    assert_eq!(price(&prices, "eastus", H100, Market::OnDemand), Some(98.32));
    assert_eq!(price(&prices, "eastus", H100, Market::Spot), Some(18.169536));
    assert_eq!(prices.compute.len(), 2, "{:?}", prices.compute);
    assert!(prices.compute.iter().all(|p| p.cloud == Cloud::Azure && p.provenance.source == "azure-retail-prices"));
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[1].query("$skip"), Some("4"), "the second page came from the link, verbatim");
    // The row whose retailPrice is "n/a" is skipped with a warning (else it would make the
    // on-demand price ambiguous).
    assert!(prices.warnings.iter().any(|w| w.contains("skipping malformed row 3")), "{:?}", prices.warnings);
}

#[tokio::test]
async fn spot_prices_are_only_read_when_wanted() {
    let server = FixtureServer::start().await;
    server.route(vm_filter("eastus", H100, true), vec![Reply::fixture("azure/vm-nd96isr-h100-v5-eastus-page1.json")]);
    server.route(vm_filter("eastus", H100, false), vec![Reply::fixture("azure/vm-nd96isr-h100-v5-eastus-page2.json")]);
    let prices = feed(&server, 1).fetch(&vm("eastus", H100, false)).await.unwrap();
    assert_eq!(price(&prices, "eastus", H100, Market::OnDemand), Some(98.32));
    assert_eq!(price(&prices, "eastus", H100, Market::Spot), None);
}

#[tokio::test]
async fn backs_off_on_429_and_5xx_then_succeeds() {
    let server = FixtureServer::start().await;
    server.route(
        vm_filter("eastus", A100, true),
        vec![
            Reply::status(429, "Too Many Requests").header("Retry-After", "0"),
            Reply::status(503, "busy"),
            Reply::fixture("azure/vm-nc24ads-a100-v4-eastus.json"),
        ],
    );
    let prices = feed(&server, 4).fetch(&vm("eastus", A100, false)).await.unwrap();
    assert_eq!(price(&prices, "eastus", A100, Market::OnDemand), Some(3.673));
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn gives_up_after_the_bounded_number_of_tries() {
    let server = FixtureServer::start().await;
    server.route(vm_filter("eastus", A100, true), vec![Reply::status(429, "slow down").header("Retry-After", "0")]);
    let error = feed(&server, 3).fetch(&vm("eastus", A100, false)).await.unwrap_err();
    assert!(matches!(error, PricingError::Status { status: 429, .. }), "{error}");
    assert_eq!(server.requests().len(), 3);
}

#[tokio::test]
async fn a_client_error_is_not_retried() {
    let server = FixtureServer::start().await;
    server.route(vm_filter("eastus", A100, true), vec![Reply::status(400, "{\"Error\":\"bad filter\"}")]);
    let error = feed(&server, 5).fetch(&vm("eastus", A100, false)).await.unwrap_err();
    assert!(error.to_string().contains("http status 400: {\"Error\":\"bad filter\"}"), "{error}");
    assert_eq!(server.requests().len(), 1);
}

#[tokio::test]
async fn refuses_to_guess_when_several_rows_match() {
    let server = FixtureServer::start().await;
    server.route(
        vm_filter("westeurope", H100, true),
        vec![Reply::fixture("azure/vm-nd96isr-h100-v5-westeurope-ambiguous.json")],
    );
    let prices = feed(&server, 1).fetch(&vm("westeurope", H100, true)).await.unwrap();
    assert_eq!(price(&prices, "westeurope", H100, Market::OnDemand), None, "two candidate rows: no price");
    assert_eq!(price(&prices, "westeurope", H100, Market::Spot), Some(21.8), "the spot row is unambiguous");
    let warning = prices.warnings.iter().find(|w| w.contains("refusing to guess")).expect("a warning");
    assert!(warning.contains(H100) && warning.contains("on-demand") && warning.contains("2 rows"), "{warning}");
    assert!(warning.contains("a1f0c3d2-0000-4b1e-8e55-5f1d2c3b4a01") && warning.contains("4a02"), "{warning}");
}

#[tokio::test]
async fn egress_and_storage_take_the_first_paid_tier_of_the_right_product() {
    let server = FixtureServer::start().await;
    server.route(
        |r: &Recorded| r.query("$filter") == Some("serviceName eq 'Bandwidth' and armRegionName eq 'eastus'"),
        vec![Reply::fixture("azure/bandwidth-eastus.json")],
    );
    server.route(
        |r: &Recorded| {
            r.query("$filter").is_some_and(|f| f.starts_with("serviceName eq 'Storage' and armRegionName eq 'eastus'"))
        },
        vec![Reply::fixture("azure/storage-hot-lrs-eastus.json")],
    );
    let wanted =
        Wanted { compute: Vec::new(), regions: vec![WantedRegion { cloud: Cloud::Azure, region: "eastus".into() }] };
    let prices = feed(&server, 1).fetch(&wanted).await.unwrap();
    let egress = |destination| prices.egress.iter().find(|p| p.destination == destination).map(|p| p.usd_per_gb);
    // MGN routing's 100 GB tier (not the free one, not Internet routing's 0.08).
    assert_eq!(egress(Destination::Internet), Some(0.087));
    // The dearer of the inter-region meters (inter-continent), an upper bound.
    assert_eq!(egress(Destination::InterRegion), Some(0.05));
    // General Block Blob v2's first tier, not the next tier and not Files.
    assert_eq!(prices.storage.len(), 1);
    assert_eq!(prices.storage[0].usd_per_gb_month, 0.0184);
    assert!(prices.warnings.is_empty(), "{:?}", prices.warnings);
}
