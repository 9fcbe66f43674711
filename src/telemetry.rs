//! Logs: `tracing` to stderr (stdout is for what the user asked to see). `RUST_LOG` filters; the
//! OpenTelemetry export arrives with the operators' view issue.

use tracing_subscriber::EnvFilter;

/// Installs the process-wide subscriber once; later calls are ignored.
pub fn init(default_filter: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr).try_init();
}
