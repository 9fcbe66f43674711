//! What the agents and the driver saw, gathered by one task from one channel: the hot paths only
//! send (lock-free) and never share a map.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// One observation, sent by an agent or the driver.
#[derive(Debug)]
pub enum Event {
    /// Agent `agent` got its Registered message.
    Registered { agent: usize },
    /// An assignment of `job` arrived at an agent.
    Assigned { job: String, at: Instant },
    /// The broker acknowledged an agent's final report of `job`: it is committed as finished.
    Acked { job: String, at: Instant },
    /// The broker acknowledged these submits; the batch was first sent at `sent`.
    Submitted { jobs: Vec<String>, sent: Instant },
    /// Agent `agent` first sent its renewal at `sent`; the answer came at `at`, refused with
    /// `error` (or signed, with `None`).
    Renewed { agent: usize, sent: Instant, at: Instant, error: Option<String> },
}

/// One agent's renewal as the bench saw it.
#[derive(Debug, Clone)]
pub struct RenewalSeen {
    pub sent: Instant,
    pub answered: Instant,
    pub error: Option<String>,
}

impl RenewalSeen {
    pub fn latency(&self) -> Duration {
        self.answered.duration_since(self.sent)
    }
}

pub type Events = mpsc::UnboundedSender<Event>;

/// Everything recorded so far.
#[derive(Default)]
pub struct Record {
    /// Job id → when its batch was first sent.
    submitted: HashMap<String, Instant>,
    /// Job id → when its first assignment arrived, and how many arrived.
    assigned: HashMap<String, (Instant, u32)>,
    /// Job id → when its first acknowledgement of completion arrived.
    acked: HashMap<String, Instant>,
    /// Submitted jobs that are also acked.
    completed: usize,
    first_submit: Option<Instant>,
    last_completion: Option<Instant>,
    /// Agents registered since the last [`Record::reset_registered`].
    registered: HashSet<usize>,
    /// Agent → its renewal's first answer.
    renewals: HashMap<usize, RenewalSeen>,
}

impl Record {
    pub fn apply(&mut self, event: Event) {
        match event {
            Event::Registered { agent } => {
                self.registered.insert(agent);
            }
            Event::Assigned { job, at } => {
                self.assigned.entry(job).and_modify(|(_, n)| *n += 1).or_insert((at, 1));
            }
            Event::Acked { job, at } => {
                if self.acked.contains_key(&job) {
                    return;
                }
                if self.submitted.contains_key(&job) {
                    self.complete(at);
                }
                self.acked.insert(job, at);
            }
            Event::Renewed { agent, sent, at, error } => {
                self.renewals.entry(agent).or_insert(RenewalSeen { sent, answered: at, error });
            }
            Event::Submitted { jobs, sent } => {
                self.first_submit = Some(self.first_submit.map_or(sent, |t| t.min(sent)));
                for job in jobs {
                    if self.submitted.contains_key(&job) {
                        continue;
                    }
                    if let Some(&at) = self.acked.get(&job) {
                        self.complete(at);
                    }
                    self.submitted.insert(job, sent);
                }
            }
        }
    }

    fn complete(&mut self, at: Instant) {
        self.completed += 1;
        self.last_completion = Some(self.last_completion.map_or(at, |t| t.max(at)));
    }

    /// Jobs the broker acknowledged (distinct).
    pub fn submitted(&self) -> usize {
        self.submitted.len()
    }

    /// Acknowledged jobs whose completion was acknowledged to an agent.
    pub fn completed(&self) -> usize {
        self.completed
    }

    pub fn registered(&self) -> usize {
        self.registered.len()
    }

    pub fn reset_registered(&mut self) {
        self.registered.clear();
    }

    /// First submit to last completion.
    pub fn window(&self) -> Option<(Instant, Instant)> {
        Some((self.first_submit?, self.last_completion?))
    }

    /// Submit→agent-received latency of every submitted job that reached an agent, milliseconds,
    /// sorted.
    pub fn latencies_ms(&self) -> Vec<f64> {
        let mut ms: Vec<f64> = self
            .submitted
            .iter()
            .filter_map(|(job, sent)| self.assigned.get(job).map(|(at, _)| at.duration_since(*sent)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        ms
    }

    /// Jobs that agents were assigned (and completed) more than once.
    pub fn completed_twice(&self) -> usize {
        self.assigned.values().filter(|(_, n)| *n > 1).count()
    }

    /// Agents whose renewal was answered (signed or refused).
    pub fn renewals_answered(&self) -> usize {
        self.renewals.len()
    }

    /// Every answered renewal.
    pub fn renewals(&self) -> impl Iterator<Item = &RenewalSeen> {
        self.renewals.values()
    }

    /// The acknowledged job ids.
    pub fn submitted_ids(&self) -> impl Iterator<Item = &String> {
        self.submitted.keys()
    }
}

/// The value at quantile `q` (0..=1) of sorted `values` (nearest rank), or 0 when empty.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_counts_each_submitted_job_once_in_any_order() {
        let mut r = Record::default();
        let t = Instant::now();
        r.apply(Event::Acked { job: "a".into(), at: t });
        r.apply(Event::Submitted { jobs: vec!["a".into(), "b".into()], sent: t });
        r.apply(Event::Acked { job: "b".into(), at: t });
        r.apply(Event::Acked { job: "b".into(), at: t });
        r.apply(Event::Submitted { jobs: vec!["b".into()], sent: t });
        assert_eq!((r.submitted(), r.completed()), (2, 2));
        r.apply(Event::Assigned { job: "a".into(), at: t });
        r.apply(Event::Assigned { job: "a".into(), at: t });
        assert_eq!(r.completed_twice(), 1);
        assert_eq!(r.latencies_ms().len(), 1);
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 500.0);
        assert_eq!(quantile(&v, 0.99), 990.0);
        assert_eq!(quantile(&v, 0.999), 999.0);
        assert_eq!(quantile(&v, 1.0), 1000.0);
        assert_eq!(quantile(&[], 0.5), 0.0);
    }
}
