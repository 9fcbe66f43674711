//! The HTTP pieces the Resource Manager calls and the token requests share: the client (rustls
//! with ring, the platform's roots plus a `ca_file`'s), `Retry-After`, error text.

use std::path::Path;
use std::time::Duration;

/// The client of one provider: rustls with the process's ring provider, bounded connect and
/// request times, no redirects (a redirect would carry the bearer token elsewhere).
pub(super) fn client(ca_file: Option<&Path>) -> Result<reqwest::Client, String> {
    crate::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(20))
        .timeout(Duration::from_secs(120))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("hybroker/", env!("CARGO_PKG_VERSION"), " (capacity)"));
    if let Some(path) = ca_file {
        builder = builder.tls_certs_merge(read_roots(path)?);
    }
    builder.build().map_err(|e| format!("http client: {}", describe(&e)))
}

pub(crate) use crate::pricing::http::{describe, retry_after};

/// The certificates of a PEM file, at least one.
fn read_roots(path: &Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("ca_file {}: {e}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("ca_file {}: {}", path.display(), describe(&e)))?;
    if certs.is_empty() {
        return Err(format!("ca_file {} holds no certificate", path.display()));
    }
    Ok(certs)
}
