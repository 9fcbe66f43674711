//! The broker's side of job data: the configured storage locations, resolving a submission's
//! inputs and outputs (listing and HEADing inputs for their sizes, checking the tenant's allowed
//! prefixes) and minting each attempt's presigned requests. Only the broker holds credentials.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::task::JoinHandle;

use crate::config::{BrokerConfig, StorageCloud, StorageConfig, TenantConfig};
use crate::error::ApiError;
use crate::model::data::{DataUri, InputObject, JobData, OutputChoice, OutputTarget, Scheme, input_destination};
use crate::model::job::{Checkpoint, Input, JobSpec};
use crate::placement::sizes::{self, DataSize};
use crate::storage::azure::{AzureBlobStore, AzureSettings};
use crate::storage::local::LocalS3Server;
use crate::storage::s3::{S3Settings, S3Store};
use crate::storage::{CompletedPart, ObjectMeta, ObjectStore, Presigned, StorageError, Unreachable};

/// What [`DataPlane::resolve_with`] does with an input whose size its store does not give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Missing {
    /// Refuse the job (submit).
    Refuse,
    /// Take its `size_hint`, else 0 (a plan).
    Assume,
}

/// Why an input's objects were not listed: the broker's refusal, and the store's answer when it
/// only means that the size is unknown (missing object, unreachable store).
struct Unlisted {
    error: ApiError,
    why: Option<String>,
}

/// Most parts one upload may have (S3's limit).
const MAX_PARTS: u64 = 10_000;

/// How the broker reaches one location.
struct Location {
    config: StorageConfig,
    store: Arc<dyn ObjectStore>,
}

/// Every configured location, and the rules for minting URLs.
pub struct DataPlane {
    locations: HashMap<String, Location>,
    by_uri: HashMap<(Scheme, String), String>,
    url_ttl: Duration,
    max_input_objects: usize,
    multipart_threshold: u64,
    part_size: u64,
    /// The embedded local servers; aborted when the data plane is dropped.
    servers: Vec<JoinHandle<()>>,
}

impl Drop for DataPlane {
    fn drop(&mut self) {
        for server in &self.servers {
            server.abort();
        }
    }
}

/// One output file's upload, as the broker plans it.
pub enum Upload {
    Single { key: String, put: Presigned },
    Multipart { key: String, upload_id: String, part_size: u64, parts: Vec<Presigned> },
}

impl DataPlane {
    /// Connects to every location and starts the embedded local stores.
    pub async fn start(config: &BrokerConfig) -> anyhow::Result<Self> {
        Self::connect(config, false).await
    }

    /// Every location for planning offline (`hybroker plan --config`): the broker's clients and
    /// credential resolution, but a location that cannot be reached (no credentials) answers every
    /// request with why, and local stores are served on a free loopback port (the broker may hold
    /// theirs).
    pub async fn for_planning(config: &BrokerConfig) -> anyhow::Result<Self> {
        Self::connect(config, true).await
    }

    async fn connect(config: &BrokerConfig, planning: bool) -> anyhow::Result<Self> {
        let mut plane = DataPlane {
            locations: HashMap::new(),
            by_uri: HashMap::new(),
            url_ttl: config.staging.url_ttl.0,
            max_input_objects: config.staging.max_input_objects,
            multipart_threshold: config.staging.multipart_threshold_mib << 20,
            part_size: config.staging.part_size_mib << 20,
            servers: Vec::new(),
        };
        for s in &config.storage {
            let store: Arc<dyn ObjectStore> = match connect_location(s, planning).await {
                Ok((store, server)) => {
                    plane.servers.extend(server.map(|server| tokio::spawn(server.run(std::future::pending()))));
                    store
                }
                Err(e) if planning => Arc::new(Unreachable { reason: format!("{e:#}") }),
                Err(e) => return Err(e),
            };
            plane.by_uri.insert(s.uri_store(), s.name.clone());
            plane.locations.insert(s.name.clone(), Location { config: s.clone(), store });
        }
        Ok(plane)
    }

    /// The location's store, by name.
    fn store(&self, location: &str) -> Result<&Arc<dyn ObjectStore>, ApiError> {
        self.locations
            .get(location)
            .map(|l| &l.store)
            .ok_or_else(|| ApiError::FailedPrecondition(format!("storage location {location} is no longer configured")))
    }

    /// The location a URI names, checked against the tenant's allowed prefixes.
    fn locate(&self, field: &str, uri: &str, tenant: &TenantConfig) -> Result<(DataUri, &Location), ApiError> {
        let parsed = DataUri::parse(uri).map_err(|e| ApiError::InvalidArgument(format!("{field}: {e}")))?;
        let location = self
            .by_uri
            .get(&(parsed.scheme, parsed.store.clone()))
            .and_then(|name| self.locations.get(name))
            .ok_or_else(|| {
                ApiError::InvalidArgument(format!(
                    "{field}: {}://{} is not a configured storage location",
                    parsed.scheme.as_str(),
                    parsed.store
                ))
            })?;
        if let Some(refusal) = outside_prefixes(field, uri, &parsed, tenant) {
            return Err(ApiError::InvalidArgument(refusal));
        }
        Ok((parsed, location))
    }

    /// A URI a tenant names directly (`hybroker data`): its location's name and whether that is
    /// the embedded local store. Checked like a submission's URIs, but a URI outside the tenant's
    /// prefixes is PERMISSION_DENIED (naming them).
    pub fn tenant_uri(&self, uri: &str, tenant: &TenantConfig) -> Result<(DataUri, String, bool), ApiError> {
        if let Ok(parsed) = DataUri::parse(uri)
            && let Some(refusal) = outside_prefixes("uri", uri, &parsed, tenant)
        {
            return Err(ApiError::PermissionDenied(refusal));
        }
        let (parsed, location) = self.locate("uri", uri, tenant)?;
        let local = location.config.cloud == StorageCloud::Local;
        Ok((parsed, location.config.name.clone(), local))
    }

    /// Whether a location is the embedded local store (loopback only: tenants cannot reach it).
    pub fn is_local(&self, location: &str) -> bool {
        self.locations.get(location).is_some_and(|l| l.config.cloud == StorageCloud::Local)
    }

    /// The store of a location, by name.
    pub fn object_store(&self, location: &str) -> Result<Arc<dyn ObjectStore>, ApiError> {
        self.store(location).cloned()
    }

    /// How long minted URLs are valid (`staging.url_ttl`).
    pub fn url_ttl(&self) -> Duration {
        self.url_ttl
    }

    /// Resolves a submission's data: every input object with its size, every output's target.
    pub async fn resolve(&self, tenant: &TenantConfig, spec: &JobSpec) -> Result<JobData, ApiError> {
        Ok(self.resolve_with(tenant, spec, Missing::Refuse).await?.0)
    }

    /// [`DataPlane::resolve`] for a plan: an input whose size its store does not give (missing,
    /// or the store unreachable) takes its `size_hint`, else 0, instead of refusing the job; with
    /// where each input's size came from.
    pub async fn resolve_for_plan(
        &self,
        tenant: &TenantConfig,
        spec: &JobSpec,
    ) -> Result<(JobData, Vec<DataSize>), ApiError> {
        self.resolve_with(tenant, spec, Missing::Assume).await
    }

    async fn resolve_with(
        &self,
        tenant: &TenantConfig,
        spec: &JobSpec,
        missing: Missing,
    ) -> Result<(JobData, Vec<DataSize>), ApiError> {
        let mut data = JobData::default();
        let mut sizes = Vec::new();
        let mut destinations = HashSet::new();
        for (i, input) in spec.inputs.iter().enumerate() {
            let field = format!("inputs[{i}].uri");
            let (uri, location) = self.locate(&field, &input.uri, tenant)?;
            let objects = match self.input_objects(&field, input, &uri, location, data.inputs.len()).await {
                Ok(objects) => objects,
                Err(Unlisted { why: Some(why), .. }) if missing == Missing::Assume => {
                    let size = sizes::unread_input(i, &input.uri, input.size_hint, &why);
                    data.inputs.push(InputObject {
                        location: location.config.name.clone(),
                        key: uri.path.clone(),
                        path: input.path.clone(),
                        size: size.bytes,
                        etag: None,
                        md5: None,
                    });
                    sizes.push(size);
                    continue;
                }
                Err(unlisted) => return Err(unlisted.error),
            };
            if data.inputs.len() + objects.len() > self.max_input_objects {
                return Err(ApiError::InvalidArgument(format!(
                    "inputs: more than {} objects in all (staging.max_input_objects)",
                    self.max_input_objects
                )));
            }
            sizes.push(sizes::listed_input(i, &input.uri, objects.iter().map(|o| o.size).sum()));
            for meta in objects {
                let path = input_destination(&input.path, &uri.path, uri.is_prefix(), &meta.key).ok_or_else(|| {
                    ApiError::InvalidArgument(format!("{field}: object key {:?} cannot be staged safely", meta.key))
                })?;
                if !destinations.insert(path.clone()) {
                    return Err(ApiError::InvalidArgument(format!("{field}: two inputs land at {path}")));
                }
                data.inputs.push(InputObject {
                    location: location.config.name.clone(),
                    key: meta.key,
                    path,
                    size: meta.size,
                    etag: meta.etag,
                    md5: meta.content_md5,
                });
            }
        }
        for (i, output) in spec.outputs.iter().enumerate() {
            if let (None, Some(residency)) = (&output.to, &output.residency) {
                data.outputs.push(self.output_choices(i, &output.path, residency, tenant)?);
                continue;
            }
            let field = format!("outputs[{i}].to");
            let to = output.to.as_deref().ok_or_else(|| ApiError::InvalidArgument(format!("{field}: missing")))?;
            let (uri, location) = self.locate(&field, to, tenant)?;
            let prefix =
                if uri.path.is_empty() || uri.path.ends_with('/') { uri.path } else { format!("{}/", uri.path) };
            let to = format!("{}://{}/{prefix}", uri.scheme.as_str(), uri.store);
            data.outputs.push(OutputTarget {
                path: output.path.clone(),
                location: location.config.name.clone(),
                to,
                prefix,
                residency: None,
                choices: Vec::new(),
            });
        }
        data.checkpoint = match &spec.checkpoint {
            None => None,
            // Checked like an output's `to`: a location the tenant may write.
            Some(Checkpoint { path, to: Some(to) }) => {
                let (uri, location) = self.locate("checkpoint.to", to, tenant)?;
                let prefix =
                    if uri.path.is_empty() || uri.path.ends_with('/') { uri.path } else { format!("{}/", uri.path) };
                let to = format!("{}://{}/{prefix}", uri.scheme.as_str(), uri.store);
                let location = location.config.name.clone();
                Some(OutputTarget { path: path.clone(), location, to, prefix, residency: None, choices: Vec::new() })
            }
            // The first output's location (or its choices, which placement settles for both).
            Some(Checkpoint { path, to: None }) => match data.outputs.first() {
                Some(first) => Some(OutputTarget { path: path.clone(), ..first.clone() }),
                None => {
                    return Err(ApiError::InvalidArgument("checkpoint.to: missing, and the job has no output".into()));
                }
            },
        };
        Ok((data, sizes))
    }

    /// The objects of one input (listed under a prefix, or HEADed), or why not. A missing input
    /// is refused even with a `size_hint`: agents stage exactly the objects listed at submit.
    async fn input_objects(
        &self,
        field: &str,
        input: &Input,
        uri: &DataUri,
        location: &Location,
        listed_before: usize,
    ) -> Result<Vec<ObjectMeta>, Unlisted> {
        let absent = |what: String| {
            let hint = if input.size_hint.is_some() {
                " (size_hint prices a plan; the broker stages only inputs that exist at submit)"
            } else {
                ""
            };
            Unlisted { error: ApiError::InvalidArgument(format!("{field}: {what}{hint}")), why: Some(what) }
        };
        let unread = |e: StorageError| {
            let why = (!matches!(e, StorageError::TooMany { .. })).then(|| e.to_string());
            Unlisted { error: store_error(field, e), why }
        };
        if uri.is_prefix() {
            let limit = self.max_input_objects.saturating_sub(listed_before);
            let listed = location.store.list(&uri.path, limit).await.map_err(unread)?;
            let listed: Vec<_> = listed.into_iter().filter(|o| !o.key.ends_with('/')).collect();
            if listed.is_empty() {
                return Err(absent(format!("no objects under {}", input.uri)));
            }
            Ok(listed)
        } else {
            match location.store.head(&uri.path).await.map_err(unread)? {
                Some(meta) => Ok(vec![meta]),
                None => Err(absent(format!("{} does not exist", input.uri))),
            }
        }
    }

    /// An output that leaves its location to placement: every location of the residency group
    /// where the tenant may write (each with the tenant's first allowed prefix there).
    fn output_choices(
        &self,
        i: usize,
        path: &str,
        residency: &str,
        tenant: &TenantConfig,
    ) -> Result<OutputTarget, ApiError> {
        let mut choices = Vec::new();
        for allowed in tenant.storage.iter().filter_map(|p| DataUri::parse(p).ok()) {
            let Some(location) =
                self.by_uri.get(&(allowed.scheme, allowed.store.clone())).and_then(|n| self.locations.get(n))
            else {
                continue;
            };
            if location.config.residency != residency
                || choices.iter().any(|c: &OutputChoice| c.location == location.config.name)
            {
                continue;
            }
            let prefix = match allowed.path.as_str() {
                "" => String::new(),
                p if p.ends_with('/') => p.to_string(),
                p => format!("{p}/"),
            };
            let to = format!("{}://{}/{prefix}", allowed.scheme.as_str(), allowed.store);
            choices.push(OutputChoice { location: location.config.name.clone(), to, prefix });
        }
        if choices.is_empty() {
            return Err(ApiError::InvalidArgument(format!(
                "outputs[{i}].residency: tenant {} may write to no storage location in residency group {residency}",
                tenant.name
            )));
        }
        Ok(OutputTarget {
            path: path.to_string(),
            location: String::new(),
            to: String::new(),
            prefix: String::new(),
            residency: Some(residency.to_string()),
            choices,
        })
    }

    /// Fresh GETs for the inputs with these indices (all when empty).
    pub async fn input_urls(&self, data: &JobData, indices: &[u32]) -> Result<Vec<Presigned>, ApiError> {
        let all: Vec<u32> = (0..data.inputs.len() as u32).collect();
        let indices = if indices.is_empty() { &all[..] } else { indices };
        let mut urls = Vec::with_capacity(indices.len());
        for &i in indices {
            let input = data
                .inputs
                .get(i as usize)
                .ok_or_else(|| ApiError::InvalidArgument(format!("input {i} does not exist")))?;
            let store = self.store(&input.location)?;
            urls.push(store.presign_get(&input.key, self.url_ttl).await.map_err(|e| store_error("inputs", e))?);
        }
        Ok(urls)
    }

    /// A GET of one object of a location (an earlier attempt's checkpoint).
    pub async fn presign_get(&self, location: &str, key: &str) -> Result<Presigned, ApiError> {
        let store = self.store(location)?;
        store.presign_get(key, self.url_ttl).await.map_err(|e| store_error("checkpoint", e))
    }

    /// The key of one output file of one attempt; `None` when the relative path is unsafe.
    pub fn output_key(target: &OutputTarget, attempt_prefix: &str, rel: &str) -> Option<String> {
        let name = if rel.is_empty() { target.path.trim_end_matches('/').rsplit('/').next()? } else { rel };
        let bad = name.split('/').any(|s| s.is_empty() || s == "." || s == "..") || name.chars().any(char::is_control);
        (!bad).then(|| format!("{attempt_prefix}{name}"))
    }

    /// Plans the upload of one output file: a PUT, or a multipart upload with every part's URL.
    pub async fn plan_upload(&self, target: &OutputTarget, key: String, size: u64) -> Result<Upload, ApiError> {
        let store = self.store(&target.location)?;
        if size <= self.multipart_threshold {
            let put = store.presign_put(&key, self.url_ttl).await.map_err(|e| store_error("outputs", e))?;
            return Ok(Upload::Single { key, put });
        }
        let part_size = self.part_size.max(size.div_ceil(MAX_PARTS));
        let upload_id = store.create_multipart(&key).await.map_err(|e| store_error("outputs", e))?;
        let numbers: Vec<u32> = (1..=size.div_ceil(part_size) as u32).collect();
        let parts = self.part_urls(target, &key, &upload_id, &numbers).await?;
        Ok(Upload::Multipart { key, upload_id, part_size, parts })
    }

    /// Fresh URLs for parts of an upload.
    pub async fn part_urls(
        &self,
        target: &OutputTarget,
        key: &str,
        upload_id: &str,
        numbers: &[u32],
    ) -> Result<Vec<Presigned>, ApiError> {
        let store = self.store(&target.location)?;
        let mut parts = Vec::with_capacity(numbers.len());
        for &n in numbers {
            if n == 0 || u64::from(n) > MAX_PARTS {
                return Err(ApiError::InvalidArgument(format!("part number {n} is out of range 1..={MAX_PARTS}")));
            }
            parts.push(
                store.presign_part(key, upload_id, n, self.url_ttl).await.map_err(|e| store_error("outputs", e))?,
            );
        }
        Ok(parts)
    }

    /// Completes one multipart upload.
    pub async fn complete(
        &self,
        target: &OutputTarget,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
    ) -> Result<(), ApiError> {
        let store = self.store(&target.location)?;
        store.complete_multipart(key, upload_id, parts).await.map_err(|e| store_error("outputs", e))
    }
}

/// The client of one location, and the embedded server a local one needs running. Planning
/// serves a local store on a free loopback port instead of its `listen`.
async fn connect_location(
    s: &StorageConfig,
    planning: bool,
) -> anyhow::Result<(Arc<dyn ObjectStore>, Option<LocalS3Server>)> {
    Ok(match s.cloud {
        StorageCloud::Aws => (
            Arc::new(
                S3Store::new(S3Settings {
                    bucket: s.bucket.clone().unwrap_or_default(),
                    region: if s.region.is_empty() { "us-east-1".into() } else { s.region.clone() },
                    endpoint: s.endpoint.clone(),
                    profile: s.profile.clone(),
                    static_credentials: None,
                })
                .await
                .with_context(|| format!("storage {}", s.name))?,
            ),
            None,
        ),
        StorageCloud::Azure => (
            Arc::new(
                AzureBlobStore::new(AzureSettings {
                    account: s.account.clone().unwrap_or_default(),
                    container: s.container.clone().unwrap_or_default(),
                    endpoint: s.endpoint.clone(),
                    account_key: s.account_key().map_err(|e| anyhow::anyhow!("storage {}: {e}", s.name))?,
                })
                .await
                .with_context(|| format!("storage {}", s.name))?,
            ),
            None,
        ),
        StorageCloud::Local => {
            let dir = s.dir.clone().unwrap_or_default();
            let listen = if planning { SocketAddr::from(([127, 0, 0, 1], 0)) } else { s.listen };
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("storage {}: listen on {listen}", s.name))?;
            let server = LocalS3Server::new(&dir, listener).with_context(|| format!("storage {}", s.name))?;
            let store = server.store(&s.name).await.with_context(|| format!("storage {}", s.name))?;
            if !planning {
                tracing::info!(location = s.name, endpoint = server.endpoint(), dir = %dir.display(), "local store serving");
            }
            (Arc::new(store), Some(server))
        }
    })
}

/// Why `uri` is outside the tenant's allowed prefixes, or `None` when it is inside.
fn outside_prefixes(field: &str, uri: &str, parsed: &DataUri, tenant: &TenantConfig) -> Option<String> {
    let allowed = tenant.storage.iter().filter_map(|p| DataUri::parse(p).ok()).any(|p| parsed.is_within(&p));
    let list = if tenant.storage.is_empty() { "none".to_string() } else { tenant.storage.join(", ") };
    (!allowed)
        .then(|| format!("{field}: tenant {} may not use {uri} (its allowed storage prefixes: {list})", tenant.name))
}

/// A store's answer as the caller sees it: a missing or denied object is the request's fault.
pub(super) fn store_error(field: &str, e: StorageError) -> ApiError {
    match e {
        StorageError::NotFound(_) | StorageError::TooMany { .. } => ApiError::InvalidArgument(format!("{field}: {e}")),
        StorageError::Denied(_) => ApiError::FailedPrecondition(format!("{field}: {e}")),
        StorageError::Request(_) | StorageError::Config(_) => ApiError::Unavailable(format!("{field}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::sizes::SizeSource;

    /// A broker config with one local store under `dir` and tenant `acme` allowed all of it.
    fn config(dir: &std::path::Path) -> BrokerConfig {
        let text = format!(
            "[broker]\nlisten = \"127.0.0.1:0\"\n[tls]\nca_cert = \"a\"\ncert = \"b\"\nkey = \"c\"\n[store]\npath = \"x.db\"\n\
             [[storage]]\nname = \"scratch\"\ncloud = \"local\"\ndir = \"{}\"\n\
             [[tenant]]\nname = \"acme\"\nstorage = [\"local://scratch/\"]\n",
            dir.display()
        );
        crate::config::parse_toml(&text, std::path::Path::new("t.toml"), []).unwrap()
    }

    #[tokio::test]
    async fn a_missing_input_is_refused_at_submit_even_with_a_hint_and_a_plan_takes_the_hint() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("scratch/ds")).unwrap();
        std::fs::write(dir.path().join("scratch/ds/a.bin"), vec![0u8; 1234]).unwrap();
        let config = config(dir.path());
        let tenant = config.tenant("acme").unwrap();
        let spec = |inputs: &str| {
            JobSpec::from_yaml(format!("name: x\ncommand: [\"true\"]\ninputs: [{inputs}]\n").as_bytes(), 1 << 20)
                .unwrap()
        };
        let present = spec("{uri: local://scratch/ds/, path: ds/}");
        let later =
            spec("{uri: local://scratch/ds/, path: ds/}, {uri: local://scratch/later.bin, path: l, size_hint: 2GiB}");
        let unknown = spec("{uri: local://scratch/none/, path: none/}");

        let plane = DataPlane::start(&config).await.unwrap();
        assert_eq!(plane.resolve(&tenant, &present).await.unwrap().input_bytes(), 1234);
        let refused = plane.resolve(&tenant, &later).await.unwrap_err().to_string();
        assert_eq!(
            refused,
            "inputs[1].uri: local://scratch/later.bin does not exist (size_hint prices a plan; the broker stages \
             only inputs that exist at submit)"
        );
        let refused = plane.resolve(&tenant, &unknown).await.unwrap_err().to_string();
        assert_eq!(refused, "inputs[0].uri: no objects under local://scratch/none/");

        let planning = DataPlane::for_planning(&config).await.unwrap();
        let (data, sizes) = planning.resolve_for_plan(&tenant, &later).await.unwrap();
        assert_eq!(data.input_bytes(), 1234 + (2 << 30));
        let got: Vec<(u64, SizeSource)> = sizes.iter().map(|s| (s.bytes, s.source)).collect();
        assert_eq!(got, [(1234, SizeSource::Store), (2 << 30, SizeSource::SizeHint)]);
        assert_eq!(sizes[1].why, "local://scratch/later.bin does not exist");
        let (_, sizes) = planning.resolve_for_plan(&tenant, &unknown).await.unwrap();
        assert_eq!((sizes[0].bytes, sizes[0].source), (0, SizeSource::Assumed));
        // The tenant's allowed prefixes still hold: a plan refuses what the broker would.
        let other = config.tenant("default").unwrap();
        assert!(planning.resolve_for_plan(&other, &present).await.unwrap_err().to_string().contains("may not use"));
    }
}
