//! A job's checkpoint (`checkpoint: {path: ckpt/, …}`) on the agent. Under each attempt's own
//! prefix the checkpoint is `checkpoint/files/<path>` and the marker `checkpoint/complete.json`
//! (the files it holds), written last. A save uploads the files changed since the last save (when
//! the job asks, by creating the file named by `HYBROKER_CHECKPOINT_REQUEST`, which the agent
//! removes once the save is done; and after a spot notice stopped the job); one that overwrites an
//! earlier save's files first marks the checkpoint incomplete. A new attempt stages in the newest
//! complete checkpoint of an earlier attempt before the job starts. Every URL is minted by the
//! broker for the attempt holding the epoch: a zombie of an earlier attempt gets none.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::staging::{self, CompletedUpload, FoundFile, InputFile, Progress, StagingLimits, UploadPlan, UrlSource};
use super::urls::BrokerUrls;
use super::work_files::{AGENT_FILES_DIR, write_agent_file};
use crate::model::presigned::Presigned;
use crate::proto::{self, agent_service_client::AgentServiceClient};
use crate::telemetry::grpc::TracedChannel;

/// The job creates this file (in its work directory) to ask for a save.
pub const REQUEST_FILE: &str = ".checkpoint-request";
/// The variable naming [`REQUEST_FILE`].
pub const REQUEST_ENV: &str = "HYBROKER_CHECKPOINT_REQUEST";
/// The output number of the checkpoint in the broker's output calls.
const CHECKPOINT_OUTPUT: u32 = u32::MAX;
const MARKER: &str = "complete.json";
/// The marker as the agent writes it before uploading it, in the work directory's agent files.
const MARKER_FILE: &str = "checkpoint.json";
/// Files in one checkpoint at most.
const MAX_FILES: usize = 10_000;

/// `complete.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    complete: bool,
    #[serde(default)]
    files: Vec<MarkerFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct MarkerFile {
    path: String,
    size: u64,
}

/// A file of the checkpoint directory as last seen: size and modification time (ns).
type Seen = BTreeMap<String, (u64, i128)>;

/// One attempt's checkpoint.
pub(super) struct Checkpointer {
    http: reqwest::Client,
    broker: AgentServiceClient<TracedChannel>,
    limits: std::sync::Arc<StagingLimits>,
    job_id: String,
    epoch: u64,
    attempt: u32,
    work_dir: PathBuf,
    /// The checkpoint directory, relative to the work directory, without a trailing `/`.
    path: String,
    /// What the last save uploaded.
    uploaded: Option<Seen>,
}

impl Checkpointer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        http: reqwest::Client,
        broker: AgentServiceClient<TracedChannel>,
        limits: std::sync::Arc<StagingLimits>,
        job_id: String,
        epoch: u64,
        attempt: u32,
        work_dir: PathBuf,
        path: &str,
    ) -> Self {
        let path = path.trim_end_matches('/').to_string();
        Self { http, broker, limits, job_id, epoch, attempt, work_dir, path, uploaded: None }
    }

    /// Stages the newest complete checkpoint of an earlier attempt into the checkpoint directory;
    /// returns the attempt it came from (`None`: there is none).
    pub async fn restore(&self) -> Result<Option<u32>, String> {
        for earlier in (1..self.attempt).rev() {
            let source = self.source(earlier, Vec::new(), Vec::new());
            let marker_url = source.urls(&[MARKER.to_string()]).await?.pop().ok_or("no marker URL")?;
            let Some(marker) = self.fetch_marker(&marker_url).await? else { continue };
            if !marker.complete || marker.files.len() > MAX_FILES {
                tracing::info!(job = self.job_id, earlier, "an earlier attempt's checkpoint is incomplete");
                continue;
            }
            let names: Vec<String> = marker.files.iter().map(|f| format!("files/{}", f.path)).collect();
            let inputs: Vec<InputFile> = marker
                .files
                .iter()
                .map(|f| InputFile { path: format!("{}/{}", self.path, f.path), size: f.size, md5: None })
                .collect();
            let source = self.source(earlier, names, Vec::new());
            let initial = source.input_urls(&[]).await?;
            staging::stage_in(&self.http, &source, &self.work_dir, &inputs, initial, &self.limits, &quiet)
                .await
                .map_err(|e| format!("checkpoint of attempt {earlier}: {e}"))?;
            tracing::info!(job = self.job_id, from = earlier, files = inputs.len(), "checkpoint staged in");
            return Ok(Some(earlier));
        }
        Ok(None)
    }

    /// Uploads what changed since the last save, then the marker. Returns the files uploaded.
    pub async fn save(&mut self) -> Result<usize, String> {
        let dir = self.work_dir.join(&self.path);
        let seen = tokio::task::spawn_blocking(move || walk(&dir)).await.map_err(|e| e.to_string())??;
        let changed: Vec<&String> = seen
            .iter()
            .filter(|(path, state)| self.uploaded.as_ref().and_then(|u| u.get(*path)) != Some(state))
            .map(|(path, _)| path)
            .collect();
        if self.uploaded.as_ref() == Some(&seen) {
            return Ok(0);
        }
        if self.uploaded.is_some() && !changed.is_empty() {
            // Files of a complete checkpoint are about to be overwritten.
            self.upload_marker(&Marker { complete: false, files: Vec::new() }).await?;
        }
        let outputs: Vec<String> = changed.iter().map(|p| format!("{}/{p}", self.path)).collect();
        let names: Vec<String> = changed.iter().map(|p| format!("files/{p}")).collect();
        if !outputs.is_empty() {
            let source = self.source(self.attempt, Vec::new(), names);
            staging::stage_out(&self.http, &source, &self.work_dir, &outputs, &self.limits, &quiet)
                .await
                .map_err(|e| format!("checkpoint upload: {e}"))?;
        }
        let files = seen.iter().map(|(path, (size, _))| MarkerFile { path: path.clone(), size: *size }).collect();
        self.upload_marker(&Marker { complete: true, files }).await?;
        let uploaded = changed.len();
        self.uploaded = Some(seen);
        Ok(uploaded)
    }

    /// Whether the job asks for a save.
    pub fn requested(&self) -> bool {
        // Never followed: the work directory is the job's.
        std::fs::symlink_metadata(self.work_dir.join(REQUEST_FILE)).is_ok()
    }

    /// Takes the job's request away: its save is done (or failed; the log says why).
    pub fn answer_request(&self) {
        let _ = std::fs::remove_file(self.work_dir.join(REQUEST_FILE));
    }

    async fn upload_marker(&self, marker: &Marker) -> Result<(), String> {
        let json = serde_json::to_vec(marker).map_err(|e| e.to_string())?;
        write_agent_file(&self.work_dir, MARKER_FILE, &json).map_err(|e| format!("checkpoint marker: {e}"))?;
        let local = format!("{AGENT_FILES_DIR}/{MARKER_FILE}");
        let source = self.source(self.attempt, Vec::new(), vec![MARKER.to_string()]);
        staging::stage_out(&self.http, &source, &self.work_dir, &[local], &self.limits, &quiet)
            .await
            .map(drop)
            .map_err(|e| format!("checkpoint marker upload: {e}"))
    }

    async fn fetch_marker(&self, url: &Presigned) -> Result<Option<Marker>, String> {
        let method = reqwest::Method::from_bytes(url.method.as_bytes()).map_err(|e| e.to_string())?;
        let mut request = self.http.request(method, &url.url).timeout(self.limits.request_timeout);
        for (name, value) in &url.headers {
            request = request.header(name, value);
        }
        let response = request.send().await.map_err(|e| format!("checkpoint marker: {e}"))?;
        if !response.status().is_success() {
            return Ok(None); // none (404; 403 where listing is not allowed)
        }
        let body = response.bytes().await.map_err(|e| format!("checkpoint marker: {e}"))?;
        Ok(serde_json::from_slice(&body).ok())
    }

    fn source(&self, attempt: u32, inputs: Vec<String>, uploads: Vec<String>) -> CheckpointUrls {
        CheckpointUrls {
            broker: BrokerUrls { client: self.broker.clone(), job_id: self.job_id.clone(), epoch: self.epoch },
            attempt,
            inputs,
            uploads,
        }
    }
}

fn quiet(_: Progress) {}

/// The regular files under `dir` (relative paths), symbolic links and special files left out.
fn walk(dir: &Path) -> Result<Seen, String> {
    let mut seen = Seen::new();
    let mut pending = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = pending.pop() {
        let entries = match std::fs::read_dir(&path) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && rel.is_empty() => return Ok(seen),
            Err(e) => return Err(format!("checkpoint {}: {e}", path.display())),
        };
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
            let rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
            let Ok(meta) = entry.path().symlink_metadata() else { continue };
            if meta.is_dir() {
                pending.push((entry.path(), rel));
            } else if meta.is_file() {
                let mtime = meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok());
                seen.insert(rel, (meta.len(), mtime.map_or(0, |d| d.as_nanos() as i128)));
            }
            if seen.len() > MAX_FILES {
                return Err(format!("checkpoint: more than {MAX_FILES} files"));
            }
        }
    }
    Ok(seen)
}

/// The broker's URLs for one attempt's checkpoint: GETs of `inputs` (names under an earlier
/// attempt's `checkpoint/`), uploads of the found files as `uploads` (by output index).
struct CheckpointUrls {
    /// The attempt's own data calls: a checkpoint's multipart uploads are outputs of index
    /// [`CHECKPOINT_OUTPUT`].
    broker: BrokerUrls,
    attempt: u32,
    inputs: Vec<String>,
    uploads: Vec<String>,
}

impl CheckpointUrls {
    async fn urls(&self, paths: &[String]) -> Result<Vec<Presigned>, String> {
        let req = proto::CheckpointUrlsRequest {
            job_id: self.broker.job_id.clone(),
            epoch: self.broker.epoch,
            attempt: self.attempt,
            paths: paths.to_vec(),
        };
        let resp = self.broker.client.clone().checkpoint_urls(req).await.map_err(|s| s.message().to_string())?;
        Ok(resp.into_inner().urls.into_iter().map(Presigned::from).collect())
    }
}

#[async_trait]
impl UrlSource for CheckpointUrls {
    async fn input_urls(&self, indices: &[u32]) -> Result<Vec<Presigned>, String> {
        let paths: Vec<String> = if indices.is_empty() {
            self.inputs.clone()
        } else {
            indices.iter().filter_map(|&i| self.inputs.get(i as usize).cloned()).collect()
        };
        self.urls(&paths).await
    }

    async fn plan_outputs(&self, files: &[FoundFile]) -> Result<Vec<UploadPlan>, String> {
        let files = files
            .iter()
            .map(|f| {
                let path = self.uploads.get(f.output as usize).cloned().ok_or("a file of no checkpoint upload")?;
                Ok(proto::OutputFile { output: CHECKPOINT_OUTPUT, path, size: f.size })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let req = proto::PlanOutputsRequest { job_id: self.broker.job_id.clone(), epoch: self.broker.epoch, files };
        let resp = self.broker.client.clone().plan_outputs(req).await.map_err(|s| s.message().to_string())?;
        super::urls::upload_plans(resp.into_inner())
    }

    async fn part_urls(&self, _: u32, key: &str, upload_id: &str, numbers: &[u32]) -> Result<Vec<Presigned>, String> {
        self.broker.part_urls(CHECKPOINT_OUTPUT, key, upload_id, numbers).await
    }

    async fn complete_outputs(&self, uploads: Vec<CompletedUpload>) -> Result<(), String> {
        let uploads = uploads.into_iter().map(|u| CompletedUpload { output: CHECKPOINT_OUTPUT, ..u }).collect();
        self.broker.complete_outputs(uploads).await
    }
}
