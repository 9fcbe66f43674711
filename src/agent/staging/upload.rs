//! Stage-out: output files from the work directory to object storage.
//!
//! The outputs are walked first (see [`super::walk`]); then, in batches of at most
//! [`PLAN_BATCH`] files, the broker plans each file's upload (so URLs are minted shortly before
//! they are used) and the PUTs run with bounded concurrency over all files and parts. Each PUT
//! carries `Content-Length` and `Content-MD5`: its body is hashed first and read again to be sent,
//! so the store refuses it if the file changed in between. The multipart uploads are completed by
//! the broker in one call at the end.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use async_trait::async_trait;
use futures::{Stream, StreamExt, TryStreamExt};
use md5::{Digest, Md5};
use reqwest::header::CONTENT_LENGTH;

use super::request::{
    Activity, Credit, Ctx, Meter, Retry, TryError, UrlSlot, check_status, from_reqwest, header, request,
};
use super::walk::{Found, find_outputs, open_found};
use super::{CompletedUpload, Progress, Stage, StageStats, StagingError, StagingLimits, UploadPlan, UrlSource, md5sum};
use crate::model::presigned::{CompletedPart, Presigned};

/// Most files planned by the broker in one call.
pub(super) const PLAN_BATCH: usize = 1000;
/// Bytes read from the file per chunk of a request body.
const BODY_CHUNK: u64 = 256 << 10;
/// Bytes read at once to hash a body.
const HASH_CHUNK: u64 = 1 << 20;

/// Uploads the files of `outputs` (work-dir paths from the spec, each a file or a directory,
/// walked recursively) as the broker plans, then has the broker complete the multipart uploads.
/// Symbolic links and special files inside output directories are skipped and listed in
/// [`StageStats::skipped`]; a declared output that is one, or that does not exist, is an error.
pub async fn stage_out(
    http: &reqwest::Client,
    urls: &dyn UrlSource,
    work_dir: &Path,
    outputs: &[String],
    limits: &StagingLimits,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<StageStats, StagingError> {
    let started = Instant::now();
    let (root, specs) = (work_dir.to_path_buf(), outputs.to_vec());
    let walked =
        tokio::task::spawn_blocking(move || find_outputs(&root, &specs)).await.map_err(|e| join_error(e, "."))??;
    for entry in &walked.skipped {
        tracing::warn!(entry, "not uploaded");
    }
    let total = walked.found.iter().map(|f| f.file.size).sum();
    let files = walked.found.len() as u32;
    let ctx = Ctx { http, limits, meter: Meter::start(Stage::Out, total, files, progress) };
    let mut completed = Vec::new();
    for batch in walked.found.chunks(PLAN_BATCH) {
        let wanted: Vec<_> = batch.iter().map(|f| f.file.clone()).collect();
        let plans =
            urls.plan_outputs(&wanted).await.map_err(|reason| StagingError::Source { what: "upload plans", reason })?;
        if plans.len() != wanted.len() {
            let reason = format!("{} plans for {} files", plans.len(), wanted.len());
            return Err(StagingError::Source { what: "upload plans", reason });
        }
        let uploads =
            batch.iter().zip(plans).map(|(found, plan)| Upload::new(found, plan)).collect::<Result<Vec<_>, _>>()?;
        let requests =
            uploads.iter().enumerate().flat_map(|(u, upload)| (0..upload.parts()).map(move |part| (u, part)));
        futures::stream::iter(requests)
            .map(Ok)
            .try_for_each_concurrent(limits.concurrency.max(1), |(u, part)| {
                put_part(&ctx, urls, work_dir, &uploads[u], part)
            })
            .await?;
        completed.extend(uploads.into_iter().filter_map(Upload::completed));
    }
    if !completed.is_empty() {
        urls.complete_outputs(completed)
            .await
            .map_err(|reason| StagingError::Source { what: "completion of the multipart uploads", reason })?;
    }
    ctx.meter.finish();
    Ok(StageStats { bytes: total, files, duration: started.elapsed(), skipped: walked.skipped })
}

fn join_error(e: tokio::task::JoinError, path: &str) -> StagingError {
    StagingError::Io { stage: Stage::Out, path: path.to_owned(), source: io::Error::other(e.to_string()) }
}

/// One file's upload as planned.
struct Upload<'f> {
    found: &'f Found,
    path: String,
    key: String,
    /// Multipart: the upload id and the part size.
    multipart: Option<(String, u64)>,
    /// The current PUT of each part (one for a single PUT).
    urls: Mutex<Vec<Presigned>>,
    /// The ETag of each part once it is uploaded.
    etags: Mutex<Vec<Option<String>>>,
    remaining: AtomicUsize,
    refreshing: tokio::sync::Mutex<()>,
}

impl<'f> Upload<'f> {
    fn new(found: &'f Found, plan: UploadPlan) -> Result<Self, StagingError> {
        let path = found.display();
        let size = found.file.size;
        let (key, multipart, urls) = match plan {
            UploadPlan::Single { key, put } => (key, None, vec![put]),
            UploadPlan::Multipart { key, upload_id, part_size, parts } => {
                let needed = if part_size == 0 { 0 } else { size.div_ceil(part_size).max(1) };
                if parts.len() as u64 != needed {
                    let reason = format!(
                        "{} parts planned for {path} ({size} bytes in parts of {part_size} bytes)",
                        parts.len()
                    );
                    return Err(StagingError::Source { what: "upload plans", reason });
                }
                (key, Some((upload_id, part_size)), parts)
            }
        };
        let parts = urls.len();
        Ok(Upload {
            found,
            path,
            key,
            multipart,
            urls: Mutex::new(urls),
            etags: Mutex::new(vec![None; parts]),
            remaining: AtomicUsize::new(parts),
            refreshing: tokio::sync::Mutex::new(()),
        })
    }

    fn parts(&self) -> usize {
        self.etags().len()
    }

    fn etags(&self) -> MutexGuard<'_, Vec<Option<String>>> {
        self.etags.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn urls(&self) -> MutexGuard<'_, Vec<Presigned>> {
        self.urls.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// (offset, length) of a part.
    fn range(&self, part: usize) -> (u64, u64) {
        let size = self.found.file.size;
        match &self.multipart {
            None => (0, size),
            Some((_, part_size)) => {
                let offset = part as u64 * part_size;
                (offset, (*part_size).min(size - offset))
            }
        }
    }

    fn io(&self, source: io::Error) -> StagingError {
        StagingError::Io { stage: Stage::Out, path: self.path.clone(), source }
    }

    /// The finished multipart upload, for the broker to complete.
    fn completed(self) -> Option<CompletedUpload> {
        let (upload_id, _) = self.multipart?;
        let etags = self.etags.into_inner().unwrap_or_else(|e| e.into_inner());
        let parts = etags
            .into_iter()
            .enumerate()
            .map(|(i, etag)| CompletedPart { number: i as u32 + 1, etag: etag.unwrap_or_default() })
            .collect();
        Some(CompletedUpload { output: self.found.file.output, key: self.key, upload_id, parts })
    }
}

/// The URL of one part (or of a single PUT).
struct PartSlot<'a, 'f> {
    source: &'a dyn UrlSource,
    upload: &'a Upload<'f>,
    part: usize,
}

#[async_trait]
impl UrlSlot for PartSlot<'_, '_> {
    fn current(&self) -> Presigned {
        self.upload.urls()[self.part].clone()
    }

    /// A single PUT is planned again; a multipart upload gets fresh URLs for all its parts not yet
    /// uploaded, in one call.
    async fn refresh(&self, used: &Presigned) -> Result<Presigned, StagingError> {
        let upload = self.upload;
        let _one_at_a_time = upload.refreshing.lock().await;
        let current = self.current();
        if current != *used {
            return Ok(current);
        }
        let source_error = |what, reason| StagingError::Source { what, reason };
        let Some((upload_id, _)) = &upload.multipart else {
            let plans = self.source.plan_outputs(std::slice::from_ref(&upload.found.file)).await;
            let plans = plans.map_err(|reason| source_error("upload plans", reason))?;
            let Some(UploadPlan::Single { put, .. }) = plans.into_iter().next() else {
                return Err(source_error("upload plans", format!("no single PUT in the new plan for {}", upload.path)));
            };
            upload.urls()[0] = put.clone();
            return Ok(put);
        };
        let numbers: Vec<u32> = {
            let etags = upload.etags();
            let others = (0..etags.len()).filter(|&i| i != self.part && etags[i].is_none());
            std::iter::once(self.part).chain(others).map(|i| i as u32 + 1).collect()
        };
        let output = upload.found.file.output;
        let fresh = self.source.part_urls(output, &upload.key, upload_id, &numbers).await;
        let fresh = fresh.map_err(|reason| source_error("part urls", reason))?;
        if fresh.len() != numbers.len() {
            return Err(source_error("part urls", format!("{} urls for {} parts", fresh.len(), numbers.len())));
        }
        let mut urls = upload.urls();
        for (number, url) in numbers.into_iter().zip(fresh) {
            urls[number as usize - 1] = url;
        }
        Ok(urls[self.part].clone())
    }
}

/// Uploads one part (or a whole file), with retries.
async fn put_part(
    ctx: &Ctx<'_>,
    source: &dyn UrlSource,
    work_dir: &Path,
    upload: &Upload<'_>,
    part: usize,
) -> Result<(), StagingError> {
    let (offset, len) = upload.range(part);
    let (root, found) = (work_dir.to_path_buf(), upload.found.clone());
    let md5 = tokio::task::spawn_blocking(move || hash_range(&open_found(&root, &found)?, offset, len))
        .await
        .map_err(|e| join_error(e, &upload.path))?
        .map_err(|e| upload.io(e))?;
    let content_md5 = md5sum::base64(&md5);
    let slot = PartSlot { source, upload, part };
    let mut credit = Credit::default();
    let mut retry = Retry::new(ctx, &upload.path, &slot);
    let etag = loop {
        let req = retry.request().await?;
        match put_once(ctx, work_dir, upload, (offset, len), &content_md5, &req, &mut credit).await {
            Ok(etag) => break etag,
            Err(e) => retry.failed(e).await?,
        }
    };
    upload.etags()[part] = Some(etag);
    if upload.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
        ctx.meter.add_file();
    }
    Ok(())
}

/// One try of one PUT; returns the store's ETag (`""` when it sends none).
async fn put_once(
    ctx: &Ctx<'_>,
    work_dir: &Path,
    upload: &Upload<'_>,
    (offset, len): (u64, u64),
    content_md5: &str,
    req: &Presigned,
    credit: &mut Credit,
) -> Result<String, TryError> {
    let (root, found) = (work_dir.to_path_buf(), upload.found.clone());
    let file = tokio::task::spawn_blocking(move || open_found(&root, &found))
        .await
        .map_err(|e| TryError::Other(join_error(e, &upload.path)))?
        .map_err(|e| TryError::Other(upload.io(e)))?;
    let activity = Arc::new(Activity::new());
    let body = reqwest::Body::wrap_stream(body_stream(Arc::new(file), offset, len, activity.clone()));
    let builder = request(ctx.http, req)?.header(CONTENT_LENGTH, len).header("content-md5", content_md5).body(body);
    let idle = ctx.limits.request_timeout;
    let sent = activity.watch(idle, builder.send(), || credit.to(&ctx.meter, activity.sent())).await;
    if let Some(e) = activity.local_error.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(TryError::Other(upload.io(e)));
    }
    let response = match sent {
        None => return Err(TryError::transient(format!("no progress for {}", humantime::format_duration(idle)))),
        Some(result) => result.map_err(from_reqwest)?,
    };
    let response = check_status(ctx, response).await?;
    credit.to(&ctx.meter, len);
    Ok(header(response.headers(), "etag").unwrap_or_default())
}

/// `len` bytes of `file` from `offset`, read in chunks off the async threads.
fn body_stream(
    file: Arc<File>,
    offset: u64,
    len: u64,
    activity: Arc<Activity>,
) -> impl Stream<Item = io::Result<Vec<u8>>> + Send + 'static {
    futures::stream::try_unfold(0u64, move |sent| {
        let (file, activity) = (file.clone(), activity.clone());
        async move {
            if sent >= len {
                return Ok(None);
            }
            let n = (len - sent).min(BODY_CHUNK);
            let pos = offset + sent;
            let read = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0; n as usize];
                file.read_exact_at(&mut buf, pos).map(|()| buf).map_err(shrank)
            })
            .await
            .map_err(|e| io::Error::other(e.to_string()))
            .and_then(|r| r);
            match read {
                Ok(buf) => {
                    activity.touch(n);
                    Ok(Some((buf, sent + n)))
                }
                Err(e) => {
                    let copy = io::Error::new(e.kind(), e.to_string());
                    *activity.local_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(copy);
                    Err(e)
                }
            }
        }
    })
}

/// The MD5 of `len` bytes of `file` from `offset`.
fn hash_range(file: &File, offset: u64, len: u64) -> io::Result<[u8; 16]> {
    let mut md5 = Md5::new();
    let mut buf = vec![0; HASH_CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(HASH_CHUNK) as usize;
        file.read_exact_at(&mut buf[..n], offset + done).map_err(shrank)?;
        md5.update(&buf[..n]);
        done += n as u64;
    }
    Ok(md5.finalize().into())
}

/// A read past the end means the file shrank after it was found.
fn shrank(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::UnexpectedEof { io::Error::other("it shrank while it was uploaded") } else { e }
}
