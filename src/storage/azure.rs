//! Azure Blob through the legacy `azure_storage_blobs` crate: shared-key requests from the broker and
//! service SAS URLs (one blob each) for agents.
//!
//! Multipart uploads are block blobs: the upload id is a fresh random id, part `n` is a Put Block whose
//! block id derives from the upload id and `n` (all the same length, as Azure requires), and completing
//! is a Put Block List of those ids.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use azure_core::request_options::MaxResults;
use azure_core::{ExponentialRetryOptions, RetryOptions};
use azure_storage::CloudLocation;
use azure_storage::prelude::*;
use azure_storage::shared_access_signature::SasProtocol;
use azure_storage_blobs::blob::{BlobBlockType, BlockList};
use azure_storage_blobs::prelude::*;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;

use super::{CompletedPart, MAX_URL_TTL, ObjectMeta, ObjectStore, Presigned, StorageError};

/// Azure allows at most this many blocks in one blob.
pub const MAX_BLOCKS: u32 = 50_000;

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

impl fmt::Debug for AzureSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureSettings")
            .field("account", &self.account)
            .field("container", &self.container)
            .field("endpoint", &self.endpoint)
            .field("account_key", &"<redacted>")
            .finish()
    }
}

/// One Azure container, reached with the account key (which never leaves this struct).
#[derive(Clone)]
pub struct AzureBlobStore {
    account: String,
    container: String,
    client: ContainerClient,
    /// SAS URLs allow plain http too (emulator endpoints); otherwise https only.
    allow_http: bool,
}

impl fmt::Debug for AzureBlobStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AzureBlobStore")
            .field("account", &self.account)
            .field("container", &self.container)
            .field("allow_http", &self.allow_http)
            .finish_non_exhaustive()
    }
}

impl AzureBlobStore {
    /// Checks the settings and builds the client; makes no request.
    pub async fn new(settings: AzureSettings) -> Result<Self, StorageError> {
        let AzureSettings { account, container, endpoint, account_key } = settings;
        if account.is_empty() || !account.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err(StorageError::Config(format!("invalid azure storage account name {account:?}")));
        }
        let lower = container.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let dashes = container.starts_with('-') || container.ends_with('-') || container.contains("--");
        let valid_container = (3..=63).contains(&container.len()) && lower && !dashes;
        if !valid_container {
            return Err(StorageError::Config(format!("invalid azure container name {container:?}")));
        }
        if B64.decode(account_key.trim()).map_or(true, |k| k.is_empty()) {
            return Err(StorageError::Config(format!("the key of azure storage account {account} is not base64")));
        }
        let (location, allow_http) = match endpoint {
            None => (CloudLocation::Public { account: account.clone() }, false),
            Some(ep) => {
                let bad = |why: &str| StorageError::Config(format!("azure blob endpoint {ep:?}: {why}"));
                let url = azure_core::Url::parse(&ep).map_err(|e| bad(&e.to_string()))?;
                if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                    return Err(bad("not an http(s) url with a host"));
                }
                if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
                    return Err(bad("must not carry a query, fragment or user"));
                }
                // A trailing slash would double the one before the container name.
                let uri = url.as_str().trim_end_matches('/').to_string();
                (CloudLocation::Custom { account: account.clone(), uri }, url.scheme() == "http")
            }
        };
        let retry = ExponentialRetryOptions::default().max_retries(3u32).max_total_elapsed(Duration::from_secs(20));
        let credentials = StorageCredentials::access_key(account.clone(), account_key.trim().to_string());
        let client = ClientBuilder::with_location(location, credentials)
            .retry(RetryOptions::exponential(retry))
            .container_client(container.clone());
        Ok(Self { account, container, client, allow_http })
    }

    /// Creates the container when it does not exist yet (development and tests; production
    /// containers are made by their owners).
    pub async fn ensure_container(&self) -> Result<(), StorageError> {
        match self.client.create().await {
            Err(e) if status_of(&e) == Some(409) => Ok(()),
            r => r.map_err(|e| self.fail(e, "create container", "")),
        }
    }

    fn blob(&self, key: &str) -> Result<BlobClient, StorageError> {
        let bad_segment = key.split('/').any(|s| s == "." || s == "..");
        if key.is_empty() || key.len() > 1024 || key.starts_with('/') || key.ends_with('/') || bad_segment {
            return Err(StorageError::Request(format!("{:?} is not a valid azure blob name", key)));
        }
        Ok(self.client.blob_client(key))
    }

    /// `account/container/key`, for messages.
    fn name(&self, key: &str) -> String {
        format!("{}/{}/{key}", self.account, self.container)
    }

    /// Maps an SDK error; the message names the blob and never carries a signature or the key.
    fn fail(&self, err: azure_core::Error, op: &str, key: &str) -> StorageError {
        let what = if key.is_empty() {
            format!("{op} of azure container {}/{}", self.account, self.container)
        } else {
            format!("{op} of azure blob {}", self.name(key))
        };
        match err.as_http_error() {
            Some(h) => {
                let status = u16::from(h.status());
                let code = h.error_code().unwrap_or("no error code");
                match status {
                    401 | 403 => StorageError::Denied(format!("{what}: {code}")),
                    404 if code == "ContainerNotFound" => {
                        StorageError::NotFound(format!("azure container {}/{}", self.account, self.container))
                    }
                    404 => StorageError::NotFound(format!("azure blob {}", self.name(key))),
                    _ => StorageError::Request(format!("{what}: http {status}: {code}")),
                }
            }
            None => {
                let (mut msg, mut source) = (err.to_string(), std::error::Error::source(&err));
                while let Some(e) = source {
                    (msg, source) = (format!("{msg}: {e}"), e.source());
                }
                StorageError::Request(format!("{what}: {}", scrub(&msg)))
            }
        }
    }

    /// A service SAS URL for exactly this blob, with its expiry truncated to the second as signed.
    async fn sas_url(
        &self,
        key: &str,
        permissions: BlobSasPermissions,
        ttl: Duration,
    ) -> Result<(azure_core::Url, SystemTime), StorageError> {
        let blob = self.blob(key)?;
        let secs = (SystemTime::now() + ttl.min(MAX_URL_TTL)).duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let expires_at = UNIX_EPOCH + Duration::from_secs(secs);
        let expiry = time::OffsetDateTime::from_unix_timestamp(secs as i64)
            .map_err(|e| StorageError::Request(format!("sas expiry for azure blob {}: {e}", self.name(key))))?;
        let protocol = if self.allow_http { SasProtocol::HttpHttps } else { SasProtocol::Https };
        let sas = blob
            .shared_access_signature(permissions, expiry)
            .await
            .map_err(|e| self.fail(e, "signing", key))?
            .protocol(protocol);
        let url = blob.generate_signed_blob_url(&sas).map_err(|e| self.fail(e, "signing", key))?;
        Ok((url, expires_at))
    }
}

/// Read (`r`) or create+write (`cw`) on one blob.
fn perms(write: bool) -> BlobSasPermissions {
    BlobSasPermissions { read: !write, create: write, write, ..Default::default() }
}

fn status_of(err: &azure_core::Error) -> Option<u16> {
    err.as_http_error().map(|h| u16::from(h.status()))
}

/// A 404 for the blob itself (a missing container stays an error: the settings are wrong).
fn blob_missing(err: &azure_core::Error) -> bool {
    err.as_http_error().is_some_and(|h| u16::from(h.status()) == 404 && h.error_code() != Some("ContainerNotFound"))
}

/// Cuts any `sig=` value out of a message (belt and braces: broker requests use shared-key headers).
fn scrub(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find("sig=") {
        out.push_str(&rest[..i + 4]);
        out.push('…');
        rest = &rest[i + 4..];
        rest = &rest[rest.find(|c: char| c == '&' || c == ')' || c.is_whitespace()).unwrap_or(rest.len())..];
    }
    out.push_str(rest);
    out
}

/// The block id (before base64) of part `number` of upload `upload_id`: always 24 bytes, so all block
/// ids of a blob have the same length and their base64 needs no padding.
pub fn block_id(upload_id: &str, number: u32) -> Result<String, StorageError> {
    if upload_id.len() != 16 || !upload_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(StorageError::Request(format!("{upload_id:?} is not an azure upload id")));
    }
    if !(1..=MAX_BLOCKS).contains(&number) {
        return Err(StorageError::Request(format!("part number {number} is outside 1..={MAX_BLOCKS}")));
    }
    Ok(format!("{upload_id}-{number:07}"))
}

fn meta(name: String, props: &azure_storage_blobs::blob::BlobProperties) -> ObjectMeta {
    let etag = props.etag.to_string().trim_matches('"').to_string();
    ObjectMeta {
        key: name,
        size: props.content_length,
        etag: (!etag.is_empty()).then_some(etag),
        content_md5: props.content_md5.as_ref().map(|m| B64.encode(m.as_slice())),
    }
}

#[async_trait]
impl ObjectStore for AzureBlobStore {
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        match self.blob(key)?.get_properties().await {
            Ok(resp) => Ok(Some(meta(key.to_string(), &resp.blob.properties))),
            Err(e) if blob_missing(&e) => Ok(None),
            Err(e) => Err(self.fail(e, "head", key)),
        }
    }

    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<ObjectMeta>, StorageError> {
        let page = u32::try_from(limit.saturating_add(1)).unwrap_or(u32::MAX).clamp(1, 5000);
        let mut req = self.client.list_blobs().max_results(MaxResults::try_from(page).expect("page size is not zero"));
        if !prefix.is_empty() {
            req = req.prefix(prefix.to_string());
        }
        let mut pages = req.into_stream();
        let mut out = Vec::new();
        while let Some(resp) = pages.next().await {
            let resp = resp.map_err(|e| self.fail(e, &format!("list (prefix {prefix:?})"), ""))?;
            for b in resp.blobs.blobs() {
                out.push(meta(b.name.clone(), &b.properties));
                if out.len() > limit {
                    return Err(StorageError::TooMany { prefix: prefix.to_string(), limit });
                }
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn presign_get(&self, key: &str, ttl: Duration) -> Result<Presigned, StorageError> {
        let (url, expires_at) = self.sas_url(key, perms(false), ttl).await?;
        Ok(Presigned { method: "GET".into(), url: url.into(), headers: vec![], expires_at })
    }

    async fn presign_put(&self, key: &str, ttl: Duration) -> Result<Presigned, StorageError> {
        let (url, expires_at) = self.sas_url(key, perms(true), ttl).await?;
        let headers = vec![("x-ms-blob-type".to_string(), "BlockBlob".to_string())];
        Ok(Presigned { method: "PUT".into(), url: url.into(), headers, expires_at })
    }

    /// Azure has no such call: the id is fresh randomness the block ids derive from.
    async fn create_multipart(&self, key: &str) -> Result<String, StorageError> {
        self.blob(key)?;
        Ok(format!("{:016x}", fastrand::u64(..)))
    }

    async fn presign_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        ttl: Duration,
    ) -> Result<Presigned, StorageError> {
        let id = B64.encode(block_id(upload_id, number)?);
        let (mut url, expires_at) = self.sas_url(key, perms(true), ttl).await?;
        url.query_pairs_mut().append_pair("comp", "block").append_pair("blockid", &id);
        Ok(Presigned { method: "PUT".into(), url: url.into(), headers: vec![], expires_at })
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
    ) -> Result<(), StorageError> {
        let blob = self.blob(key)?;
        let mut numbers: Vec<u32> = parts.iter().map(|p| p.number).collect();
        numbers.sort_unstable();
        if numbers.is_empty() || numbers.windows(2).any(|w| w[0] == w[1]) {
            return Err(StorageError::Request(format!(
                "completing azure blob {}: parts must be non-empty and numbered uniquely",
                self.name(key)
            )));
        }
        let blocks = numbers.into_iter().map(|n| Ok(BlobBlockType::new_latest(block_id(upload_id, n)?.into_bytes())));
        let blocks = blocks.collect::<Result<_, StorageError>>()?;
        blob.put_block_list(BlockList { blocks }).await.map(drop).map_err(|e| self.fail(e, "put block list", key))
    }

    /// A no-op: Azure has no call to drop uncommitted blocks; they are discarded a week after the
    /// last block was written, or when the blob is next committed.
    async fn abort_multipart(&self, key: &str, _upload_id: &str) -> Result<(), StorageError> {
        self.blob(key).map(drop)
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self.blob(key)?.delete().delete_snapshots_method(DeleteSnapshotsMethod::Include).await {
            Err(e) if blob_missing(&e) => Ok(()),
            r => r.map(drop).map_err(|e| self.fail(e, "delete", key)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

    fn settings(endpoint: Option<&str>) -> AzureSettings {
        let account = if endpoint.is_some() { "devstoreaccount1" } else { "acct" };
        let (container, account_key) = ("jobs".into(), DEV_KEY.into());
        AzureSettings { account: account.into(), container, endpoint: endpoint.map(String::from), account_key }
    }

    async fn store(endpoint: Option<&str>) -> AzureBlobStore {
        AzureBlobStore::new(settings(endpoint)).await.unwrap()
    }

    fn query(url: &str) -> Vec<(String, String)> {
        reqwest::Url::parse(url).unwrap().query_pairs().map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
    }

    fn has(q: &[(String, String)], k: &str, v: &str) -> bool {
        q.iter().any(|(a, b)| a == k && b == v)
    }

    #[test]
    fn block_ids_have_one_length() {
        let ids: Vec<String> =
            [1, 9, 10, 999, 50_000].iter().map(|n| block_id("0123456789abcdef", *n).unwrap()).collect();
        assert!(ids.iter().all(|i| i.len() == 24 && !B64.encode(i).contains('=')));
        assert!(block_id("0123456789abcdef", 0).is_err() && block_id("0123456789abcdef", MAX_BLOCKS + 1).is_err());
        assert!(block_id("short", 1).is_err() && block_id("0123456789abcdeg", 1).is_err());
    }

    #[tokio::test]
    async fn sas_urls_name_one_blob_and_no_key() {
        let s = store(Some("http://127.0.0.1:10000/devstoreaccount1/")).await;
        let get = s.presign_get("t1/in/a b.txt", Duration::from_secs(60)).await.unwrap();
        assert!(get.url.starts_with("http://127.0.0.1:10000/devstoreaccount1/jobs/t1/in/a%20b.txt?"), "{}", get.url);
        let q = query(&get.url);
        assert!(has(&q, "sr", "b") && has(&q, "sp", "r") && has(&q, "spr", "http,https"), "{q:?}");
        assert!(!get.url.contains(DEV_KEY) && !get.url.contains(&DEV_KEY[..20]));
        assert!(get.expires_at > SystemTime::now() && !format!("{get:?}").contains("sig="));

        let put = s.presign_put("t1/out.bin", Duration::from_secs(60)).await.unwrap();
        assert!(has(&query(&put.url), "sp", "cw"));
        assert_eq!(put.headers, vec![("x-ms-blob-type".to_string(), "BlockBlob".to_string())]);

        let part = s.presign_part("t1/out.bin", "0123456789abcdef", 3, Duration::from_secs(60)).await.unwrap();
        let q = query(&part.url);
        let id = B64.encode(block_id("0123456789abcdef", 3).unwrap());
        assert!(has(&q, "comp", "block") && has(&q, "blockid", &id) && has(&q, "sp", "cw"), "{q:?}");
        assert!(part.headers.is_empty());

        let public = store(None).await.presign_get("k", Duration::from_secs(60)).await.unwrap();
        assert!(public.url.starts_with("https://acct.blob.core.windows.net/jobs/k?"), "{}", public.url);
        assert!(has(&query(&public.url), "spr", "https"));
    }

    #[tokio::test]
    async fn bad_settings_and_names_are_refused() {
        assert!(!format!("{:?}", settings(None)).contains(DEV_KEY));
        let key = AzureSettings { account_key: "not base64!".into(), ..settings(None) };
        for bad in [AzureSettings { container: "Jobs".into(), ..settings(None) }, key, settings(Some("ftp://x"))] {
            assert!(matches!(AzureBlobStore::new(bad).await, Err(StorageError::Config(_))));
        }
        let s = store(None).await;
        for key in ["", "/a", "a/", "a/../b", "./a"] {
            assert!(s.presign_get(key, Duration::from_secs(1)).await.is_err(), "{key:?}");
        }
        assert_eq!(scrub("url (http://h/b?sv=1&sig=abc%2B&sp=r) failed"), "url (http://h/b?sv=1&sig=…&sp=r) failed");
    }
}
