//! `hybroker bench placement`: decisions per second and decision latency of the pure placement
//! engine for 1,000 queued jobs against a synthetic fleet (cloud sites with their instance types
//! and prices, on-prem sites summarising many agents).

use crate::placement::synthetic::{bench, bench_world};

/// `hybroker bench placement` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct PlacementBenchArgs {
    /// Cloud sites (each with a handful of instance types and their prices).
    #[arg(long, default_value_t = 50)]
    pub cloud_sites: usize,
    /// Agents, spread over the on-prem sites (summarised per site by distinct node shapes).
    #[arg(long, default_value_t = 10_000)]
    pub agents: usize,
    /// Timed rounds over the 1,000 jobs (one untimed warm-up round comes first).
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn run(args: &PlacementBenchArgs) -> anyhow::Result<()> {
    if args.rounds == 0 || args.cloud_sites == 0 {
        anyhow::bail!("--rounds and --cloud-sites must be at least 1");
    }
    let (world, jobs, replay) = bench_world(args.cloud_sites, args.agents, args.seed);
    let report = bench(&world, &jobs, args.rounds);
    println!(
        "placement: {} jobs x {} sites ({} agents), {} rounds",
        report.jobs, report.sites, args.agents, args.rounds
    );
    println!("  decisions/s   {:>10.0}", report.decisions_per_s);
    println!("  p50           {:>10.1} us", report.p50_us);
    println!("  p99           {:>10.1} us   (target <= 100 us)", report.p99_us);
    println!("  max           {:>10.1} us", report.max_us);
    println!(
        "  site replay   {:>10.1} ms   (one on-prem site's queue-wait estimate: {} agents, 250 jobs waiting; once per dispatch round that needs it)",
        replay.as_secs_f64() * 1e3,
        args.agents / 4
    );
    println!(
        "  placed        {:>10} of {} (the rest break a rule: residency, caps, no fitting type)",
        report.placed, report.jobs
    );
    let (tenants, median_us, max_us) = fair_order_timing(report.jobs, args.rounds, args.seed);
    println!(
        "  fair order    {median_us:>10.1} us   per order of {} queued jobs, {tenants} tenants (max {max_us:.1} us; {:.3} us per job)",
        report.jobs,
        median_us / report.jobs.max(1) as f64
    );
    Ok(())
}

/// The time `placement::fair::fair_order` takes to order `jobs` queued jobs of 20 tenants
/// (weights 1 to 3, priorities 0 to 100, 1 to 8 GPUs each) on a pool of 512 GPUs: (tenants,
/// median µs, max µs) over `rounds` orders.
fn fair_order_timing(jobs: usize, rounds: usize, seed: u64) -> (usize, f64, f64) {
    use crate::placement::fair::{Amount, Tenant, Waiting, fair_order};
    const TENANTS: usize = 20;
    let mut rng = fastrand::Rng::with_seed(seed);
    let total = Amount { gpus: 512.0, cpus: 8192.0, memory_gib: 65536.0 };
    let tenants: Vec<Tenant> = (0..TENANTS)
        .map(|i| Tenant {
            weight: f64::from(rng.u32(1..=3)),
            holds: Amount { gpus: f64::from(rng.u32(0..32)), cpus: 64.0, memory_gib: 512.0 },
            past: Amount { gpus: f64::from(rng.u32(0..1000)), ..Amount::default() },
            ..Tenant::new(&format!("tenant-{i}"))
        })
        .collect();
    let waiting: Vec<Waiting<usize>> = (0..jobs)
        .map(|key| {
            let gpus = f64::from(rng.u32(1..=8));
            let asks = Amount { gpus, cpus: gpus * 8.0, memory_gib: gpus * 64.0 };
            Waiting { key, tenant: rng.usize(..TENANTS), priority: rng.u32(0..=100), age: key as i64, asks }
        })
        .collect();
    let mut times: Vec<f64> = (0..rounds.max(1) + 1)
        .map(|_| {
            let input = waiting.clone();
            let started = std::time::Instant::now();
            std::hint::black_box(fair_order(total, &tenants, input));
            started.elapsed().as_secs_f64() * 1e6
        })
        .skip(1)
        .collect();
    times.sort_by(f64::total_cmp);
    (TENANTS, times[times.len() / 2], times[times.len() - 1])
}
