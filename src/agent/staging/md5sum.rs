//! The in-order MD5 hasher of ranged downloads (where the store keeps only an MD5), and the
//! `Content-MD5` of uploads.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Condvar, Mutex, MutexGuard};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use md5::{Digest, Md5};

/// `Content-MD5` for a body with this MD5.
pub(super) fn base64(md5: &[u8; 16]) -> String {
    STANDARD.encode(md5)
}

/// Buffer of the in-order hasher.
const HASH_BUFFER: usize = 1 << 20;

/// How far each range of a big file is on disk; the in-order hasher waits on it.
pub(super) struct Feed {
    /// (start, len) of each range, in order.
    ranges: Vec<(u64, u64)>,
    pub(super) size: u64,
    state: Mutex<FeedState>,
    ready: Condvar,
}

struct FeedState {
    /// Bytes on disk from each range's start.
    written: Vec<u64>,
    stopped: bool,
}

impl Feed {
    pub(super) fn new(ranges: Vec<(u64, u64)>, size: u64) -> Feed {
        let state = FeedState { written: vec![0; ranges.len()], stopped: false };
        Feed { ranges, size, state: Mutex::new(state), ready: Condvar::new() }
    }

    fn lock(&self) -> MutexGuard<'_, FeedState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Range `index` is on disk up to `done` bytes from its start.
    pub(super) fn advance(&self, index: usize, done: u64) {
        let mut state = self.lock();
        if done > state.written[index] {
            state.written[index] = done;
            self.ready.notify_one();
        }
    }

    pub(super) fn stop(&self) {
        self.lock().stopped = true;
        self.ready.notify_all();
    }

    /// Blocks until the file is on disk in order beyond `hashed`: that end, or `None` once
    /// stopped. `first` is the first range not known to be complete.
    fn wait_beyond(&self, hashed: u64, first: &mut usize) -> Option<u64> {
        let mut state = self.lock();
        loop {
            if state.stopped {
                return None;
            }
            while *first < self.ranges.len() && state.written[*first] == self.ranges[*first].1 {
                *first += 1;
            }
            let end = self.ranges.get(*first).map_or(self.size, |(start, _)| start + state.written[*first]);
            if end > hashed {
                return Some(end);
            }
            state = self.ready.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The MD5 of a big file, read back in order as its ranges land; `None` when stopped.
pub(super) fn hash_in_order(feed: &Feed, dest: &Path) -> io::Result<Option<[u8; 16]>> {
    let file = OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW).open(dest)?;
    let (mut md5, mut buf) = (Md5::new(), vec![0u8; HASH_BUFFER]);
    let (mut hashed, mut first) = (0u64, 0usize);
    while hashed < feed.size {
        let Some(end) = feed.wait_beyond(hashed, &mut first) else {
            return Ok(None);
        };
        while hashed < end {
            let n = (end - hashed).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], hashed)?;
            md5.update(&buf[..n]);
            hashed += n as u64;
        }
    }
    Ok(Some(md5.finalize().into()))
}
