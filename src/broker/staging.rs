//! The agent service's data calls: presigned requests for the attempt an agent holds. Every call
//! first asks the core whether the calling agent holds that job's attempt at that epoch, so a
//! stale or foreign agent gets nothing; output keys are built here, under the attempt's own prefix,
//! never taken from the agent.

use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use super::core::{AttemptData, Cmd};
use super::data::{DataPlane, Upload};
use crate::error::ApiError;
use crate::model::data::OutputTarget;
use crate::proto;
use crate::storage::CompletedPart;

/// Most files planned in one call.
const MAX_FILES_PER_CALL: usize = 1000;
/// The output number of the job's checkpoint in the output calls.
pub const CHECKPOINT_OUTPUT: u32 = u32::MAX;

/// The attempt's data, when `agent` holds `job_id` at `epoch`.
pub(super) async fn attempt_data(
    core: &mpsc::Sender<Cmd>,
    agent: &str,
    job_id: &str,
    epoch: u64,
) -> Result<AttemptData, Status> {
    let (reply, rx) = oneshot::channel();
    let cmd = Cmd::AttemptData { agent: agent.to_string(), job_id: job_id.to_string(), epoch, reply };
    let unavailable = || Status::unavailable("the broker's core is not running");
    core.send(cmd).await.map_err(|_| unavailable())?;
    Ok(rx.await.map_err(|_| unavailable())??)
}

pub(super) async fn input_urls(
    data: &DataPlane,
    attempt: &AttemptData,
    req: proto::InputUrlsRequest,
) -> Result<proto::InputUrlsResponse, Status> {
    let urls = data.input_urls(&attempt.data, &req.indices).await?;
    Ok(proto::InputUrlsResponse { urls: urls.into_iter().map(proto::PresignedRequest::from).collect() })
}

pub(super) async fn plan_outputs(
    data: &DataPlane,
    job_id: &str,
    attempt: &AttemptData,
    req: proto::PlanOutputsRequest,
) -> Result<proto::PlanOutputsResponse, Status> {
    if req.files.len() > MAX_FILES_PER_CALL {
        return Err(Status::invalid_argument(format!("files: at most {MAX_FILES_PER_CALL} per call")));
    }
    let mut uploads = Vec::with_capacity(req.files.len());
    for file in req.files {
        let (target, prefix) = target(attempt, job_id, file.output)?;
        let key = DataPlane::output_key(target, &prefix, &file.path)
            .ok_or_else(|| Status::invalid_argument(format!("output file path {:?} is not a safe name", file.path)))?;
        uploads.push(data.plan_upload(target, key, file.size).await?.into());
    }
    Ok(proto::PlanOutputsResponse { uploads })
}

impl From<Upload> for proto::UploadPlan {
    fn from(upload: Upload) -> Self {
        match upload {
            Upload::Single { key, put } => proto::UploadPlan { key, put: Some(put.into()), ..Default::default() },
            Upload::Multipart { key, upload_id, part_size, parts } => proto::UploadPlan {
                key,
                put: None,
                upload_id,
                part_size,
                parts: parts.into_iter().map(proto::PresignedRequest::from).collect(),
            },
        }
    }
}

pub(super) async fn part_urls(
    data: &DataPlane,
    job_id: &str,
    attempt: &AttemptData,
    req: proto::PartUrlsRequest,
) -> Result<proto::PartUrlsResponse, Status> {
    let (target, prefix) = target(attempt, job_id, req.output)?;
    check_key(target, &prefix, &req.key)?;
    let parts = data.part_urls(target, &req.key, &req.upload_id, &req.numbers).await?;
    Ok(proto::PartUrlsResponse { parts: parts.into_iter().map(proto::PresignedRequest::from).collect() })
}

pub(super) async fn complete_outputs(
    data: &DataPlane,
    job_id: &str,
    attempt: &AttemptData,
    req: proto::CompleteOutputsRequest,
) -> Result<proto::CompleteOutputsResponse, Status> {
    for upload in req.uploads {
        let (target, prefix) = target(attempt, job_id, upload.output)?;
        check_key(target, &prefix, &upload.key)?;
        let parts: Vec<CompletedPart> =
            upload.parts.into_iter().map(|p| CompletedPart { number: p.number, etag: p.etag }).collect();
        data.complete(target, &upload.key, &upload.upload_id, &parts).await?;
    }
    Ok(proto::CompleteOutputsResponse {})
}

/// GETs of an earlier attempt's checkpoint objects; never of the caller's own attempt or a later
/// one, nor outside that attempt's `checkpoint/` prefix.
pub(super) async fn checkpoint_urls(
    data: &DataPlane,
    job_id: &str,
    attempt: &AttemptData,
    req: proto::CheckpointUrlsRequest,
) -> Result<proto::CheckpointUrlsResponse, Status> {
    let target = checkpoint(attempt)?;
    let keys = checkpoint_keys(target, &attempt.tenant, job_id, attempt.attempt, &req)?;
    let mut urls = Vec::with_capacity(keys.len());
    for key in keys {
        urls.push(data.presign_get(&target.location, &key).await?.into());
    }
    Ok(proto::CheckpointUrlsResponse { urls })
}

/// The keys `req` asks to read, for the holder of attempt `own`: only an earlier attempt's, and
/// only safe names under its `checkpoint/` prefix.
fn checkpoint_keys(
    target: &OutputTarget,
    tenant: &str,
    job_id: &str,
    own: u32,
    req: &proto::CheckpointUrlsRequest,
) -> Result<Vec<String>, Status> {
    if req.attempt == 0 || req.attempt >= own {
        return Err(Status::invalid_argument(format!("attempt {} is not an earlier attempt", req.attempt)));
    }
    if req.paths.len() > MAX_FILES_PER_CALL {
        return Err(Status::invalid_argument(format!("paths: at most {MAX_FILES_PER_CALL} per call")));
    }
    let prefix = target.checkpoint_prefix(tenant, job_id, req.attempt);
    req.paths
        .iter()
        .map(|path| {
            DataPlane::output_key(target, &prefix, path)
                .filter(|_| !path.is_empty())
                .ok_or_else(|| Status::invalid_argument(format!("checkpoint path {path:?} is not a safe name")))
        })
        .collect()
}

fn checkpoint(attempt: &AttemptData) -> Result<&OutputTarget, Status> {
    attempt.data.checkpoint.as_ref().ok_or_else(|| Status::invalid_argument("the job has no checkpoint"))
}

/// The output (or the checkpoint) and the prefix its keys lie under for this attempt.
fn target<'a>(attempt: &'a AttemptData, job_id: &str, output: u32) -> Result<(&'a OutputTarget, String), Status> {
    if output == CHECKPOINT_OUTPUT {
        let target = checkpoint(attempt)?;
        return Ok((target, target.checkpoint_prefix(&attempt.tenant, job_id, attempt.attempt)));
    }
    let target = attempt
        .data
        .outputs
        .get(output as usize)
        .ok_or_else(|| Status::invalid_argument(format!("output {output} does not exist")))?;
    Ok((target, target.attempt_prefix(&attempt.tenant, job_id, attempt.attempt)))
}

/// Keys an agent sends back must lie under this attempt's prefix.
fn check_key(target: &OutputTarget, prefix: &str, key: &str) -> Result<(), Status> {
    match key.strip_prefix(prefix) {
        Some(rest) if DataPlane::output_key(target, prefix, rest).as_deref() == Some(key) => Ok(()),
        _ => Err(ApiError::PermissionDenied(format!("key {key:?} is not under this attempt's prefix {prefix}")).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> OutputTarget {
        OutputTarget {
            path: "ckpt/".into(),
            location: "lab".into(),
            to: "local://lab/acme/ckpt/".into(),
            prefix: "acme/ckpt/".into(),
            residency: None,
            choices: Vec::new(),
        }
    }

    fn ask(attempt: u32, paths: &[&str]) -> proto::CheckpointUrlsRequest {
        let paths = paths.iter().map(|p| p.to_string()).collect();
        proto::CheckpointUrlsRequest { job_id: "j1".into(), epoch: 3, attempt, paths }
    }

    /// A checkpoint is read only from an earlier attempt of the same job, under its checkpoint
    /// prefix: never the caller's own or a later attempt, never a path that climbs out.
    #[test]
    fn only_an_earlier_attempts_checkpoint_is_readable() {
        let keys = checkpoint_keys(&target(), "acme", "j1", 3, &ask(2, &["files/state", "complete.json"])).unwrap();
        assert_eq!(
            keys,
            [
                "acme/ckpt/acme/j1/attempt-2/checkpoint/files/state",
                "acme/ckpt/acme/j1/attempt-2/checkpoint/complete.json"
            ]
        );
        for attempt in [0, 3, 4] {
            let refused = checkpoint_keys(&target(), "acme", "j1", 3, &ask(attempt, &["complete.json"])).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "attempt {attempt}");
        }
        for path in ["", "../attempt-3/checkpoint/complete.json", "files/../../x", "/etc/passwd", "files//x", "a\nb"] {
            let refused = checkpoint_keys(&target(), "acme", "j1", 3, &ask(1, &[path])).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{path:?}");
        }
    }
}
