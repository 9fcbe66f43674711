//! The AWS feed against a local server answering in the Price List Query API's JSON (each price a
//! JSON document inside a string) and EC2's XML.

use std::time::{Duration, SystemTime};

use super::fixture_server::{FixtureServer, Recorded, Reply};
use super::sigv4::{self, SignableRequest};
use aws_sdk_s3::config::Credentials;

use super::{AwsFeedSettings, AwsPriceFeed, FeedPrices, PriceFeed, Wanted, WantedInstance, WantedRegion};
use crate::model::price::{Cloud, Destination, Market};
use crate::model::retry::{RetryLimit, RetryPolicy};

const KEY_ID: &str = "AKIDPRICETEST";
const SECRET: &str = "price/test/secret";

fn feed(server: &FixtureServer, spot: bool) -> AwsPriceFeed {
    let settings = AwsFeedSettings {
        pricing_endpoint: format!("{}/pricing", server.base),
        pricing_region: "us-east-1".into(),
        ec2_endpoint: format!("{}/ec2/{{region}}", server.base),
        spot,
        profile: None,
        retry: RetryPolicy::exponential(Duration::from_millis(1), Duration::from_millis(20))
            .with_limit(RetryLimit::Tries(3)),
        max_pages: 10,
    };
    AwsPriceFeed::with_static_credentials(settings, KEY_ID, SECRET).unwrap()
}

fn instances(types: &[&str], spot: bool) -> Wanted {
    let compute = types
        .iter()
        .map(|t| WantedInstance { cloud: Cloud::Aws, region: "us-east-1".into(), instance_type: t.to_string(), spot })
        .collect();
    Wanted { compute, regions: Vec::new() }
}

/// A GetProducts request for `service_code` whose filters include `field=value`, with or without a
/// NextToken.
fn get_products(
    service_code: &'static str,
    field: &'static str,
    value: &'static str,
    next_token: bool,
) -> impl Fn(&Recorded) -> bool + Send + Sync + 'static {
    move |r: &Recorded| {
        let Ok(body) = serde_json::from_str::<serde_json::Value>(&r.body) else { return false };
        let filters = body["Filters"].as_array().cloned().unwrap_or_default();
        r.path == "/pricing/"
            && r.header("x-amz-target") == "AWSPriceListService.GetProducts"
            && r.header("content-type") == "application/x-amz-json-1.1"
            && body["ServiceCode"] == service_code
            && filters.iter().any(|f| f["Type"] == "TERM_MATCH" && f["Field"] == field && f["Value"] == value)
            && body.get("NextToken").is_some() == next_token
    }
}

fn price(prices: &FeedPrices, instance_type: &str, market: Market) -> Option<f64> {
    prices.compute.iter().find(|p| p.instance_type == instance_type && p.market == market).map(|p| p.usd_per_hour)
}

/// Recomputes the signature of what arrived: the headers and body on the wire are what was signed.
fn assert_signed(request: &Recorded, service: &str, signed: &[&str]) {
    let date = request.header("x-amz-date");
    let field = |range: std::ops::Range<usize>| date[range].parse::<u32>().unwrap();
    let at = time::Date::from_calendar_date(
        field(0..4) as i32,
        time::Month::try_from(field(4..6) as u8).unwrap(),
        field(6..8) as u8,
    )
    .unwrap()
    .with_hms(field(9..11) as u8, field(11..13) as u8, field(13..15) as u8)
    .unwrap()
    .assume_utc();
    let url = reqwest::Url::parse(&format!("http://{}{}", request.header("host"), request.path)).unwrap();
    let headers: Vec<(&str, &str)> = signed.iter().map(|name| (*name, request.header(name))).collect();
    let credentials = Credentials::new(KEY_ID, SECRET, None, None, "test");
    let signable = SignableRequest { method: "POST", url: &url, headers: &headers, body: request.body.as_bytes() };
    let expected = sigv4::sign(&signable, &credentials, "us-east-1", service, SystemTime::from(at)).unwrap();
    let authorization = request.header("authorization");
    assert!(authorization.starts_with(&format!("AWS4-HMAC-SHA256 Credential={KEY_ID}/")), "{authorization}");
    assert!(authorization.contains(&format!("/us-east-1/{service}/aws4_request")), "{authorization}");
    let expected = &expected.iter().find(|(name, _)| name == "authorization").unwrap().1;
    assert_eq!(authorization, expected);
}

#[tokio::test]
async fn on_demand_prices_come_from_json_documents_in_strings_over_next_token_pages() {
    let server = FixtureServer::start().await;
    server.route(
        get_products("AmazonEC2", "instanceType", "p5.48xlarge", false),
        vec![Reply::fixture("aws/getproducts-ec2-p5-page1.json")],
    );
    server.route(
        get_products("AmazonEC2", "instanceType", "p5.48xlarge", true),
        vec![Reply::fixture("aws/getproducts-ec2-p5-page2.json")],
    );

    let prices = feed(&server, false).fetch(&instances(&["p5.48xlarge"], true)).await.unwrap();

    // Page 1: an unused-reservation product (not a candidate) and a truncated document (skipped);
    // page 2: the Linux on-demand product, "55.0400000000" as a string.
    assert_eq!(price(&prices, "p5.48xlarge", Market::OnDemand), Some(55.04));
    assert_eq!(prices.compute.len(), 1, "spot is off: {:?}", prices.compute);
    assert_eq!(prices.compute[0].provenance.source, "aws:price-list");
    assert!(
        prices.warnings.iter().any(|w| w.contains("skipping malformed price list element 1")),
        "{:?}",
        prices.warnings
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    let second: serde_json::Value = serde_json::from_str(&requests[1].body).unwrap();
    assert_eq!(second["NextToken"], "eyJ2IjoyLCJjIjoiUDVwYWdlMiJ9");
    for request in &requests {
        assert_signed(request, "pricing", &["content-type", "x-amz-target"]);
    }
}

#[tokio::test]
async fn a_throttled_get_products_is_retried() {
    let server = FixtureServer::start().await;
    server.route(
        get_products("AmazonEC2", "instanceType", "p5.48xlarge", false),
        vec![
            Reply::status(400, r#"{"__type":"ThrottlingException","message":"Rate exceeded"}"#),
            Reply::fixture("aws/getproducts-ec2-p5-page2.json"),
        ],
    );
    let prices = feed(&server, false).fetch(&instances(&["p5.48xlarge"], false)).await.unwrap();
    assert_eq!(price(&prices, "p5.48xlarge", Market::OnDemand), Some(55.04));
    assert_eq!(server.requests().len(), 2);
}

#[tokio::test]
async fn several_matching_products_are_refused() {
    let server = FixtureServer::start().await;
    server.route(
        get_products("AmazonEC2", "instanceType", "g6.xlarge", false),
        vec![Reply::fixture("aws/getproducts-ec2-g6-ambiguous.json")],
    );
    let prices = feed(&server, false).fetch(&instances(&["g6.xlarge"], false)).await.unwrap();
    assert_eq!(price(&prices, "g6.xlarge", Market::OnDemand), None);
    let warning = prices.warnings.iter().find(|w| w.contains("refusing to guess")).expect("a warning");
    assert!(warning.contains("g6.xlarge") && warning.contains("A2B7JH5P6KVE2C8M"), "{warning}");
    assert!(warning.contains("QX9W3CJ8MZ4TT7RD"), "{warning}");
}

#[tokio::test]
async fn spot_is_the_lowest_current_linux_price_across_zones_from_the_xml_answer() {
    let server = FixtureServer::start().await;
    server.route(
        get_products("AmazonEC2", "instanceType", "p5.48xlarge", false),
        vec![Reply::fixture("aws/getproducts-ec2-p5-page2.json")],
    );
    server.route(
        get_products("AmazonEC2", "instanceType", "g6.xlarge", false),
        vec![Reply::status(200, r#"{"FormatVersion":"aws_v1","PriceList":[]}"#)],
    );
    let ec2 = |next: bool| {
        move |r: &Recorded| {
            r.path == "/ec2/us-east-1/"
                && r.body.contains("Action=DescribeSpotPriceHistory")
                && r.body.contains("NextToken=") == next
        }
    };
    server.route(ec2(false), vec![Reply::fixture("aws/spot-us-east-1-page1.xml")]);
    server.route(ec2(true), vec![Reply::fixture("aws/spot-us-east-1-page2.xml")]);

    let prices = feed(&server, true).fetch(&instances(&["p5.48xlarge", "g6.xlarge"], true)).await.unwrap();

    // us-east-1a's latest is 31.464 (its older 20.10 no longer holds), us-east-1b's 29.87 (page 2);
    // the Windows and SUSE prices don't count.
    assert_eq!(price(&prices, "p5.48xlarge", Market::Spot), Some(29.87));
    assert_eq!(price(&prices, "g6.xlarge", Market::Spot), Some(0.3126));
    let spot = prices.compute.iter().find(|p| p.market == Market::Spot).unwrap();
    assert_eq!(spot.provenance.source, "aws:spot-price-history");
    assert!(
        prices.warnings.iter().any(|w| w.contains("skipping malformed spot price item 3")),
        "{:?}",
        prices.warnings
    );
    assert!(prices.warnings.iter().any(|w| w.contains("no price for g6.xlarge (on-demand)")), "{:?}", prices.warnings);

    let spot_requests: Vec<Recorded> = server.requests().into_iter().filter(|r| r.path.starts_with("/ec2/")).collect();
    assert_eq!(spot_requests.len(), 2);
    let first = &spot_requests[0].body;
    assert!(first.contains("InstanceType.1=g6.xlarge") && first.contains("InstanceType.2=p5.48xlarge"), "{first}");
    assert!(first.contains("ProductDescription.1=Linux%2FUNIX"), "{first}");
    assert!(spot_requests[1].body.ends_with("&NextToken=P5%2Bpage%2F2%3D%3D"), "{}", spot_requests[1].body);
    for request in &spot_requests {
        assert_signed(request, "ec2", &["content-type"]);
    }
}

#[tokio::test]
async fn egress_and_s3_storage_come_from_their_price_lists() {
    let server = FixtureServer::start().await;
    server.route(
        get_products("AWSDataTransfer", "fromRegionCode", "us-east-1", false),
        vec![Reply::fixture("aws/getproducts-datatransfer-us-east-1.json")],
    );
    server.route(
        get_products("AmazonS3", "regionCode", "us-east-1", false),
        vec![Reply::fixture("aws/getproducts-s3-us-east-1.json")],
    );
    let wanted =
        Wanted { compute: Vec::new(), regions: vec![WantedRegion { cloud: Cloud::Aws, region: "us-east-1".into() }] };

    let prices = feed(&server, true).fetch(&wanted).await.unwrap();

    let egress = |destination| prices.egress.iter().find(|p| p.destination == destination).map(|p| p.usd_per_gb);
    assert_eq!(egress(Destination::Internet), Some(0.09), "the first paid tier after the free one");
    assert_eq!(egress(Destination::InterRegion), Some(0.02), "the dearest destination, not intra-region");
    assert_eq!(prices.storage.len(), 1);
    assert_eq!(prices.storage[0].usd_per_gb_month, 0.023, "standard's first tier, not infrequent access");
    assert!(prices.warnings.is_empty(), "{:?}", prices.warnings);
}
