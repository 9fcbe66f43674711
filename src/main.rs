//! The `hybroker` binary: parse the command line, load config, start logs, call a module's `run()`.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, Subcommand};
use hybroker::cli::{self, PkiCommand};
use hybroker::config::{AgentConfig, BrokerConfig, GatewayConfig, QuickstartConfig};
use hybroker::{agent, bench, broker, gateway, private_files, telemetry, tls};

#[derive(Parser)]
#[command(
    name = "hybroker",
    version = env!("HYBROKER_VERSION"),
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
        /// The config file: this, else `HYBROKER_CONFIG`, else `./config/broker.toml`, else
        /// `/etc/hybroker/broker.toml`.
        #[arg(long, env = "HYBROKER_CONFIG")]
        config: Option<PathBuf>,
        /// Write the bound address to this file once listening (useful with port 0).
        #[arg(long)]
        addr_file: Option<PathBuf>,
        /// Write the enrol listener's bound address (broker.enroll_listen) to this file.
        #[arg(long)]
        enroll_addr_file: Option<PathBuf>,
    },
    /// Run the gateway: the tenants' HTTP API, a client of the broker.
    Gateway {
        /// The config file: this, else `HYBROKER_CONFIG`, else `./config/gateway.toml`, else
        /// `/etc/hybroker/gateway.toml`.
        #[arg(long, env = "HYBROKER_CONFIG")]
        config: Option<PathBuf>,
        /// Write the bound address to this file once listening (useful with port 0).
        #[arg(long)]
        addr_file: Option<PathBuf>,
    },
    #[command(flatten)]
    Client(cli::client::ClientCommand),
    /// Manage tenants' API keys (with an admin certificate, on the broker): add, list, revoke.
    Tenants(cli::admin::TenantsArgs),
    /// Run the agent on a GPU node; it dials out to the broker.
    Agent {
        /// The config file: this, else `HYBROKER_CONFIG`, else `./config/agent.toml`, else
        /// `/etc/hybroker/agent.toml`.
        #[arg(long, env = "HYBROKER_CONFIG")]
        config: Option<PathBuf>,
        /// Add simulated GPUs, e.g. `4xH100-80GB` (overrides the config's agent.simulate_gpus).
        #[arg(long)]
        simulate_gpus: Option<String>,
        /// Enrol with the join token in this file when the node has no valid certificate (see
        /// `admin agents token create --output-file`); overrides agent.join_token_file.
        #[arg(long, value_name = "PATH")]
        join_file: Option<PathBuf>,
    },
    /// Operate the broker directly with an admin certificate: submit, get, list, cancel, logs, agents,
    /// drain, sites.
    Admin(cli::admin::AdminArgs),
    /// Make a development CA and issue role certificates.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// The instance catalog placement uses: show it, or write one from the EC2 and Azure APIs.
    #[command(subcommand)]
    Catalog(cli::catalog::CatalogCommand),
    /// Everything in one process on embedded defaults, with sample jobs.
    Quickstart {
        /// Run the sample jobs, print the results and exit (0 only if all succeeded).
        #[arg(long)]
        once: bool,
        /// Where the quickstart keeps its PKI, database and work directories (made afresh).
        #[arg(long, default_value = ".hybroker/quickstart")]
        state_dir: PathBuf,
        /// Watch it: a file with `[metrics]` and `[telemetry]` sections, as in the services'
        /// configs (see config/quickstart.toml); everything else is embedded.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Benchmark: a broker child process, N simulated agents over mTLS, M jobs; prints and writes
    /// throughput, latency, CPU and memory (and a reconnect storm or a broker kill on request).
    /// `bench staging`: the agent's stage-in against curl; `bench placement`: the placement engine.
    Bench(bench::BenchArgs),
    /// Shell completions on stdout (bash, zsh, fish, …).
    ///
    /// For example `hybroker completions bash > /usr/share/bash-completion/completions/hybroker`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Man pages, one per command (`hybroker.1`, `hybroker-jobs.1`, …), written into DIR.
    Manpages { dir: PathBuf },
    /// Prints the job files' JSON Schema (`schema job`, the content of deploy/schema/job.schema.json).
    #[command(hide = true)]
    Schema {
        #[arg(value_parser = ["job"])]
        which: String,
    },
    /// The agent's per-attempt sandbox init (the agent re-executes itself); not for people.
    #[command(hide = true)]
    SandboxInit { spec: PathBuf },
}

fn main() -> anyhow::Result<()> {
    // Before any thread exists (the init unshares namespaces and forks), and before parsing the
    // whole command line: it runs once per attempt.
    let mut args = std::env::args_os().skip(1);
    if let (Some(command), Some(spec), None) = (args.next(), args.next(), args.next())
        && command == "sandbox-init"
    {
        agent::sandbox::init::main(std::path::Path::new(&spec));
    }
    #[cfg(target_feature = "crt-static")]
    nss_built_in_only();
    let cli = Cli::parse();
    let format = cli.log_format;
    // systemd's readiness socket is this process's alone: read it, and take it out of the
    // environment while no other thread exists, so that jobs and the broker's local agents do not
    // inherit it (sd_notify's unset_environment).
    let notify_socket = std::env::var_os("NOTIFY_SOCKET");
    if notify_socket.is_some() {
        // SAFETY: single-threaded here: the runtime and its threads start below.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
    }
    tls::install_crypto_provider();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        // Services trace their spans (their config says where to); every other command only logs.
        if !matches!(
            cli.command,
            Command::Broker { .. } | Command::Gateway { .. } | Command::Agent { .. } | Command::Quickstart { .. }
        ) {
            telemetry::init(format, None)?;
        }
        match cli.command {
            Command::Broker { config, addr_file, enroll_addr_file } => {
                let config = BrokerConfig::load(&config_path(config, "broker")?)?;
                let tracing = traced(format, "broker", &config.telemetry, &config.tls.cert)?;
                telemetry::notify::install(notify_socket.as_deref());
                let catalog = config.placement.install_catalog().map_err(anyhow::Error::msg)?;
                tracing::info!(as_of = catalog.as_of(), types = catalog.types().len(), "instance catalog");
                if let Err(e) = bench::raise_open_file_limit() {
                    tracing::warn!("could not raise the open-file limit: {e}");
                }
                let listener = cli::listen(config.broker.listen)?;
                let enroll = config.broker.enroll_listen.map(cli::listen).transpose()?;
                if let (Some(path), Some(enroll)) = (enroll_addr_file, &enroll) {
                    private_files::write_atomically(&path, &enroll.local_addr()?.to_string())?;
                }
                if let Some(path) = addr_file {
                    private_files::write_atomically(&path, &listener.local_addr()?.to_string())?;
                }
                let served = broker::run_with(config, listener, enroll, cli::shutdown_signal()).await;
                tracing.shutdown().await;
                served
            }
            Command::Gateway { config, addr_file } => {
                let config = GatewayConfig::load(&config_path(config, "gateway")?)?;
                let tracing = traced(format, "gateway", &config.telemetry, &config.tls.cert)?;
                telemetry::notify::install(notify_socket.as_deref());
                let listener = cli::listen(config.gateway.listen)?;
                if let Some(path) = addr_file {
                    private_files::write_atomically(&path, &listener.local_addr()?.to_string())?;
                }
                let served = gateway::run(config, listener, cli::shutdown_signal()).await;
                tracing.shutdown().await;
                served
            }
            Command::Client(cmd) => exit_with(cli::client::run(cmd).await?),
            Command::Tenants(args) => exit_with(cli::admin::tenants(args).await),
            Command::Agent { config, simulate_gpus, join_file } => {
                let mut config = AgentConfig::load_joining(&config_path(config, "agent")?, join_file)?;
                if let Some(spec) = simulate_gpus {
                    config.agent.simulate_gpus = spec;
                    config.validate(std::path::Path::new("--simulate-gpus"))?;
                }
                let tracing = traced(format, "agent", &config.telemetry, &config.tls.cert)?;
                telemetry::notify::install(notify_socket.as_deref());
                let ran = agent::run(config, cli::shutdown_signal()).await;
                tracing.shutdown().await;
                ran
            }
            Command::Pki(cmd) => exit_with(cli::report::finish(cli::pki(cmd).map(|()| cli::report::EXIT_OK))),
            Command::Admin(args) => exit_with(cli::admin::run(args).await),
            Command::Catalog(cmd) => {
                exit_with(cli::report::finish(cli::catalog::run(cmd).await.map(|()| cli::report::EXIT_OK)))
            }
            Command::Quickstart { once, state_dir, config } => {
                let config = config.map(|path| QuickstartConfig::load(&path)).transpose()?.unwrap_or_default();
                let service =
                    telemetry::Service { role: "quickstart", section: &config.telemetry, site: None, instance: None };
                let tracing = telemetry::init(format, Some(service))?;
                let ok = cli::quickstart::run(&state_dir, once, config.metrics).await;
                tracing.shutdown().await;
                let ok = ok?;
                if !ok {
                    std::process::exit(1);
                }
                Ok(())
            }
            Command::Bench(bench::BenchArgs { other: Some(bench::BenchCommand::Placement(args)), .. }) => {
                bench::placement::run(&args)
            }
            Command::Bench(bench::BenchArgs { other: Some(bench::BenchCommand::Capacity(args)), .. }) => {
                bench::capacity::run(&args).await
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
            Command::Completions { shell } => {
                cli::docs::write_completions(Cli::command(), shell, &mut std::io::stdout().lock())?;
                Ok(())
            }
            Command::Manpages { dir } => {
                for page in cli::docs::write_man_pages(Cli::command(), &dir)? {
                    println!("{}", page.display());
                }
                Ok(())
            }
            Command::Schema { .. } => {
                print!("{}", hybroker::gateway::job_schema::job_file_schema_text());
                Ok(())
            }
            Command::SandboxInit { .. } => {
                anyhow::bail!("sandbox-init is run by the agent only, as `hybroker sandbox-init <spec>`")
            }
        }
    })
}

/// The static release build (`scripts/release.sh`, glibc with `+crt-static`) looks up users, groups
/// and hosts only in the NSS sources built into the C library (`files`, `dns`): a module it would
/// load from the system (`libnss_systemd` for Debian's `passwd: files systemd`, `libnss_resolve`,
/// `libnss_sss`, …) runs against a second C library and crashes the process — the agent looks up
/// every UID it claims for an attempt. Dynamic builds (`cargo install`) use the system's NSS.
#[cfg(target_feature = "crt-static")]
fn nss_built_in_only() {
    unsafe extern "C" {
        /// glibc's per-process override of an `nsswitch.conf` line.
        fn __nss_configure_lookup(db: *const std::ffi::c_char, services: *const std::ffi::c_char) -> std::ffi::c_int;
    }
    for (db, services) in [(c"passwd", c"files"), (c"group", c"files"), (c"hosts", c"files dns")] {
        // SAFETY: static NUL-terminated strings, called before any other thread exists.
        unsafe { __nss_configure_lookup(db.as_ptr(), services.as_ptr()) };
    }
}

/// Logs and traces for a service: `hybroker-<role>`, its site and identity from its certificate.
fn traced(
    format: telemetry::LogFormat,
    role: &'static str,
    section: &telemetry::TelemetrySection,
    cert: &std::path::Path,
) -> anyhow::Result<telemetry::Telemetry> {
    let identity = tls::identity_of_cert_file(cert).ok();
    let site = identity.as_ref().and_then(|i| i.site.clone());
    let instance = identity.map(|i| i.uri());
    telemetry::init(format, Some(telemetry::Service { role, section, site, instance }))
}

/// Ends the process with `code` when it is not 0.
/// A service's config file: the one given (`--config` or `HYBROKER_CONFIG`), else the first of
/// `./config/<role>.toml` and `/etc/hybroker/<role>.toml` that exists.
fn config_path(given: Option<PathBuf>, role: &str) -> anyhow::Result<PathBuf> {
    hybroker::config::find(given, role).map_err(|e| match e {
        hybroker::config::ConfigError::Parse { message, .. } => anyhow::anyhow!(message),
        other => other.into(),
    })
}

fn exit_with(code: i32) -> anyhow::Result<()> {
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}
