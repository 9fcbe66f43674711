//! `hybroker admin backup DIR` and `admin restore DIR`: the state a broker cannot rebuild, copied
//! on the broker's host while it runs, and put back for a fresh broker.
//!
//! A backup holds `broker.db` (an online snapshot of the job store: jobs, events, agents, API key
//! hashes, join tokens, revocations), `secrets.key` (without it the jobs' stored secrets cannot be
//! opened), `ca/` (the issuing CA that signs agents' certificates, and the root key if it is kept
//! there), the config it was taken with, and `MANIFEST.json` (each file's size and SHA-256). The
//! broker's own TLS certificate and key are not in it: the CA re-issues them
//! (`hybroker pki issue --role broker`).
//!
//! A restore checks every file against the manifest, then writes each to where the *current*
//! config puts it, never over an existing file that differs (the database must not exist at all:
//! stop the broker and move the old one away first).

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::BrokerConfig;
use crate::pki::CaPaths;
use crate::private_files;
use crate::store::snapshot::{self, SnapshotSummary};

pub const MANIFEST: &str = "MANIFEST.json";
const DB: &str = "broker.db";
const SECRETS: &str = "secrets.key";
const CONFIG: &str = "broker.toml";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("backup {dir}: {message}")]
    Invalid { dir: String, message: String },
}

fn file_error(path: &Path, e: impl std::fmt::Display) -> BackupError {
    BackupError::File { path: path.display().to_string(), message: e.to_string() }
}

/// `MANIFEST.json`: what a backup holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// RFC 3339.
    pub created_at: String,
    /// The hybroker that took it (`hybroker --version`).
    pub version: String,
    pub schema_version: i64,
    pub jobs: i64,
    pub files: Vec<BackedUp>,
}

/// One file of a backup.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BackedUp {
    /// Relative to the backup directory: `broker.db`, `secrets.key`, `ca/<name>`, `broker.toml`.
    pub name: String,
    /// Where it was taken from.
    pub source: String,
    pub bytes: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// Takes a backup of the broker `config` describes into `dir` (new or empty; made 0700).
pub async fn backup(
    config: &BrokerConfig,
    config_path: &Path,
    dir: &Path,
    version: &str,
) -> Result<Manifest, BackupError> {
    if dir.exists() && fs::read_dir(dir).map_err(|e| file_error(dir, e))?.next().is_some() {
        return Err(file_error(dir, "not empty; a backup goes into a new or empty directory"));
    }
    private_files::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    let db = snapshot::snapshot(&config.store.path, &dir.join(DB)).await?;
    let mut files = vec![described(dir, DB, &config.store.path)?];
    let secrets = config.secrets_key_file();
    if secrets.is_file() {
        files.push(copied(&secrets, dir, SECRETS)?);
    }
    for (name, source) in ca_files(config) {
        if source.is_file() {
            files.push(copied(&source, dir, &name)?);
        }
    }
    files.push(copied(config_path, dir, CONFIG)?);
    let SnapshotSummary { schema_version, jobs, .. } = db;
    let created_at =
        time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    let manifest = Manifest { created_at, version: version.to_string(), schema_version, jobs, files };
    let text = serde_json::to_string_pretty(&manifest).expect("a manifest serialises");
    private_files::write_new(&dir.join(MANIFEST), text.as_bytes()).map_err(|e| file_error(dir, e))?;
    Ok(manifest)
}

/// What a restore did with each file: (backup name, where it went, written or already there).
pub type Restored = Vec<(String, PathBuf, bool)>;

/// Restores the backup in `dir` to the places `config` names. Nothing is written unless every file
/// matches the manifest and no existing file stands in the way.
pub async fn restore(config: &BrokerConfig, dir: &Path) -> Result<Restored, BackupError> {
    let invalid = |message: String| BackupError::Invalid { dir: dir.display().to_string(), message };
    let text = fs::read_to_string(dir.join(MANIFEST)).map_err(|e| invalid(format!("{MANIFEST}: {e}")))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| invalid(format!("{MANIFEST}: {e}")))?;
    let ca = ca_files(config);
    let mut plan = Vec::new();
    for file in &manifest.files {
        let path = dir.join(&file.name);
        let (bytes, sha256) = digest(&path)?;
        if (bytes, sha256.as_str()) != (file.bytes, file.sha256.as_str()) {
            return Err(invalid(format!("{} does not match the manifest (damaged or changed)", file.name)));
        }
        let target = match file.name.as_str() {
            DB => config.store.path.clone(),
            SECRETS => config.secrets_key_file(),
            CONFIG => continue,
            name => match ca.iter().find(|(n, _)| n == name) {
                Some((_, target)) => target.clone(),
                None if config.broker.ca_dir.is_none() => {
                    return Err(invalid(format!(
                        "it holds the issuing CA ({name}) but this config has no broker.ca_dir to restore it to"
                    )));
                }
                None => return Err(invalid(format!("unknown file {name} in the manifest"))),
            },
        };
        plan.push((file.name.clone(), path, target, sha256));
    }
    let db = plan.iter().find(|(name, ..)| name == DB).ok_or_else(|| invalid(format!("no {DB} in the manifest")))?;
    snapshot::summarize(&db.1).await?;
    for store_file in crate::store::store_files(&config.store.path) {
        if store_file.exists() {
            return Err(file_error(
                &store_file,
                "exists: a restore never writes over a database; stop the broker and move its database away first",
            ));
        }
    }
    let mut restored = Vec::new();
    for (name, _, target, sha256) in &plan {
        if target.exists() {
            if digest(target)?.1 == *sha256 {
                restored.push((name.clone(), target.clone(), false));
                continue;
            }
            return Err(file_error(target, format!("exists and differs from the backup's {name}; move it away first")));
        }
    }
    for (name, source, target, _) in plan {
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            private_files::create_dir_all(parent).map_err(|e| file_error(parent, e))?;
        }
        if restored.iter().any(|(n, _, _)| *n == name) {
            continue;
        }
        copy_private(&source, &target)?;
        restored.push((name, target, true));
    }
    Ok(restored)
}

/// The issuing CA's files as (backup name, path), when the broker has a CA directory.
fn ca_files(config: &BrokerConfig) -> Vec<(String, PathBuf)> {
    let Some(ca_dir) = &config.broker.ca_dir else { return vec![] };
    let paths = CaPaths::in_dir(ca_dir);
    [paths.cert, paths.root_key, paths.issuing_cert, paths.key, paths.trust_domain, ca_dir.join(crate::pki::OLD_CA_KEY)]
        .into_iter()
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?.to_string();
            Some((format!("ca/{name}"), path))
        })
        .collect()
}

fn copied(source: &Path, dir: &Path, name: &str) -> Result<BackedUp, BackupError> {
    let target = dir.join(name);
    if let Some(parent) = target.parent() {
        private_files::create_dir_all(parent).map_err(|e| file_error(parent, e))?;
    }
    copy_private(source, &target)?;
    described(dir, name, source)
}

fn described(dir: &Path, name: &str, source: &Path) -> Result<BackedUp, BackupError> {
    let (bytes, sha256) = digest(&dir.join(name))?;
    Ok(BackedUp { name: name.to_string(), source: source.display().to_string(), bytes, sha256 })
}

/// Copies `source` to a new 0600 file at `target` (through a temporary name, renamed when whole).
fn copy_private(source: &Path, target: &Path) -> Result<(), BackupError> {
    let partial = target.with_extension("partial");
    let _ = fs::remove_file(&partial);
    private_files::create_file(&partial).map_err(|e| file_error(&partial, e))?;
    let mut from = fs::File::open(source).map_err(|e| file_error(source, e))?;
    let mut to = fs::OpenOptions::new().write(true).open(&partial).map_err(|e| file_error(&partial, e))?;
    std::io::copy(&mut from, &mut to).map_err(|e| file_error(target, e))?;
    to.sync_all().map_err(|e| file_error(target, e))?;
    fs::rename(&partial, target).map_err(|e| file_error(target, e))
}

/// A file's size and SHA-256 (lowercase hex).
fn digest(path: &Path) -> Result<(u64, String), BackupError> {
    let mut file = fs::File::open(path).map_err(|e| file_error(path, e))?;
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| file_error(path, e))?;
        if n == 0 {
            break;
        }
        context.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, super::keys::hex(context.finish().as_ref())))
}
