//! The Azure provider's credential, resolved from `[site.capacity.azure.credential]` and the
//! standard variables of the Azure SDKs: `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`,
//! `AZURE_CLIENT_SECRET`, `AZURE_FEDERATED_TOKEN_FILE` (what a Kubernetes workload identity
//! webhook injects). The config's values win over the variables; a secret is read from
//! `client_secret_file` or `AZURE_CLIENT_SECRET`, never from the config text.

use std::path::PathBuf;

use crate::capacity::azure::ResolvedCredential;
use crate::model::capacity::{AzureCredential, AzureCredentialKind};
use crate::model::secret::SecretValue;

pub const TENANT_VAR: &str = "AZURE_TENANT_ID";
pub const CLIENT_VAR: &str = "AZURE_CLIENT_ID";
pub const SECRET_VAR: &str = "AZURE_CLIENT_SECRET";
pub const FEDERATED_TOKEN_VAR: &str = "AZURE_FEDERATED_TOKEN_FILE";

/// [`resolve_azure_credential`] with the process environment.
pub fn azure_credential_from_env(credential: &AzureCredential) -> Result<ResolvedCredential, Vec<String>> {
    resolve_azure_credential(credential, |name| std::env::var(name).ok())
}

/// Resolves the credential; every problem at once, as `azure.credential.<key>: …` (the caller
/// prefixes the site's key path). `var` looks up an environment variable.
pub fn resolve_azure_credential(
    credential: &AzureCredential,
    var: impl Fn(&str) -> Option<String>,
) -> Result<ResolvedCredential, Vec<String>> {
    let mut problems = Vec::new();
    let lookup = |given: &Option<String>, name: &str| {
        given.clone().or_else(|| var(name)).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty())
    };
    let tenant = lookup(&credential.tenant_id, TENANT_VAR);
    let client = lookup(&credential.client_id, CLIENT_VAR);
    let mut required = |value: Option<String>, key: &str, name: &str| {
        if value.is_none() {
            problems.push(format!("azure.credential.{key}: not given, and {name} is not set"));
        }
        value.unwrap_or_default()
    };
    let resolved = match credential.kind {
        AzureCredentialKind::ClientSecret => {
            let tenant_id = required(tenant, "tenant_id", TENANT_VAR);
            let client_id = required(client, "client_id", CLIENT_VAR);
            let secret = match &credential.client_secret_file {
                Some(path) => match std::fs::read_to_string(path) {
                    Ok(text) if !text.trim().is_empty() => Some(text.trim().to_owned()),
                    Ok(_) => {
                        problems.push(format!("azure.credential.client_secret_file: {} is empty", path.display()));
                        None
                    }
                    Err(e) => {
                        problems.push(format!("azure.credential.client_secret_file: {}: {e}", path.display()));
                        None
                    }
                },
                None => match var(SECRET_VAR).filter(|v| !v.trim().is_empty()) {
                    Some(secret) => Some(secret.trim().to_owned()),
                    None => {
                        problems.push(format!(
                            "azure.credential.client_secret_file: not given, and {SECRET_VAR} is not set"
                        ));
                        None
                    }
                },
            };
            ResolvedCredential::ClientSecret {
                tenant_id,
                client_id,
                secret: SecretValue::new(secret.unwrap_or_default()),
            }
        }
        AzureCredentialKind::WorkloadIdentity => {
            let tenant_id = required(tenant, "tenant_id", TENANT_VAR);
            let client_id = required(client, "client_id", CLIENT_VAR);
            let file = credential
                .federated_token_file
                .clone()
                .or_else(|| var(FEDERATED_TOKEN_VAR).filter(|v| !v.trim().is_empty()).map(PathBuf::from));
            let token_file =
                required(file.map(|f| f.display().to_string()), "federated_token_file", FEDERATED_TOKEN_VAR);
            if !token_file.is_empty() && !std::path::Path::new(&token_file).is_file() {
                problems.push(format!("azure.credential.federated_token_file: {token_file} does not exist"));
            }
            ResolvedCredential::WorkloadIdentity { tenant_id, client_id, token_file: PathBuf::from(token_file) }
        }
        AzureCredentialKind::ManagedIdentity => ResolvedCredential::ManagedIdentity { client_id: client },
    };
    if problems.is_empty() { Ok(resolved) } else { Err(problems) }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |name| map.get(name).cloned()
    }

    #[test]
    fn the_config_wins_over_the_environment_and_fills_from_it() {
        let c = AzureCredential { tenant_id: Some("t-config".into()), ..AzureCredential::default() };
        let got =
            resolve_azure_credential(&c, vars(&[(TENANT_VAR, "t-env"), (CLIENT_VAR, "c"), (SECRET_VAR, "s3cret")]));
        let Ok(ResolvedCredential::ClientSecret { tenant_id, client_id, secret }) = got else { panic!("{got:?}") };
        assert_eq!((tenant_id.as_str(), client_id.as_str(), secret.expose()), ("t-config", "c", "s3cret"));
    }

    #[test]
    fn every_missing_part_is_reported_with_its_key() {
        let problems = resolve_azure_credential(&AzureCredential::default(), vars(&[])).unwrap_err();
        assert_eq!(problems.len(), 3, "{problems:?}");
        for key in ["tenant_id", "client_id", "client_secret_file"] {
            assert!(problems.iter().any(|p| p.starts_with(&format!("azure.credential.{key}:"))), "{key}: {problems:?}");
        }
        let c = AzureCredential { kind: AzureCredentialKind::WorkloadIdentity, ..AzureCredential::default() };
        let problems = resolve_azure_credential(&c, vars(&[(FEDERATED_TOKEN_VAR, "/nonexistent/token")])).unwrap_err();
        assert!(problems.iter().any(|p| p.contains("/nonexistent/token does not exist")), "{problems:?}");
        assert!(!problems.iter().any(|p| p.contains("s3cret")));
    }

    #[test]
    fn a_managed_identity_needs_nothing() {
        let c = AzureCredential { kind: AzureCredentialKind::ManagedIdentity, ..AzureCredential::default() };
        let got = resolve_azure_credential(&c, vars(&[(CLIENT_VAR, "user-assigned")])).unwrap();
        assert_eq!(got, ResolvedCredential::ManagedIdentity { client_id: Some("user-assigned".into()) });
    }
}
