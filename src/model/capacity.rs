//! A cloud site's capacity provider (`[site.capacity]`): which cloud API launches its instances,
//! the limits on how many and how costly, the timeouts that retire them, and the provider's launch
//! settings (`[site.capacity.aws]`, `[site.capacity.azure]`, `[site.capacity.local]`). A site with a
//! provider is elastic: placement may choose it before any of its agents exists. Pure: the broker's
//! `capacity` module does the launching.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration::HumanDuration;

/// Which API launches a site's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// EC2 `RunInstances` (on-demand or spot), `DescribeInstances` by tag, `TerminateInstances`.
    Aws,
    /// Azure Resource Manager virtual machines.
    Azure,
    /// Agent processes on the broker's own machine, each enrolling like a VM (quickstart, tests).
    Local,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Aws => "aws",
            ProviderKind::Azure => "azure",
            ProviderKind::Local => "local",
        }
    }
}

/// `[site.capacity]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CapacityConfig {
    pub provider: ProviderKind,
    /// Instances of the site alive at once (launching, booting and enrolled).
    #[serde(default = "default_max_instances")]
    pub max_instances: u32,
    /// Launched but not yet enrolled, at once.
    #[serde(default = "default_max_pending")]
    pub max_pending: u32,
    /// The site's instances together may cost at most this per hour (list price of their type and
    /// market); none: no cap beyond `max_instances`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_usd_per_hour: Option<f64>,
    /// An instance whose agent has not enrolled this long after the launch is terminated and its
    /// jobs placed again.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout: HumanDuration,
    /// An enrolled instance without an attempt this long is drained, terminated and its agent
    /// revoked and removed.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: HumanDuration,
    /// A tagged instance of this broker and site that the store does not know is terminated once
    /// it is this old (at least `boot_timeout`: its launch may still be answering).
    #[serde(default = "default_orphan_grace")]
    pub orphan_grace: HumanDuration,
    /// How long (site, instance type, market) is left out after an insufficient-capacity error
    /// (or a spot interruption).
    #[serde(default = "default_capacity_backoff")]
    pub capacity_backoff: HumanDuration,
    /// How long it is left out after a quota or SKU error.
    #[serde(default = "default_quota_backoff")]
    pub quota_backoff: HumanDuration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsLaunch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub azure: Option<AzureLaunch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalLaunch>,
}

fn default_max_instances() -> u32 {
    4
}
fn default_max_pending() -> u32 {
    2
}
fn default_boot_timeout() -> HumanDuration {
    Duration::from_secs(600).into()
}
fn default_idle_timeout() -> HumanDuration {
    Duration::from_secs(300).into()
}
fn default_orphan_grace() -> HumanDuration {
    Duration::from_secs(900).into()
}
fn default_capacity_backoff() -> HumanDuration {
    Duration::from_secs(180).into()
}
fn default_quota_backoff() -> HumanDuration {
    Duration::from_secs(3600).into()
}

/// `[site.capacity.aws]`: how EC2 instances are launched. Either a launch template or an image
/// (with subnets and security groups) must be given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsLaunch {
    /// A launch template id (`lt-…`) or name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_template: Option<String>,
    /// The template's version (`$Default` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_template_version: Option<String>,
    /// An AMI with `hybroker` installed (`deploy/image/build-image.sh`), overriding the template's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    /// Subnet ids, tried in order (one per availability zone).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnets: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub security_groups: Vec<String>,
    /// An instance profile (name or ARN) for the instances. None by default: agents need no cloud
    /// credentials, and attempts cannot reach the metadata service anyway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// The EC2 endpoint (an emulator in tests); default: the region's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
}

/// `[site.capacity.azure]`: how Azure VMs are created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureLaunch {
    pub subscription_id: String,
    pub resource_group: String,
    /// An image resource id (`/subscriptions/…/images/…` or a gallery image version) or a
    /// marketplace URN `publisher:offer:sku:version`, with `hybroker` installed.
    pub image: String,
    /// The subnet's resource id; each VM gets its own NIC there (deleted with the VM).
    pub subnet_id: String,
    #[serde(default = "default_admin_username")]
    pub admin_username: String,
    /// The OpenSSH public key put on the VMs (Azure requires one; password login is off).
    pub ssh_public_key: String,
    /// A user-assigned managed identity's resource id for the VMs. None by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_identity: Option<String>,
    /// How the broker authenticates to Resource Manager.
    #[serde(default)]
    pub credential: AzureCredential,
    /// Resource Manager's base URL (a fixture in tests); default `https://management.azure.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Microsoft Entra's base URL; default `https://login.microsoftonline.com`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// The instance metadata service (managed identity); default `http://169.254.169.254`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imds_endpoint: Option<String>,
    /// Extra trust roots (PEM) for `endpoint` and `authority`, beside the platform's: a private
    /// Resource Manager proxy's CA, or the tests' fixture CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

fn default_admin_username() -> String {
    "hybroker".into()
}

/// `[site.capacity.azure.credential]`. Ids and the secret's file may come from the standard
/// `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET`, `AZURE_FEDERATED_TOKEN_FILE`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureCredential {
    #[serde(default)]
    pub kind: AzureCredentialKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// `client_secret`: a file holding the secret (never the secret itself in the config).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// `workload_identity`: the projected service-account token, re-read for every token request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub federated_token_file: Option<PathBuf>,
}

impl AzureCredential {
    /// Settings that the kind does not use (a secret file for a managed identity…) are mistakes.
    fn problems(&self, p: &mut Vec<String>) {
        let kind = self.kind.as_str();
        let unused = [
            ("client_secret_file", self.client_secret_file.is_some(), self.kind != AzureCredentialKind::ClientSecret),
            (
                "federated_token_file",
                self.federated_token_file.is_some(),
                self.kind != AzureCredentialKind::WorkloadIdentity,
            ),
            ("tenant_id", self.tenant_id.is_some(), self.kind == AzureCredentialKind::ManagedIdentity),
        ];
        for (key, given, unused) in unused {
            if given && unused {
                p.push(format!("azure.credential.{key}: not used by kind {kind}"));
            }
        }
    }
}

impl AzureCredentialKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AzureCredentialKind::ClientSecret => "client_secret",
            AzureCredentialKind::WorkloadIdentity => "workload_identity",
            AzureCredentialKind::ManagedIdentity => "managed_identity",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AzureCredentialKind {
    #[default]
    ClientSecret,
    WorkloadIdentity,
    ManagedIdentity,
}

/// `[site.capacity.local]`: agent processes on the broker's machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalLaunch {
    /// The `hybroker` binary the agents run; default: the broker's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<PathBuf>,
    /// Where each instance gets its directory (certificates, work, log); default: `local-instances`
    /// beside the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// `sandbox.isolation` of the agents: `auto` (the default: the full sandbox as root, else
    /// unprivileged user namespaces) or `none` (then the site must be dedicated to one tenant:
    /// `[[dedicated]] agent = "<site>/*"`).
    #[serde(default = "default_local_isolation")]
    pub isolation: String,
}

fn default_local_isolation() -> String {
    "auto".into()
}

impl CapacityConfig {
    /// A provider with the default limits and no launch settings (tests, the bench).
    pub fn new(provider: ProviderKind) -> Self {
        CapacityConfig {
            provider,
            max_instances: default_max_instances(),
            max_pending: default_max_pending(),
            max_usd_per_hour: None,
            boot_timeout: default_boot_timeout(),
            idle_timeout: default_idle_timeout(),
            orphan_grace: default_orphan_grace(),
            capacity_backoff: default_capacity_backoff(),
            quota_backoff: default_quota_backoff(),
            aws: None,
            azure: None,
            local: None,
        }
    }

    /// Every problem, as `key: message` with keys relative to `[site.capacity]` (the caller
    /// prefixes `site[i].capacity.`); `cloud` is the site's kind (`aws`/`azure`).
    pub fn problems(&self, cloud: &str) -> Vec<String> {
        let mut p = Vec::new();
        if self.max_instances == 0 {
            p.push("max_instances: must be more than 0".to_owned());
        }
        if self.max_pending == 0 {
            p.push("max_pending: must be more than 0".to_owned());
        }
        if self.max_usd_per_hour.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            p.push("max_usd_per_hour: must be more than 0".to_owned());
        }
        for (key, d) in [
            ("boot_timeout", self.boot_timeout),
            ("idle_timeout", self.idle_timeout),
            ("capacity_backoff", self.capacity_backoff),
            ("quota_backoff", self.quota_backoff),
        ] {
            if d.0.is_zero() {
                p.push(format!("{key}: must be more than 0"));
            }
        }
        if self.orphan_grace < self.boot_timeout {
            p.push(format!(
                "orphan_grace ({}) must be at least boot_timeout ({}): a launch may still be answering",
                self.orphan_grace, self.boot_timeout
            ));
        }
        let sections = [("aws", self.aws.is_some()), ("azure", self.azure.is_some()), ("local", self.local.is_some())];
        for (name, given) in sections {
            if given && name != self.provider.as_str() {
                p.push(format!("{name}: settings for provider {name}, but provider is {}", self.provider.as_str()));
            }
        }
        match self.provider {
            ProviderKind::Local => {}
            ProviderKind::Aws | ProviderKind::Azure if self.provider.as_str() != cloud => {
                p.push(format!("provider: a {cloud} site cannot use provider {}", self.provider.as_str()));
            }
            ProviderKind::Aws => match &self.aws {
                None => p.push("aws: provider aws needs [site.capacity.aws] (an image or a launch template)".into()),
                Some(aws) => aws.problems(&mut p),
            },
            ProviderKind::Azure => match &self.azure {
                None => p.push("azure: provider azure needs [site.capacity.azure]".into()),
                Some(azure) => azure.problems(&mut p),
            },
        }
        if let Some(local) = &self.local
            && !matches!(local.isolation.as_str(), "none" | "auto")
        {
            p.push(format!("local.isolation: {:?} is not none or auto", local.isolation));
        }
        p
    }
}

impl AwsLaunch {
    fn problems(&self, p: &mut Vec<String>) {
        if self.launch_template.is_none() && self.image_id.is_none() {
            p.push("aws.image_id: give an image (AMI with hybroker installed) or aws.launch_template".into());
        }
        if self.launch_template.is_none() && self.subnets.is_empty() {
            p.push("aws.subnets: give at least one subnet (or a launch template that names one)".into());
        }
        if self.image_id.as_deref().is_some_and(|i| !i.starts_with("ami-")) {
            p.push(format!("aws.image_id: {:?} is not an AMI id (ami-…)", self.image_id.as_deref().unwrap_or("")));
        }
        for (i, s) in self.subnets.iter().enumerate() {
            if !s.starts_with("subnet-") {
                p.push(format!("aws.subnets[{i}]: {s:?} is not a subnet id (subnet-…)"));
            }
        }
        for (i, s) in self.security_groups.iter().enumerate() {
            if !s.starts_with("sg-") {
                p.push(format!("aws.security_groups[{i}]: {s:?} is not a security group id (sg-…)"));
            }
        }
        if self.launch_template.as_deref().is_some_and(|t| t.trim().is_empty()) {
            p.push("aws.launch_template: must not be empty".into());
        }
        if self.launch_template_version.is_some() && self.launch_template.is_none() {
            p.push("aws.launch_template_version: given without aws.launch_template".into());
        }
        for (key, value) in [("instance_profile", &self.instance_profile), ("key_name", &self.key_name)] {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                p.push(format!("aws.{key}: must not be empty (leave it out for none)"));
            }
        }
        if let Some(endpoint) = &self.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            p.push(format!("aws.endpoint: {endpoint:?} is not an http(s) url"));
        }
    }
}

impl AzureLaunch {
    fn problems(&self, p: &mut Vec<String>) {
        for (key, value) in [
            ("subscription_id", &self.subscription_id),
            ("resource_group", &self.resource_group),
            ("image", &self.image),
            ("subnet_id", &self.subnet_id),
            ("ssh_public_key", &self.ssh_public_key),
            ("admin_username", &self.admin_username),
        ] {
            if value.trim().is_empty() {
                p.push(format!("azure.{key}: must be given"));
            }
        }
        let image = self.image.trim();
        if !image.is_empty() && !image.starts_with("/subscriptions/") && image.split(':').count() != 4 {
            p.push(format!("azure.image: {image:?} is neither an image resource id nor publisher:offer:sku:version"));
        }
        if !self.subnet_id.trim().is_empty() && !self.subnet_id.starts_with("/subscriptions/") {
            p.push("azure.subnet_id: must be a subnet resource id (/subscriptions/…/subnets/…)".into());
        }
        for (key, url) in [("endpoint", &self.endpoint), ("authority", &self.authority)] {
            if let Some(url) = url
                && !url.starts_with("https://")
            {
                p.push(format!("azure.{key}: {url:?} must be an https:// URL (it carries the credential)"));
            }
        }
        if let Some(url) = &self.imds_endpoint
            && !url.starts_with("http://")
            && !url.starts_with("https://")
        {
            p.push(format!("azure.imds_endpoint: {url:?} is not an http:// URL"));
        }
        if self.ca_file.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
            p.push("azure.ca_file: must not be empty".into());
        }
        self.credential.problems(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let mut c = CapacityConfig::new(ProviderKind::Aws);
        c.max_instances = 0;
        c.max_usd_per_hour = Some(-1.0);
        c.aws = Some(AwsLaunch { subnets: vec!["net-1".into()], ..AwsLaunch::default() });
        let p = c.problems("aws");
        for want in ["max_instances:", "max_usd_per_hour:", "aws.image_id:", "aws.subnets[0]:"] {
            assert!(p.iter().any(|m| m.starts_with(want)), "{want} missing from {p:?}");
        }
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(CapacityConfig::new(ProviderKind::Local).problems("aws").is_empty());
        let p = CapacityConfig::new(ProviderKind::Azure).problems("aws");
        assert_eq!(p, ["provider: a aws site cannot use provider azure"]);
    }

    #[test]
    fn azure_settings_report_every_problem_with_its_key() {
        let mut c = CapacityConfig::new(ProviderKind::Azure);
        c.azure = Some(AzureLaunch {
            image: "ubuntu".into(),
            subnet_id: "subnet-1".into(),
            endpoint: Some("http://127.0.0.1:1".into()),
            credential: AzureCredential {
                kind: AzureCredentialKind::ManagedIdentity,
                client_secret_file: Some("secret".into()),
                ..AzureCredential::default()
            },
            ..AzureLaunch::default()
        });
        let p = c.problems("azure");
        for want in [
            "azure.subscription_id:",
            "azure.resource_group:",
            "azure.ssh_public_key:",
            "azure.admin_username:",
            "azure.image:",
            "azure.subnet_id:",
            "azure.endpoint:",
            "azure.credential.client_secret_file: not used by kind managed_identity",
        ] {
            assert!(p.iter().any(|m| m.starts_with(want)), "{want} missing from {p:?}");
        }
        assert_eq!(p.len(), 8, "{p:?}");
    }

    #[test]
    fn capacity_parses_from_toml() {
        let c: CapacityConfig = toml::from_str(
            "provider = \"aws\"\nmax_instances = 3\nidle_timeout = \"2m\"\n[aws]\nimage_id = \"ami-1\"\n\
             subnets = [\"subnet-a\"]\n",
        )
        .unwrap();
        assert_eq!((c.max_instances, c.idle_timeout.0), (3, Duration::from_secs(120)));
        assert!(c.problems("aws").is_empty(), "{:?}", c.problems("aws"));
        assert!(toml::from_str::<CapacityConfig>("provider = \"gcp\"").is_err());
    }
}
