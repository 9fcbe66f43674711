//! Metric updates under contention: threads incrementing labelled counters at once, through the
//! registry's name-and-labels API (`inc`), through handles resolved once (`Handle::inc`), and
//! through the registry this one replaced (one global mutex, a linear search of the family's
//! label sets per update; kept here, reduced to its update path, as the baseline).
//!
//! `cargo bench --bench metrics_contention` (release); prints nanoseconds per update and updates
//! per second for 1, 2, 4 and 8 threads. Under `cargo test --benches` it runs a few updates only.
//! Measure on a quiet machine with at least as many cores as threads: contention is the point.

use std::sync::Mutex;
use std::time::Instant;

use hybroker::metrics::{FAMILIES, Registry};

const ROUTES: [&str; 12] = [
    "/v1/jobs",
    "/v1/jobs/{id}",
    "/v1/jobs/{id}/logs",
    "/v1/jobs/{id}/events",
    "/v1/jobs/{id}/cancel",
    "/v1/jobs/{id}/outputs",
    "/v1/quotes",
    "/v1/usage",
    "/v1/keys",
    "/healthz",
    "/readyz",
    "unmatched",
];
const METHODS: [&str; 2] = ["GET", "POST"];
const STATUSES: [&str; 4] = ["200", "201", "404", "429"];
const FAMILY: &str = "hybroker_gateway_requests_total";

/// The label sets the threads cycle through (96: a gateway's realistic spread).
fn label_sets() -> Vec<[&'static str; 3]> {
    let mut sets = Vec::new();
    for route in ROUTES {
        for method in METHODS {
            for status in STATUSES {
                sets.push([route, method, status]);
            }
        }
    }
    sets
}

/// One family's series in the previous registry: label values and value.
type BeforeSeries = Vec<(Vec<String>, f64)>;

/// One update: `(thread, i)`.
type Update<'a> = &'a (dyn Fn(usize, usize) + Sync);

/// The previous registry's update path: every family's series in one `Vec` behind one mutex,
/// found by comparing label values one series after another.
#[derive(Default)]
struct Before {
    series: Mutex<Vec<BeforeSeries>>,
}

impl Before {
    fn new() -> Self {
        Self { series: Mutex::new(FAMILIES.iter().map(|_| Vec::new()).collect()) }
    }

    fn inc(&self, name: &str, labels: &[&str], by: f64) {
        let Some(i) = FAMILIES.iter().position(|f| f.name == name) else { return };
        let mut all = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let list = &mut all[i];
        let at = match list.iter().position(|s| s.0.iter().map(String::as_str).eq(labels.iter().copied())) {
            Some(at) => at,
            None => {
                list.push((labels.iter().map(|l| l.to_string()).collect(), 0.0));
                list.len() - 1
            }
        };
        list[at].1 += by.max(0.0);
    }
}

/// Runs `update(thread, i)` `per_thread` times on each of `threads` threads; nanoseconds per update.
fn measure(threads: usize, per_thread: usize, update: Update<'_>) -> f64 {
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || {
                for i in 0..per_thread {
                    update(t, i);
                }
            });
        }
    });
    started.elapsed().as_nanos() as f64 / (threads * per_thread) as f64
}

fn main() {
    let per_thread = if cfg!(debug_assertions) { 2_000 } else { 2_000_000 };
    let sets = label_sets();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    println!("{} label sets, {per_thread} updates per thread, {cores} cores", sets.len());
    println!("{:>8} {:>30} {:>12} {:>14}", "threads", "registry", "ns/update", "updates/s");
    for threads in [1, 2, 4, 8] {
        let before = Before::new();
        let after = Registry::default();
        let handles: Vec<_> = sets.iter().map(|l| after.handle(FAMILY, l).expect("declared family")).collect();
        // Threads start at different label sets, as concurrent requests do.
        let pick = |t: usize, i: usize| (t * 7 + i) % sets.len();
        let runs: [(&str, Update<'_>); 3] = [
            ("before: mutex + linear search", &|t, i| before.inc(FAMILY, &sets[pick(t, i)], 1.0)),
            ("after: inc (arc-swap + hash)", &|t, i| after.inc(FAMILY, &sets[pick(t, i)], 1.0)),
            ("after: handle", &|t, i| handles[pick(t, i)].inc(1.0)),
        ];
        for (name, update) in runs {
            let ns = measure(threads, per_thread, update);
            println!("{threads:>8} {name:>30} {ns:>12.1} {:>14.0}", 1e9 / ns);
        }
        // Every update counted, whichever way it went.
        let total: f64 = before.series.lock().unwrap().iter().flatten().map(|s| s.1).sum();
        assert_eq!(total, (threads * per_thread) as f64);
        let rendered: f64 = after
            .render()
            .lines()
            .filter(|l| l.starts_with(FAMILY))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .sum();
        assert_eq!(rendered, (2 * threads * per_thread) as f64);
    }
}
