//! The job lifecycle (docs/design.md §3), as a pure state machine with fencing epochs.
//!
//! `queued → placed → leased → running → succeeded | failed | cancelled`. A lost lease sends the job
//! back to `queued` while attempts remain. Every report names the epoch of the attempt it is about;
//! a report for any other epoch is refused, so a zombie agent can never overwrite a newer attempt.

use std::fmt;
use std::str::FromStr;

/// The full, fixed set of job states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Placed,
    Leased,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ALL: [JobState; 7] = [
        JobState::Queued,
        JobState::Placed,
        JobState::Leased,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Placed => "placed",
            JobState::Leased => "leased",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }

    /// Bound to an agent: an attempt exists and holds a lease.
    pub fn has_attempt(self) -> bool {
        matches!(self, JobState::Leased | JobState::Running)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL.into_iter().find(|st| st.as_str() == s).ok_or_else(|| {
            let names: Vec<_> = JobState::ALL.iter().map(|s| s.as_str()).collect();
            format!("unknown job state {s:?}; expected one of {}", names.join(", "))
        })
    }
}

/// The lifecycle-relevant part of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lifecycle {
    pub state: JobState,
    /// Attempts started so far (the current one included); numbers attempts and their prefixes.
    pub attempts: u32,
    pub max_attempts: u32,
    /// Attempts a spot interruption ended: they do not count toward `max_attempts`.
    pub preemptions: u32,
    /// Fencing epoch of the current attempt; 0 before the first lease. Strictly increases per lease.
    pub epoch: u64,
}

/// Something that happens to a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A site was chosen.
    Place,
    /// Bound to an agent: a new attempt with a new epoch.
    Lease,
    /// The agent started the process.
    Started {
        epoch: u64,
    },
    /// The process ended with an exit code.
    Exited {
        epoch: u64,
        exit_code: i32,
    },
    /// The attempt could not start or was killed (max runtime); final for the job.
    AttemptFailed {
        epoch: u64,
    },
    /// The lease expired or the agent lost the attempt.
    LeaseLost {
        epoch: u64,
    },
    /// Moving the job's data failed (a store or the network); like a lost lease, the job is tried
    /// again (with a fresh attempt prefix) while attempts remain.
    StagingFailed {
        epoch: u64,
    },
    /// A spot interruption notice stopped the attempt: the job is tried again, and the attempt
    /// does not count toward `max_attempts`.
    Preempted {
        epoch: u64,
    },
    Cancel,
}

/// Why an input was refused; the job is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("stale epoch {got}: the job's current attempt has epoch {current}")]
    StaleEpoch { got: u64, current: u64 },
    #[error("the job is already {0}")]
    Terminal(JobState),
    #[error("not allowed while the job is {0}")]
    WrongState(JobState),
}

impl Lifecycle {
    pub fn new(max_attempts: u32) -> Self {
        Self { state: JobState::Queued, attempts: 0, max_attempts: max_attempts.max(1), preemptions: 0, epoch: 0 }
    }

    /// Attempts that count toward `max_attempts`: every attempt but the preempted ones.
    pub fn counted_attempts(&self) -> u32 {
        self.attempts.saturating_sub(self.preemptions)
    }

    /// Applies one input; returns the new state, or why it was refused (then nothing changed).
    pub fn apply(&mut self, input: &Input) -> Result<JobState, Refusal> {
        use JobState::*;
        if self.state.is_terminal() {
            return Err(Refusal::Terminal(self.state));
        }
        let next = match *input {
            Input::Place if self.state == Queued => Placed,
            Input::Lease if self.state == Placed && self.counted_attempts() < self.max_attempts => {
                self.attempts += 1;
                self.epoch += 1;
                Leased
            }
            Input::Cancel => Cancelled,
            Input::Started { epoch } => {
                self.fence(epoch)?;
                match self.state {
                    Leased => Running,
                    s => return Err(Refusal::WrongState(s)),
                }
            }
            Input::Exited { epoch, exit_code } => {
                self.fence(epoch)?;
                if exit_code == 0 { Succeeded } else { Failed }
            }
            Input::AttemptFailed { epoch } => {
                self.fence(epoch)?;
                Failed
            }
            Input::LeaseLost { epoch } | Input::StagingFailed { epoch } => {
                self.fence(epoch)?;
                if self.counted_attempts() < self.max_attempts { Queued } else { Failed }
            }
            Input::Preempted { epoch } => {
                self.fence(epoch)?;
                self.preemptions += 1;
                Queued
            }
            Input::Place | Input::Lease => return Err(Refusal::WrongState(self.state)),
        };
        self.state = next;
        Ok(next)
    }

    /// Reports are only about the current attempt of a job that has one.
    fn fence(&self, epoch: u64) -> Result<(), Refusal> {
        if !self.state.has_attempt() {
            return Err(Refusal::WrongState(self.state));
        }
        if epoch != self.epoch {
            return Err(Refusal::StaleEpoch { got: epoch, current: self.epoch });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn input() -> impl Strategy<Value = Input> {
        prop_oneof![
            Just(Input::Place),
            Just(Input::Lease),
            Just(Input::Cancel),
            (0u64..5).prop_map(|epoch| Input::Started { epoch }),
            (0u64..5, -2i32..3).prop_map(|(epoch, exit_code)| Input::Exited { epoch, exit_code }),
            (0u64..5).prop_map(|epoch| Input::AttemptFailed { epoch }),
            (0u64..5).prop_map(|epoch| Input::LeaseLost { epoch }),
            (0u64..5).prop_map(|epoch| Input::StagingFailed { epoch }),
            (0u64..5).prop_map(|epoch| Input::Preempted { epoch }),
        ]
    }

    #[test]
    fn happy_path() {
        let mut l = Lifecycle::new(3);
        assert_eq!(l.apply(&Input::Place), Ok(JobState::Placed));
        assert_eq!(l.apply(&Input::Lease), Ok(JobState::Leased));
        assert_eq!(l.epoch, 1);
        assert_eq!(l.apply(&Input::Started { epoch: 1 }), Ok(JobState::Running));
        assert_eq!(l.apply(&Input::Exited { epoch: 1, exit_code: 0 }), Ok(JobState::Succeeded));
        assert_eq!(l.apply(&Input::Cancel), Err(Refusal::Terminal(JobState::Succeeded)));
    }

    #[test]
    fn lost_lease_requeues_until_attempts_run_out() {
        let mut l = Lifecycle::new(2);
        for epoch in 1..=2 {
            l.apply(&Input::Place).unwrap();
            l.apply(&Input::Lease).unwrap();
            l.apply(&Input::Started { epoch }).unwrap();
            let expected = if epoch < 2 { JobState::Queued } else { JobState::Failed };
            assert_eq!(l.apply(&Input::LeaseLost { epoch }), Ok(expected));
        }
        assert_eq!(l.attempts, 2);
    }

    #[test]
    fn zombie_report_is_refused() {
        let mut l = Lifecycle::new(3);
        l.apply(&Input::Place).unwrap();
        l.apply(&Input::Lease).unwrap();
        l.apply(&Input::LeaseLost { epoch: 1 }).unwrap();
        l.apply(&Input::Place).unwrap();
        l.apply(&Input::Lease).unwrap();
        let zombie = Input::Exited { epoch: 1, exit_code: 0 };
        assert_eq!(l.apply(&zombie), Err(Refusal::StaleEpoch { got: 1, current: 2 }));
        assert_eq!(l.state, JobState::Leased);
    }

    #[test]
    fn preemption_requeues_without_using_up_attempts() {
        let mut l = Lifecycle::new(1);
        for epoch in 1..=3 {
            l.apply(&Input::Place).unwrap();
            assert_eq!(l.apply(&Input::Lease), Ok(JobState::Leased), "preempted attempts leave room");
            l.apply(&Input::Started { epoch }).unwrap();
            assert_eq!(l.apply(&Input::Preempted { epoch }), Ok(JobState::Queued));
        }
        assert_eq!((l.attempts, l.preemptions, l.counted_attempts()), (3, 3, 0));
        l.apply(&Input::Place).unwrap();
        l.apply(&Input::Lease).unwrap();
        assert_eq!(l.epoch, 4, "attempt numbers and epochs stay unique");
        assert_eq!(
            l.apply(&Input::LeaseLost { epoch: 4 }),
            Ok(JobState::Failed),
            "a counted attempt uses the one allowed"
        );
    }

    #[test]
    fn stale_or_early_preemption_is_refused() {
        let mut l = Lifecycle::new(3);
        assert_eq!(l.apply(&Input::Preempted { epoch: 0 }), Err(Refusal::WrongState(JobState::Queued)));
        l.apply(&Input::Place).unwrap();
        l.apply(&Input::Lease).unwrap();
        l.apply(&Input::Preempted { epoch: 1 }).unwrap();
        l.apply(&Input::Place).unwrap();
        l.apply(&Input::Lease).unwrap();
        let before = l.clone();
        assert_eq!(l.apply(&Input::Preempted { epoch: 1 }), Err(Refusal::StaleEpoch { got: 1, current: 2 }));
        assert_eq!(l, before, "a zombie's notice changes nothing");
        assert_eq!(l.preemptions, 1);
    }

    proptest! {
        /// Random sequences of reports, expiries, cancels and stale epochs never break the invariants.
        #[test]
        fn invariants_hold(max_attempts in 1u32..4, inputs in proptest::collection::vec(input(), 0..40)) {
            let mut l = Lifecycle::new(max_attempts);
            let mut successes = 0;
            for inp in &inputs {
                let before = l.clone();
                match l.apply(inp) {
                    Ok(state) => {
                        prop_assert_eq!(state, l.state);
                        prop_assert!(l.epoch >= before.epoch, "epoch never goes back");
                        prop_assert!(!before.state.is_terminal(), "terminal states are final");
                        if state == JobState::Succeeded { successes += 1; }
                        if let Input::Started { epoch } | Input::Exited { epoch, .. }
                            | Input::AttemptFailed { epoch } | Input::LeaseLost { epoch }
                            | Input::Preempted { epoch } = inp {
                            prop_assert_eq!(*epoch, before.epoch, "only the current epoch changes a job");
                        }
                    }
                    Err(_) => prop_assert_eq!(&l, &before, "a refused input changes nothing"),
                }
                prop_assert!(l.counted_attempts() <= l.max_attempts);
                prop_assert!(l.preemptions <= l.attempts);
                if matches!(inp, Input::Preempted { .. }) && l != before {
                    prop_assert_eq!(l.preemptions, before.preemptions + 1);
                    prop_assert_eq!(l.state, JobState::Queued);
                }
                prop_assert_eq!(l.epoch, u64::from(l.attempts));
            }
            prop_assert!(successes <= 1);
        }
    }
}
