//! Cloud capacity providers: the one [`Provider`] trait through which the broker launches, lists
//! and terminates a site's instances, and its implementations: `aws` (EC2), `azure` (Resource
//! Manager virtual machines) and `local` (agent processes on this machine). What to launch and
//! when is decided by the broker's core (`broker::core::capacity`); the provider only talks to the
//! cloud. A provider's calls are safe to repeat: a launch with the same `launch_id` never makes a
//! second instance (EC2 `ClientToken`, the Azure VM's name, the local instance's directory), and
//! terminating an instance that is gone succeeds.
//!
//! Every instance carries the tags [`TAG_BROKER`], [`TAG_SITE`] and [`TAG_LAUNCH`] (EC2 tags, Azure
//! resource tags), so a restarted broker finds what it launched ([`Provider::list`]) even when a
//! launch's reply was lost.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

use crate::model::UnixMillis;
use crate::model::price::Market;

pub mod aws;
pub mod azure;
pub mod local;
pub mod user_data;

/// The tag naming the broker that launched an instance (`broker.name`).
pub const TAG_BROKER: &str = "hybroker-broker";
/// The tag naming the instance's site.
pub const TAG_SITE: &str = "hybroker-site";
/// The tag holding the launch id (also the EC2 `ClientToken` and the Azure VM name).
pub const TAG_LAUNCH: &str = "hybroker-launch";

/// One launch, as the provider makes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// `hbl-` and 16 lowercase hex digits: the idempotency key of the launch, the value of
    /// [`TAG_LAUNCH`], the EC2 `ClientToken` and the Azure VM's name.
    pub launch_id: String,
    /// The value of [`TAG_BROKER`].
    pub broker: String,
    /// The value of [`TAG_SITE`].
    pub site: String,
    /// A catalog instance type of the site's cloud (`p5.48xlarge`, `Standard_NC24ads_A100_v4`).
    pub instance_type: String,
    pub market: Market,
    /// The instance's user data (cloud-init, [`user_data::render`]); the provider encodes it as
    /// its API wants (base64). It holds the launch's join token: never logged.
    pub user_data: String,
}

/// What the cloud says an instance is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InstanceState {
    /// Being created or booting.
    Pending,
    Running,
    /// Stopping, shutting down or being deleted: going away.
    Stopping,
    /// Gone (terminated, deleted). Recorded only when the cloud says so.
    Terminated,
}

impl InstanceState {
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Running => "running",
            InstanceState::Stopping => "stopping",
            InstanceState::Terminated => "terminated",
        }
    }
}

/// An instance as the cloud reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The cloud's id: EC2 `i-…`; the Azure VM's name; the local instance's name.
    pub instance_id: String,
    /// The [`TAG_LAUNCH`] tag (`None` when missing).
    pub launch_id: Option<String>,
    /// The [`TAG_SITE`] tag.
    pub site: Option<String>,
    pub instance_type: String,
    pub market: Market,
    pub state: InstanceState,
    /// When the cloud says it was launched (created), if it says.
    pub launched_at: Option<UnixMillis>,
}

/// Why a call failed, in the classes the broker acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProviderError {
    /// No capacity for this type (and market) now: `InsufficientInstanceCapacity`,
    /// `AllocationFailed`, `SpotMaxPriceTooLow`… The (site, type, market) is left out for
    /// `capacity_backoff` and the jobs are placed elsewhere.
    Capacity { code: String, message: String },
    /// A quota or SKU limit: `VcpuLimitExceeded`, `MaxSpotInstanceCountExceeded`, Azure's
    /// `OperationNotAllowed` (cores quota), `QuotaExceeded`, `SkuNotAvailable`. Left out for
    /// `quota_backoff`.
    Quota { code: String, message: String },
    /// Throttled (`RequestLimitExceeded`, HTTP 429): try again after `retry_after` with the same
    /// launch id.
    Throttled { code: String, retry_after: Option<Duration> },
    /// The request itself is wrong (bad image, parameters, credentials): retrying cannot help.
    Invalid { code: String, message: String },
    /// A network error, a 5xx, a timeout: try again with the same launch id.
    Transient { message: String },
}

impl ProviderError {
    /// The cloud's error code, or `transient`.
    pub fn code(&self) -> &str {
        match self {
            ProviderError::Capacity { code, .. }
            | ProviderError::Quota { code, .. }
            | ProviderError::Throttled { code, .. }
            | ProviderError::Invalid { code, .. } => code,
            ProviderError::Transient { .. } => "transient",
        }
    }

    /// `capacity`, `quota`, `throttled`, `invalid` or `transient` (a metric label).
    pub fn class(&self) -> &'static str {
        match self {
            ProviderError::Capacity { .. } => "capacity",
            ProviderError::Quota { .. } => "quota",
            ProviderError::Throttled { .. } => "throttled",
            ProviderError::Invalid { .. } => "invalid",
            ProviderError::Transient { .. } => "transient",
        }
    }

    /// Whether the same call may succeed later.
    pub fn retryable(&self) -> bool {
        matches!(self, ProviderError::Throttled { .. } | ProviderError::Transient { .. })
    }
}

impl fmt::Display for ProviderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProviderError::Capacity { code, message }
            | ProviderError::Quota { code, message }
            | ProviderError::Invalid { code, message } => write!(f, "{code}: {message}"),
            ProviderError::Throttled { code, retry_after: Some(d) } => write!(f, "{code}: retry after {d:?}"),
            ProviderError::Throttled { code, retry_after: None } => write!(f, "{code}: throttled"),
            ProviderError::Transient { message } => write!(f, "transient: {message}"),
        }
    }
}

impl std::error::Error for ProviderError {}

/// A cloud site's instances: launch, list, terminate. One per site with a `[site.capacity]`.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Launches one instance. Idempotent by `spec.launch_id`: a launch repeated after a lost
    /// reply returns the instance the first one made. The instance may still be pending.
    async fn launch(&self, spec: &LaunchSpec) -> Result<Instance, ProviderError>;

    /// Every instance of this broker and site that is not terminated (by the tags), wherever its
    /// launch was recorded.
    async fn list(&self) -> Result<Vec<Instance>, ProviderError>;

    /// Terminates (deletes) the instance, with its disks and network interface. Succeeds when it
    /// is already gone.
    async fn terminate(&self, instance_id: &str) -> Result<(), ProviderError>;
}
