//! Certificate renewal under load. `--renew`: every agent renews once, on its live stream, at a
//! uniformly random point of `--renew-window` while the jobs run (kubelet-style spread renewal);
//! `--renew-storm`: every agent renews at once, after registering and before the jobs, so the time
//! to serve them all and the broker's CPU per renewal are the renewals' alone.
//!
//! The agents' side of a renewal (a P-256 key and a CSR each) is made before the run, on all
//! cores ([`make_csrs`]), and reported apart: what is measured is the broker verifying and
//! signing on the agents' streams. An agent that gets its certificate dials with it from then on
//! (`--renew-storm --storm` reconnects the whole fleet on renewed certificates).

use std::time::{Duration, Instant};

use super::Run;
use super::report::{Latency, RenewalReport};
use super::setup::{RENEWED_LIFETIME, TRUST_DOMAIN, node_name};
use crate::pki;
use crate::proto::{self, job_service_client::JobServiceClient};

/// How long past the end of the window the bench waits for the last answers.
const PATIENCE: Duration = Duration::from_secs(60);
/// How long the broker's view may lag the agents' answers (it is updated after each answer).
const VIEW_PATIENCE: Duration = Duration::from_secs(10);
/// How often progress is printed while waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// One agent's renewal request, made ahead: the new key and its CSR.
pub struct Csr {
    pub key_pem: String,
    pub csr_der: Vec<u8>,
}

/// What the fleet renews with: the trust bundle to load renewed certificates with, and agent
/// `i`'s CSR at `i` (none: the agents never renew).
#[derive(Default)]
pub struct RenewKit {
    pub ca_pem: String,
    pub csrs: Vec<Csr>,
}

/// Renew once, at `start` plus a uniformly random part of `window` (zero: all at `start`).
#[derive(Debug, Clone, Copy)]
pub struct RenewRound {
    pub start: tokio::time::Instant,
    pub window: Duration,
}

/// Makes a fresh P-256 key and CSR for every agent (agent `i` is `site_of(i)/node-<i>`) on all
/// cores, as each agent would before renewing.
pub fn make_csrs(agents: usize, site_of: &(dyn Fn(usize) -> String + Sync)) -> anyhow::Result<Vec<Csr>> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(agents.max(1));
    let mut made: Vec<Option<Csr>> = (0..agents).map(|_| None).collect();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    (t..agents)
                        .step_by(threads)
                        .map(|i| {
                            let (key_pem, csr_der) = pki::agent_csr(TRUST_DOMAIN, &site_of(i), &node_name(i))?;
                            Ok((i, Csr { key_pem, csr_der }))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()
                })
            })
            .collect();
        for worker in workers {
            for (i, csr) in worker.join().expect("a csr worker panicked")? {
                made[i] = Some(csr);
            }
        }
        Ok(())
    })?;
    Ok(made.into_iter().map(|c| c.expect("every agent has a csr")).collect())
}

/// How many agents the broker sees on a renewed certificate: its NotAfter (what the agent
/// connected with) lies beyond three quarters of the renewal lifetime from now, which a first
/// certificate (1 day) never does.
pub async fn agents_on_renewed_certificates(channel: tonic::transport::Channel) -> anyhow::Result<usize> {
    let agents = JobServiceClient::new(channel).list_agents(proto::ListAgentsRequest {}).await?.into_inner().agents;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let beyond = (now + RENEWED_LIFETIME.mul_f64(0.75)).as_millis() as i64;
    Ok(agents.iter().filter(|a| a.connected && a.cert_not_after_ms > beyond).count())
}

/// The fleet's state when the renewals were signalled.
pub struct Started {
    round: RenewRound,
    at: Instant,
    cpu: f64,
    failures: u64,
    dropped: u64,
}

impl Run<'_> {
    /// Signals every agent to renew once within `window` (zero: at once).
    pub(super) fn start_renewals(&mut self, window: Duration) -> Started {
        let round = RenewRound { start: tokio::time::Instant::now(), window };
        let started = Started {
            round,
            at: Instant::now(),
            cpu: self.broker.cpu_seconds(),
            failures: self.fleet.failures(),
            dropped: self.fleet.dropped(),
        };
        self.fleet.renew(round);
        started
    }

    /// Waits until every agent's renewal was answered (or the window and a minute more passed),
    /// then sums up; `csr_seconds` is what making the CSRs took.
    pub(super) async fn finish_renewals(
        &mut self,
        s: Started,
        csr_seconds: f64,
        channel: tonic::transport::Channel,
    ) -> anyhow::Result<RenewalReport> {
        let agents = self.args.agents;
        let deadline = s.round.start + s.round.window + PATIENCE;
        let mut progress = tokio::time::interval(PROGRESS_EVERY);
        progress.reset();
        while self.watch.rec.renewals_answered() < agents {
            tokio::select! {
                Some(event) = self.watch.rx.recv() => self.watch.rec.apply(event),
                _ = progress.tick() => println!("  {} of {agents} renewals answered", self.watch.rec.renewals_answered()),
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        let cpu = self.broker.cpu_seconds() - s.cpu;
        let elapsed = s.at.elapsed().as_secs_f64();
        let rec = &self.watch.rec;
        let (failed_connects, dropped_streams) = (self.fleet.failures() - s.failures, self.fleet.dropped() - s.dropped);
        let signed = rec.renewals().filter(|r| r.error.is_none()).count();
        let refused = rec.renewals_answered() - signed;
        let last = rec.renewals().map(|r| r.answered).max();
        let seconds = last.map_or(0.0, |t| t.saturating_duration_since(s.at).as_secs_f64());
        let mut latencies: Vec<f64> = rec.renewals().map(|r| r.latency().as_secs_f64() * 1000.0).collect();
        latencies.sort_by(f64::total_cmp);
        let during_jobs = rec
            .window()
            .map_or(0, |(first, last)| rec.renewals().filter(|r| (first..=last).contains(&r.answered)).count());
        // The broker shows each renewed expiry once it has taken the renewal in (just after the
        // answer): wait a little for the last ones.
        let view_deadline = Instant::now() + VIEW_PATIENCE;
        let broker_shows_renewed = loop {
            let shown = agents_on_renewed_certificates(channel.clone()).await?;
            if shown >= signed || Instant::now() >= view_deadline {
                break shown;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let storm = s.round.window.is_zero();
        let interrupted = self.args.kill_broker || self.args.restart_broker;
        let unanswered = agents - rec.renewals_answered();
        Ok(RenewalReport {
            mode: if storm { "storm" } else { "spread" },
            window_seconds: s.round.window.as_secs_f64(),
            csr_seconds,
            csr_us_per_agent: csr_seconds * 1e6 / agents as f64,
            agents,
            signed,
            refused,
            unanswered,
            seconds,
            per_second: if seconds > 0.0 { signed as f64 / seconds } else { 0.0 },
            latency_ms: Latency::of(&latencies),
            broker_cpu_seconds: cpu,
            broker_avg_cores: if elapsed > 0.0 { cpu / elapsed } else { 0.0 },
            broker_cpu_ms_per_renewal: (storm && signed > 0).then(|| cpu * 1000.0 / signed as f64),
            during_jobs,
            failed_connects,
            dropped_streams,
            first_error: rec.renewals().find_map(|r| r.error.clone()),
            broker_shows_renewed,
            ok: signed == agents && (interrupted || failed_connects == 0 && dropped_streams == 0),
        })
    }
}
