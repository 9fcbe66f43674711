//! The embedded `local` store: an S3-compatible server (s3s-fs) in-process over a directory, signing
//! with a key made at start. Agents reach it with presigned URLs like real S3; the broker through an
//! [`S3Store`].
//!
//! Bodies stream between the socket and files (s3s-fs writes a temporary file and renames it), so
//! object size is bounded by the disk, not memory. Corrections to s3s-fs: `Content-MD5` is checked
//! while the body streams, for objects and parts alike, and a mismatch stores nothing; every object
//! gets a full-object CRC32C (summed as a PUT's body streams in, over the assembled object when a
//! multipart upload completes; s3s-fs records one only when the client sends it), which a whole
//! GET reports as `x-amz-checksum-crc32c` so downloads can check ranges in parallel; and GETs read
//! the file [`READ_CHUNK`] at a time (s3s-fs reads 4 KiB per blocking call, ~100 MiB/s).
//!
//! The store is private to the broker's user: the root and bucket directories are 0700, so nothing
//! below them (s3s-fs's temporary files, parts and metadata included) can be reached by anyone
//! else; stored objects, the directories above them and their metadata are narrowed to 0600/0700
//! as they are written; at start anything found wider is narrowed and logged.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use crc_fast::{CrcAlgorithm, Digest as CrcDigest};
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

/// Bytes a GET reads from its file at once.
pub const READ_CHUNK: usize = 1 << 20;

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
        let sidecars = [".metadata.json", ".internal.json"].map(|suffix| self.sidecar(bucket, key, suffix));
        let dirs = object.ancestors().skip(1).take_while(|d| d.starts_with(&bucket_dir) && *d != bucket_dir);
        for path in std::iter::once(object.as_path()).chain(dirs).chain(sidecars.iter().map(PathBuf::as_path)) {
            if let Err(e) = private_files::narrow(path) {
                tracing::warn!(path = %path.display(), error = %e, "local store: cannot make a stored file private");
            }
        }
    }

    /// Where s3s-fs 0.14 keeps what it knows about an object: `<root>/.bucket-B.object-K<suffix>`.
    fn sidecar(&self, bucket: &str, key: &str, suffix: &str) -> PathBuf {
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        self.1.join(format!(".bucket-{}.object-{}{suffix}", b64(bucket), b64(key)))
    }

    /// The stored object's path, `None` for a key s3s-fs would refuse anyway.
    fn object_path(&self, bucket: &str, key: &str) -> Option<PathBuf> {
        let bad = |s: &str| s.is_empty() || s.split('/').any(|part| part == "..");
        (!bad(bucket) && !bucket.contains('/') && !bad(key)).then(|| self.1.join(bucket).join(key))
    }

    /// Records `crc32c` as the object's only checksum in its internal info (where s3s-fs reads the
    /// checksums a GET reports), replacing the file; a completed upload otherwise keeps the
    /// checksums of the object the key held before.
    fn record_crc32c(&self, bucket: &str, key: &str, crc32c: u32) -> io::Result<()> {
        let path = self.sidecar(bucket, key, ".internal.json");
        let mut info: serde_json::Map<String, serde_json::Value> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(io::Error::other)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => serde_json::Map::new(),
            Err(e) => return Err(e),
        };
        info.retain(|name, _| !name.starts_with("checksum_"));
        info.insert("checksum_crc32c".into(), B64.encode(crc32c.to_be_bytes()).into());
        let bytes = serde_json::to_vec(&info).map_err(io::Error::other)?;
        let temporary = path.with_extension(format!("json.{}", fastrand::u64(..)));
        private_files::write_new(&temporary, &bytes)?;
        std::fs::rename(&temporary, &path).inspect_err(|_| {
            let _ = std::fs::remove_file(&temporary);
        })
    }

    /// Records the CRC32C of the object now stored at the key (read back in full).
    async fn record_crc32c_of_file(&self, bucket: &str, key: &str) -> S3Result<()> {
        let Some(path) = self.object_path(bucket, key) else { return Ok(()) };
        let crc = tokio::task::spawn_blocking(move || crc32c_of_file(&path))
            .await
            .map_err(|e| s3_error!(InternalError, "summing the object: {e}"))?
            .map_err(|e| s3_error!(InternalError, "summing the object: {e}"))?;
        self.record_crc32c(bucket, key, crc).map_err(|e| s3_error!(InternalError, "recording a checksum: {e}"))
    }
}

/// The CRC32C of the file at `path`.
fn crc32c_of_file(path: &Path) -> io::Result<u32> {
    let file = std::fs::File::open(path)?;
    let (mut crc, mut buf, mut at) = (CrcDigest::new(CrcAlgorithm::Crc32Iscsi), vec![0u8; READ_CHUNK], 0u64);
    loop {
        let n = file.read_at(&mut buf, at)?;
        if n == 0 {
            return Ok(crc.finalize() as u32);
        }
        crc.update(&buf[..n]);
        at += n as u64;
    }
}

/// `len` bytes of `file` from `start`, [`READ_CHUNK`] per blocking read.
fn file_body(file: std::fs::File, start: u64, len: u64) -> StreamingBlob {
    let file = Arc::new(file);
    let chunks = futures::stream::try_unfold(0u64, move |sent| {
        let file = Arc::clone(&file);
        async move {
            if sent >= len {
                return Ok(None);
            }
            let n = (len - sent).min(READ_CHUNK as u64) as usize;
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; n];
                file.read_exact_at(&mut buf, start + sent).map(|()| Bytes::from(buf))
            });
            let chunk = read.await.map_err(io::Error::other)??;
            Ok::<_, io::Error>(Some((chunk, sent + n as u64)))
        }
    });
    StreamingBlob::wrap(chunks)
}

/// The first byte of a `Content-Range` (`bytes 100-199/1000` → 100).
fn range_start(content_range: &str) -> Option<u64> {
    content_range.trim().strip_prefix("bytes ")?.split_once('-')?.0.parse().ok()
}

/// What a body's [`SumStream`] found: whether its MD5 missed `Content-MD5`, and its CRC32C once
/// it ended.
#[derive(Default)]
struct Sums {
    mismatch: AtomicBool,
    crc32c: Mutex<Option<u32>>,
}

/// Wraps `body` in a [`SumStream`]: an MD5 check when the request has `Content-MD5`, and the CRC32C.
fn check_md5(body: &mut Option<StreamingBlob>, content_md5: Option<String>) -> S3Result<Option<Arc<Sums>>> {
    let Some(inner) = body.take() else { return Ok(None) };
    let expected = match content_md5 {
        None => None,
        Some(b64) => Some(
            B64.decode(b64.trim())
                .ok()
                .and_then(|d| <[u8; 16]>::try_from(d).ok())
                .ok_or_else(|| s3_error!(InvalidDigest, "content-md5 is not a base64 md5 digest"))?,
        ),
    };
    let sums = Arc::new(Sums::default());
    *body = Some(StreamingBlob::new(SumStream {
        inner,
        md5: expected.map(|e| (Md5::new(), e)),
        crc32c: CrcDigest::new(CrcAlgorithm::Crc32Iscsi),
        done: false,
        sums: Arc::clone(&sums),
    }));
    Ok(Some(sums))
}

/// The store's answer, or `BadDigest` when the body did not match its `Content-MD5`.
fn digest_error(err: S3Error, sums: Option<&Arc<Sums>>) -> S3Error {
    if sums.is_some_and(|s| s.mismatch.load(Ordering::Acquire)) {
        s3_error!(BadDigest, "the content-md5 you specified did not match what we received")
    } else {
        err
    }
}

/// s3s-fs refuses an unknown upload id with `AccessDenied`; with a single key it can only be unknown.
fn unknown_upload(err: S3Error) -> S3Error {
    if *err.code() == S3ErrorCode::AccessDenied { s3_error!(NoSuchUpload) } else { err }
}

/// Passes the body through, summing it; fails at its end if the MD5 differs from the expected one,
/// before s3s-fs commits anything.
struct SumStream {
    inner: StreamingBlob,
    /// The running MD5 and the `Content-MD5` it must reach.
    md5: Option<(Md5, [u8; 16])>,
    crc32c: CrcDigest,
    done: bool,
    sums: Arc<Sums>,
}

impl Stream for SumStream {
    type Item = Result<Bytes, StdError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut this.inner).poll_next(cx)) {
            Some(Ok(bytes)) => {
                if let Some((md5, _)) = this.md5.as_mut() {
                    md5.update(&bytes);
                }
                this.crc32c.update(&bytes);
                Poll::Ready(Some(Ok(bytes)))
            }
            Some(Err(e)) => {
                this.done = true;
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.done = true;
                if let Some((md5, expected)) = this.md5.take()
                    && md5.finalize().as_slice() != expected
                {
                    this.sums.mismatch.store(true, Ordering::Release);
                    return Poll::Ready(Some(Err("content-md5 mismatch".into())));
                }
                *this.sums.crc32c.lock().unwrap_or_else(|e| e.into_inner()) = Some(this.crc32c.finalize() as u32);
                Poll::Ready(None)
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl ByteStream for SumStream {
    fn remaining_length(&self) -> RemainingLength {
        self.inner.remaining_length()
    }
}

type Answer<T> = S3Result<S3Response<T>>;

#[async_trait]
impl S3 for Md5Checked {
    async fn put_object(&self, mut req: S3Request<PutObjectInput>) -> Answer<PutObjectOutput> {
        let sums = check_md5(&mut req.input.body, req.input.content_md5.take())?;
        let (bucket, key) = (req.input.bucket.clone(), req.input.key.clone());
        let mut stored = self.0.put_object(req).await.map_err(|e| digest_error(e, sums.as_ref()))?;
        let crc32c = sums.and_then(|s| *s.crc32c.lock().unwrap_or_else(|e| e.into_inner()));
        if let Some(crc) = crc32c.filter(|_| !key.ends_with('/')) {
            self.record_crc32c(&bucket, &key, crc)
                .map_err(|e| s3_error!(InternalError, "recording the object's checksum: {e}"))?;
            stored.output.checksum_crc32c = Some(B64.encode(crc.to_be_bytes()));
        }
        self.make_private(&bucket, &key);
        Ok(stored)
    }

    async fn upload_part(&self, mut req: S3Request<UploadPartInput>) -> Answer<UploadPartOutput> {
        let sums = check_md5(&mut req.input.body, req.input.content_md5.take())?;
        self.0.upload_part(req).await.map_err(|e| unknown_upload(digest_error(e, sums.as_ref())))
    }

    /// s3s-fs's answer with the body read [`READ_CHUNK`] at a time from a file opened after it
    /// (a concurrent replacement of the object shows as a checksum mismatch to the reader).
    async fn get_object(&self, req: S3Request<GetObjectInput>) -> Answer<GetObjectOutput> {
        let path = self.object_path(&req.input.bucket, &req.input.key);
        let mut answer = self.0.get_object(req).await?;
        let output = &mut answer.output;
        let start = output.content_range.as_deref().map_or(Some(0), range_start);
        let len = output.content_length.and_then(|n| u64::try_from(n).ok());
        if let (Some(path), Some(start), Some(len)) = (path, start, len) {
            let opened = tokio::task::spawn_blocking(move || std::fs::File::open(path)).await;
            if let Ok(Ok(file)) = opened {
                output.body = Some(file_body(file, start, len));
            }
        }
        Ok(answer)
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
        self.record_crc32c_of_file(&bucket, &key).await?;
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
