//! The embedded `local` store: an S3-compatible server (s3s-fs) in-process over a directory, signing
//! with a key made at start. Agents reach it with presigned URLs like real S3; the broker through an
//! [`S3Store`].
//!
//! Bodies stream between the socket and files (s3s-fs writes a temporary file and renames it), so
//! object size is bounded by the disk, not memory. One correction to s3s-fs: `Content-MD5` is
//! checked while the body streams, for objects and parts alike, and a mismatch stores nothing.
//!
//! The store is private to the broker's user: the root and bucket directories are 0700, so nothing
//! below them (s3s-fs's temporary files, parts and metadata included) can be reached by anyone
//! else; stored objects, the directories above them and their metadata are narrowed to 0600/0700
//! as they are written; at start anything found wider is narrowed and logged.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::Stream;
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use md5::{Digest, Md5};
use ring::rand::{SecureRandom, SystemRandom};
use s3s::auth::SimpleAuth;
use s3s::dto::{
    AbortMultipartUploadInput, AbortMultipartUploadOutput, CompleteMultipartUploadInput, CompleteMultipartUploadOutput,
    CreateMultipartUploadInput, CreateMultipartUploadOutput, DeleteObjectInput, DeleteObjectOutput, GetObjectInput,
    GetObjectOutput, HeadBucketInput, HeadBucketOutput, HeadObjectInput, HeadObjectOutput, ListObjectsV2Input,
    ListObjectsV2Output, ListPartsInput, ListPartsOutput, PutObjectInput, PutObjectOutput, StreamingBlob,
    UploadPartInput, UploadPartOutput,
};
use s3s::service::{S3Service, S3ServiceBuilder};
use s3s::stream::{ByteStream, RemainingLength};
use s3s::{S3, S3Error, S3ErrorCode, S3Request, S3Response, S3Result, StdError, s3_error};
use tokio::net::TcpListener;

use super::StorageError;
use super::s3::{S3Settings, S3Store};
use crate::private_files;
use crate::tls::accept_connections;

/// The region the store's clients sign for (s3s does not check it).
pub const LOCAL_REGION: &str = "us-east-1";
/// Longest a client may take to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// An S3-compatible endpoint over `root`; bucket `b` is the directory `root/b`.
pub struct LocalS3Server {
    root: PathBuf,
    listener: TcpListener,
    service: S3Service,
    access_key: String,
    secret_key: String,
}

impl fmt::Debug for LocalS3Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalS3Server")
            .field("root", &self.root)
            .field("listener", &self.listener.local_addr().ok())
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

impl LocalS3Server {
    /// Takes the listener the server will answer on; makes `root` if needed (0700), and narrows
    /// what it finds there with a wider mode (logged).
    pub fn new(root: &Path, listener: TcpListener) -> Result<Self, StorageError> {
        private_files::create_dir_all(root)
            .map_err(|e| StorageError::Config(format!("cannot create the local store {}: {e}", root.display())))?;
        private_files::narrow_tree(root).map_err(|e| {
            StorageError::Config(format!("cannot make the local store {} private: {e}", root.display()))
        })?;
        let fs = s3s_fs::FileSystem::new(root)
            .map_err(|e| StorageError::Config(format!("cannot open the local store {}: {e:?}", root.display())))?;
        let (access_key, secret_key) = new_key()?;
        let mut builder = S3ServiceBuilder::new(Md5Checked(fs, root.to_path_buf()));
        builder.set_auth(SimpleAuth::from_single(access_key.clone(), secret_key.clone()));
        Ok(Self { root: root.to_path_buf(), listener, service: builder.build(), access_key, secret_key })
    }

    /// `http://127.0.0.1:PORT`: what agents and the broker's client use.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.listener.local_addr().expect("bound"))
    }

    /// The access key id and secret this server accepts (made at start, never logged).
    pub fn credentials(&self) -> (&str, &str) {
        (&self.access_key, &self.secret_key)
    }

    /// A client for bucket `bucket` (its directory is made if missing), signing with this server's key.
    pub async fn store(&self, bucket: &str) -> Result<S3Store, StorageError> {
        let valid = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && bucket.starts_with(|c: char| c.is_ascii_alphanumeric())
            && !bucket.contains("..");
        if !valid {
            return Err(StorageError::Config(format!(
                "local bucket name {bucket:?} is invalid: 3 to 63 lowercase letters, digits, '-' or '.'"
            )));
        }
        let dir = self.root.join(bucket);
        private_files::create_dir_all(&dir)
            .map_err(|e| StorageError::Config(format!("cannot create local bucket {}: {e}", dir.display())))?;
        S3Store::new(S3Settings {
            bucket: bucket.to_string(),
            region: LOCAL_REGION.to_string(),
            endpoint: Some(self.endpoint()),
            profile: None,
            static_credentials: Some((self.access_key.clone(), self.secret_key.clone())),
        })
        .await
    }

    /// Serves until `shutdown` resolves; connections still open then are dropped.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT);
        let service = self.service;
        let serve_one = move |connection, peer| {
            let (builder, service) = (builder.clone(), service.clone());
            async move {
                if let Err(e) = builder.serve_connection(TokioIo::new(connection), service).await {
                    tracing::debug!(%peer, error = %e, "local store connection failed");
                }
            }
        };
        accept_connections("local store", self.listener, None, shutdown, serve_one).await.abort_all();
    }
}

/// A 20-character access key id and a 40-character secret from the system's secure random source.
fn new_key() -> Result<(String, String), StorageError> {
    const ID_CHARS: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut bytes = [0u8; 50];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| StorageError::Config("no secure randomness for the local store key".into()))?;
    let id = bytes[..20].iter().map(|b| char::from(ID_CHARS[usize::from(b % 32)])).collect();
    Ok((id, B64.encode(&bytes[20..])))
}

/// s3s-fs for the operations the broker and agents use, with `Content-MD5` enforced: upstream checks
/// it for objects only after the file is in place, and never for parts. Other operations are refused.
/// Objects written are made private (the store's root is the second field).
struct Md5Checked(s3s_fs::FileSystem, PathBuf);

impl Md5Checked {
    /// Narrows a stored object, the directories s3s-fs made for its key and its metadata files
    /// (named as s3s-fs 0.14 names them) to 0600/0700. s3s-fs has refused keys that leave the
    /// bucket before this runs; a key with `..` is skipped all the same.
    fn make_private(&self, bucket: &str, key: &str) {
        if key.split('/').any(|part| part == "..") || bucket.contains('/') {
            return;
        }
        let bucket_dir = self.1.join(bucket);
        let object = bucket_dir.join(key);
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let sidecars = [".metadata.json", ".internal.json"]
            .map(|suffix| self.1.join(format!(".bucket-{}.object-{}{suffix}", b64(bucket), b64(key))));
        let dirs = object.ancestors().skip(1).take_while(|d| d.starts_with(&bucket_dir) && *d != bucket_dir);
        for path in std::iter::once(object.as_path()).chain(dirs).chain(sidecars.iter().map(PathBuf::as_path)) {
            if let Err(e) = private_files::narrow(path) {
                tracing::warn!(path = %path.display(), error = %e, "local store: cannot make a stored file private");
            }
        }
    }
}

/// Wraps `body` in an MD5 check when the request has `Content-MD5`; the flag turns true on a mismatch.
fn check_md5(body: &mut Option<StreamingBlob>, content_md5: Option<String>) -> S3Result<Option<Arc<AtomicBool>>> {
    let (Some(content_md5), Some(inner)) = (content_md5, body.take()) else { return Ok(None) };
    let expected = B64
        .decode(content_md5.trim())
        .ok()
        .and_then(|d| <[u8; 16]>::try_from(d).ok())
        .ok_or_else(|| s3_error!(InvalidDigest, "content-md5 is not a base64 md5 digest"))?;
    let mismatch = Arc::new(AtomicBool::new(false));
    *body = Some(StreamingBlob::new(Md5Stream {
        inner,
        hasher: Some(Md5::new()),
        expected,
        mismatch: Arc::clone(&mismatch),
    }));
    Ok(Some(mismatch))
}

/// The store's answer, or `BadDigest` when the body did not match its `Content-MD5`.
fn digest_error(err: S3Error, mismatch: Option<&Arc<AtomicBool>>) -> S3Error {
    if mismatch.is_some_and(|m| m.load(Ordering::Acquire)) {
        s3_error!(BadDigest, "the content-md5 you specified did not match what we received")
    } else {
        err
    }
}

/// s3s-fs refuses an unknown upload id with `AccessDenied`; with a single key it can only be unknown.
fn unknown_upload(err: S3Error) -> S3Error {
    if *err.code() == S3ErrorCode::AccessDenied { s3_error!(NoSuchUpload) } else { err }
}

/// Passes the body through and fails at its end if the MD5 differs, before s3s-fs commits anything.
struct Md5Stream {
    inner: StreamingBlob,
    hasher: Option<Md5>,
    expected: [u8; 16],
    mismatch: Arc<AtomicBool>,
}

impl Stream for Md5Stream {
    type Item = Result<Bytes, StdError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        let Some(hasher) = this.hasher.as_mut() else { return Poll::Ready(None) };
        match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
            Some(Ok(bytes)) => {
                hasher.update(&bytes);
                Poll::Ready(Some(Ok(bytes)))
            }
            Some(Err(e)) => {
                this.hasher = None;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                let digest = this.hasher.take().map(Md5::finalize);
                if digest.is_some_and(|d| d.as_slice() == this.expected) {
                    Poll::Ready(None)
                } else {
                    this.mismatch.store(true, Ordering::Release);
                    Poll::Ready(Some(Err("content-md5 mismatch".into())))
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl ByteStream for Md5Stream {
    fn remaining_length(&self) -> RemainingLength {
        self.inner.remaining_length()
    }
}

type Answer<T> = S3Result<S3Response<T>>;

#[async_trait]
impl S3 for Md5Checked {
    async fn put_object(&self, mut req: S3Request<PutObjectInput>) -> Answer<PutObjectOutput> {
        let mismatch = check_md5(&mut req.input.body, req.input.content_md5.take())?;
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        let stored = self.0.put_object(req).await.map_err(|e| digest_error(e, mismatch.as_ref()))?;
        self.make_private(&bucket, &key);
        Ok(stored)
    }

    async fn upload_part(&self, mut req: S3Request<UploadPartInput>) -> Answer<UploadPartOutput> {
        let mismatch = check_md5(&mut req.input.body, req.input.content_md5.take())?;
        self.0.upload_part(req).await.map_err(|e| unknown_upload(digest_error(e, mismatch.as_ref())))
    }

    async fn get_object(&self, req: S3Request<GetObjectInput>) -> Answer<GetObjectOutput> {
        self.0.get_object(req).await
    }

    async fn head_object(&self, req: S3Request<HeadObjectInput>) -> Answer<HeadObjectOutput> {
        self.0.head_object(req).await
    }

    async fn head_bucket(&self, req: S3Request<HeadBucketInput>) -> Answer<HeadBucketOutput> {
        self.0.head_bucket(req).await
    }

    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> Answer<ListObjectsV2Output> {
        self.0.list_objects_v2(req).await
    }

    async fn delete_object(&self, req: S3Request<DeleteObjectInput>) -> Answer<DeleteObjectOutput> {
        self.0.delete_object(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> Answer<CreateMultipartUploadOutput> {
        self.0.create_multipart_upload(req).await
    }

    async fn list_parts(&self, req: S3Request<ListPartsInput>) -> Answer<ListPartsOutput> {
        self.0.list_parts(req).await.map_err(unknown_upload)
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> Answer<CompleteMultipartUploadOutput> {
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        let stored = self.0.complete_multipart_upload(req).await.map_err(unknown_upload)?;
        self.make_private(&bucket, &key);
        Ok(stored)
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> Answer<AbortMultipartUploadOutput> {
        self.0.abort_multipart_upload(req).await.map_err(unknown_upload)
    }
}

#[cfg(test)]
#[path = "local_tests.rs"]
mod tests;
