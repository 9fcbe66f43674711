//! Object storage for job data: one [`ObjectStore`] interface with real implementations for S3
//! ([`s3::S3Store`], also used for S3-compatible stores) and Azure Blob ([`azure::AzureBlobStore`]),
//! plus the embedded `local` store ([`local::LocalS3Server`]: an S3-compatible server in-process
//! over a directory, reached through an `S3Store`).
//!
//! Only the broker holds credentials. Agents get [`Presigned`] requests: a method, a URL that opens
//! exactly one object (or one part of one upload) for minutes, and the headers to send with it.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;

pub mod azure;
pub mod local;
pub mod s3;

/// One object as a listing or HEAD shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The full key (S3) or blob name (Azure), without the bucket or container.
    pub key: String,
    pub size: u64,
    /// The store's entity tag, quotes removed (S3: the MD5 in hex for single-part uploads).
    pub etag: Option<String>,
    /// The object's MD5 in base64, when the store knows it (Azure `Content-MD5`).
    pub content_md5: Option<String>,
}

pub use crate::model::presigned::{CompletedPart, Presigned, redact_url};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("access denied by the store: {0}")]
    Denied(String),
    #[error("prefix {prefix:?} holds more than {limit} objects")]
    TooMany { prefix: String, limit: usize },
    #[error("storage request failed: {0}")]
    Request(String),
    #[error("storage configuration: {0}")]
    Config(String),
}

/// The longest a presigned URL may be valid for (`storage_url_ttl` is capped by it).
pub const MAX_URL_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// What the broker does with a bucket or container. Keys are relative to it.
#[async_trait]
pub trait ObjectStore: Send + Sync + fmt::Debug {
    /// The object's size and tags, or `None` when it does not exist.
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError>;

    /// Every object whose key starts with `prefix`, in key order; more than `limit` is an error.
    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<ObjectMeta>, StorageError>;

    /// A GET of exactly this object (ranges allowed), valid for `ttl`.
    async fn presign_get(&self, key: &str, ttl: Duration) -> Result<Presigned, StorageError>;

    /// A PUT of exactly this object in one request, valid for `ttl`.
    async fn presign_put(&self, key: &str, ttl: Duration) -> Result<Presigned, StorageError>;

    /// Starts a multipart upload; returns its id (Azure: a fresh id the block ids derive from).
    async fn create_multipart(&self, key: &str) -> Result<String, StorageError>;

    /// A PUT of part `number` (1-based) of that upload, valid for `ttl`.
    async fn presign_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        ttl: Duration,
    ) -> Result<Presigned, StorageError>;

    /// Makes the object from the parts, in `number` order.
    async fn complete_multipart(&self, key: &str, upload_id: &str, parts: &[CompletedPart])
    -> Result<(), StorageError>;

    /// Drops an unfinished upload and its parts (best effort where the store has no such call).
    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StorageError>;

    /// Deletes the object; deleting a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StorageError>;
}

/// A location whose client could not be built (no credentials, a bad setting): every call fails
/// with the reason, as [`StorageError::Config`]. Offline planning keeps going without its sizes.
#[derive(Debug, Clone)]
pub struct Unreachable {
    pub reason: String,
}

#[async_trait]
impl ObjectStore for Unreachable {
    async fn head(&self, _: &str) -> Result<Option<ObjectMeta>, StorageError> {
        Err(self.error())
    }

    async fn list(&self, _: &str, _: usize) -> Result<Vec<ObjectMeta>, StorageError> {
        Err(self.error())
    }

    async fn presign_get(&self, _: &str, _: Duration) -> Result<Presigned, StorageError> {
        Err(self.error())
    }

    async fn presign_put(&self, _: &str, _: Duration) -> Result<Presigned, StorageError> {
        Err(self.error())
    }

    async fn create_multipart(&self, _: &str) -> Result<String, StorageError> {
        Err(self.error())
    }

    async fn presign_part(&self, _: &str, _: &str, _: u32, _: Duration) -> Result<Presigned, StorageError> {
        Err(self.error())
    }

    async fn complete_multipart(&self, _: &str, _: &str, _: &[CompletedPart]) -> Result<(), StorageError> {
        Err(self.error())
    }

    async fn abort_multipart(&self, _: &str, _: &str) -> Result<(), StorageError> {
        Err(self.error())
    }

    async fn delete(&self, _: &str) -> Result<(), StorageError> {
        Err(self.error())
    }
}

impl Unreachable {
    fn error(&self) -> StorageError {
        StorageError::Config(self.reason.clone())
    }
}
