//! S3 (and S3-compatible stores) through `aws-sdk-s3`. STUB: being written.

use std::time::Duration;

use async_trait::async_trait;

use super::{CompletedPart, ObjectMeta, ObjectStore, Presigned, StorageError};

/// Where an S3 bucket is and how to sign for it.
#[derive(Clone)]
pub struct S3Settings {
    pub bucket: String,
    pub region: String,
    /// A custom endpoint (emulator, S3-compatible store); path-style addressing is used with it.
    pub endpoint: Option<String>,
    /// A profile of the shared config/credentials files; `None` = the default chain.
    pub profile: Option<String>,
    /// Fixed credentials (the embedded local store); `None` = the AWS default chain
    /// (env, profile, web identity, instance metadata).
    pub static_credentials: Option<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct S3Store {
    bucket: String,
}

impl S3Store {
    pub async fn new(settings: S3Settings) -> Result<Self, StorageError> {
        Ok(Self { bucket: settings.bucket })
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn head(&self, _key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        todo!("{}", self.bucket)
    }
    async fn list(&self, _prefix: &str, _limit: usize) -> Result<Vec<ObjectMeta>, StorageError> {
        todo!()
    }
    async fn presign_get(&self, _key: &str, _ttl: Duration) -> Result<Presigned, StorageError> {
        todo!()
    }
    async fn presign_put(&self, _key: &str, _ttl: Duration) -> Result<Presigned, StorageError> {
        todo!()
    }
    async fn create_multipart(&self, _key: &str) -> Result<String, StorageError> {
        todo!()
    }
    async fn presign_part(&self, _key: &str, _upload_id: &str, _number: u32, _ttl: Duration)
    -> Result<Presigned, StorageError> {
        todo!()
    }
    async fn complete_multipart(&self, _key: &str, _upload_id: &str, _parts: &[CompletedPart])
    -> Result<(), StorageError> {
        todo!()
    }
    async fn abort_multipart(&self, _key: &str, _upload_id: &str) -> Result<(), StorageError> {
        todo!()
    }
    async fn delete(&self, _key: &str) -> Result<(), StorageError> {
        todo!()
    }
}
