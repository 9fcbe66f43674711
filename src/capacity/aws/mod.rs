//! EC2 capacity: [`AwsProvider`] launches a site's instances with `RunInstances`, finds them with
//! `DescribeInstances` by tag and ends them with `TerminateInstances`, through a small EC2 Query API
//! client (`query`: SigV4 via `aws-sigv4`, answers read with `quick-xml`: `reply`) rather than
//! `aws-sdk-ec2`.
//!
//! - A launch is idempotent by its launch id, the `ClientToken`: EC2 answers a repeated launch with
//!   the first one's instance. A repeat whose parameters changed (the configuration changed between
//!   a lost answer and the retry) gets `IdempotentParameterMismatch`; the instance is then looked up
//!   by its [`TAG_LAUNCH`] tag.
//! - Subnets are tried in order, as SkyPilot and dstack try availability zones: a capacity error in
//!   one tries the next; any other error ends the launch.
//! - Instances get no instance profile unless one is configured, IMDSv2 only (`HttpTokens=required`),
//!   and the tags `Name`, [`TAG_BROKER`], [`TAG_SITE`], [`TAG_LAUNCH`] on the instance and its volumes.

use std::fmt;

use async_trait::async_trait;
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, SharedCredentialsProvider};
use aws_smithy_http_client::tls::{Provider as TlsProvider, rustls_provider::CryptoMode};
use base64::Engine as _;

use super::{Instance, InstanceState, LaunchSpec, Provider, ProviderError, TAG_BROKER, TAG_LAUNCH, TAG_SITE};
use crate::model::capacity::AwsLaunch;
use crate::model::price::Market;
use query::Ec2Client;

pub mod catalog;
mod query;
mod reply;
#[cfg(test)]
mod tests;

/// EC2 takes at most this much user data (before base64).
const MAX_USER_DATA: usize = 16 * 1024;
/// `MaxResults` of one `DescribeInstances` page (EC2 allows 5 to 1000).
const PAGE_SIZE: u32 = 1000;
/// A listing with more pages than this is refused (a token that never ends).
const MAX_PAGES: usize = 100;
/// The states [`Provider::list`] asks for: all but `terminated`.
const LIVE_STATES: [&str; 5] = ["pending", "running", "shutting-down", "stopping", "stopped"];

/// What [`AwsProvider::new`] needs: the site, its region, the broker's name (the [`TAG_BROKER`]
/// value) and the site's `[site.capacity.aws]`.
#[derive(Clone)]
pub struct AwsSettings {
    pub site: String,
    pub region: String,
    pub broker: String,
    pub launch: AwsLaunch,
    /// Fixed credentials (an emulator); `None` = the AWS default chain (env, profile, SSO, web
    /// identity, instance metadata), as for S3.
    pub static_credentials: Option<(String, String)>,
}

impl fmt::Debug for AwsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsSettings")
            .field("site", &self.site)
            .field("region", &self.region)
            .field("broker", &self.broker)
            .field("launch", &self.launch)
            .field("static_credentials", &self.static_credentials.as_ref().map(|(id, _)| format!("{id}/<redacted>")))
            .finish()
    }
}

/// One AWS site's instances.
pub struct AwsProvider {
    settings: AwsSettings,
    endpoint: String,
    client: Ec2Client,
}

impl fmt::Debug for AwsProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AwsProvider")
            .field("site", &self.settings.site)
            .field("region", &self.settings.region)
            .field("endpoint", &self.endpoint)
            .finish()
    }
}

impl AwsProvider {
    /// A provider for `settings.site`: endpoint = `launch.endpoint` or the region's; credentials of
    /// the default chain are resolved at each call (and cached by the chain).
    pub async fn new(settings: AwsSettings) -> Result<AwsProvider, ProviderError> {
        let invalid = |message: String| ProviderError::Invalid { code: "InvalidConfiguration".into(), message };
        if settings.region.trim().is_empty() {
            return Err(invalid(format!("aws site {}: no region", settings.site)));
        }
        if settings.broker.trim().is_empty() || settings.site.trim().is_empty() {
            return Err(invalid("aws provider: the broker and site names must be given".into()));
        }
        let endpoint = match &settings.launch.endpoint {
            Some(endpoint) => endpoint.trim_end_matches('/').to_owned(),
            None => regional_endpoint(&settings.region),
        };
        let credentials = match &settings.static_credentials {
            Some((id, secret)) => {
                SharedCredentialsProvider::new(Credentials::new(id, secret, None, None, "hybroker-static"))
            }
            None => default_chain(&settings.region).await.ok_or_else(|| ProviderError::Invalid {
                code: "NoCredentials".into(),
                message: format!("aws site {}: the default credential chain has no provider", settings.site),
            })?,
        };
        let client = Ec2Client::new(&endpoint, &settings.region, credentials)?;
        Ok(AwsProvider { settings, endpoint, client })
    }

    /// The EC2 endpoint this provider calls.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// `RunInstances` in one subnet (or the template's, with `None`).
    async fn run_instance(&self, spec: &LaunchSpec, subnet: Option<&str>) -> Result<Instance, ProviderError> {
        let params = run_instances_params(&self.settings.launch, spec, subnet);
        let xml = self.client.call("RunInstances", &params).await?;
        let instances = reply::parse_run_instances(&xml).map_err(|message| ProviderError::Transient { message })?;
        let Some(mut instance) = instances.into_iter().next() else {
            return Err(ProviderError::Transient { message: "RunInstances answered without an instance".into() });
        };
        // The answer may leave the tags out: they are the launch's.
        instance.launch_id.get_or_insert_with(|| spec.launch_id.clone());
        instance.site.get_or_insert_with(|| spec.site.clone());
        Ok(instance)
    }

    /// Every instance of this broker and site matching `filters` (each a name and its values), over
    /// all pages.
    async fn describe(&self, filters: &[(&str, Vec<&str>)]) -> Result<Vec<Instance>, ProviderError> {
        let mut params = vec![("MaxResults".to_owned(), PAGE_SIZE.to_string())];
        let ours = [
            (format!("tag:{TAG_BROKER}"), vec![self.settings.broker.as_str()]),
            (format!("tag:{TAG_SITE}"), vec![self.settings.site.as_str()]),
        ];
        let all = ours.iter().map(|(n, v)| (n.as_str(), v)).chain(filters.iter().map(|(n, v)| (*n, v)));
        for (i, (name, values)) in all.enumerate() {
            params.push((format!("Filter.{}.Name", i + 1), name.to_owned()));
            for (j, value) in values.iter().enumerate() {
                params.push((format!("Filter.{}.Value.{}", i + 1, j + 1), (*value).to_owned()));
            }
        }
        let mut instances = Vec::new();
        for _ in 0..MAX_PAGES {
            let xml = self.client.call("DescribeInstances", &params).await?;
            let page = reply::parse_describe_instances(&xml).map_err(|message| ProviderError::Transient { message })?;
            instances.extend(page.instances);
            let Some(token) = page.next_token else { return Ok(instances) };
            params.retain(|(k, _)| k != "NextToken");
            params.push(("NextToken".into(), token));
        }
        Err(ProviderError::Transient { message: format!("DescribeInstances: still more pages after {MAX_PAGES}") })
    }

    /// The instance a launch made, found by its tag after `IdempotentParameterMismatch`: a live one
    /// first, else a terminated one.
    async fn find_launched(&self, launch_id: &str) -> Result<Option<Instance>, ProviderError> {
        let tag = format!("tag:{TAG_LAUNCH}");
        let mut found = self.describe(&[(tag.as_str(), vec![launch_id])]).await?;
        found.sort_by_key(|i| i.state == InstanceState::Terminated);
        Ok(found.into_iter().next())
    }

    fn check(&self, spec: &LaunchSpec) -> Result<(), ProviderError> {
        let invalid = |message: String| ProviderError::Invalid { code: "InvalidParameterValue".into(), message };
        if spec.broker != self.settings.broker || spec.site != self.settings.site {
            return Err(invalid(format!(
                "launch {} is for broker {} site {}, this provider for broker {} site {}",
                spec.launch_id, spec.broker, spec.site, self.settings.broker, self.settings.site
            )));
        }
        if spec.launch_id.is_empty() || spec.launch_id.len() > 64 || !spec.launch_id.is_ascii() {
            return Err(invalid(format!("launch id {:?} is not a client token (1 to 64 ascii)", spec.launch_id)));
        }
        if spec.user_data.len() > MAX_USER_DATA {
            return Err(invalid(format!(
                "launch {}: user data of {} bytes, ec2 takes at most {MAX_USER_DATA}",
                spec.launch_id,
                spec.user_data.len()
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Provider for AwsProvider {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Instance, ProviderError> {
        self.check(spec)?;
        let subnets: Vec<Option<&str>> = match self.settings.launch.subnets.as_slice() {
            [] => vec![None],
            subnets => subnets.iter().map(|s| Some(s.as_str())).collect(),
        };
        let mut capacity_errors = Vec::new();
        for subnet in subnets {
            match self.run_instance(spec, subnet).await {
                Ok(instance) => {
                    tracing::info!(site = %spec.site, launch = %spec.launch_id, instance = %instance.instance_id,
                        instance_type = %spec.instance_type, market = ?spec.market, subnet = subnet.unwrap_or("-"),
                        "ec2 instance launched");
                    return Ok(instance);
                }
                Err(ProviderError::Capacity { code, message }) => {
                    tracing::info!(site = %spec.site, launch = %spec.launch_id, subnet = subnet.unwrap_or("-"),
                        code, "ec2 capacity error, trying the next subnet: {message}");
                    capacity_errors.push((subnet, code, message));
                }
                Err(ProviderError::Invalid { code, message }) if code == "IdempotentParameterMismatch" => {
                    return match self.find_launched(&spec.launch_id).await? {
                        Some(instance) => {
                            tracing::info!(site = %spec.site, launch = %spec.launch_id,
                                instance = %instance.instance_id, "ec2 launch already made (found by its tag)");
                            Ok(instance)
                        }
                        None => Err(ProviderError::Transient {
                            message: format!(
                                "{code}: {message}; no instance has tag {TAG_LAUNCH}={} yet",
                                spec.launch_id
                            ),
                        }),
                    };
                }
                Err(other) => return Err(other),
            }
        }
        let code = capacity_errors.last().map(|(_, code, _)| code.clone()).unwrap_or_default();
        let message = capacity_errors
            .iter()
            .map(|(subnet, _, message)| format!("in {}: {message}", subnet.unwrap_or("the template's subnet")))
            .collect::<Vec<_>>()
            .join("; ");
        Err(ProviderError::Capacity { code, message })
    }

    async fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        self.describe(&[("instance-state-name", LIVE_STATES.to_vec())]).await
    }

    async fn terminate(&self, instance_id: &str) -> Result<(), ProviderError> {
        let params = [("InstanceId.1".to_owned(), instance_id.to_owned())];
        match self.client.call("TerminateInstances", &params).await {
            Ok(_) => {
                tracing::info!(site = %self.settings.site, instance = instance_id, "ec2 instance terminating");
                Ok(())
            }
            Err(ProviderError::Invalid { code, .. }) if code == "InvalidInstanceID.NotFound" => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// `https://ec2.<region>.amazonaws.com` (`.amazonaws.com.cn` in the China regions).
fn regional_endpoint(region: &str) -> String {
    let suffix = if region.starts_with("cn-") { "amazonaws.com.cn" } else { "amazonaws.com" };
    format!("https://ec2.{region}.{suffix}")
}

/// The AWS default credential chain for `region`, as the S3 store and the AWS price feed load it.
async fn default_chain(region: &str) -> Option<SharedCredentialsProvider> {
    let http = aws_smithy_http_client::Builder::new().tls_provider(TlsProvider::Rustls(CryptoMode::Ring)).build_https();
    let shared = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .region(Region::new(region.to_owned()))
        .load()
        .await;
    shared.credentials_provider()
}

/// The parameters of the `RunInstances` of one launch in `subnet`.
fn run_instances_params(launch: &AwsLaunch, spec: &LaunchSpec, subnet: Option<&str>) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = Vec::new();
    let mut put = |k: &str, v: &str| p.push((k.to_owned(), v.to_owned()));
    put("ClientToken", &spec.launch_id);
    put("MinCount", "1");
    put("MaxCount", "1");
    put("InstanceType", &spec.instance_type);
    if let Some(image) = &launch.image_id {
        put("ImageId", image);
    }
    if let Some(template) = &launch.launch_template {
        let key = if template.starts_with("lt-") { "LaunchTemplateId" } else { "LaunchTemplateName" };
        put(&format!("LaunchTemplate.{key}"), template);
        put("LaunchTemplate.Version", launch.launch_template_version.as_deref().unwrap_or("$Default"));
    }
    if let Some(subnet) = subnet {
        put("SubnetId", subnet);
    }
    for (i, group) in launch.security_groups.iter().enumerate() {
        put(&format!("SecurityGroupId.{}", i + 1), group);
    }
    if let Some(profile) = &launch.instance_profile {
        let key = if profile.starts_with("arn:") { "IamInstanceProfile.Arn" } else { "IamInstanceProfile.Name" };
        put(key, profile);
    }
    if let Some(key_name) = &launch.key_name {
        put("KeyName", key_name);
    }
    put("UserData", &base64::engine::general_purpose::STANDARD.encode(&spec.user_data));
    put("MetadataOptions.HttpTokens", "required");
    put("MetadataOptions.HttpEndpoint", "enabled");
    let name = format!("hybroker-{}-{}", spec.site, spec.launch_id);
    let tags =
        [("Name", name.as_str()), (TAG_BROKER, &spec.broker), (TAG_SITE, &spec.site), (TAG_LAUNCH, &spec.launch_id)];
    for (i, resource) in ["instance", "volume"].iter().enumerate() {
        let prefix = format!("TagSpecification.{}", i + 1);
        put(&format!("{prefix}.ResourceType"), resource);
        for (j, (key, value)) in tags.iter().enumerate() {
            put(&format!("{prefix}.Tag.{}.Key", j + 1), key);
            put(&format!("{prefix}.Tag.{}.Value", j + 1), value);
        }
    }
    if spec.market == Market::Spot {
        put("InstanceMarketOptions.MarketType", "spot");
        put("InstanceMarketOptions.SpotOptions.SpotInstanceType", "one-time");
        put("InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior", "terminate");
    }
    p
}
