//! Stage-in: inputs from object storage into the work directory.
//!
//! Every input file is created (sized, mode 0600, directories 0700) before any byte moves, then
//! fetched: in one GET when it is at most `range_size`, else as ranged GETs written at their
//! offsets. A range that breaks off is resumed where it stopped. A small file is hashed as it is
//! written; a big one by a blocking thread that reads back, in order, the prefix that is already
//! on disk, so hashing runs beside downloading (on another core) instead of after it. MD5 runs at
//! about 600 MB/s on one core, which bounds a checked big file's download rate.
//!
//! The work directory is the agent's own at this point (the job's process has not started), so
//! directories are made without symlink checks; files are still opened with `O_NOFOLLOW`.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use hyper::body::Bytes;
use md5::{Digest, Md5};
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RANGE};
use tokio::task::JoinHandle;

use super::md5sum::{Expected, Feed, hash_in_order, store_md5};
use super::request::{
    Credit, Ctx, EXPIRY_MARGIN, Meter, Retry, TryError, UrlSlot, from_reqwest, header, request, send,
};
use super::{InputFile, Progress, Stage, StageStats, StagingError, StagingLimits, UrlSource, relative_components};
use crate::model::presigned::Presigned;

/// Bytes gathered from the network before they are written (and hashed) in one go.
const FLUSH_BYTES: usize = 1 << 20;
/// Smallest range size honoured.
const MIN_RANGE: u64 = 4096;
/// Most URLs asked for in one refresh.
const REFRESH_BATCH: usize = 1000;

/// Downloads `inputs` into `work_dir`, `initial` holding one GET per input (same order). Returns
/// when every file is on disk and checked; on error, files may be partly written.
pub async fn stage_in(
    http: &reqwest::Client,
    urls: &dyn UrlSource,
    work_dir: &Path,
    inputs: &[InputFile],
    initial: Vec<Presigned>,
    limits: &StagingLimits,
    progress: &(dyn Fn(Progress) + Send + Sync),
) -> Result<StageStats, StagingError> {
    let started = Instant::now();
    if initial.len() != inputs.len() {
        let reason = format!("{} urls for {} inputs", initial.len(), inputs.len());
        return Err(StagingError::Source { what: "input urls", reason });
    }
    let range_size = limits.range_size.max(MIN_RANGE);
    let mut files = Vec::with_capacity(inputs.len());
    let mut pieces = Vec::new();
    let mut seen = HashSet::new();
    for (index, input) in inputs.iter().enumerate() {
        let mut file = InFile::new(work_dir, input, range_size, &mut seen)?;
        let mut ranges = Vec::new();
        let mut start = 0;
        loop {
            let len = if file.ranged { range_size.min(input.size - start) } else { input.size };
            ranges.push((start, len));
            start += len;
            if start >= input.size {
                break;
            }
        }
        file.remaining = AtomicUsize::new(ranges.len());
        pieces.extend(ranges.iter().enumerate().map(|(k, &(start, len))| Piece { file: index, index: k, start, len }));
        if file.ranged {
            file.feed = Some(Arc::new(Feed::new(ranges, input.size)));
        }
        files.push(file);
    }
    let plan: Vec<(PathBuf, u64, String)> =
        files.iter().map(|f| (f.dest.clone(), f.input.size, f.rel.clone())).collect();
    tokio::task::spawn_blocking(move || create_files(&plan)).await.map_err(|e| join_error(e, "inputs"))??;

    let total = inputs.iter().map(|i| i.size).sum();
    let ctx = Ctx { http, limits, meter: Meter::start(Stage::In, total, files.len() as u32, progress) };
    let urls = InputUrls {
        source: urls,
        done: (0..inputs.len()).map(|_| AtomicBool::new(false)).collect(),
        urls: Mutex::new(initial),
        refreshing: tokio::sync::Mutex::new(()),
    };
    let _stop = StopHashers(&files);
    futures::stream::iter(&pieces)
        .map(Ok)
        .try_for_each_concurrent(limits.concurrency.max(1), |piece| fetch_piece(&ctx, &urls, &files[piece.file], piece))
        .await?;
    ctx.meter.finish();
    Ok(StageStats { bytes: total, files: files.len() as u32, duration: started.elapsed(), skipped: Vec::new() })
}

/// One GET: a whole small file, or one range of a big one.
struct Piece {
    file: usize,
    /// Its place among its file's pieces.
    index: usize,
    start: u64,
    len: u64,
}

/// One input being downloaded.
struct InFile<'a> {
    input: &'a InputFile,
    /// The work-dir path, normalised, for errors.
    rel: String,
    dest: PathBuf,
    /// Fetched as ranges (bigger than the range size).
    ranged: bool,
    /// Pieces not yet done.
    remaining: AtomicUsize,
    state: Mutex<FileState>,
    /// Ranged files: how far each range is on disk, for the in-order hasher.
    feed: Option<Arc<Feed>>,
    hasher: Mutex<Option<HashTask>>,
}

/// The in-order hasher of a ranged file: its MD5, or `None` when stopped.
type HashTask = JoinHandle<io::Result<Option<[u8; 16]>>>;

/// What the responses told about a file.
#[derive(Default)]
struct FileState {
    expected: Option<Expected>,
    etag: Option<String>,
    hashing: bool,
}

impl<'a> InFile<'a> {
    fn new(
        work_dir: &Path,
        input: &'a InputFile,
        range_size: u64,
        seen: &mut HashSet<String>,
    ) -> Result<Self, StagingError> {
        let bad = |why| StagingError::BadPath { what: "input", path: input.path.clone(), why };
        let parts = relative_components("input", &input.path)?;
        let rel = parts.join("/");
        if parts.is_empty() {
            return Err(bad("is empty"));
        }
        if !seen.insert(rel.clone()) {
            return Err(bad("is listed twice"));
        }
        let expected = match &input.md5 {
            Some(b64) => Some(Expected::from_base64(b64, "the broker").ok_or_else(|| StagingError::Source {
                what: "input checksums",
                reason: format!("{b64:?} is not a base64 md5 (for {rel})"),
            })?),
            None => None,
        };
        Ok(InFile {
            input,
            dest: parts.iter().fold(work_dir.to_path_buf(), |p, c| p.join(c)),
            rel,
            ranged: input.size > range_size,
            remaining: AtomicUsize::new(0),
            state: Mutex::new(FileState { expected, ..FileState::default() }),
            feed: None,
            hasher: Mutex::new(None),
        })
    }

    fn state(&self) -> MutexGuard<'_, FileState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn integrity(&self, reason: String) -> StagingError {
        StagingError::Integrity { stage: Stage::In, path: self.rel.clone(), reason }
    }

    fn io(&self, source: io::Error) -> StagingError {
        StagingError::Io { stage: Stage::In, path: self.rel.clone(), source }
    }

    /// Checks a response's headers against what earlier ones said; learns the expected MD5 and,
    /// for a ranged file, starts hashing once it is known.
    fn on_response(&self, headers: &HeaderMap) -> Result<Option<Expected>, TryError> {
        let mut state = self.state();
        if let Some(etag) = header(headers, "etag") {
            match &state.etag {
                Some(seen) if *seen != etag => {
                    return Err(TryError::Other(
                        self.integrity("the object changed in the store while it was downloaded".into()),
                    ));
                }
                Some(_) => {}
                None => state.etag = Some(etag),
            }
        }
        if state.expected.is_none() {
            state.expected = store_md5(headers, !self.ranged);
        }
        if let (Some(_), Some(feed), false) = (state.expected, &self.feed, state.hashing) {
            state.hashing = true;
            let (feed, dest) = (feed.clone(), self.dest.clone());
            let handle = tokio::task::spawn_blocking(move || hash_in_order(&feed, &dest));
            *self.hasher.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        }
        Ok(state.expected)
    }

    /// After its last piece: a ranged file's in-order hash against the expected MD5.
    async fn verify_in_order(&self) -> Result<(), StagingError> {
        let handle = self.hasher.lock().unwrap_or_else(|e| e.into_inner()).take();
        let expected = self.state().expected;
        let (Some(handle), Some(expected)) = (handle, expected) else {
            return Ok(());
        };
        match handle.await.map_err(|e| join_error(e, &self.rel))?.map_err(|e| self.io(e))? {
            Some(actual) => expected.check(&actual).map_err(|reason| self.integrity(reason)),
            None => Ok(()),
        }
    }
}

/// Stops the in-order hashers when the stage ends, whichever way.
struct StopHashers<'f, 'a>(&'f [InFile<'a>]);

impl Drop for StopHashers<'_, '_> {
    fn drop(&mut self) {
        self.0.iter().filter_map(|f| f.feed.as_ref()).for_each(|feed| feed.stop());
    }
}

/// Creates every input file (sized) and its directories.
fn create_files(files: &[(PathBuf, u64, String)]) -> Result<(), StagingError> {
    for (dest, size, rel) in files {
        let io = |source| StagingError::Io { stage: Stage::In, path: rel.clone(), source };
        if let Some(parent) = dest.parent() {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(parent).map_err(io)?;
        }
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(dest)
            .map_err(io)?;
        file.set_len(*size).map_err(io)?;
    }
    Ok(())
}

fn join_error(e: tokio::task::JoinError, what: &str) -> StagingError {
    StagingError::Io { stage: Stage::In, path: what.to_owned(), source: io::Error::other(e.to_string()) }
}

/// Fetches one piece, with retries; the last piece of a file also checks the file.
async fn fetch_piece(
    ctx: &Ctx<'_>,
    urls: &InputUrls<'_>,
    file: &InFile<'_>,
    piece: &Piece,
) -> Result<(), StagingError> {
    let slot = InputSlot { urls, index: piece.file };
    let (mut done, mut credit) = (0, Credit::default());
    let mut retry = Retry::new(ctx, &file.rel, &slot);
    loop {
        let req = retry.request().await?;
        match fetch_once(ctx, file, piece, &req, &mut done, &mut credit).await {
            Ok(()) => break,
            Err(e) => retry.failed(e).await?,
        }
    }
    if file.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
        file.verify_in_order().await?;
        urls.done[piece.file].store(true, Ordering::Relaxed);
        ctx.meter.add_file();
    }
    Ok(())
}

/// One try of one piece. `done` is how much of the piece is on disk from earlier tries (a range
/// resumes there; a whole file starts over).
async fn fetch_once(
    ctx: &Ctx<'_>,
    file: &InFile<'_>,
    piece: &Piece,
    req: &Presigned,
    done: &mut u64,
    credit: &mut Credit,
) -> Result<(), TryError> {
    if !file.ranged {
        *done = 0;
    }
    let (from, end) = (piece.start + *done, piece.start + piece.len);
    if file.ranged && from == end {
        return Ok(()); // all on disk; the connection broke after the last byte
    }
    let mut builder = request(ctx.http, req)?;
    if file.ranged {
        builder = builder.header(RANGE, format!("bytes={from}-{}", end - 1));
    }
    let mut response = send(ctx, builder).await?;
    check_framing(file, response.status(), response.headers(), from, end)?;
    let expected = file.on_response(response.headers())?;
    let dest = file.dest.clone();
    let handle = tokio::task::spawn_blocking(move || {
        OpenOptions::new().write(true).custom_flags(nix::libc::O_NOFOLLOW).open(dest)
    });
    let handle = handle.await.map_err(|e| TryError::Other(join_error(e, &file.rel)))?;
    let mut writer = Writer {
        file: Arc::new(handle.map_err(|e| TryError::Other(file.io(e)))?),
        offset: from,
        chunks: Vec::new(),
        buffered: 0,
        hasher: (!file.ranged && expected.is_some()).then(Md5::new),
    };
    let want = end - from;
    let mut got = 0u64;
    loop {
        let wait = ctx.limits.request_timeout;
        let chunk = match tokio::time::timeout(wait, response.chunk()).await {
            Err(_) => return Err(TryError::transient(format!("no data for {}", humantime::format_duration(wait)))),
            Ok(result) => result.map_err(from_reqwest)?,
        };
        let last = chunk.is_none();
        if let Some(chunk) = chunk {
            got += chunk.len() as u64;
            if got > want {
                return Err(TryError::Other(
                    file.integrity(format!("the store sent more than the {want} bytes asked for")),
                ));
            }
            writer.buffered += chunk.len();
            writer.chunks.push(chunk);
        }
        if writer.buffered >= FLUSH_BYTES || (last && writer.buffered > 0) {
            *done += writer.flush().await.map_err(|e| TryError::Other(file.io(e)))?;
            credit.to(&ctx.meter, *done);
            if let Some(feed) = &file.feed {
                feed.advance(piece.index, *done);
            }
        }
        if last {
            break;
        }
    }
    if got < want {
        return Err(TryError::transient(format!("the response ended after {got} of {want} bytes")));
    }
    if let (Some(hasher), Some(expected)) = (writer.hasher, expected) {
        expected.check(&hasher.finalize().into()).map_err(|reason| TryError::Other(file.integrity(reason)))?;
    }
    Ok(())
}

/// Checks status, `Content-Range` and `Content-Length` of a response before its body is read.
fn check_framing(
    file: &InFile<'_>,
    status: StatusCode,
    headers: &HeaderMap,
    from: u64,
    end: u64,
) -> Result<(), TryError> {
    let size = file.input.size;
    let listed = |actual: u64| {
        TryError::Other(file.integrity(format!("the object is {actual} bytes in the store, {size} were listed")))
    };
    if file.ranged {
        if status == StatusCode::OK {
            return Err(TryError::Fatal("the store ignored the range request (HTTP 200 to a ranged GET)".into()));
        }
        if status != StatusCode::PARTIAL_CONTENT {
            return Err(TryError::Fatal(format!("unexpected HTTP {status} to a ranged GET")));
        }
        let Some((first, last, total)) = header(headers, "content-range").as_deref().and_then(parse_content_range)
        else {
            return Err(TryError::Fatal("a ranged response without a valid Content-Range".into()));
        };
        if let Some(total) = total.filter(|t| *t != size) {
            return Err(listed(total));
        }
        if first != from || last.checked_add(1) != Some(end) {
            return Err(TryError::Fatal(format!("the store sent bytes {first}-{last} for bytes {from}-{}", end - 1)));
        }
    } else if status != StatusCode::OK {
        return Err(TryError::Fatal(format!("unexpected HTTP {status} to a GET")));
    }
    match header(headers, "content-length").and_then(|v| v.trim().parse::<u64>().ok()) {
        Some(len) if len != end - from && !file.ranged => Err(listed(len)),
        Some(len) if len != end - from => Err(TryError::Fatal(format!("{len} bytes for a range of {}", end - from))),
        _ => Ok(()),
    }
}

/// `bytes 0-99/1000` → (0, 99, Some(1000)); `/*` gives no total.
fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let total = if total == "*" { None } else { Some(total.parse().ok()?) };
    Some((first.parse().ok()?, last.parse().ok()?, total))
}

/// Gathers a response's chunks and writes them (hashing them first, for a small file) off the
/// async threads, about [`FLUSH_BYTES`] at a time, without copying them.
struct Writer {
    file: Arc<File>,
    offset: u64,
    chunks: Vec<Bytes>,
    buffered: usize,
    hasher: Option<Md5>,
}

impl Writer {
    /// Writes the gathered chunks at their offset; returns how many bytes.
    async fn flush(&mut self) -> io::Result<u64> {
        let (file, offset) = (self.file.clone(), self.offset);
        let (chunks, mut hasher) = (std::mem::take(&mut self.chunks), self.hasher.take());
        let (hasher, result) = tokio::task::spawn_blocking(move || {
            let mut at = offset;
            for chunk in &chunks {
                if let Some(h) = hasher.as_mut() {
                    h.update(chunk);
                }
                if let Err(e) = file.write_all_at(chunk, at) {
                    return (hasher, Err(e));
                }
                at += chunk.len() as u64;
            }
            (hasher, Ok(at - offset))
        })
        .await
        .map_err(|e| io::Error::other(e.to_string()))?;
        let n = result?;
        (self.hasher, self.offset, self.buffered) = (hasher, offset + n, 0);
        Ok(n)
    }
}

/// The current GET of every input, refreshed in batches.
struct InputUrls<'a> {
    source: &'a dyn UrlSource,
    urls: Mutex<Vec<Presigned>>,
    /// Inputs completely downloaded (their URLs are not refreshed any more).
    done: Vec<AtomicBool>,
    refreshing: tokio::sync::Mutex<()>,
}

/// The URL of one input.
struct InputSlot<'u, 'a> {
    urls: &'u InputUrls<'a>,
    index: usize,
}

#[async_trait]
impl UrlSlot for InputSlot<'_, '_> {
    fn current(&self) -> Presigned {
        self.urls.urls.lock().unwrap_or_else(|e| e.into_inner())[self.index].clone()
    }

    /// Asks for this input's URL and those of the unfinished inputs that expire no later (they
    /// were minted together), up to [`REFRESH_BATCH`] in one call.
    async fn refresh(&self, used: &Presigned) -> Result<Presigned, StagingError> {
        let _one_at_a_time = self.urls.refreshing.lock().await;
        let current = self.current();
        if current != *used {
            return Ok(current);
        }
        let horizon = used.expires_at.max(SystemTime::now() + EXPIRY_MARGIN + Duration::from_secs(30));
        let indices: Vec<u32> = {
            let urls = self.urls.urls.lock().unwrap_or_else(|e| e.into_inner());
            let others = (0..urls.len()).filter(|&i| {
                i != self.index && !self.urls.done[i].load(Ordering::Relaxed) && urls[i].expires_at <= horizon
            });
            std::iter::once(self.index).chain(others).take(REFRESH_BATCH).map(|i| i as u32).collect()
        };
        let fresh = self
            .urls
            .source
            .input_urls(&indices)
            .await
            .map_err(|reason| StagingError::Source { what: "input urls", reason })?;
        if fresh.len() != indices.len() {
            let reason = format!("{} urls for {} inputs", fresh.len(), indices.len());
            return Err(StagingError::Source { what: "input urls", reason });
        }
        let mut urls = self.urls.urls.lock().unwrap_or_else(|e| e.into_inner());
        for (index, url) in indices.into_iter().zip(fresh) {
            urls[index as usize] = url;
        }
        Ok(urls[self.index].clone())
    }
}
