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
    Ok(())
}
