//! Azure Blob through `azure_storage_blobs`. STUB: being written.

use std::time::Duration;

use async_trait::async_trait;

use super::{CompletedPart, ObjectMeta, ObjectStore, Presigned, StorageError};

/// Where an Azure container is and the key that signs for it.
#[derive(Clone)]
pub struct AzureSettings {
    pub account: String,
    pub container: String,
    /// The blob endpoint, e.g. `http://127.0.0.1:10000/devstoreaccount1` (Azurite); `None` =
    /// `https://<account>.blob.core.windows.net`.
    pub endpoint: Option<String>,
    /// The storage account key (base64), read from a file or the environment by the config.
    pub account_key: String,
}

#[derive(Debug, Clone)]
pub struct AzureBlobStore {
    container: String,
}

impl AzureBlobStore {
    pub async fn new(settings: AzureSettings) -> Result<Self, StorageError> {
        Ok(Self { container: settings.container })
    }
}

#[async_trait]
impl ObjectStore for AzureBlobStore {
    async fn head(&self, _key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        todo!("{}", self.container)
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
