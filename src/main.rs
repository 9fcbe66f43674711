//! The `hybroker` binary: parse the command line, load config, start logs, call a module's `run()`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use hybroker::cli::{self, PkiCommand};
use hybroker::config::{AgentConfig, BrokerConfig, GatewayConfig};
use hybroker::{agent, bench, broker, gateway, telemetry, tls};

#[derive(Parser)]
#[command(
    name = "hybroker",
    version,
    about = "Hybrid-cloud GPU workload broker: on-prem GPUs and AWS/Azure as one pool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr as text for people, or one JSON object per line for log pipelines.
    #[arg(long, global = true, value_enum, env = "HYBROKER_LOG_FORMAT", default_value_t = telemetry::LogFormat::Text)]
    log_format: telemetry::LogFormat,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker (the control plane).
    Broker {
        #[arg(long, default_value = "config/broker.toml")]
        config: PathBuf,
        /// Write the bound address to this file once listening (useful with port 0).
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    /// Run the gateway: the tenants' HTTP API, a client of the broker.
    Gateway {
        #[arg(long, default_value = "config/gateway.toml")]
        config: PathBuf,
        /// Write the bound address to this file once listening (useful with port 0).
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    #[command(flatten)]
    Client(cli::client::ClientCommand),
    /// Manage tenants' API keys (with an admin certificate, on the broker).
    Tenants(cli::admin::TenantsArgs),
    /// Run the agent on a GPU node; it dials out to the broker.
    Agent {
        #[arg(long, default_value = "config/agent.toml")]
        config: PathBuf,
        /// Add simulated GPUs, e.g. `4xH100-80GB` (overrides the config's agent.simulate_gpus).
        #[arg(long)]
        simulate_gpus: Option<String>,
    },
    /// Operate the broker directly with an admin certificate: submit, get, list, cancel, logs, agents.
    Admin(cli::admin::AdminArgs),
    /// Make a development CA and issue role certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Everything in one process on embedded defaults, with sample jobs.
    Quickstart {
        /// Run the sample jobs, print the results and exit (0 only if all succeeded).
        #[arg(long)]
        once: bool,
        /// Where the quickstart keeps its PKI, database and work directories (made afresh).
        #[arg(long, default_value = ".hybroker/quickstart")]
        state_dir: PathBuf,
    },
    /// Benchmark: a broker child process, N simulated agents over mTLS, M jobs; prints and writes
    /// throughput, latency, CPU and memory (and a reconnect storm or a broker kill on request).
    /// `bench staging`: the agent's stage-in against curl; `bench placement`: the placement engine.
    Bench(bench::BenchArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init("info,h2=warn,tower=warn,hyper=warn,sqlx=warn,rustls_platform_verifier=off", cli.log_format);
    tls::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Broker { config, addr_file } => {
                if let Err(e) = bench::raise_open_file_limit() {
                    tracing::warn!("could not raise the open-file limit: {e}");
                }
                let config = BrokerConfig::load(&config)?;
                let listener = cli::listen(config.broker.listen)?;
                if let Some(path) = addr_file {
                    cli::write_atomically(&path, &listener.local_addr()?.to_string())?;
                }
                broker::run(config, listener, cli::shutdown_signal()).await
            }
            Command::Gateway { config, addr_file } => {
                let config = GatewayConfig::load(&config)?;
                let listener = cli::listen(config.gateway.listen)?;
                if let Some(path) = addr_file {
                    cli::write_atomically(&path, &listener.local_addr()?.to_string())?;
                }
                gateway::run(config, listener, cli::shutdown_signal()).await
            }
            Command::Client(cmd) => exit_with(cli::client::run(cmd).await?),
            Command::Tenants(args) => exit_with(cli::admin::tenants(args).await?),
            Command::Agent { config, simulate_gpus } => {
                let mut config = AgentConfig::load(&config)?;
                if let Some(spec) = simulate_gpus {
                    config.agent.simulate_gpus = spec;
                    config.validate(std::path::Path::new("--simulate-gpus"))?;
                }
                agent::run(config, cli::shutdown_signal()).await
            }
            Command::Pki(cmd) => cli::pki(cmd),
            Command::Admin(args) => exit_with(cli::admin::run(args).await?),
            Command::Quickstart { once, state_dir } => {
                let ok = cli::quickstart::run(&state_dir, once).await?;
                if !ok {
                    std::process::exit(1);
                }
                Ok(())
            }
            Command::Bench(bench::BenchArgs { other: Some(bench::BenchCommand::Placement(args)), .. }) => {
                bench::placement::run(&args)
            }
            Command::Bench(bench::BenchArgs { other: Some(bench::BenchCommand::Staging(args)), .. }) => {
                bench::staging::run(args).await
            }
            Command::Bench(args) => {
                if !bench::run(args).await? {
                    std::process::exit(1);
                }
                Ok(())
            }
        }
    })
}

/// Ends the process with `code` when it is not 0.
fn exit_with(code: i32) -> anyhow::Result<()> {
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}
