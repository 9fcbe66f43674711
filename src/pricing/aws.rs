//! AWS prices through two SigV4-signed calls, without the `aws-sdk-pricing`/`aws-sdk-ec2` crates:
//! - the Price List Query API `GetProducts` (JSON 1.1 protocol, `X-Amz-Target:
//!   AWSPriceListService.GetProducts`): EC2 on-demand (`AmazonEC2`), egress (`AWSDataTransfer`)
//!   and S3 Standard storage (`AmazonS3`). Each `PriceList` element is a JSON document inside a
//!   string, parsed twice; prices are strings (`"55.0400000000"`). Paged with `NextToken`.
//! - EC2 `DescribeSpotPriceHistory` (query protocol, XML answer; see `spot`): per instance type,
//!   the lowest current Linux price across the region's availability zones.
//!
//! Credentials come from the AWS default chain (`aws-config`) or are given. The public offer files
//! (`/offers/v1.0/aws/AmazonEC2/current/<region>/index.json`) need no credentials but weigh tens of
//! MB or more per region, which is why the feed asks the Query API for the few SKUs it needs.

use std::time::SystemTime;

use async_trait::async_trait;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, ProvideCredentials, SharedCredentialsProvider};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use serde_json::json;

use super::http::{self, percent_encode};
use super::price_list::{PriceItem, ProductsPage, single};
use super::sigv4::{self, SignableRequest};
use super::spot::{lowest_current, parse_spot_page};
use super::{FeedPrices, PriceFeed, PricingError, Wanted, now_ms};
use crate::model::price::{Cloud, ComputePrice, Destination, EgressPrice, Market, Provenance, StoragePrice};
use crate::model::retry::RetryPolicy;

/// The feed's name; its prices' sources are `aws:price-list` and `aws:spot-price-history`.
pub const AWS_FEED_NAME: &str = "aws";

/// Where the AWS feed asks and with which credentials.
#[derive(Debug, Clone, PartialEq)]
pub struct AwsFeedSettings {
    /// The Price List Query API: `https://api.pricing.us-east-1.amazonaws.com` (also `eu-central-1`
    /// and `ap-south-1`, whatever region is priced).
    pub pricing_endpoint: String,
    /// The region that endpoint signs for.
    pub pricing_region: String,
    /// EC2's endpoint, `{region}` standing for the region priced: `https://ec2.{region}.amazonaws.com`.
    pub ec2_endpoint: String,
    /// Whether spot prices are asked for (IAM `ec2:DescribeSpotPriceHistory`).
    pub spot: bool,
    /// A profile of the shared config files; `None` = the default chain.
    pub profile: Option<String>,
    pub retry: RetryPolicy,
    /// The most pages one query may take.
    pub max_pages: usize,
}

impl Default for AwsFeedSettings {
    fn default() -> Self {
        Self {
            pricing_endpoint: "https://api.pricing.us-east-1.amazonaws.com".into(),
            pricing_region: "us-east-1".into(),
            ec2_endpoint: "https://ec2.{region}.amazonaws.com".into(),
            spot: true,
            profile: None,
            retry: http::default_retry_policy(),
            max_pages: 50,
        }
    }
}

/// Prices from the AWS Price List Query API and EC2's spot price history.
#[derive(Debug, Clone)]
pub struct AwsPriceFeed {
    settings: AwsFeedSettings,
    http: reqwest::Client,
    credentials: SharedCredentialsProvider,
}

impl AwsPriceFeed {
    /// A feed signing with the AWS default credential chain (env, profile, SSO, web identity,
    /// instance metadata), resolved at each fetch.
    pub async fn from_default_chain(settings: AwsFeedSettings) -> Result<Self, PricingError> {
        let client =
            aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(client);
        if let Some(profile) = &settings.profile {
            loader = loader.profile_name(profile);
        }
        let shared = loader.load().await;
        let credentials = shared
            .credentials_provider()
            .ok_or_else(|| PricingError::Config("aws price feed: no credentials provider".into()))?;
        Ok(Self { settings, http: http::client()?, credentials })
    }

    /// A feed signing with fixed credentials.
    pub fn with_static_credentials(
        settings: AwsFeedSettings,
        access_key_id: &str,
        secret_access_key: &str,
    ) -> Result<Self, PricingError> {
        let credentials = Credentials::new(access_key_id, secret_access_key, None, None, "hybroker-static");
        Ok(Self { settings, http: http::client()?, credentials: SharedCredentialsProvider::new(credentials) })
    }

    async fn credentials(&self) -> Result<Credentials, PricingError> {
        self.credentials
            .provide_credentials()
            .await
            .map_err(|e| PricingError::Credentials { what: "aws price feed".into(), message: e.to_string() })
    }

    /// POSTs `body`, signed for `service` in `region`, with retries; returns the answer's body.
    async fn signed_post(&self, call: SignedCall<'_>, credentials: &Credentials) -> Result<String, PricingError> {
        let url = reqwest::Url::parse(call.url)
            .map_err(|e| PricingError::Config(format!("{}: bad url {:?}: {e}", call.what, call.url)))?;
        http::send_with_retries(&self.settings.retry, call.what, || {
            let request =
                SignableRequest { method: "POST", url: &url, headers: call.headers, body: call.body.as_bytes() };
            let signature = sigv4::sign(&request, credentials, call.region, call.service, SystemTime::now())
                .map_err(|message| PricingError::Http { what: call.what.to_string(), message })?;
            let mut builder = self.http.post(url.clone()).body(call.body.to_string());
            for (name, value) in
                call.headers.iter().copied().chain(signature.iter().map(|(n, v)| (n.as_str(), v.as_str())))
            {
                builder = builder.header(name, value);
            }
            Ok(builder)
        })
        .await
    }

    /// Every product of `service_code` matching `filters` (TERM_MATCH), over all pages; malformed
    /// elements are skipped with a warning.
    async fn products(
        &self,
        service_code: &str,
        filters: &[(&str, &str)],
        credentials: &Credentials,
        prices: &mut FeedPrices,
    ) -> Result<Vec<PriceItem>, PricingError> {
        let filter_json: Vec<_> = filters
            .iter()
            .map(|(field, value)| json!({"Type": "TERM_MATCH", "Field": field, "Value": value}))
            .collect();
        let described = filters.iter().map(|(f, v)| format!("{f}={v}")).collect::<Vec<_>>().join(",");
        let url = format!("{}/", self.settings.pricing_endpoint.trim_end_matches('/'));
        let mut items = Vec::new();
        let mut next_token: Option<String> = None;
        for page_number in 1..=self.settings.max_pages.max(1) {
            let what = format!("aws GetProducts {service_code} ({described}, page {page_number})");
            let mut body = json!({"ServiceCode": service_code, "Filters": filter_json, "FormatVersion": "aws_v1",
                "MaxResults": 100});
            if let Some(token) = &next_token {
                body["NextToken"] = json!(token);
            }
            let headers =
                [("content-type", "application/x-amz-json-1.1"), ("x-amz-target", "AWSPriceListService.GetProducts")];
            let call = SignedCall {
                what: &what,
                url: &url,
                headers: &headers,
                body: &body.to_string(),
                region: &self.settings.pricing_region,
                service: "pricing",
            };
            let answer = self.signed_post(call, credentials).await?;
            let page = ProductsPage::parse(&answer)
                .map_err(|e| PricingError::Parse { what: what.clone(), message: e.to_string() })?;
            for (index, parsed) in page.items().into_iter().enumerate() {
                match parsed {
                    Ok(item) => items.push(item),
                    Err(e) => prices
                        .warn(AWS_FEED_NAME, format!("{what}: skipping malformed price list element {index}: {e}")),
                }
            }
            match page.next_token {
                Some(token) if !token.is_empty() => next_token = Some(token),
                _ => return Ok(items),
            }
        }
        Err(PricingError::Parse {
            what: format!("aws GetProducts {service_code} ({described})"),
            message: format!("still more pages after {}", self.settings.max_pages),
        })
    }
}

/// One signed POST.
struct SignedCall<'a> {
    what: &'a str,
    url: &'a str,
    headers: &'a [(&'a str, &'a str)],
    body: &'a str,
    region: &'a str,
    service: &'a str,
}

#[async_trait]
impl PriceFeed for AwsPriceFeed {
    fn name(&self) -> &str {
        AWS_FEED_NAME
    }

    async fn fetch(&self, wanted: &Wanted) -> Result<FeedPrices, PricingError> {
        let instances = wanted.instances(Cloud::Aws);
        let regions = wanted.regions(Cloud::Aws);
        let mut prices = FeedPrices::default();
        if instances.is_empty() && regions.is_empty() {
            return Ok(prices);
        }
        let credentials = self.credentials().await?;
        let list = Provenance { source: format!("{AWS_FEED_NAME}:price-list"), fetched_at: now_ms() };
        for instance in &instances {
            self.on_demand(&instance.region, &instance.instance_type, &credentials, &list, &mut prices).await?;
        }
        for region in &regions {
            self.egress(region, &credentials, &list, &mut prices).await?;
            self.storage(region, &credentials, &list, &mut prices).await?;
        }
        if self.settings.spot {
            let mut by_region: Vec<(&str, Vec<&str>)> = Vec::new();
            for instance in instances.iter().filter(|i| i.spot) {
                match by_region.iter_mut().find(|(region, _)| *region == instance.region) {
                    Some((_, types)) => types.push(&instance.instance_type),
                    None => by_region.push((&instance.region, vec![&instance.instance_type])),
                }
            }
            for (region, types) in by_region {
                self.spot(region, &types, &credentials, &mut prices).await?;
            }
        }
        Ok(prices)
    }
}

impl AwsPriceFeed {
    async fn on_demand(
        &self,
        region: &str,
        instance_type: &str,
        credentials: &Credentials,
        provenance: &Provenance,
        prices: &mut FeedPrices,
    ) -> Result<(), PricingError> {
        let filters = [
            ("instanceType", instance_type),
            ("regionCode", region),
            ("operatingSystem", "Linux"),
            ("tenancy", "Shared"),
            ("capacitystatus", "Used"),
            ("preInstalledSw", "NA"),
        ];
        let items = self.products("AmazonEC2", &filters, credentials, prices).await?;
        let candidates: Vec<&PriceItem> = items.iter().filter(|i| i.matches(&filters)).collect();
        let label = format!("{instance_type} (on-demand) in {region}");
        if let Some(tiers) = single_or_warn(&label, &candidates, prices) {
            prices.compute.push(ComputePrice {
                cloud: Cloud::Aws,
                region: region.to_string(),
                instance_type: instance_type.to_string(),
                market: Market::OnDemand,
                usd_per_hour: tiers[0].1,
                provenance: provenance.clone(),
            });
        }
        Ok(())
    }

    async fn egress(
        &self,
        region: &str,
        credentials: &Credentials,
        provenance: &Provenance,
        prices: &mut FeedPrices,
    ) -> Result<(), PricingError> {
        let items = self.products("AWSDataTransfer", &[("fromRegionCode", region)], credentials, prices).await?;
        let internet: Vec<&PriceItem> = items
            .iter()
            .filter(|i| {
                i.matches(&[("fromRegionCode", region), ("transferType", "AWS Outbound"), ("toLocation", "External")])
            })
            .collect();
        let label = format!("internet egress from {region}");
        if let Some(tiers) = single_or_warn(&label, &internet, prices) {
            match tiers.iter().find(|(_, price)| *price > 0.0) {
                Some(&(_, price)) => prices.egress.push(egress(region, Destination::Internet, price, provenance)),
                None => prices.warn(AWS_FEED_NAME, format!("{label}: no paid tier")),
            }
        }
        // One product per destination region; the model has one inter-region price per source
        // region, so it takes the dearest first paid tier, an upper bound.
        let mut dearest: Option<f64> = None;
        for item in
            items.iter().filter(|i| i.matches(&[("fromRegionCode", region), ("transferType", "InterRegion Outbound")]))
        {
            match item.on_demand_tiers() {
                Ok(tiers) => {
                    if let Some(&(_, price)) = tiers.iter().find(|(_, price)| *price > 0.0) {
                        dearest = Some(dearest.map_or(price, |d: f64| d.max(price)));
                    }
                }
                Err(e) => prices.warn(AWS_FEED_NAME, format!("inter-region egress from {region}: skipping {e}")),
            }
        }
        match dearest {
            Some(price) => prices.egress.push(egress(region, Destination::InterRegion, price, provenance)),
            None => prices.warn(AWS_FEED_NAME, format!("no inter-region egress price for {region}")),
        }
        Ok(())
    }

    async fn storage(
        &self,
        region: &str,
        credentials: &Credentials,
        provenance: &Provenance,
        prices: &mut FeedPrices,
    ) -> Result<(), PricingError> {
        let attributes = [("regionCode", region), ("storageClass", "General Purpose"), ("volumeType", "Standard")];
        let mut filters = attributes.to_vec();
        filters.push(("productFamily", "Storage"));
        let items = self.products("AmazonS3", &filters, credentials, prices).await?;
        // `productFamily` is a field of the product, not one of its attributes.
        let candidates: Vec<&PriceItem> =
            items.iter().filter(|i| i.product.product_family == "Storage" && i.matches(&attributes)).collect();
        if let Some(tiers) = single_or_warn(&format!("s3 standard storage in {region}"), &candidates, prices) {
            prices.storage.push(StoragePrice {
                cloud: Cloud::Aws,
                region: region.to_string(),
                usd_per_gb_month: tiers[0].1,
                provenance: provenance.clone(),
            });
        }
        Ok(())
    }

    /// The lowest current Linux spot price across the region's zones, per instance type.
    async fn spot(
        &self,
        region: &str,
        instance_types: &[&str],
        credentials: &Credentials,
        prices: &mut FeedPrices,
    ) -> Result<(), PricingError> {
        let provenance = Provenance { source: format!("{AWS_FEED_NAME}:spot-price-history"), fetched_at: now_ms() };
        let url = format!("{}/", self.settings.ec2_endpoint.replace("{region}", region).trim_end_matches('/'));
        let at = time::OffsetDateTime::from(SystemTime::now());
        let start = format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
            at.year(),
            u8::from(at.month()),
            at.day(),
            at.hour(),
            at.minute(),
            at.second()
        );
        let mut form = format!(
            "Action=DescribeSpotPriceHistory&Version=2016-11-15&ProductDescription.1={}&StartTime={}",
            percent_encode("Linux/UNIX"),
            percent_encode(&start)
        );
        for (n, instance_type) in instance_types.iter().enumerate() {
            form.push_str(&format!("&InstanceType.{}={}", n + 1, percent_encode(instance_type)));
        }
        let mut items = Vec::new();
        let mut next_token: Option<String> = None;
        for page_number in 1..=self.settings.max_pages.max(1) {
            let what = format!("aws DescribeSpotPriceHistory in {region} (page {page_number})");
            let mut body = form.clone();
            if let Some(token) = &next_token {
                body.push_str(&format!("&NextToken={}", percent_encode(token)));
            }
            let headers = [("content-type", "application/x-www-form-urlencoded; charset=utf-8")];
            let call = SignedCall { what: &what, url: &url, headers: &headers, body: &body, region, service: "ec2" };
            let answer = self.signed_post(call, credentials).await?;
            let page =
                parse_spot_page(&answer).map_err(|message| PricingError::Parse { what: what.clone(), message })?;
            for note in page.skipped {
                prices.warn(AWS_FEED_NAME, format!("{what}: {note}"));
            }
            items.extend(page.items);
            next_token = page.next_token;
            if next_token.is_none() {
                break;
            }
        }
        if next_token.is_some() {
            return Err(PricingError::Parse {
                what: format!("aws DescribeSpotPriceHistory in {region}"),
                message: format!("still more pages after {}", self.settings.max_pages),
            });
        }
        let lowest = lowest_current(&items);
        for instance_type in instance_types {
            match lowest.get(*instance_type) {
                Some(&usd_per_hour) => prices.compute.push(ComputePrice {
                    cloud: Cloud::Aws,
                    region: region.to_string(),
                    instance_type: instance_type.to_string(),
                    market: Market::Spot,
                    usd_per_hour,
                    provenance: provenance.clone(),
                }),
                None => prices.warn(AWS_FEED_NAME, format!("no spot price for {instance_type} in {region}")),
            }
        }
        Ok(())
    }
}

/// The one candidate's on-demand tiers, or `None` with a warning why not.
fn single_or_warn(label: &str, candidates: &[&PriceItem], prices: &mut FeedPrices) -> Option<Vec<(f64, f64)>> {
    single(label, candidates).map_err(|message| prices.warn(AWS_FEED_NAME, message)).ok()
}

fn egress(region: &str, destination: Destination, usd_per_gb: f64, provenance: &Provenance) -> EgressPrice {
    EgressPrice {
        cloud: Cloud::Aws,
        region: region.to_string(),
        destination,
        usd_per_gb,
        provenance: provenance.clone(),
    }
}
