//! One attempt from start to end: stage the inputs into a fresh work directory, run the process,
//! stage the outputs out, and say how it ended. The URLs come from the broker ([`BrokerUrls`]) for
//! exactly this attempt; the agent itself holds no cloud credentials.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use super::checkpoint::Checkpointer;
use super::executor::{self, Launch, Outcome, SandboxLaunch};
use super::sandbox::{AttemptResources, AttemptSandbox, Sandbox, devices};
use super::staging::{self, InputFile, Progress, Stage, StageStats, StagingLimits, UrlSource};
use super::urls::BrokerUrls;
use super::{AttemptEvent, Ended};
use crate::model::data::StagingStats;
use crate::proto::{self, agent_service_client::AgentServiceClient};
use crate::telemetry::context;
use crate::telemetry::grpc::TracedChannel;

/// What the attempt task needs to move its data.
#[derive(Clone)]
pub(super) struct Staging {
    pub http: reqwest::Client,
    pub broker: AgentServiceClient<TracedChannel>,
    pub limits: Arc<StagingLimits>,
}

/// The attempt's sandbox, to be made: the agent's way of isolating, what the job asked for, and
/// its GPUs' device nodes `(index, node)`.
pub(super) struct SandboxPlan {
    pub sandbox: Arc<Sandbox>,
    pub resources: AttemptResources,
    pub gpu_nodes: Vec<(u32, PathBuf)>,
}

/// The job's data for one attempt, from its assignment.
pub(super) struct AttemptData {
    pub inputs: Vec<InputFile>,
    pub outputs: Vec<String>,
    /// The job's checkpoint directory, if it has one.
    pub checkpoint: Option<String>,
}

impl AttemptData {
    pub fn from_assignment(a: &proto::Assignment) -> Self {
        let inputs = a
            .inputs
            .iter()
            .map(|i| InputFile { path: i.path.clone(), size: i.size, md5: (!i.md5.is_empty()).then(|| i.md5.clone()) })
            .collect();
        let checkpoint = (!a.checkpoint_path.is_empty()).then(|| a.checkpoint_path.clone());
        Self { inputs, outputs: a.outputs.clone(), checkpoint }
    }

    fn is_empty(&self) -> bool {
        self.inputs.is_empty() && self.outputs.is_empty() && self.checkpoint.is_none()
    }
}

/// Runs the attempt and reports its end (and output, progress) on `events`. The attempt is a
/// span in the job's trace (continuing the broker's dispatch span, from `trace_context`), with
/// `stage-in`, `execute` and `stage-out` children.
#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    launch: Launch,
    epoch: u64,
    plan: SandboxPlan,
    data: AttemptData,
    staging: Staging,
    events: mpsc::Sender<AttemptEvent>,
    cancel: watch::Receiver<bool>,
    trace_context: &HashMap<String, String>,
) {
    let span = tracing::info_span!(
        "job.attempt",
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        hybroker.job.id = %launch.job_id,
        hybroker.job.attempt = i64::from(launch.attempt),
        hybroker.outcome = tracing::field::Empty,
    );
    context::set_parent(&span, context::from_carrier(trace_context));
    let job_id = launch.job_id.clone();
    let ended = sandboxed(launch, epoch, plan, data, staging, &events, cancel).instrument(span.clone()).await;
    span.record("hybroker.outcome", ended.staging_error.as_deref().unwrap_or(&ended.outcome.reason()));
    if ended.staging_error.is_some() || failed(&ended.outcome) {
        span.record("otel.status_code", "ERROR");
    }
    drop(span);
    let _ = events.send(AttemptEvent::Ended { job_id, epoch, ended }).await;
}

/// The attempt in its sandbox: made before stage-in, its processes killed right after the job,
/// its work directory removed (or kept, failed) and its UID freed at the end.
async fn sandboxed(
    mut launch: Launch,
    epoch: u64,
    plan: SandboxPlan,
    data: AttemptData,
    staging: Staging,
    events: &mpsc::Sender<AttemptEvent>,
    cancel: watch::Receiver<bool>,
) -> Ended {
    let (dir, job_id, number) = (launch.work_dir.clone(), launch.job_id.clone(), launch.attempt);
    let SandboxPlan { sandbox, resources, gpu_nodes } = plan;
    let begun = tokio::task::spawn_blocking(move || {
        let nodes = devices::attempt_nodes(&gpu_nodes);
        let attempt = sandbox.begin(&job_id, number, &dir, resources, nodes)?;
        let fds = attempt.join_fds()?;
        let claim = attempt.claim_fd()?.map(Arc::new);
        let init = sandbox.init_program().map(|p| SandboxLaunch {
            init_program: p.to_owned(),
            spec: attempt.spec.clone(),
            join_fds: Arc::new(fds),
            claim,
        });
        Ok::<_, String>((attempt, init))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    let (attempt_sandbox, init) = match begun {
        Ok(begun) => begun,
        Err(why) => return Ended::plain(Outcome::StartFailed(format!("sandbox: {why}"))),
    };
    launch.sandbox = init;
    let mut held = Some(attempt_sandbox);
    let ended = attempt(launch, epoch, &mut held, data, staging, events, cancel).await;
    let succeeded = ended.staging_error.is_none() && ended.outcome.succeeded();
    if let Some(attempt_sandbox) = held {
        let _ = tokio::task::spawn_blocking(move || attempt_sandbox.finish(succeeded)).await;
    }
    ended
}

/// Runs the job in its sandbox; kills what is left of it and reads its limits' verdict.
async fn execute_sandboxed(
    launch: Launch,
    epoch: u64,
    sandbox: &mut Option<AttemptSandbox>,
    events: &mpsc::Sender<AttemptEvent>,
    cancel: watch::Receiver<bool>,
) -> Outcome {
    let outcome = execute(launch, epoch, events, cancel).await;
    let Some(mut held) = sandbox.take() else { return outcome };
    match tokio::task::spawn_blocking(move || (held.after_process(outcome), held)).await {
        Ok((outcome, held)) => {
            *sandbox = Some(held);
            outcome
        }
        Err(e) => Outcome::StartFailed(format!("sandbox: {e}")),
    }
}

async fn attempt(
    launch: Launch,
    epoch: u64,
    sandbox: &mut Option<AttemptSandbox>,
    data: AttemptData,
    staging: Staging,
    events: &mpsc::Sender<AttemptEvent>,
    mut cancel: watch::Receiver<bool>,
) -> Ended {
    let job_id = launch.job_id.clone();
    if data.is_empty() {
        let outcome = execute_sandboxed(launch, epoch, sandbox, events, cancel).await;
        return Ended { outcome, staging: None, staging_error: None };
    }
    let urls = BrokerUrls { client: staging.broker.clone(), job_id: job_id.clone(), epoch };
    let progress = {
        let (events, job_id) = (events.clone(), job_id.clone());
        move |p: Progress| {
            let _ = events.try_send(AttemptEvent::Progress { job_id: job_id.clone(), epoch, progress: p });
        }
    };
    let mut stats = StagingStats::default();
    let span = stage_span("stage-in");
    let staged = async {
        make_work_dir(&launch.work_dir).await?;
        let initial = urls.input_urls(&[]).await.map_err(|e| format!("broker could not provide input URLs: {e}"))?;
        staging::stage_in(&staging.http, &urls, &launch.work_dir, &data.inputs, initial, &staging.limits, &progress)
            .await
            .map_err(|e| e.to_string())
    }
    .instrument(span.clone());
    let staged = tokio::select! {
        staged = staged => staged,
        () = cancelled(&mut cancel) => return Ended::plain(Outcome::Cancelled),
    };
    record_stage(&span, &staged);
    match staged {
        Ok(s) => (stats.in_bytes, stats.in_files, stats.in_ms) = counts(&s),
        Err(e) => return Ended::staging_failed(format!("stage-in failed: {e}"), stats),
    }
    let mut checkpointer = data.checkpoint.as_deref().map(|path| {
        let work_dir = launch.work_dir.clone();
        let (http, broker, limits) = (staging.http.clone(), staging.broker.clone(), staging.limits.clone());
        Checkpointer::new(http, broker, limits, job_id.clone(), epoch, launch.attempt, work_dir, path)
    });
    if let Some(c) = &checkpointer {
        let restored = tokio::select! {
            restored = c.restore() => restored,
            () = cancelled(&mut cancel) => return Ended::plain(Outcome::Cancelled),
        };
        if let Err(e) = restored {
            return Ended::staging_failed(format!("checkpoint stage-in failed: {e}"), stats);
        }
    }
    let outcome = match checkpointer.as_mut() {
        Some(c) => execute_checkpointing(launch.clone(), epoch, sandbox, events, cancel.clone(), c).await,
        None => execute_sandboxed(launch.clone(), epoch, sandbox, events, cancel.clone()).await,
    };
    if !outcome.succeeded() || data.outputs.is_empty() {
        return Ended { outcome, staging: Some(stats), staging_error: None };
    }
    let span = stage_span("stage-out");
    let stage_out =
        staging::stage_out(&staging.http, &urls, &launch.work_dir, &data.outputs, &staging.limits, &progress)
            .instrument(span.clone());
    let staged = tokio::select! {
        s = stage_out => s.map_err(|e| e.to_string()),
        () = cancelled(&mut cancel) => return Ended::plain(Outcome::Cancelled),
    };
    record_stage(&span, &staged);
    match staged {
        Ok(s) => {
            (stats.out_bytes, stats.out_files, stats.out_ms) = counts(&s);
            for skipped in &s.skipped {
                tracing::warn!(job = job_id, path = skipped, "output entry skipped (not a regular file or directory)");
            }
            Ended { outcome, staging: Some(stats), staging_error: None }
        }
        Err(e) => Ended::staging_failed(format!("stage-out failed: {e}"), stats),
    }
}

/// Runs the job, saving its checkpoint whenever it asks; after a spot notice stopped it, saves
/// what changed since (before the attempt reports, so before another attempt may start).
async fn execute_checkpointing(
    launch: Launch,
    epoch: u64,
    sandbox: &mut Option<AttemptSandbox>,
    events: &mpsc::Sender<AttemptEvent>,
    cancel: watch::Receiver<bool>,
    checkpointer: &mut Checkpointer,
) -> Outcome {
    let job = launch.job_id.clone();
    let run = execute_sandboxed(launch, epoch, sandbox, events, cancel);
    tokio::pin!(run);
    let outcome = loop {
        tokio::select! {
            outcome = &mut run => break outcome,
            () = tokio::time::sleep(CHECKPOINT_REQUEST_POLL) => {
                if checkpointer.requested() {
                    // The job waits for its request to go; it runs on meanwhile.
                    let ended = {
                        let save = checkpointer.save();
                        tokio::pin!(save);
                        tokio::select! {
                            saved = &mut save => {
                                log_save(&job, "asked", saved);
                                None
                            }
                            outcome = &mut run => {
                                log_save(&job, "asked", save.await);
                                Some(outcome)
                            }
                        }
                    };
                    checkpointer.answer_request();
                    if let Some(outcome) = ended {
                        break outcome;
                    }
                }
            }
        }
    };
    if matches!(outcome, Outcome::Preempted(_)) {
        log_save(&job, "spot notice", checkpointer.save().await);
    }
    outcome
}

/// How often the agent looks for the job's checkpoint request.
const CHECKPOINT_REQUEST_POLL: std::time::Duration = std::time::Duration::from_millis(100);

fn log_save(job: &str, why: &str, saved: Result<usize, String>) {
    match saved {
        Ok(files) => tracing::info!(job, why, files, "checkpoint saved"),
        Err(e) => tracing::warn!(job, why, "checkpoint not saved: {e}"),
    }
}

/// A `stage-in` or `stage-out` span; [`record_stage`] fills it in.
fn stage_span(name: &'static str) -> tracing::Span {
    tracing::info_span!(
        "stage",
        otel.name = name,
        otel.status_code = tracing::field::Empty,
        hybroker.staging.bytes = tracing::field::Empty,
        hybroker.staging.files = tracing::field::Empty,
        hybroker.staging.duration_ms = tracing::field::Empty,
        error.message = tracing::field::Empty,
    )
}

fn record_stage(span: &tracing::Span, staged: &Result<StageStats, String>) {
    match staged {
        Ok(s) => {
            span.record("hybroker.staging.bytes", s.bytes as i64);
            span.record("hybroker.staging.files", s.files as i64);
            span.record("hybroker.staging.duration_ms", s.duration.as_millis() as i64);
        }
        Err(e) => {
            span.record("otel.status_code", "ERROR");
            span.record("error.message", e.as_str());
        }
    }
}

/// Resolves when the attempt is cancelled (never when the sender is gone without cancelling).
async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|c| *c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn counts(s: &StageStats) -> (u64, u32, u64) {
    (s.bytes, s.files, s.duration.as_millis() as u64)
}

/// Runs the process, forwarding its output as events. Its span's context is the workload's
/// `TRACEPARENT` (and `TRACESTATE`), so an instrumented job joins the trace.
async fn execute(
    mut launch: Launch,
    epoch: u64,
    events: &mpsc::Sender<AttemptEvent>,
    cancel: watch::Receiver<bool>,
) -> Outcome {
    let span = tracing::info_span!(
        "execute",
        otel.status_code = tracing::field::Empty,
        process.executable.name = launch.command.first().and_then(|c| c.rsplit('/').next()).unwrap_or(""),
        process.exit.code = tracing::field::Empty,
        hybroker.outcome = tracing::field::Empty,
    );
    for (key, value) in context::carrier_of(&span) {
        launch.env.insert(key.to_ascii_uppercase(), value);
    }
    let outcome = run_process(launch, epoch, events, cancel).instrument(span.clone()).await;
    if let Some(code) = outcome.exit_code() {
        span.record("process.exit.code", code);
    }
    span.record("hybroker.outcome", outcome.reason().as_str());
    if failed(&outcome) {
        span.record("otel.status_code", "ERROR");
    }
    outcome
}

/// An outcome that is an error on the trace: not a success, and not a cancel someone asked for.
fn failed(outcome: &Outcome) -> bool {
    !outcome.succeeded() && !matches!(outcome, Outcome::Cancelled | Outcome::Preempted(_))
}

async fn run_process(
    launch: Launch,
    epoch: u64,
    events: &mpsc::Sender<AttemptEvent>,
    cancel: watch::Receiver<bool>,
) -> Outcome {
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(64);
    let (forward_events, job_id) = (events.clone(), launch.job_id.clone());
    let forward = tokio::spawn(async move {
        while let Some(data) = out_rx.recv().await {
            let ev = AttemptEvent::Output { job_id: job_id.clone(), epoch, data };
            if forward_events.send(ev).await.is_err() {
                return;
            }
        }
    });
    let outcome = executor::run(launch, out_tx, cancel).await;
    let _ = forward.await;
    outcome
}

/// The attempt's work directory, made by the agent (mode 0700) before inputs land in it; the
/// executor hands it to the job's user afterwards.
async fn make_work_dir(dir: &std::path::Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let dir: PathBuf = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir))
        .await
        .map_err(|e| format!("work directory: {e}"))?
        .map_err(|e| format!("work directory: {e}"))
}

/// `stage` as sent to the broker.
pub(super) fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::In => "in",
        Stage::Out => "out",
    }
}
