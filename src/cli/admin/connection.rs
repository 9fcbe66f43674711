//! How an operator reaches the broker — its address, the CA that signed its certificate, an admin
//! certificate and key — from flags anywhere on the command line or from the environment, and what
//! the operator is told when that fails: which flag or variable to fix.

use std::path::{Path, PathBuf};

use clap::Args;
use tonic::Code;
use tonic::transport::Channel;

use crate::cli::report::{Output, hinted};
use crate::model::identity::Role;
use crate::tls::{self, TlsError, TlsPaths};

const BROKER_HINT: &str = "is the broker running? set its address with --broker or HYBROKER_BROKER";
const URL_HINT: &str = "pass the broker's address as https://HOST:PORT with --broker or HYBROKER_BROKER";
const CA_HINT: &str = "pass the CA certificate that signed the broker's certificate with --ca-cert or \
                       HYBROKER_ADMIN_CA_CERT";
const CERT_HINT: &str = "pass an admin certificate and its key with --cert and --key (or HYBROKER_ADMIN_CERT \
                         and HYBROKER_ADMIN_KEY); `hybroker pki issue --role admin` makes one";
const REFUSED_HINT: &str = "the broker must accept your certificate: pass an admin certificate issued by the \
                            broker's CA and not expired, with --cert and --key (or HYBROKER_ADMIN_CERT and \
                            HYBROKER_ADMIN_KEY)";

const LOST_HINT: &str = "check that --cert and --key (or HYBROKER_ADMIN_CERT and HYBROKER_ADMIN_KEY) are an admin \
                         certificate issued by the broker's CA and not expired, and that the broker at --broker \
                         (HYBROKER_BROKER) is still running";
/// How [`tls::explain_status`] begins a call that failed in transport, after connecting.
const CONNECTION_FAILED: &str = "the connection to the broker failed";

/// How an operator reaches the broker, and how to print. Every flag may come before or after the
/// subcommand.
#[derive(Args)]
pub struct BrokerArgs {
    /// The broker's gRPC address.
    #[arg(long, global = true, env = "HYBROKER_BROKER", default_value = "https://127.0.0.1:7443")]
    broker: String,
    /// CA certificate that signed the broker's certificate.
    #[arg(long, global = true, env = "HYBROKER_ADMIN_CA_CERT", value_name = "PEM", default_value = "pki/ca.pem")]
    ca_cert: PathBuf,
    /// An admin-role certificate.
    #[arg(long, global = true, env = "HYBROKER_ADMIN_CERT", value_name = "PEM", default_value = "pki/admin.pem")]
    cert: PathBuf,
    /// The admin certificate's private key.
    #[arg(long, global = true, env = "HYBROKER_ADMIN_KEY", value_name = "PEM", default_value = "pki/admin-key.pem")]
    key: PathBuf,
    /// How to print answers.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl BrokerArgs {
    /// The CA bundle the broker is verified with (`--ca-cert`).
    pub fn ca_cert(&self) -> &Path {
        &self.ca_cert
    }

    /// The trust domain of the admin certificate.
    pub fn trust_domain(&self) -> anyhow::Result<String> {
        Ok(tls::identity_of_cert_file(&self.cert).map_err(|e| self.file_error(e))?.trust_domain)
    }
    /// A mutual-TLS channel to the broker; each failure says which flag to fix.
    pub async fn channel(&self) -> anyhow::Result<Channel> {
        tls::install_crypto_provider();
        let paths = TlsPaths { ca_cert: self.ca_cert.clone(), cert: self.cert.clone(), key: self.key.clone() };
        let me = tls::identity_of_cert_file(&paths.cert).map_err(|e| self.file_error(e))?;
        if me.role != Role::Admin {
            let message = format!("certificate {} has role {}, not admin", self.cert.display(), me.role);
            return Err(hinted(message, CERT_HINT));
        }
        let config = tls::client_config(&paths, &me.trust_domain, Role::Broker).map_err(|e| self.file_error(e))?;
        tls::connect(&self.broker, config, None).await.map_err(|e| match e {
            TlsError::BadUrl { .. } => hinted(e.to_string(), URL_HINT),
            TlsError::Connect { ref reason, .. } => {
                let hint = connection_hint(reason).unwrap_or(BROKER_HINT);
                hinted(e.to_string(), hint)
            }
            other => other.into(),
        })
    }

    /// A certificate or key that cannot be used, with the flag that names it.
    fn file_error(&self, e: TlsError) -> anyhow::Error {
        let hint = match &e {
            TlsError::Read { path, .. }
            | TlsError::BadPem { path, .. }
            | TlsError::NoCertificate { path, .. }
            | TlsError::CertIdentity { path, .. } => Some(self.hint_for(path)),
            TlsError::NoKey(_) | TlsError::Config(_) => Some(CERT_HINT),
            TlsError::BadCa(_) | TlsError::Verifier(_) => Some(CA_HINT),
            _ => None,
        };
        match hint {
            Some(hint) => hinted(e.to_string(), hint),
            None => e.into(),
        }
    }

    fn hint_for(&self, path: &Path) -> &'static str {
        if path == self.ca_cert { CA_HINT } else { CERT_HINT }
    }
}

/// A refused call, explained, with a hint where the operator can fix it.
///
/// A broker that refuses our certificate does so after our side of the TLS 1.3 handshake is done:
/// its alert may arrive before the first call (the handshake fails), with it, or be lost when the
/// connection closes first (the call fails with a closed connection). The last is said as such.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    let mut message = tls::explain_status(&status);
    let lost = message.starts_with(CONNECTION_FAILED);
    if lost {
        message.push_str(" (at a first call, the broker may have refused your certificate)");
    }
    let hint = match status.code() {
        Code::PermissionDenied if message.starts_with("role ") => Some(CERT_HINT),
        Code::Unauthenticated => Some(REFUSED_HINT),
        _ if lost => Some(LOST_HINT),
        _ => connection_hint(&message),
    };
    match hint {
        Some(hint) => hinted(message, hint),
        None => anyhow::anyhow!(message),
    }
}

/// The hint for a failed connection, from [`tls::explain_status`]'s explanation of it.
fn connection_hint(explained: &str) -> Option<&'static str> {
    if explained.contains("refused the broker's certificate") {
        Some(CA_HINT)
    } else if explained.contains("the broker refused the TLS handshake")
        || explained.contains("it may have refused our certificate")
    {
        Some(REFUSED_HINT)
    } else if explained.contains("could not reach the broker") {
        Some(BROKER_HINT)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_connection_failure_names_what_to_pass() {
        let hint = |text: &str| connection_hint(text).unwrap_or("none");
        assert!(hint("could not reach the broker: connection refused").contains("HYBROKER_BROKER"));
        assert!(hint("refused the broker's certificate: UnknownIssuer").contains("HYBROKER_ADMIN_CA_CERT"));
        assert!(hint("the broker refused the TLS handshake (alert UnknownCA): …").contains("HYBROKER_ADMIN_CERT"));
        assert_eq!(hint("job 42 not found"), "none");
    }

    #[test]
    fn a_connection_closed_at_the_call_may_be_a_refused_certificate() {
        let closed = std::io::Error::other("connection closed");
        let status = tonic::Status::from_error(Box::new(closed));
        let lines = crate::cli::report::error_lines(&status_error(status));
        assert!(lines.contains("may have refused your certificate"), "{lines}");
        assert!(lines.contains("hint: check that --cert and --key"), "{lines}");
    }

    #[test]
    fn a_refused_role_asks_for_an_admin_certificate() {
        let e = status_error(tonic::Status::permission_denied("role gateway is not allowed here; allowed: admin"));
        let lines = crate::cli::report::error_lines(&e);
        assert!(lines.starts_with("error: role gateway is not allowed here"), "{lines}");
        assert!(lines.contains("hint: pass an admin certificate"), "{lines}");
        let e = status_error(tonic::Status::not_found("no job x"));
        assert_eq!(crate::cli::report::error_lines(&e), "error: no job x\n");
    }
}
