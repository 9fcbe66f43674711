//! S3 (and S3-compatible stores) through `aws-sdk-s3`, over `aws-smithy-http-client` with rustls and
//! ring, so the process keeps a single crypto provider.
//!
//! The broker signs; agents only see presigned URLs (SigV4 query signatures that cover the method,
//! the bucket, the key and, for parts, the upload id and part number).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::{PresignedRequest, PresigningConfig};
use aws_sdk_s3::types::{ChecksumMode, CompletedMultipartUpload, CompletedPart as S3Part};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};

use super::{CompletedPart, ObjectMeta, ObjectStore, Presigned, StorageError};

/// The most objects one ListObjectsV2 page holds.
const PAGE_SIZE: usize = 1000;
/// Part numbers S3 accepts.
const PART_NUMBERS: std::ops::RangeInclusive<u32> = 1..=10_000;

/// Where an S3 bucket is and how to sign for it.
#[derive(Clone)]
pub struct S3Settings {
    pub bucket: String,
    /// Empty = the region of the AWS default chain (env, profile).
    pub region: String,
    /// A custom endpoint (emulator, S3-compatible store); path-style addressing is used with it.
    pub endpoint: Option<String>,
    /// A profile of the shared config/credentials files; `None` = the default chain.
    pub profile: Option<String>,
    /// Fixed credentials (the embedded local store); `None` = the AWS default chain
    /// (env, profile, web identity, instance metadata).
    pub static_credentials: Option<(String, String)>,
}

impl fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Settings")
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("profile", &self.profile)
            .field("static_credentials", &self.static_credentials.as_ref().map(|(id, _)| format!("{id}/<redacted>")))
            .finish()
    }
}

/// One bucket of S3 or an S3-compatible store.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    endpoint: Option<String>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store").field("bucket", &self.bucket).field("endpoint", &self.endpoint).finish()
    }
}

impl S3Store {
    /// A client for `settings.bucket`. Credentials of the default chain are resolved at the first request.
    pub async fn new(settings: S3Settings) -> Result<Self, StorageError> {
        if settings.bucket.is_empty() {
            return Err(StorageError::Config("the s3 bucket name is empty".into()));
        }
        if let Some(endpoint) = &settings.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(StorageError::Config(format!("s3 endpoint {endpoint:?} is not an http(s) url")));
        }
        let http_client =
            aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http_client);
        if !settings.region.is_empty() {
            loader = loader.region(Region::new(settings.region.clone()));
        }
        if let Some(profile) = &settings.profile {
            loader = loader.profile_name(profile);
        }
        if let Some((id, secret)) = &settings.static_credentials {
            loader = loader.credentials_provider(Credentials::new(id, secret, None, None, "hybroker-static"));
        }
        if let Some(endpoint) = &settings.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let shared = loader.load().await;
        if shared.region().is_none() {
            return Err(StorageError::Config(format!(
                "no region for s3 bucket {}: set one in the configuration or the aws profile",
                settings.bucket
            )));
        }
        // Checksums only where S3 requires them: otherwise presigned PUTs would carry a checksum of an
        // empty body. Presigned GETs ask for the object's checksums themselves (`x-amz-checksum-mode:
        // ENABLED`, a signed header): a whole GET then reports its full-object CRC, which the agent
        // checks its parallel ranges against.
        let mut config = aws_sdk_s3::config::Builder::from(&shared)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if settings.endpoint.is_some() {
            config = config.force_path_style(true);
        }
        Ok(Self { client: Client::from_conf(config.build()), bucket: settings.bucket, endpoint: settings.endpoint })
    }

    /// The bucket this store works on.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// `s3://bucket/key`, for messages.
    fn target(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    fn error<E>(&self, op: &str, key: &str, err: SdkError<E, HttpResponse>) -> StorageError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let message = format!("{op} {}: {}", self.target(key), describe(&err));
        match (status(&err), err.code()) {
            (Some(403), _)
            | (
                _,
                Some(
                    "AccessDenied"
                    | "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "ExpiredToken"
                    | "InvalidToken"
                    | "AllAccessDisabled",
                ),
            ) => StorageError::Denied(message),
            (_, Some("NoSuchBucket")) => StorageError::NotFound(format!("s3 bucket {}", self.bucket)),
            _ => StorageError::Request(message),
        }
    }
}

/// Status, code and message of a store's answer, or the cause chain of a failure to get one. Not
/// `DisplayErrorContext`: its debug tail holds the raw response body, where S3 echoes the canonical
/// request of a refused signature (with any session token).
fn describe<E>(err: &SdkError<E, HttpResponse>) -> String
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    if let SdkError::ServiceError(service) = err {
        let status = service.raw().status().as_u16();
        let reason = hyper::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason());
        let code = err.code().map(str::to_string).or(reason.map(str::to_lowercase));
        let code = code.as_deref().unwrap_or("no error code");
        return match err.message() {
            Some(message) => format!("{status} {code}: {message}"),
            None => format!("{status} {code}"),
        };
    }
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn status<E>(err: &SdkError<E, HttpResponse>) -> Option<u16> {
    err.raw_response().map(|r| r.status().as_u16())
}

fn is_no_such_upload<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    err.code() == Some("NoSuchUpload") || status(err) == Some(404)
}

fn unquote(etag: &str) -> String {
    etag.trim_start_matches("W/").trim_matches('"').to_string()
}

/// A signing time on a whole second (as `X-Amz-Date` has it) and the exact end of validity.
fn presigning(ttl: Duration) -> Result<(PresigningConfig, SystemTime), StorageError> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| StorageError::Config(e.to_string()))?;
    let start = UNIX_EPOCH + Duration::from_secs(now.as_secs());
    let ttl = Duration::from_secs(ttl.as_secs());
    let config = PresigningConfig::builder()
        .start_time(start)
        .expires_in(ttl)
        .build()
        .map_err(|e| StorageError::Config(format!("presigned url lifetime {ttl:?}: {e}")))?;
    Ok((config, start + ttl))
}

fn presigned(request: PresignedRequest, expires_at: SystemTime) -> Presigned {
    Presigned {
        method: request.method().to_string(),
        url: request.uri().to_string(),
        headers: request.headers().map(|(name, value)| (name.to_string(), value.to_string())).collect(),
        expires_at,
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn head(&self, key: &str) -> Result<Option<ObjectMeta>, StorageError> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.to_string(),
                size: out.content_length().and_then(|n| u64::try_from(n).ok()).unwrap_or(0),
                etag: out.e_tag().map(unquote),
                content_md5: None,
            })),
            Err(err) if status(&err) == Some(404) || err.as_service_error().is_some_and(|e| e.is_not_found()) => {
                Ok(None)
            }
            Err(err) => Err(self.error("head", key, err)),
        }
    }

    async fn list(&self, prefix: &str, limit: usize) -> Result<Vec<ObjectMeta>, StorageError> {
        let page_size = i32::try_from(limit.saturating_add(1).min(PAGE_SIZE)).unwrap_or(1000);
        let mut objects = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(prefix)
                .max_keys(page_size)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|err| self.error("list", &format!("{prefix}*"), err))?;
            for object in page.contents() {
                let Some(key) = object.key() else { continue };
                if objects.len() == limit {
                    return Err(StorageError::TooMany { prefix: prefix.to_string(), limit });
                }
                objects.push(ObjectMeta {
                    key: key.to_string(),
                    size: object.size().and_then(|n| u64::try_from(n).ok()).unwrap_or(0),
                    etag: object.e_tag().map(unquote),
                    content_md5: None,
                });
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_string()),
                _ => break,
            }
        }
        objects.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(objects)
    }

    async fn presign_get(&self, key: &str, ttl: Duration) -> Result<Presigned, StorageError> {
        let (config, expires_at) = presigning(ttl)?;
        let request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .presigned(config)
            .await
            .map_err(|err| self.error("presign get", key, err))?;
        Ok(presigned(request, expires_at))
    }

    async fn presign_put(&self, key: &str, ttl: Duration) -> Result<Presigned, StorageError> {
        let (config, expires_at) = presigning(ttl)?;
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .presigned(config)
            .await
            .map_err(|err| self.error("presign put", key, err))?;
        Ok(presigned(request, expires_at))
    }

    async fn create_multipart(&self, key: &str) -> Result<String, StorageError> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|err| self.error("create multipart upload", key, err))?;
        out.upload_id().map(str::to_string).ok_or_else(|| {
            StorageError::Request(format!("create multipart upload {}: the store gave no upload id", self.target(key)))
        })
    }

    async fn presign_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        ttl: Duration,
    ) -> Result<Presigned, StorageError> {
        if !PART_NUMBERS.contains(&number) {
            return Err(StorageError::Config(format!(
                "part number {number} of {} is outside 1..=10000",
                self.target(key)
            )));
        }
        let (config, expires_at) = presigning(ttl)?;
        let request = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .part_number(number as i32)
            .presigned(config)
            .await
            .map_err(|err| self.error("presign part", key, err))?;
        Ok(presigned(request, expires_at))
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[CompletedPart],
    ) -> Result<(), StorageError> {
        let mut sorted: Vec<&CompletedPart> = parts.iter().collect();
        sorted.sort_by_key(|part| part.number);
        let mut s3_parts = Vec::with_capacity(sorted.len());
        for part in sorted {
            if !PART_NUMBERS.contains(&part.number) {
                let target = self.target(key);
                return Err(StorageError::Config(format!(
                    "part number {} of {target} is outside 1..=10000",
                    part.number
                )));
            }
            s3_parts.push(S3Part::builder().part_number(part.number as i32).e_tag(&part.etag).build());
        }
        let upload = CompletedMultipartUpload::builder().set_parts(Some(s3_parts)).build();
        match self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(upload)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(err) if err.code() == Some("NoSuchUpload") => {
                Err(StorageError::NotFound(format!("upload {upload_id} of {}", self.target(key))))
            }
            Err(err) => Err(self.error("complete multipart upload", key, err)),
        }
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), StorageError> {
        match self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(upload_id).send().await {
            Ok(_) => Ok(()),
            // Already completed or aborted: nothing left to drop.
            Err(err) if is_no_such_upload(&err) => Ok(()),
            Err(err) => Err(self.error("abort multipart upload", key, err)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self.client.delete_object().bucket(&self.bucket).key(key).send().await {
            Ok(_) => Ok(()),
            Err(err) if err.code() == Some("NoSuchKey") => Ok(()),
            Err(err) => Err(self.error("delete", key, err)),
        }
    }
}
