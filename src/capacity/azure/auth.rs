//! Tokens for Resource Manager, as plain OAuth 2.0 requests (no `azure_identity`: the tree builds
//! `azure_core` 0.21 for Blob storage, and a second major version of it for two HTTP calls would
//! add minutes to every fresh build):
//!
//! - client secret: `POST {authority}/{tenant}/oauth2/v2.0/token`, a form with
//!   `grant_type=client_credentials`, `client_id`, `client_secret` and
//!   `scope=https://management.azure.com/.default`;
//! - workload identity: the same form with `client_assertion_type=…jwt-bearer` and
//!   `client_assertion`, the federated token re-read from its file for every request (the
//!   platform rotates it);
//! - managed identity: `GET {imds}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=…`
//!   with `Metadata: true` (and `client_id` for a user-assigned identity).
//!
//! A token is kept until five minutes before it expires; concurrent callers share one request.

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::StatusCode;
use reqwest::header::CONTENT_TYPE;
use serde::Deserialize;
use tokio::sync::Mutex;

use super::http::{describe, retry_after};
use crate::capacity::ProviderError;
use crate::model::secret::SecretValue;

/// The scope of a Resource Manager token (Entra v2 endpoint).
pub const ARM_SCOPE: &str = "https://management.azure.com/.default";
/// The resource of a Resource Manager token (managed identity, v1 style).
pub const ARM_RESOURCE: &str = "https://management.azure.com/";
/// The assertion type of a federated (workload identity) token.
pub const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Microsoft Entra's public cloud authority.
pub const DEFAULT_AUTHORITY: &str = "https://login.microsoftonline.com";
/// The instance metadata service.
pub const DEFAULT_IMDS: &str = "http://169.254.169.254";
/// What a form field or the tenant's path segment leaves unencoded: RFC 3986's unreserved
/// characters (a tenant is a GUID or a domain name).
const FORM: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');
/// A token is renewed this long before it expires.
pub const RENEW_BEFORE: Duration = Duration::from_secs(300);

/// How the broker authenticates to Resource Manager, with its ids and secret resolved from the
/// config and the standard `AZURE_*` variables (`config::azure_env`). `Debug` never shows the
/// secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedCredential {
    ClientSecret {
        tenant_id: String,
        client_id: String,
        secret: SecretValue,
    },
    WorkloadIdentity {
        tenant_id: String,
        client_id: String,
        token_file: PathBuf,
    },
    /// The VM's (or host's) managed identity; `client_id` picks a user-assigned one.
    ManagedIdentity {
        client_id: Option<String>,
    },
}

impl ResolvedCredential {
    /// `client_secret`, `workload_identity` or `managed_identity`.
    pub fn kind(&self) -> &'static str {
        match self {
            ResolvedCredential::ClientSecret { .. } => "client_secret",
            ResolvedCredential::WorkloadIdentity { .. } => "workload_identity",
            ResolvedCredential::ManagedIdentity { .. } => "managed_identity",
        }
    }
}

/// A bearer token; `Debug` does not show it.
#[derive(Clone)]
pub(super) struct AccessToken(String);

impl AccessToken {
    pub(super) fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AccessToken(<redacted>)")
    }
}

struct Cached {
    token: AccessToken,
    renew_at: Instant,
}

/// Gets and caches Resource Manager tokens for one credential.
pub(super) struct TokenSource {
    credential: ResolvedCredential,
    authority: String,
    imds: String,
    http: reqwest::Client,
    cached: Mutex<Option<Cached>>,
}

/// The token answers of Entra (`expires_in` a number) and of the metadata service (a string).
#[derive(Deserialize)]
struct TokenReply {
    access_token: String,
    expires_in: NumberOrString,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrString {
    Number(u64),
    Text(String),
}

/// An OAuth 2.0 error answer.
#[derive(Deserialize, Default)]
struct OAuthError {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

impl TokenSource {
    pub(super) fn new(credential: ResolvedCredential, authority: &str, imds: &str, http: reqwest::Client) -> Self {
        TokenSource {
            credential,
            authority: authority.trim_end_matches('/').to_owned(),
            imds: imds.trim_end_matches('/').to_owned(),
            http,
            cached: Mutex::new(None),
        }
    }

    /// A token valid for at least [`RENEW_BEFORE`] more (when the issuer allows that long).
    pub(super) async fn token(&self) -> Result<AccessToken, ProviderError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && Instant::now() < c.renew_at
        {
            return Ok(c.token.clone());
        }
        let (token, lifetime) = self.request().await?;
        let renew_at = Instant::now() + lifetime.saturating_sub(RENEW_BEFORE);
        *cached = Some(Cached { token: token.clone(), renew_at });
        Ok(token)
    }

    /// Drops the cached token (Resource Manager refused it).
    pub(super) async fn forget(&self) {
        *self.cached.lock().await = None;
    }

    /// A POST of an `application/x-www-form-urlencoded` form to the tenant's token endpoint.
    fn form(&self, tenant_id: &str, fields: &[(&str, &str)]) -> reqwest::RequestBuilder {
        let encode = |text: &str| utf8_percent_encode(text, FORM).to_string();
        let body: Vec<String> = fields.iter().map(|(k, v)| format!("{}={}", encode(k), encode(v))).collect();
        self.http
            .post(format!("{}/{}/oauth2/v2.0/token", self.authority, encode(tenant_id)))
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body.join("&"))
    }

    async fn request(&self) -> Result<(AccessToken, Duration), ProviderError> {
        let request = match &self.credential {
            ResolvedCredential::ClientSecret { tenant_id, client_id, secret } => self.form(
                tenant_id,
                &[
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                    ("client_secret", secret.expose()),
                    ("scope", ARM_SCOPE),
                ],
            ),
            ResolvedCredential::WorkloadIdentity { tenant_id, client_id, token_file } => {
                let assertion = tokio::fs::read_to_string(token_file).await.map_err(|e| ProviderError::Invalid {
                    code: "FederatedTokenUnreadable".into(),
                    message: format!("cannot read the federated token file {}: {e}", token_file.display()),
                })?;
                self.form(
                    tenant_id,
                    &[
                        ("grant_type", "client_credentials"),
                        ("client_id", client_id),
                        ("client_assertion_type", JWT_BEARER),
                        ("client_assertion", assertion.trim()),
                        ("scope", ARM_SCOPE),
                    ],
                )
            }
            ResolvedCredential::ManagedIdentity { client_id } => {
                let mut query = vec![("api-version", "2018-02-01"), ("resource", ARM_RESOURCE)];
                if let Some(id) = client_id {
                    query.push(("client_id", id));
                }
                self.http
                    .get(format!("{}/metadata/identity/oauth2/token", self.imds))
                    .query(&query)
                    .header("Metadata", "true")
            }
        };
        let what = self.credential.kind();
        let response = request
            .send()
            .await
            .map_err(|e| ProviderError::Transient { message: format!("token request ({what}): {}", describe(&e)) })?;
        let status = response.status();
        let wait = retry_after(response.headers());
        let body = response.text().await.map_err(|e| ProviderError::Transient {
            message: format!("token request ({what}): reading the answer: {}", describe(&e)),
        })?;
        if status.is_success() {
            let reply: TokenReply = serde_json::from_str(&body).map_err(|e| ProviderError::Transient {
                message: format!("token request ({what}): unreadable answer: {e}"),
            })?;
            let seconds = match reply.expires_in {
                NumberOrString::Number(n) => n,
                NumberOrString::Text(t) => t.trim().parse().unwrap_or(0),
            };
            return Ok((AccessToken(reply.access_token), Duration::from_secs(seconds)));
        }
        let error: OAuthError = serde_json::from_str(&body).unwrap_or_default();
        let code = if error.error.is_empty() { format!("http_{}", status.as_u16()) } else { error.error };
        let message = format!("token request ({what}) refused: {}", error.error_description);
        Err(match status {
            StatusCode::TOO_MANY_REQUESTS => ProviderError::Throttled { code, retry_after: wait },
            s if s.is_server_error() => ProviderError::Transient { message: format!("{code}: {message}") },
            _ => ProviderError::Invalid { code, message },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_secret_and_the_token() {
        let c = ResolvedCredential::ClientSecret {
            tenant_id: "t".into(),
            client_id: "c".into(),
            secret: SecretValue::new("hunter2-secret"),
        };
        assert!(!format!("{c:?}").contains("hunter2"), "{c:?}");
        assert!(!format!("{:?}", AccessToken("eyJ-token".into())).contains("eyJ"));
    }

    #[test]
    fn both_token_answer_shapes_parse() {
        let entra: TokenReply =
            serde_json::from_str(r#"{"token_type":"Bearer","expires_in":3599,"access_token":"a"}"#).unwrap();
        assert!(matches!(entra.expires_in, NumberOrString::Number(3599)));
        let imds: TokenReply =
            serde_json::from_str(r#"{"access_token":"b","expires_in":"3599","expires_on":"1","token_type":"Bearer"}"#)
                .unwrap();
        assert!(matches!(imds.expires_in, NumberOrString::Text(ref t) if t == "3599"));
    }
}
