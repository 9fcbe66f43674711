//! Messages a person can act on for failed calls and connections.

use std::error::Error as StdError;
use std::io;

use tonic::{Code, Status};

/// A clear message for a failed call: transport and TLS failures are explained from the error
/// chain (only what it shows), other statuses give their message.
pub fn explain_status(status: &Status) -> String {
    if let Some(message) = status.source().and_then(explain_error) {
        return message;
    }
    let transport = matches!(status.code(), Code::Unknown | Code::Unavailable | Code::Cancelled | Code::Internal);
    match status.source() {
        Some(source) if transport => {
            format!("the connection to the broker failed: {}: {}", status.message(), error_chain(source))
        }
        _ if status.message().is_empty() => status.code().description().to_string(),
        _ => status.message().to_string(),
    }
}

/// Explains the first TLS or socket failure in the chain of `err`, if there is one.
///
/// h2 keeps only the kind and text of I/O errors, so rustls errors are also recognised by text.
pub(super) fn explain_error(err: &(dyn StdError + 'static)) -> Option<String> {
    const ALERT: &str = "received fatal alert: ";
    const BAD_PEER: &str = "invalid peer certificate: ";
    let mut connecting = false;
    let mut current = Some(err);
    while let Some(e) = current {
        connecting |= e.is::<tonic::ConnectError>();
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(match tls {
                rustls::Error::AlertReceived(alert) => explain_alert(&format!("{alert:?}")),
                other => explain_tls_text(&other.to_string()),
            });
        }
        let text = e.to_string();
        if let Some(at) = text.find(ALERT) {
            let name: String = text[at + ALERT.len()..].chars().take_while(char::is_ascii_alphanumeric).collect();
            return Some(explain_alert(&name));
        }
        if let Some(at) = text.find(BAD_PEER) {
            return Some(explain_tls_text(&text[at..]));
        }
        if let Some(io_err) = e.downcast_ref::<io::Error>() {
            use io::ErrorKind as K;
            let message = match io_err.kind() {
                K::ConnectionRefused => Some("could not reach the broker: connection refused".into()),
                K::TimedOut if connecting => Some("could not reach the broker: connection timed out".into()),
                K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => Some(format!(
                    "the broker closed the connection ({io_err}); if this happens at the first \
                         call, it may have refused our certificate (check that it is issued by \
                         the broker's CA, not expired, and has the right role), or have too many \
                         unfinished handshakes from our address"
                )),
                _ => None,
            };
            if message.is_some() {
                return message;
            }
            if let Some(inner) = io_err.get_ref() {
                // `io::Error::source` skips the wrapped error itself: look at it first.
                current = Some(inner as &(dyn StdError + 'static));
                continue;
            }
        }
        current = e.source();
    }
    connecting.then(|| format!("could not reach the broker: {}", error_chain(err)))
}

/// Explains a TLS alert the broker sent us, by its rustls name.
fn explain_alert(name: &str) -> String {
    const REFUSALS: [&str; 9] = [
        "BadCertificate",
        "UnsupportedCertificate",
        "CertificateRevoked",
        "CertificateExpired",
        "CertificateUnknown",
        "UnknownCA",
        "AccessDenied",
        "CertificateRequired",
        "DecryptError",
    ];
    if REFUSALS.contains(&name) {
        format!(
            "the broker refused the TLS handshake (alert {name}): check that your certificate is \
             issued by the broker's CA, not expired, and has the right role"
        )
    } else {
        format!("the TLS handshake with the broker failed (alert {name})")
    }
}

/// Explains a local rustls failure from its text.
fn explain_tls_text(text: &str) -> String {
    match text.strip_prefix("invalid peer certificate: ") {
        Some(reason) => {
            // Our own refusals print as `Other(OtherError(<message>))`.
            let reason = reason.strip_prefix("Other(OtherError(").and_then(|r| r.strip_suffix("))")).unwrap_or(reason);
            format!("refused the broker's certificate: {reason}")
        }
        None => format!("TLS error with the broker: {text}"),
    }
}

/// The messages of `err` and its sources, joined by ": " (repeats dropped).
pub(super) fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut current = Some(err);
    while let Some(e) = current {
        let text = e.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        current = e.source();
    }
    parts.join(": ")
}
