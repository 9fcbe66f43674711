//! Moves an attempt's data: inputs from object storage into the work directory before the process
//! starts ([`stage_in`]), outputs from the work directory to object storage after it ended
//! ([`stage_out`]).
//!
//! The agent holds no credentials: every request is a [`Presigned`] one the broker minted, and a
//! [`UrlSource`] (the broker) gives fresh ones when they expire. Requests run with bounded
//! concurrency (inputs larger than [`StagingLimits::range_size`] as parallel ranged GETs written at
//! their offsets), transient failures are retried with jittered exponential backoff, and the bytes
//! are checked: every response's length, the whole file's MD5 where it is known (the broker's, an
//! S3 ETag of a single-part object, an Azure `Content-MD5`), and every upload carries `Content-MD5`
//! so the store refuses damaged bodies. Big inputs are hashed in order from the page cache while
//! later ranges still arrive, so hashing overlaps downloading.
//!
//! Stage-out never follows a symbolic link: the work directory belongs to the job's user while the
//! agent may be root. Every path below the work directory is opened one component at a time,
//! relative to the already opened parent, with `O_NOFOLLOW` (Linux: through `/proc/self/fd`), and
//! each opened file is checked to be the one that was found. A declared output path that is, or
//! passes through, a symbolic link or a special file is an error; symbolic links and special files
//! found inside an output directory are skipped and listed in [`StageStats::skipped`].
//!
//! Errors name the file, the HTTP status and the store's error code; never a URL's query (where
//! the signature lives).

mod download;
mod md5sum;
mod request;
mod upload;
mod walk;

use std::fmt;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;

use crate::model::presigned::{CompletedPart, Presigned};

pub use download::stage_in;
pub use upload::stage_out;

/// Where fresh presigned requests come from: the broker over gRPC (a fake in tests). Errors are
/// texts for people.
#[async_trait]
pub trait UrlSource: Send + Sync {
    /// Fresh GETs for the inputs with these indices (into the `inputs` of [`stage_in`]), in the
    /// same order.
    async fn input_urls(&self, indices: &[u32]) -> Result<Vec<Presigned>, String>;

    /// How to upload each found output file, in the same order.
    async fn plan_outputs(&self, files: &[FoundFile]) -> Result<Vec<UploadPlan>, String>;

    /// Fresh part URLs of a multipart upload, in the same order as `numbers` (1-based).
    async fn part_urls(
        &self,
        output: u32,
        key: &str,
        upload_id: &str,
        numbers: &[u32],
    ) -> Result<Vec<Presigned>, String>;

    /// Completes the multipart uploads (single PUTs need nothing).
    async fn complete_outputs(&self, uploads: Vec<CompletedUpload>) -> Result<(), String>;
}

/// One object to download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    /// Where it lands, relative to the work directory (`/` separated; no `..`, not absolute).
    pub path: String,
    /// Its size as the store listed it; a response of another length is an error.
    pub size: u64,
    /// Its MD5 in base64, when the store knows it; checked over the whole file.
    pub md5: Option<String>,
}

/// One file found in an output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundFile {
    /// The output it belongs to: an index into the `outputs` of [`stage_out`].
    pub output: u32,
    /// Relative to that output's path, `/` separated; `""` when the output path is itself a file.
    pub path: String,
    /// Its size when it was found.
    pub size: u64,
}

/// How the broker wants one found file uploaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UploadPlan {
    /// One PUT of the whole file.
    Single {
        /// The object's key (or blob name), for errors and logs.
        key: String,
        /// The PUT.
        put: Presigned,
    },
    /// A multipart upload: parts of `part_size` bytes (the last one shorter), in order.
    Multipart {
        /// The object's key (or blob name).
        key: String,
        /// The upload the broker started.
        upload_id: String,
        /// Bytes per part except the last.
        part_size: u64,
        /// The PUT of each part, part 1 first; there must be exactly as many as the file needs.
        parts: Vec<Presigned>,
    },
}

/// A multipart upload whose parts are all uploaded, for the broker to complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedUpload {
    /// The output it belongs to.
    pub output: u32,
    /// The object's key, as planned.
    pub key: String,
    /// The upload, as planned.
    pub upload_id: String,
    /// Every part with the ETag the store answered, in part number order.
    pub parts: Vec<CompletedPart>,
}

/// Which way data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// From storage into the work directory.
    In,
    /// From the work directory to storage.
    Out,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::In => "stage-in",
            Stage::Out => "stage-out",
        })
    }
}

/// How far a stage is: reported at its start, about once a second while moving, and at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The stage reporting.
    pub stage: Stage,
    /// Bytes written to disk (stage-in) or sent (stage-out); never decreases, a retry does not
    /// count its bytes twice.
    pub bytes_done: u64,
    /// Bytes the stage moves in all.
    pub bytes_total: u64,
    /// Files completely moved (and checked).
    pub files_done: u32,
    /// Files the stage moves in all.
    pub files_total: u32,
}

/// What a finished stage moved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageStats {
    /// Bytes moved (each file counted once).
    pub bytes: u64,
    /// Files moved.
    pub files: u32,
    /// Wall time of the whole stage.
    pub duration: Duration,
    /// Stage-out: entries inside output directories that were not uploaded, as
    /// `"<work-dir path>: <why>"` (symbolic links, special files, names that are not UTF-8).
    pub skipped: Vec<String>,
}

/// How hard staging pushes, and how patiently it retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagingLimits {
    /// Requests in flight at once, over all files and ranges (at least 1).
    pub concurrency: usize,
    /// Inputs larger than this are fetched as parallel ranged GETs of this size.
    pub range_size: u64,
    /// How many times a request that failed transiently (5xx, 408, 429, timeouts, connection
    /// trouble) is tried again; a request is tried at most `retries + 1` times.
    pub retries: u32,
    /// Pause before the first retry; doubled for each further one, with jitter.
    pub min_backoff: Duration,
    /// Longest pause between tries.
    pub max_backoff: Duration,
    /// Longest time a request may go without progress: until the response headers, between
    /// chunks of a download, and between chunks of an upload (or after its last one).
    pub request_timeout: Duration,
}

impl Default for StagingLimits {
    fn default() -> Self {
        StagingLimits {
            concurrency: 8,
            range_size: 16 << 20,
            retries: 5,
            min_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// Why a stage failed. The texts name the file (work-dir relative) and never a URL's query.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    /// A path from the spec or the broker that staging refuses.
    #[error("{what} path {path:?} is not allowed: it {why}")]
    BadPath {
        /// "input" or "output".
        what: &'static str,
        /// The path as given.
        path: String,
        /// Why, e.g. "is absolute".
        why: &'static str,
    },
    /// A declared output path that does not exist.
    #[error("output {0} does not exist")]
    MissingOutput(String),
    /// A declared output path that is, or passes through, something else than a directory or a
    /// regular file.
    #[error("output {path} is {what}; only regular files and directories are uploaded")]
    NotRegular {
        /// The work-dir path of the offending entry.
        path: String,
        /// E.g. "a symbolic link".
        what: &'static str,
    },
    /// Local file trouble.
    #[error("{stage} of {path}: {source}")]
    Io {
        /// The stage.
        stage: Stage,
        /// The work-dir path.
        path: String,
        /// What the system said.
        source: std::io::Error,
    },
    /// A request failed: at once (most 4xx), or after its retries.
    #[error("{stage} of {path} failed{}: {reason}", after_tries(*.tries))]
    Failed {
        /// The stage.
        stage: Stage,
        /// The work-dir path.
        path: String,
        /// How many times it was tried.
        tries: u32,
        /// The last failure: HTTP status with the store's code and message, or a network error.
        reason: String,
    },
    /// Data that is not what the store or the broker said it is.
    #[error("{stage} of {path}: {reason}")]
    Integrity {
        /// The stage.
        stage: Stage,
        /// The work-dir path.
        path: String,
        /// What does not match.
        reason: String,
    },
    /// The broker could not give what staging needed, or gave something unusable.
    #[error("broker could not provide {what}: {reason}")]
    Source {
        /// E.g. "input urls".
        what: &'static str,
        /// Its error, or what is wrong with its answer.
        reason: String,
    },
    /// The HTTP client could not be made.
    #[error("http client: {0}")]
    Client(String),
}

fn after_tries(tries: u32) -> String {
    if tries > 1 { format!(" after {tries} tries") } else { String::new() }
}

/// The HTTP client staging uses: rustls with the process's crypto provider (the agent installs
/// ring with [`crate::tls::install_crypto_provider`]), the platform's trusted roots plus those in
/// the PEM file `extra_root` (e.g. a private S3-compatible store's CA), HTTP/1.1 (one connection
/// per request in flight, which is what parallel ranges want), no redirects.
pub fn http_client(extra_root: Option<&Path>) -> Result<reqwest::Client, StagingError> {
    let mut builder = reqwest::Client::builder()
        .http1_only()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("hybroker-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = extra_root {
        let pem = std::fs::read(path).map_err(|e| StagingError::Client(format!("{}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| StagingError::Client(format!("{}: {}", path.display(), request::describe(e))))?;
        if certs.is_empty() {
            return Err(StagingError::Client(format!("{} holds no certificate", path.display())));
        }
        builder = builder.tls_certs_merge(certs);
    }
    builder.build().map_err(|e| StagingError::Client(request::describe(e)))
}

/// The components of a work-dir relative path, refusing absolute paths and `..`; `.` and empty
/// components are dropped.
fn relative_components<'p>(what: &'static str, path: &'p str) -> Result<Vec<&'p str>, StagingError> {
    let bad = |why| StagingError::BadPath { what, path: path.to_owned(), why };
    if path.starts_with('/') {
        return Err(bad("is absolute"));
    }
    if path.contains('\0') {
        return Err(bad("holds a NUL byte"));
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(bad("goes up with ..")),
            part => parts.push(part),
        }
    }
    Ok(parts)
}

#[cfg(test)]
mod fake;
#[cfg(test)]
#[path = "staging_tests.rs"]
mod tests;
