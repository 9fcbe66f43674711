//! The `azure` capacity provider: virtual machines through Azure Resource Manager, over `reqwest`
//! (rustls with ring), with tokens from a client secret, a workload identity or a managed identity
//! ([`auth`]).
//!
//! A launch is `PUT …/virtualMachines/{launch_id}` with `If-None-Match: *`: the VM's name is the
//! launch id, so a repeated launch cannot make a second VM — Resource Manager refuses the
//! overwrite (412) and the provider returns the VM the first launch made. The OS disk and the NIC
//! (created with the VM from `networkInterfaceConfigurations`) carry `deleteOption: Delete`, so
//! deleting the VM deletes them. `launch` follows the creation's long-running operation to its
//! end and returns the VM as it then is (running), or the error the operation ended with:
//! allocation failures often appear only there, and are classified like direct ones. A VM whose
//! creation failed is deleted at once (not followed), so it does not linger in the group.

use async_trait::async_trait;
use reqwest::{Method, StatusCode};

use super::{Instance, LaunchSpec, Provider, ProviderError, TAG_BROKER, TAG_LAUNCH, TAG_SITE};
use crate::model::capacity::AzureLaunch;

pub mod arm;
pub mod auth;
mod http;
pub mod skus;
pub mod vm;

pub use auth::ResolvedCredential;

use arm::Arm;
use auth::TokenSource;
use vm::COMPUTE_API_VERSION;

/// Resource Manager's public endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://management.azure.com";

/// What the broker gives the provider of one Azure site.
#[derive(Debug, Clone)]
pub struct AzureSettings {
    /// The site's name (the [`TAG_SITE`] tag `list` keeps).
    pub site: String,
    /// The site's region (`location` of its VMs), e.g. `westeurope`.
    pub location: String,
    /// `broker.name` (the [`TAG_BROKER`] tag `list` keeps).
    pub broker: String,
    pub launch: AzureLaunch,
    pub credential: ResolvedCredential,
}

/// A site's virtual machines in one resource group.
pub struct AzureProvider {
    settings: AzureSettings,
    arm: Arm,
}

impl std::fmt::Debug for AzureProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureProvider").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl AzureProvider {
    /// Builds the HTTPS client (the platform's roots plus `launch.ca_file`'s) and the token
    /// source; makes no request yet.
    pub fn new(settings: AzureSettings) -> Result<AzureProvider, ProviderError> {
        let invalid = |message: String| ProviderError::Invalid { code: "InvalidSettings".into(), message };
        let http = http::client(settings.launch.ca_file.as_deref()).map_err(invalid)?;
        let launch = &settings.launch;
        let tokens = TokenSource::new(
            settings.credential.clone(),
            launch.authority.as_deref().unwrap_or(auth::DEFAULT_AUTHORITY),
            launch.imds_endpoint.as_deref().unwrap_or(auth::DEFAULT_IMDS),
            http.clone(),
        );
        let arm = Arm::new(http, launch.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT), tokens);
        Ok(AzureProvider { settings, arm })
    }

    fn group_url(&self) -> String {
        let launch = &self.settings.launch;
        format!(
            "{}/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines",
            self.arm.endpoint(),
            launch.subscription_id,
            launch.resource_group
        )
    }

    fn vm_url(&self, name: &str) -> String {
        format!("{}/{name}?api-version={COMPUTE_API_VERSION}", self.group_url())
    }

    /// The VM a launch with this name made before, or the error to give when there is none.
    async fn existing(&self, spec: &LaunchSpec, refused: ProviderError) -> Result<Instance, ProviderError> {
        let reply = self.arm.send(Method::GET, &self.vm_url(&spec.launch_id), None, &[]).await?;
        match reply.status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Err(refused),
            _ => return Err(reply.error()),
        }
        let vm = reply.json()?;
        if vm::tag(&vm, TAG_LAUNCH) != Some(spec.launch_id.as_str()) || vm::tag(&vm, TAG_BROKER) != Some(&spec.broker) {
            return Err(ProviderError::Invalid {
                code: "NameTaken".into(),
                message: format!("a VM named {} exists that this broker's launch did not make", spec.launch_id),
            });
        }
        tracing::info!(vm = %spec.launch_id, "launch repeated: the VM exists");
        vm::instance(&vm).ok_or_else(|| unreadable("a VM without a name"))
    }

    /// Deletes a VM whose creation failed, without waiting for the deletion.
    async fn delete_failed(&self, name: &str) {
        match self.arm.send(Method::DELETE, &self.vm_url(name), None, &[]).await {
            Ok(reply) if reply.status.is_success() || reply.status == StatusCode::NOT_FOUND => {
                tracing::info!(vm = name, "deleting the VM whose creation failed");
            }
            Ok(reply) => tracing::warn!(vm = name, "could not delete the failed VM: {}", reply.error()),
            Err(e) => tracing::warn!(vm = name, "could not delete the failed VM: {e}"),
        }
    }
}

#[async_trait]
impl Provider for AzureProvider {
    async fn launch(&self, spec: &LaunchSpec) -> Result<Instance, ProviderError> {
        let invalid = |code: &str, message: String| ProviderError::Invalid { code: code.into(), message };
        if !vm::valid_name(&spec.launch_id) {
            return Err(invalid("InvalidLaunchId", format!("{:?} cannot name a VM", spec.launch_id)));
        }
        if spec.user_data.len() > vm::MAX_CUSTOM_DATA {
            let size = spec.user_data.len();
            return Err(invalid("CustomDataTooLarge", format!("user data is {size} bytes, Azure takes 65535")));
        }
        let body = vm::create_body(spec, &self.settings.launch, &self.settings.location);
        let url = self.vm_url(&spec.launch_id);
        let reply = self.arm.send(Method::PUT, &url, Some(&body), &[("If-None-Match", "*")]).await?;
        match reply.status {
            StatusCode::OK | StatusCode::CREATED => {}
            StatusCode::PRECONDITION_FAILED => return self.existing(spec, reply.error()).await,
            StatusCode::CONFLICT
                if !matches!(reply.error(), ProviderError::Quota { .. } | ProviderError::Capacity { .. }) =>
            {
                return self.existing(spec, reply.error()).await;
            }
            _ => return Err(reply.error()),
        }
        tracing::info!(vm = %spec.launch_id, size = %spec.instance_type, market = ?spec.market, "creating VM");
        if let Err(e) = self.arm.follow(&reply).await {
            tracing::warn!(vm = %spec.launch_id, "VM creation failed: {e}");
            if !e.retryable() {
                self.delete_failed(&spec.launch_id).await;
            }
            return Err(e);
        }
        let done = self.arm.send(Method::GET, &url, None, &[]).await?;
        if !done.status.is_success() {
            return Err(done.error());
        }
        vm::instance(&done.json()?).ok_or_else(|| unreadable("a VM without a name"))
    }

    async fn list(&self) -> Result<Vec<Instance>, ProviderError> {
        let mut url = Some(format!("{}?api-version={COMPUTE_API_VERSION}", self.group_url()));
        let mut instances = Vec::new();
        while let Some(page_url) = url.take() {
            let reply = self.arm.send(Method::GET, &page_url, None, &[]).await?;
            if !reply.status.is_success() {
                return Err(reply.error());
            }
            let page = reply.json()?;
            for vm in page.get("value").and_then(|v| v.as_array()).map(Vec::as_slice).unwrap_or_default() {
                let ours = vm::tag(vm, TAG_BROKER) == Some(&self.settings.broker)
                    && vm::tag(vm, TAG_SITE) == Some(&self.settings.site);
                if let Some(instance) = vm::instance(vm).filter(|_| ours) {
                    instances.push(instance);
                }
            }
            url = page.get("nextLink").and_then(|v| v.as_str()).filter(|s| !s.is_empty()).map(str::to_owned);
        }
        Ok(instances)
    }

    async fn terminate(&self, instance_id: &str) -> Result<(), ProviderError> {
        if !vm::valid_name(instance_id) {
            return Err(ProviderError::Invalid {
                code: "InvalidInstanceId".into(),
                message: format!("{instance_id:?} is not a VM name"),
            });
        }
        let reply = self.arm.send(Method::DELETE, &self.vm_url(instance_id), None, &[]).await?;
        match reply.status {
            StatusCode::NO_CONTENT | StatusCode::NOT_FOUND => Ok(()),
            s if s.is_success() => {
                tracing::info!(vm = instance_id, "deleting VM");
                self.arm.follow(&reply).await
            }
            _ => Err(reply.error()),
        }
    }
}

fn unreadable(what: &str) -> ProviderError {
    ProviderError::Transient { message: format!("unreadable resource manager answer: {what}") }
}
