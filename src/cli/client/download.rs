//! Downloads of stored objects to files (`jobs outputs --download`, `data get`) and the requests to
//! URLs the gateway hands out (presigned store URLs or its own streaming routes).
//!
//! Each object goes to `<file>.part` first. A `.part` left by an interrupted run is continued with
//! `Range: bytes=<its length>-` (presigned S3 and Azure GETs and the gateway's routes all take it);
//! a store that answers the whole object instead starts it over. The finished file must have the
//! object's size and, where the store keeps one, its MD5: a mismatch deletes the `.part` and fails
//! naming the object. A file already there with the right size and MD5 is skipped. On a terminal,
//! stderr shows a byte progress bar; otherwise only a final line.

use std::io::{IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use md5::{Digest, Md5};
use nix::fcntl::OFlag;
use reqwest::header::RANGE;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use super::gateway::{ClientError, Gateway, chain};
use crate::gateway::api::{DataObject, HttpRequest};

/// How often the progress bar is redrawn.
const REDRAW: Duration = Duration::from_millis(100);

/// One object and the file it goes to.
pub struct Wanted {
    pub object: DataObject,
    pub dest: PathBuf,
}

/// What a run of downloads did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub downloaded: u32,
    /// Of `downloaded`, those continued from a `.part` file.
    pub resumed: u32,
    /// Already complete, with the right size and checksum.
    pub skipped: u32,
    /// Bytes received.
    pub bytes: u64,
    /// Objects checked against the store's MD5 (the others by size only).
    pub verified: u32,
}

enum Outcome {
    Skipped,
    Fetched { resumed: bool, bytes: u64, verified: bool },
}

/// Downloads each object to its file, in order; a final line on stderr says what was done.
pub async fn download_all(gw: &Gateway, wanted: &[Wanted]) -> anyhow::Result<Tally> {
    let started = Instant::now();
    let mut bar = Bar::new(wanted.iter().map(|w| w.object.size).sum());
    let mut tally = Tally::default();
    for w in wanted {
        let outcome = fetch(gw, w, &mut bar).await;
        bar.clear();
        match outcome? {
            Outcome::Skipped => tally.skipped += 1,
            Outcome::Fetched { resumed, bytes, verified } => {
                tally.downloaded += 1;
                tally.resumed += u32::from(resumed);
                tally.verified += u32::from(verified);
                tally.bytes += bytes;
            }
        }
    }
    eprintln!(
        "downloaded {} objects ({} bytes received, {} resumed, {} md5-verified), skipped {} already complete, in {:.1} s",
        tally.downloaded,
        tally.bytes,
        tally.resumed,
        tally.verified,
        tally.skipped,
        started.elapsed().as_secs_f64()
    );
    Ok(tally)
}

/// `<dest>.part`.
fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

async fn fetch(gw: &Gateway, w: &Wanted, bar: &mut Bar) -> anyhow::Result<Outcome> {
    let o = &w.object;
    if let Some(parent) = w.dest.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    if is_complete(&w.dest, o).await? {
        bar.advance(o.size);
        return Ok(Outcome::Skipped);
    }
    let part = part_path(&w.dest);
    refuse_link(&part)?;
    let mut have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    if have > o.size {
        have = 0;
    }
    let resumed = have > 0;
    let mut received = 0;
    if have < o.size || !part.exists() {
        let mut rb = request(gw, &o.download)?;
        if have > 0 {
            rb = rb.header(RANGE, format!("bytes={have}-"));
        }
        let resp = send(rb, &o.download, &o.uri).await?;
        if have > 0 && resp.status() != StatusCode::PARTIAL_CONTENT {
            have = 0; // The whole object came: start the file over.
        }
        bar.advance(have);
        // Never through a link swapped in since the check above.
        let mut file = std::fs::OpenOptions::new()
            .custom_flags(OFlag::O_NOFOLLOW.bits())
            .create(true)
            .write(true)
            .append(have > 0)
            .truncate(have == 0)
            .open(&part)
            .with_context(|| format!("cannot write {}", part.display()))?;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| {
                anyhow::anyhow!(
                    "{}: the download broke off: {}; run the command again to resume",
                    o.uri,
                    chain(&e.without_url())
                )
            })?;
            // Never more than the listing announced: a hostile gateway or URL cannot fill the disk.
            if have + received + chunk.len() as u64 > o.size {
                drop(file);
                let _ = std::fs::remove_file(&part);
                anyhow::bail!(
                    "{}: the download sent more than the object's {} bytes; the partial file was deleted",
                    o.uri,
                    o.size
                );
            }
            file.write_all(&chunk).with_context(|| format!("cannot write {}", part.display()))?;
            received += chunk.len() as u64;
            bar.advance(chunk.len() as u64);
        }
        file.flush()?;
    }
    let len = std::fs::metadata(&part)?.len();
    if len != o.size {
        anyhow::bail!("{}: the download ended at {len} of {} bytes; run the command again to resume", o.uri, o.size);
    }
    if let Some(md5) = &o.md5 {
        let got = md5_of_file(&part).await?;
        if !got.eq_ignore_ascii_case(md5) {
            let _ = std::fs::remove_file(&part);
            anyhow::bail!(
                "{}: md5 mismatch: the store says {md5}, the downloaded data has {got}; the partial file was \
                 deleted: run the command again to download it anew",
                o.uri
            );
        }
    }
    std::fs::rename(&part, &w.dest).with_context(|| format!("cannot rename {} into place", part.display()))?;
    Ok(Outcome::Fetched { resumed: resumed && have > 0, bytes: received, verified: o.md5.is_some() })
}

/// Refuses a path that is a symbolic link: someone who can write to the download directory could
/// otherwise point a file (or a `.part`) at one of the user's files.
pub fn refuse_link(path: &Path) -> anyhow::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_symlink() => {
            anyhow::bail!("{} is a symbolic link: refusing to write through it", path.display())
        }
        _ => Ok(()),
    }
}

/// Whether `dest` already holds the object: its size and, where known, its MD5.
async fn is_complete(dest: &Path, o: &DataObject) -> anyhow::Result<bool> {
    match std::fs::metadata(dest) {
        Ok(meta) if meta.is_file() && meta.len() == o.size => match &o.md5 {
            Some(md5) => Ok(md5_of_file(dest).await?.eq_ignore_ascii_case(md5)),
            None => Ok(true),
        },
        _ => Ok(false),
    }
}

/// The MD5 of a whole file, in hex.
async fn md5_of_file(path: &Path) -> anyhow::Result<String> {
    let len = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
    Ok(hex(&md5_range(path, 0, len).await?))
}

/// The MD5 of `len` bytes of a file from `offset` (whole files for checks, parts for uploads).
pub async fn md5_range(path: &Path, offset: u64, len: u64) -> anyhow::Result<[u8; 16]> {
    let mut file = open_at(path, offset).await?;
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = file.read(&mut buf[..want]).await.with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            anyhow::bail!("{} became shorter while it was read", path.display());
        }
        md5.update(&buf[..n]);
        left -= n as u64;
    }
    Ok(md5.finalize().into())
}

/// A file opened for reading at `offset`.
pub async fn open_at(path: &Path, offset: u64) -> anyhow::Result<tokio::fs::File> {
    let mut file = tokio::fs::File::open(path).await.with_context(|| format!("cannot read {}", path.display()))?;
    file.seek(std::io::SeekFrom::Start(offset)).await?;
    Ok(file)
}

/// An MD5 in lowercase hex, as listings show it.
pub fn hex(md5: &[u8; 16]) -> String {
    md5.iter().map(|b| format!("{b:02x}")).collect()
}

/// The request a handed-out [`HttpRequest`] describes, with its headers.
pub fn request(gw: &Gateway, r: &HttpRequest) -> anyhow::Result<RequestBuilder> {
    let method = Method::from_bytes(r.method.as_bytes()).context("the gateway handed out a bad method")?;
    let mut rb = gw.handed_out(method, &r.url)?;
    for (name, value) in &r.headers {
        rb = rb.header(name, value);
    }
    Ok(rb)
}

/// Sends a handed-out request; a failure names the object (and the store or the gateway).
pub async fn send(rb: RequestBuilder, r: &HttpRequest, uri: &str) -> anyhow::Result<Response> {
    let whom = if r.via == "gateway" { "the gateway" } else { "the store" };
    let resp = rb
        .send()
        .await
        .map_err(|e| ClientError::new(format!("{uri}: cannot reach {whom}: {}", chain(&e.without_url())), None))?;
    if resp.status().is_success() {
        return Ok(resp);
    }
    let status = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    let answer = ClientError::from_answer(status, &body, None);
    Err(ClientError { message: format!("{uri}: {whom} refused: {}", answer.message), ..answer }.into())
}

/// A byte progress bar on stderr, drawn only when stderr is a terminal.
struct Bar {
    total: u64,
    done: u64,
    tty: bool,
    started: Instant,
    drawn: Option<Instant>,
}

impl Bar {
    fn new(total: u64) -> Bar {
        Bar { total, done: 0, tty: std::io::stderr().is_terminal(), started: Instant::now(), drawn: None }
    }

    fn advance(&mut self, n: u64) {
        self.done += n;
        if self.tty && self.drawn.is_none_or(|at| at.elapsed() >= REDRAW) {
            eprint!("\r{}", progress_line(self.done, self.total, self.started.elapsed()));
            let _ = std::io::stderr().flush();
            self.drawn = Some(Instant::now());
        }
    }

    /// Clears the bar's line (before other output).
    fn clear(&mut self) {
        if self.drawn.take().is_some() {
            eprint!("\r\x1b[2K");
        }
    }
}

/// `[#####.....]  12.0 MiB / 24.0 MiB  50%  6.0 MiB/s`
fn progress_line(done: u64, total: u64, elapsed: Duration) -> String {
    const WIDTH: u64 = 30;
    let filled = (done.min(total) * WIDTH).checked_div(total).unwrap_or(WIDTH).min(WIDTH);
    let percent = (done.min(total) * 100).checked_div(total).unwrap_or(100);
    let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
    format!(
        "[{}{}] {} / {} {percent:>3}% {}/s",
        "#".repeat(filled as usize),
        ".".repeat((WIDTH - filled) as usize),
        mib(done as f64),
        mib(total as f64),
        mib(rate)
    )
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / f64::from(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_fills_with_the_bytes() {
        let line = progress_line(12 << 20, 24 << 20, Duration::from_secs(2));
        assert_eq!(line, format!("[{}{}] 12.0 MiB / 24.0 MiB  50% 6.0 MiB/s", "#".repeat(15), ".".repeat(15)));
        assert!(progress_line(0, 0, Duration::ZERO).contains("100%"));
    }

    #[test]
    fn a_part_file_sits_next_to_its_file() {
        assert_eq!(part_path(Path::new("d/out/a.bin")), Path::new("d/out/a.bin.part"));
    }
}
