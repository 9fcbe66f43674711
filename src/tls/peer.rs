//! What revocation needs to know of a peer certificate ([`PeerCert`]: identity, serial, time of
//! issue, expiry), and the deny-list check ([`DenyList`]) the broker passes into its TLS server so
//! that the tls layer refuses revoked certificates without knowing where the list comes from.

use crate::model::UnixMillis;
/// How far a certificate's NotBefore lies before the moment it was issued: the time of issue is
/// NotBefore + `BACKDATE` (`pki` sets it so).
pub use crate::pki::BACKDATE;

/// Answers whether a certificate is revoked. Implemented by the broker's revocation list.
pub trait DenyList: Send + Sync + std::fmt::Debug {
    /// The reason `identity_uri`'s certificate `serial_hex` (normalised by [`normalize_serial`]),
    /// issued at `issued_at`, is revoked; `None` when it is not.
    fn denies(&self, identity_uri: &str, serial_hex: &str, issued_at: UnixMillis) -> Option<String>;

    /// [`DenyList::denies`] for a parsed peer certificate.
    fn denies_peer(&self, peer: &PeerCert) -> Option<String> {
        self.denies(&peer.identity_uri, &peer.serial_hex, peer.issued_at)
    }
}

/// The facts of a certificate that revocation and the expiry metric look at (read by
/// `PeerCert::from_der`, beside the other certificate parsing in `verify`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The single URI SAN.
    pub identity_uri: String,
    /// Serial number, lower-case hex without leading zeros ([`normalize_serial`]).
    pub serial_hex: String,
    /// NotBefore + [`BACKDATE`].
    pub issued_at: UnixMillis,
    /// NotAfter.
    pub not_after: UnixMillis,
}

/// A serial as the deny list keys it: lower-case hex, colons and spaces dropped, no leading
/// zeros (`0A:1b` → `a1b`); `None` when it is empty or not hexadecimal.
pub fn normalize_serial(serial: &str) -> Option<String> {
    let hex: String = serial.chars().filter(|c| *c != ':' && !c.is_whitespace()).collect();
    let hex = hex.strip_prefix("0x").unwrap_or(&hex).to_ascii_lowercase();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let trimmed = hex.trim_start_matches('0');
    Some(if trimmed.is_empty() { "0".to_string() } else { trimmed.to_string() })
}

#[cfg(test)]
mod tests {
    use super::normalize_serial;

    #[test]
    fn serials_are_normalised() {
        assert_eq!(normalize_serial("0A:1b").as_deref(), Some("a1b"));
        assert_eq!(normalize_serial("00").as_deref(), Some("0"));
        assert_eq!(normalize_serial("0x7F").as_deref(), Some("7f"));
        assert_eq!(normalize_serial("zz"), None);
        assert_eq!(normalize_serial(""), None);
    }
}
