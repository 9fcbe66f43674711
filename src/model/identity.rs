//! SPIFFE-style workload identities carried as the single URI SAN of every internal certificate.
//!
//! Shapes (docs/design.md §6):
//! - `spiffe://<trust-domain>/agent/<site>/<node>`: an agent speaks only for its own site and node;
//! - `spiffe://<trust-domain>/<role>/<name>` for the broker, gateways and admins.
//!
//! Every segment uses one rule ([`validate_name`]): 1..=63 characters of `[A-Za-z0-9._-]`, and
//! not `.` or `..`. The trust domain follows the SPIFFE rule: lowercase letters, digits, `.`, `-`
//! and `_`. Parsing is strict: no port, user info, query, fragment, percent-encoding, empty or
//! extra segments. Pure: no I/O.

use std::fmt;
use std::str::FromStr;

/// URI scheme prefix of every identity.
const SCHEME: &str = "spiffe://";
/// Longest accepted segment (site, node, name).
const MAX_NAME_LEN: usize = 63;
/// Longest accepted trust domain (a DNS-name-like string).
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Errors from building or parsing an identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// The URI does not start with `spiffe://`.
    #[error("identity {0:?} is not a spiffe:// uri")]
    NotSpiffe(String),
    /// A segment breaks the naming rule.
    #[error("invalid {kind} {value:?}: {reason}")]
    InvalidName {
        /// What the segment names ("site", "node", "name", "trust domain", ...).
        kind: String,
        /// The offending value.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The role segment is not one of the known roles.
    #[error("unknown role {0:?} (expected broker, agent, gateway or admin)")]
    UnknownRole(String),
    /// The path has the wrong number of segments for its role.
    #[error("identity {uri:?} must have the form {expected}")]
    WrongShape {
        /// The URI that was parsed.
        uri: String,
        /// The expected form.
        expected: &'static str,
    },
}

/// The role a certificate grants; the first path segment of the identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// The control plane (server authentication).
    Broker,
    /// A GPU node daemon (client authentication).
    Agent,
    /// The public HTTP gateway (client authentication).
    Gateway,
    /// An operator tool (client authentication).
    Admin,
}

impl Role {
    /// All roles, in declaration order.
    pub const ALL: [Role; 4] = [Role::Broker, Role::Agent, Role::Gateway, Role::Admin];

    /// The lowercase name used in URIs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Broker => "broker",
            Role::Agent => "agent",
            Role::Gateway => "gateway",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| IdentityError::UnknownRole(s.to_string()))
    }
}

/// A parsed workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// The trust domain (the URI authority).
    pub trust_domain: String,
    /// The role (first path segment).
    pub role: Role,
    /// The node id for agents, otherwise the name.
    pub name: String,
    /// The site, for agents only.
    pub site: Option<String>,
}

impl Identity {
    /// An agent identity `spiffe://<trust_domain>/agent/<site>/<node>` (not validated; see
    /// [`Identity::validate`]).
    pub fn agent(trust_domain: impl Into<String>, site: impl Into<String>, node: impl Into<String>) -> Self {
        Identity { trust_domain: trust_domain.into(), role: Role::Agent, name: node.into(), site: Some(site.into()) }
    }

    /// A non-agent identity `spiffe://<trust_domain>/<role>/<name>` (not validated). For agents use
    /// [`Identity::agent`]: an agent made here has no site and fails [`Identity::validate`].
    pub fn new(trust_domain: impl Into<String>, role: Role, name: impl Into<String>) -> Self {
        Identity { trust_domain: trust_domain.into(), role, name: name.into(), site: None }
    }

    /// Checks every part against the naming rules and the site rule (agents have one, others not).
    pub fn validate(&self) -> Result<(), IdentityError> {
        validate_trust_domain(&self.trust_domain)?;
        match (self.role, &self.site) {
            (Role::Agent, Some(site)) => {
                validate_name("site", site)?;
                validate_name("node", &self.name)
            }
            (Role::Agent, None) => Err(IdentityError::WrongShape {
                uri: self.uri(),
                expected: "spiffe://<trust-domain>/agent/<site>/<node>",
            }),
            (_, Some(_)) => {
                Err(IdentityError::WrongShape { uri: self.uri(), expected: "spiffe://<trust-domain>/<role>/<name>" })
            }
            (_, None) => validate_name("name", &self.name),
        }
    }

    /// The identity as a URI (the certificate's URI SAN).
    pub fn uri(&self) -> String {
        match &self.site {
            Some(site) => format!("{SCHEME}{}/{}/{site}/{}", self.trust_domain, self.role, self.name),
            None => format!("{SCHEME}{}/{}/{}", self.trust_domain, self.role, self.name),
        }
    }

    /// Parses and validates an identity URI; strict (see the module docs).
    pub fn parse(uri: &str) -> Result<Identity, IdentityError> {
        let rest = uri.strip_prefix(SCHEME).ok_or_else(|| IdentityError::NotSpiffe(uri.to_string()))?;
        let mut parts = rest.split('/');
        let trust_domain = parts.next().unwrap_or_default();
        validate_trust_domain(trust_domain)?;
        let role_str = parts.next().ok_or_else(|| IdentityError::WrongShape {
            uri: uri.to_string(),
            expected: "spiffe://<trust-domain>/<role>/<name>",
        })?;
        let role: Role = role_str.parse()?;
        let segments: Vec<&str> = parts.collect();
        let identity = match (role, segments.as_slice()) {
            (Role::Agent, [site, node]) => Identity::agent(trust_domain, *site, *node),
            (Role::Agent, _) => {
                return Err(IdentityError::WrongShape {
                    uri: uri.to_string(),
                    expected: "spiffe://<trust-domain>/agent/<site>/<node>",
                });
            }
            (_, [name]) => Identity::new(trust_domain, role, *name),
            (_, _) => {
                return Err(IdentityError::WrongShape {
                    uri: uri.to_string(),
                    expected: "spiffe://<trust-domain>/<role>/<name>",
                });
            }
        };
        identity.validate()?;
        Ok(identity)
    }

    /// The agent id `<site>/<node>` for agents, otherwise the name.
    pub fn agent_id(&self) -> String {
        match &self.site {
            Some(site) => format!("{site}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri())
    }
}

/// Checks one identity segment (site, node, name): 1..=63 characters of `[A-Za-z0-9._-]`, not
/// `.` or `..`. `kind` names the segment in the error message.
pub fn validate_name(kind: &str, s: &str) -> Result<(), IdentityError> {
    let invalid = |reason| IdentityError::InvalidName { kind: kind.to_string(), value: s.to_string(), reason };
    if s.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if s.len() > MAX_NAME_LEN {
        return Err(invalid("must be at most 63 characters"));
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(invalid("may only contain letters, digits, '.', '_' and '-'"));
    }
    if s == "." || s == ".." {
        return Err(invalid("must not be '.' or '..'"));
    }
    Ok(())
}

/// Checks a trust domain: 1..=255 characters of lowercase letters, digits, `.`, `_` and `-`.
pub fn validate_trust_domain(s: &str) -> Result<(), IdentityError> {
    let invalid =
        |reason| IdentityError::InvalidName { kind: "trust domain".to_string(), value: s.to_string(), reason };
    if s.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if s.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(invalid("must be at most 255 characters"));
    }
    if !s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(invalid("may only contain lowercase letters, digits, '.', '_' and '-'"));
    }
    if s == "." || s == ".." {
        return Err(invalid("must not be '.' or '..'"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_round_trip() {
        let id = Identity::agent("hybroker.test", "lab-sto", "gpu-01");
        assert_eq!(id.uri(), "spiffe://hybroker.test/agent/lab-sto/gpu-01");
        assert_eq!(id.agent_id(), "lab-sto/gpu-01");
        assert_eq!(Identity::parse(&id.uri()).unwrap(), id);
        assert_eq!(id.to_string(), id.uri());
    }

    #[test]
    fn other_roles_round_trip() {
        for role in [Role::Broker, Role::Gateway, Role::Admin] {
            let id = Identity::new("example.org", role, "main_1");
            assert_eq!(id.uri(), format!("spiffe://example.org/{role}/main_1"));
            assert_eq!(id.agent_id(), "main_1");
            assert_eq!(Identity::parse(&id.uri()).unwrap(), id);
        }
    }

    #[test]
    fn role_display_and_parse() {
        for role in Role::ALL {
            assert_eq!(role.to_string().parse::<Role>().unwrap(), role);
        }
        assert!(matches!("Broker".parse::<Role>(), Err(IdentityError::UnknownRole(_))));
    }

    #[test]
    fn parse_refuses_malformed_uris() {
        let bad = [
            "",
            "https://td/broker/main",
            "SPIFFE://td/broker/main",
            "spiffe://",
            "spiffe:///broker/main",
            "spiffe://td",
            "spiffe://td/",
            "spiffe://td/broker",
            "spiffe://td/broker/",
            "spiffe://td/broker/main/",
            "spiffe://td/broker/main/extra",
            "spiffe://td/agent/node-only",
            "spiffe://td/agent/site/node/extra",
            "spiffe://td/agent//node",
            "spiffe://td/root/main",
            "spiffe://TD/broker/main",
            "spiffe://td:443/broker/main",
            "spiffe://user@td/broker/main",
            "spiffe://td/broker/main?x=1",
            "spiffe://td/broker/main#frag",
            "spiffe://td/broker/ma%20in",
            "spiffe://td/broker/..",
            "spiffe://td/agent/./node",
            "spiffe://td/broker/mä",
        ];
        for uri in bad {
            assert!(Identity::parse(uri).is_err(), "accepted {uri:?}");
        }
    }

    #[test]
    fn parse_errors_are_clear() {
        let err = Identity::parse("spiffe://td/agent/lab/bad name").unwrap_err();
        assert_eq!(err.to_string(), "invalid node \"bad name\": may only contain letters, digits, '.', '_' and '-'");
        let err = Identity::parse("spiffe://td/agent/gpu-01").unwrap_err();
        assert!(err.to_string().contains("agent/<site>/<node>"), "{err}");
    }

    #[test]
    fn validate_name_rules() {
        assert!(validate_name("site", "a").is_ok());
        assert!(validate_name("site", "A.b_c-9").is_ok());
        assert!(validate_name("site", &"x".repeat(63)).is_ok());
        let err = validate_name("site", &"x".repeat(64)).unwrap_err();
        assert!(err.to_string().starts_with("invalid site "), "{err}");
        assert!(validate_name("node", "").is_err());
        assert!(validate_name("node", "a/b").is_err());
        assert!(validate_name("node", "..").is_err());
    }

    #[test]
    fn validate_checks_site_rule() {
        assert!(Identity::new("td", Role::Agent, "n").validate().is_err());
        let mut broker = Identity::new("td", Role::Broker, "main");
        assert!(broker.validate().is_ok());
        broker.site = Some("lab".into());
        assert!(broker.validate().is_err());
        assert!(Identity::agent("td", "lab", "n").validate().is_ok());
        assert!(Identity::agent("Td", "lab", "n").validate().is_err());
    }
}
