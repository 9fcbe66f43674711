//! Job secrets at rest: the broker's key file and AES-256-GCM sealing of a job's `secret_env`.
//!
//! The key file (`[secrets] key_file`, by default `secrets.key` next to the database) holds one
//! key per line, `<id> <base64 of 32 random bytes>`, `#` comments allowed; the first key is
//! current and seals new secrets, the others still open what they sealed (rotation: put a new line
//! first, keep the old ones while jobs sealed with them may still run). A missing file is created
//! (mode 0600) with a fresh key; a file that group or others may read or write is refused.
//!
//! A job's secrets are sealed once, at submit, with a fresh random nonce and the job id as
//! associated data (a sealed value copied to another job's row does not open), and stored as
//! `aes256gcm:<key id>:<base64 of nonce | ciphertext | tag>`. They are opened only to build the
//! agent's assignment. Lose the key file and the stored secrets are gone: back it up with the
//! database.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

use crate::model::secret::{SecretEnv, SecretValue};

/// The prefix of a sealed value: the algorithm, then the key id.
const SCHEME: &str = "aes256gcm";
const KEY_BYTES: usize = 32;
const TAG_BYTES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("secrets key file {path}: {message}")]
    KeyFile { path: String, message: String },
    #[error("secret key {0} not found")]
    UnknownKey(String),
    #[error("job secrets do not open: tampered with, or sealed for another job")]
    Tampered,
    #[error("job secrets are not sealed in a known format")]
    Malformed,
    #[error("cannot seal job secrets: the system's random source failed")]
    Random,
}

/// The broker's secret keys; the first is current.
pub struct SecretKeys {
    keys: Vec<(String, LessSafeKey)>,
    rng: SystemRandom,
}

/// Key ids only: never key material.
impl fmt::Debug for SecretKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretKeys").field("ids", &self.keys.iter().map(|(id, _)| id).collect::<Vec<_>>()).finish()
    }
}

impl SecretKeys {
    /// Reads the key file, creating it (0600, one fresh key; logged at INFO) when it is missing.
    pub fn load_or_create(path: &Path) -> Result<Self, SecretsError> {
        let error = |message: String| SecretsError::KeyFile { path: path.display().to_string(), message };
        match std::fs::metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(id) = create(path).map_err(|e| error(format!("cannot create it: {e}")))? {
                    tracing::info!(
                        path = %path.display(),
                        key_id = id,
                        "created a new job secrets key file; back it up with the database (without it stored job secrets are lost)"
                    );
                }
            }
            Err(e) => return Err(error(e.to_string())),
        }
        let meta = std::fs::metadata(path).map_err(|e| error(e.to_string()))?;
        if !meta.is_file() {
            return Err(error("is not a file".into()));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(error(format!(
                "has mode {mode:04o}; group and others must have no access to it (chmod 600 {})",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let keys = Self::parse(&text).map_err(error)?;
        tracing::info!(path = %path.display(), current = keys.current_id(), keys = keys.keys.len(), "job secrets keys loaded");
        Ok(keys)
    }

    /// Parses the key file's text: `<id> <base64 key>` lines, `#` comments, blank lines.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut keys: Vec<(String, LessSafeKey)> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields = line.split_whitespace();
            let (Some(id), Some(key), None) = (fields.next(), fields.next(), fields.next()) else {
                return Err(format!("line {n}: expected `<id> <base64 key>`"));
            };
            if !is_key_id(id) {
                return Err(format!("line {n}: a key id is 1 to 64 of [A-Za-z0-9._-]"));
            }
            let bytes = STANDARD.decode(key).map_err(|_| format!("line {n}: key {id} is not base64"))?;
            if bytes.len() != KEY_BYTES {
                return Err(format!(
                    "line {n}: key {id} is {} bytes, AES-256 needs {KEY_BYTES} (head -c 32 /dev/urandom | base64)",
                    bytes.len()
                ));
            }
            if keys.iter().any(|(k, _)| k == id) {
                return Err(format!("line {n}: key id {id} is given twice"));
            }
            let key = UnboundKey::new(&AES_256_GCM, &bytes).map_err(|_| format!("line {n}: key {id} is unusable"))?;
            keys.push((id.to_string(), LessSafeKey::new(key)));
        }
        if keys.is_empty() {
            return Err("holds no key (one `<id> <base64 key>` per line; the first is current)".into());
        }
        Ok(Self { keys, rng: SystemRandom::new() })
    }

    /// The id of the key new secrets are sealed with.
    pub fn current_id(&self) -> &str {
        &self.keys[0].0
    }

    /// Seals a job's secret values with the current key, bound to `job_id`.
    pub fn seal(&self, job_id: &str, env: &SecretEnv) -> Result<String, SecretsError> {
        let clear: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (k.as_str(), v.expose())).collect();
        let mut buf = serde_json::to_vec(&clear).expect("a map of strings serialises");
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| SecretsError::Random)?;
        let (id, key) = &self.keys[0];
        key.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::from(job_id.as_bytes()), &mut buf)
            .map_err(|_| SecretsError::Random)?;
        let mut sealed = Vec::with_capacity(NONCE_LEN + buf.len());
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&buf);
        Ok(format!("{SCHEME}:{id}:{}", STANDARD.encode(sealed)))
    }

    /// Opens what [`SecretKeys::seal`] made for `job_id`, with the key it names.
    pub fn open(&self, job_id: &str, sealed: &str) -> Result<SecretEnv, SecretsError> {
        let mut parts = sealed.splitn(3, ':');
        let (Some(SCHEME), Some(id), Some(body)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(SecretsError::Malformed);
        };
        let (_, key) = self.keys.iter().find(|(k, _)| k == id).ok_or_else(|| SecretsError::UnknownKey(id.into()))?;
        let mut bytes = STANDARD.decode(body).map_err(|_| SecretsError::Malformed)?;
        if bytes.len() < NONCE_LEN + TAG_BYTES {
            return Err(SecretsError::Malformed);
        }
        let (nonce, in_out) = bytes.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SecretsError::Malformed)?;
        let clear =
            key.open_in_place(nonce, Aad::from(job_id.as_bytes()), in_out).map_err(|_| SecretsError::Tampered)?;
        // Never the parser's message: it could quote a value.
        let env: BTreeMap<String, String> = serde_json::from_slice(clear).map_err(|_| SecretsError::Malformed)?;
        Ok(env.into_iter().map(|(k, v)| (k, SecretValue::new(v))).collect())
    }
}

fn is_key_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Writes a new key file (0600, its directory 0700 when made here) with one fresh key; `None`
/// when another process made it first.
fn create(path: &Path) -> std::io::Result<Option<String>> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        crate::private_files::create_dir_all(dir)?;
    }
    let mut key = [0u8; KEY_BYTES];
    SystemRandom::new().fill(&mut key).map_err(|_| std::io::Error::other("the system's random source failed"))?;
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let id = format!("k{secs}");
    let text = format!(
        "# hybroker job secrets keys: `<id> <base64 of 32 bytes>` per line; the first seals new secrets,\n\
         # the others still open old ones. Back this file up with the database: without it, stored job\n\
         # secrets cannot be read.\n{id} {}\n",
        STANDARD.encode(key)
    );
    let file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path);
    let mut file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(None),
        Err(e) => return Err(e),
    };
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "k1 AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const K2: &str = "k2 ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    fn env(pairs: &[(&str, &str)]) -> SecretEnv {
        pairs.iter().map(|(k, v)| (k.to_string(), SecretValue::new(*v))).collect()
    }

    fn exposed(env: &SecretEnv) -> Vec<(&str, &str)> {
        env.iter().map(|(k, v)| (k.as_str(), v.expose())).collect()
    }

    #[test]
    fn sealed_values_open_for_their_job_only_and_never_show() {
        let keys = SecretKeys::parse(&format!("# comment\n\n{K1}\n")).unwrap();
        let secrets = env(&[("TOKEN", "hunter2-hunter2"), ("PIN", "0000")]);
        let sealed = keys.seal("job-1", &secrets).unwrap();
        assert!(sealed.starts_with("aes256gcm:k1:"), "{sealed}");
        assert!(!sealed.contains("hunter2") && !sealed.contains("TOKEN"), "{sealed}");
        assert_eq!(exposed(&keys.open("job-1", &sealed).unwrap()), exposed(&secrets));
        // A fresh nonce per seal: the same secrets never seal the same twice.
        assert_ne!(keys.seal("job-1", &secrets).unwrap(), sealed);
        // The job id is the associated data: moved to another job's row, it does not open.
        assert!(matches!(keys.open("job-2", &sealed), Err(SecretsError::Tampered)));
        assert!(!format!("{keys:?}").contains("AAEC"), "{keys:?}");
    }

    #[test]
    fn tampered_or_malformed_ciphertext_is_refused() {
        let keys = SecretKeys::parse(K1).unwrap();
        let sealed = keys.seal("job-1", &env(&[("A", "b")])).unwrap();
        let body = sealed.strip_prefix("aes256gcm:k1:").unwrap();
        let mut bytes = STANDARD.decode(body).unwrap();
        for i in [0, NONCE_LEN, bytes.len() - 1] {
            bytes[i] ^= 1;
            let tampered = format!("aes256gcm:k1:{}", STANDARD.encode(&bytes));
            assert!(matches!(keys.open("job-1", &tampered), Err(SecretsError::Tampered)), "byte {i}");
            bytes[i] ^= 1;
        }
        let short = format!("aes256gcm:k1:{}", STANDARD.encode(&bytes[..NONCE_LEN + TAG_BYTES - 1]));
        for bad in ["", "aes256gcm:k1", "chacha:k1:AAAA", "aes256gcm:k1:not base64!", short.as_str()] {
            assert!(matches!(keys.open("job-1", bad), Err(SecretsError::Malformed)), "{bad:?}");
        }
    }

    #[test]
    fn rotation_opens_old_key_ids_and_an_unknown_id_is_a_clear_error() {
        let old = SecretKeys::parse(K1).unwrap();
        let sealed = old.seal("job-1", &env(&[("A", "b")])).unwrap();
        let rotated = SecretKeys::parse(&format!("{K2}\n{K1}\n")).unwrap();
        assert_eq!(rotated.current_id(), "k2");
        assert!(rotated.seal("job-2", &env(&[("A", "b")])).unwrap().starts_with("aes256gcm:k2:"));
        assert_eq!(exposed(&rotated.open("job-1", &sealed).unwrap()), [("A", "b")]);
        let dropped = SecretKeys::parse(K2).unwrap();
        let err = dropped.open("job-1", &sealed).unwrap_err();
        assert!(matches!(err, SecretsError::UnknownKey(_)));
        assert_eq!(err.to_string(), "secret key k1 not found");
        // Same id, other key material (a key file made anew): refused, never garbage.
        let other = SecretKeys::parse("k1 ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=").unwrap();
        assert!(matches!(other.open("job-1", &sealed), Err(SecretsError::Tampered)));
    }

    #[test]
    fn bad_key_files_are_refused_with_the_line_and_without_key_material() {
        let cases = [
            ("", "holds no key"),
            ("# only a comment\n", "holds no key"),
            ("k1\n", "line 1: expected"),
            ("k1 a b\n", "line 1: expected"),
            ("k:1 AAAA\n", "line 1: a key id"),
            ("k1 !!!!\n", "line 1: key k1 is not base64"),
            ("k1 c2hvcnQ=\n", "line 1: key k1 is 5 bytes"),
            (&format!("{K1}\n{K1}\n"), "line 2: key id k1 is given twice"),
        ];
        for (text, want) in cases {
            let err = SecretKeys::parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
            assert!(!err.contains("AAEC") && !err.contains("c2hv"), "{err}");
        }
    }

    #[test]
    fn a_missing_key_file_is_created_0600_and_a_readable_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/secrets.key");
        let keys = SecretKeys::load_or_create(&path).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let sealed = keys.seal("job-1", &env(&[("A", "b")])).unwrap();
        // Loaded again, the same key opens what it sealed.
        let again = SecretKeys::load_or_create(&path).unwrap();
        assert_eq!(again.current_id(), keys.current_id());
        assert_eq!(exposed(&again.open("job-1", &sealed).unwrap()), [("A", "b")]);
        for wide in [0o644, 0o640, 0o604, 0o660] {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(wide)).unwrap();
            let err = SecretKeys::load_or_create(&path).unwrap_err().to_string();
            assert!(err.contains(&format!("has mode {wide:04o}")) && err.contains("chmod 600"), "{err}");
        }
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
        SecretKeys::load_or_create(&path).unwrap();
        let err = SecretKeys::load_or_create(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is not a file") || err.contains("mode"), "{err}");
    }
}
