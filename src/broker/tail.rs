//! The bounded tail of one attempt's output, kept by the broker so logs can be followed live.

use std::collections::VecDeque;

#[derive(Debug, Clone)]
pub struct Tail {
    buf: VecDeque<u8>,
    cap: usize,
    truncated: bool,
    /// Bytes ever pushed; the tail holds the last `buf.len()` of them.
    total: u64,
}

impl Tail {
    pub fn new(cap: usize) -> Self {
        Self { buf: VecDeque::new(), cap, truncated: false, total: 0 }
    }

    /// Appends, dropping the oldest bytes beyond the cap.
    pub fn push(&mut self, data: &[u8]) {
        self.total += data.len() as u64;
        self.buf.extend(data);
        if self.buf.len() > self.cap {
            let excess = self.buf.len() - self.cap;
            self.buf.drain(..excess);
            self.truncated = true;
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.buf.iter().copied().collect()
    }

    /// Older output was dropped.
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::Tail;

    #[test]
    fn keeps_the_newest_bytes() {
        let mut t = Tail::new(4);
        t.push(b"ab");
        assert!(!t.truncated());
        t.push(b"cdef");
        assert_eq!(t.bytes(), b"cdef");
        assert!(t.truncated());
        assert_eq!(t.total(), 6);
    }
}
