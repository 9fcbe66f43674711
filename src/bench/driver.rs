//! The job driver: M jobs through `SubmitBatch` with an admin certificate, flat out (a few batches
//! in flight) or at an offered rate (a ticker that sends what is due about every millisecond).
//! Every job has its own idempotency key, so a batch that failed (the broker was killed, or was
//! busy) is sent again with the same keys and never makes a second job.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::record::{Event, Events};
use super::setup::TENANT;
use crate::model::retry::RetryPolicy;
use crate::proto::job_service_client::JobServiceClient;
use crate::proto::{self, SpecFormat, submit_result::Result as Submitted};

/// The job every submit carries.
const SPEC: &[u8] = br#"{"name":"bench","command":["true"]}"#;
/// Batches in flight at once when submitting flat out.
const FLAT_OUT_IN_FLIGHT: usize = 4;
/// Most batches in flight at once at an offered rate (beyond it the ticker waits).
const PACED_IN_FLIGHT: usize = 256;
const TICK: Duration = Duration::from_millis(1);
const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_millis(500);

/// What to submit.
#[derive(Debug, Clone)]
pub struct Plan {
    pub jobs: usize,
    /// Jobs per second; 0 = flat out.
    pub rate: f64,
    pub batch: usize,
    /// Makes this run's idempotency keys unique.
    pub run_id: String,
    /// Stop retrying after this.
    pub deadline: Instant,
}

/// Counts of what went wrong on the way.
#[derive(Debug, Default)]
pub struct Trouble {
    /// SubmitBatch calls that failed as a whole.
    pub failed_calls: AtomicU64,
    /// Jobs refused inside a batch (e.g. the broker was busy) and sent again.
    pub refused_jobs: AtomicU64,
}

/// Submits every job of `plan`; returns when all are acknowledged or the deadline passed.
pub async fn run(plan: Plan, channel: Channel, events: Events, trouble: Arc<Trouble>) {
    let ctx = Arc::new(Ctx { plan, client: JobServiceClient::new(channel), events, trouble });
    if ctx.plan.rate > 0.0 { paced(ctx).await } else { flat_out(ctx).await }
}

struct Ctx {
    plan: Plan,
    client: JobServiceClient<Channel>,
    events: Events,
    trouble: Arc<Trouble>,
}

/// A few workers, each sending the next batch as soon as its last one is acknowledged.
async fn flat_out(ctx: Arc<Ctx>) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..FLAT_OUT_IN_FLIGHT {
        let (ctx, next) = (ctx.clone(), next.clone());
        workers.spawn(async move {
            loop {
                let start = next.fetch_add(ctx.plan.batch, Ordering::Relaxed);
                if start >= ctx.plan.jobs {
                    return;
                }
                submit(&ctx, start..(start + ctx.plan.batch).min(ctx.plan.jobs)).await;
            }
        });
    }
    while workers.join_next().await.is_some() {}
}

/// Every tick, sends the jobs that came due since the last one (in batches of at most `batch`).
async fn paced(ctx: Arc<Ctx>) {
    let slots = Arc::new(Semaphore::new(PACED_IN_FLIGHT));
    let mut calls = JoinSet::new();
    let mut ticker = tokio::time::interval(TICK);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let started = Instant::now();
    let mut sent = 0;
    while sent < ctx.plan.jobs {
        ticker.tick().await;
        let due = ((started.elapsed().as_secs_f64() * ctx.plan.rate) as usize).min(ctx.plan.jobs);
        while sent < due {
            let end = due.min(sent + ctx.plan.batch);
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            let ctx = ctx.clone();
            calls.spawn(async move {
                submit(&ctx, sent..end).await;
                drop(permit);
            });
            sent = end;
        }
        while calls.try_join_next().is_some() {}
    }
    while calls.join_next().await.is_some() {}
}

/// Submits jobs `range` until every one is acknowledged (or the deadline passes), reporting the
/// acknowledged ones with the time the batch was first sent.
async fn submit(ctx: &Ctx, range: std::ops::Range<usize>) {
    let first_sent = Instant::now();
    let mut todo: Vec<usize> = range.collect();
    let policy = RetryPolicy::exponential(RETRY_MIN, RETRY_MAX).with_jitter(0.5);
    let mut failures = 0u32;
    while !todo.is_empty() && Instant::now() < ctx.plan.deadline {
        let jobs = todo.iter().map(|&i| request(&ctx.plan.run_id, i)).collect();
        let mut client = ctx.client.clone();
        match client.submit_batch(proto::SubmitBatchRequest { jobs }).await {
            Ok(response) => {
                let results = response.into_inner().results;
                let mut again = Vec::new();
                let mut ids = Vec::with_capacity(results.len());
                for (&i, result) in todo.iter().zip(results) {
                    match result.result {
                        Some(Submitted::Ok(ok)) => ids.push(ok.job_id),
                        _ => again.push(i),
                    }
                }
                let _ = ctx.events.send(Event::Submitted { jobs: ids, sent: first_sent });
                ctx.trouble.refused_jobs.fetch_add(again.len() as u64, Ordering::Relaxed);
                if again.is_empty() {
                    return;
                }
                todo = again;
            }
            Err(status) => {
                if ctx.trouble.failed_calls.fetch_add(1, Ordering::Relaxed) < 3 {
                    tracing::warn!("a SubmitBatch call failed (it is retried): {}", status.message());
                }
            }
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(policy.delay(failures, None, fastrand::f64())).await;
    }
}

/// Job `i` of the run.
fn request(run_id: &str, i: usize) -> proto::SubmitRequest {
    proto::SubmitRequest {
        spec: SPEC.to_vec(),
        format: SpecFormat::Json as i32,
        idempotency_key: format!("{run_id}-{i}"),
        tenant: TENANT.into(),
    }
}
