//! What a download is checked against: the whole object's CRC64NVME, CRC32C or CRC32 where the
//! store reports one, else its MD5; and the sums computed over the downloaded bytes.
//!
//! A CRC combines: the CRC of `a ‖ b` follows from the CRCs of `a` and `b` and the length of `b`.
//! So the ranges of a big file are summed where they are written, in parallel, and combined in
//! order at the end, while an MD5 must run over the whole file in order on one core (~600 MiB/s).
//!
//! S3 reports a full-object checksum only on a whole GET, only when the request asks with
//! `x-amz-checksum-mode: ENABLED` (the broker signs that header into its presigned GETs), and never
//! for a range; a multipart object's checksum may be *composite* (`x-amz-checksum-type: COMPOSITE`,
//! the value ending in `-<parts>`): a checksum of the parts' checksums, not of the data, which is
//! ignored here. Azure keeps only an MD5 per blob.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use crc_fast::{CrcAlgorithm, Digest as CrcDigest};
use md5::{Digest, Md5};
use reqwest::header::HeaderMap;

use super::request::header;
use crate::model::presigned::Presigned;

/// The request header that asks S3 for the object's checksums.
pub(super) const CHECKSUM_MODE: &str = "x-amz-checksum-mode";

/// A checksum of some bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Sum {
    Md5([u8; 16]),
    Crc32(u32),
    Crc32c(u32),
    Crc64Nvme(u64),
}

impl Sum {
    fn name(&self) -> &'static str {
        match self {
            Sum::Md5(_) => "md5",
            Sum::Crc32(_) => "crc32",
            Sum::Crc32c(_) => "crc32c",
            Sum::Crc64Nvme(_) => "crc64nvme",
        }
    }

    /// As people see it: MD5 in hex (an ETag), CRCs in base64 of their big-endian bytes (as S3
    /// sends them).
    fn text(&self) -> String {
        match self {
            Sum::Md5(md5) => md5.iter().map(|b| format!("{b:02x}")).collect(),
            Sum::Crc32(crc) | Sum::Crc32c(crc) => STANDARD.encode(crc.to_be_bytes()),
            Sum::Crc64Nvme(crc) => STANDARD.encode(crc.to_be_bytes()),
        }
    }
}

/// The checksum a downloaded file must have, and who said so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Expected {
    pub(super) sum: Sum,
    from: &'static str,
}

impl Expected {
    /// From a base64 MD5 (`Content-MD5` style); `None` when it is not one.
    pub(super) fn from_md5_base64(b64: &str, from: &'static str) -> Option<Expected> {
        let md5 = STANDARD.decode(b64.trim()).ok()?.try_into().ok()?;
        Some(Expected { sum: Sum::Md5(md5), from })
    }

    /// Whether `actual` matches; else the reason, for people.
    pub(super) fn check(&self, actual: &Sum) -> Result<(), String> {
        if *actual == self.sum {
            return Ok(());
        }
        let (name, from) = (self.sum.name(), self.from);
        Err(format!("{name} mismatch: {from} says {}, the downloaded data has {}", self.sum.text(), actual.text()))
    }
}

/// Whether `request` asks the store for the object's checksums (then a big file's first range is
/// fetched with a whole GET, which is where S3 reports them).
pub(super) fn asks_for_checksums(request: &Presigned) -> bool {
    request.headers.iter().any(|(name, value)| name.eq_ignore_ascii_case(CHECKSUM_MODE) && value == "ENABLED")
}

/// What a whole GET's headers say the object's checksum is: a full-object CRC64NVME, CRC32C or
/// CRC32 (what AWS SDKs send by default), else the MD5 of [`store_md5`].
pub(super) fn store_checksum(headers: &HeaderMap) -> Option<Expected> {
    store_crc(headers).or_else(|| store_md5(headers, true))
}

/// A full-object CRC from S3-style `x-amz-checksum-*` headers; composite ones are skipped.
fn store_crc(headers: &HeaderMap) -> Option<Expected> {
    if header(headers, "x-amz-checksum-type").is_some_and(|t| t.trim().eq_ignore_ascii_case("composite")) {
        return None;
    }
    let bytes = |name: &str| {
        let value = header(headers, name)?;
        if value.contains('-') {
            return None; // `<checksum of the parts' checksums>-<parts>`
        }
        STANDARD.decode(value.trim()).ok()
    };
    if let Some(crc) = bytes("x-amz-checksum-crc64nvme").and_then(|b| <[u8; 8]>::try_from(b).ok()) {
        let sum = Sum::Crc64Nvme(u64::from_be_bytes(crc));
        return Some(Expected { sum, from: "the store's x-amz-checksum-crc64nvme" });
    }
    let crc32 = |name| bytes(name).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_be_bytes);
    if let Some(crc) = crc32("x-amz-checksum-crc32c") {
        return Some(Expected { sum: Sum::Crc32c(crc), from: "the store's x-amz-checksum-crc32c" });
    }
    let crc = crc32("x-amz-checksum-crc32")?;
    Some(Expected { sum: Sum::Crc32(crc), from: "the store's x-amz-checksum-crc32" })
}

/// The whole object's MD5 as the store's response headers give it: Azure's `Content-MD5` (on a
/// whole GET; on a ranged one it would be the range's) or `x-ms-blob-content-md5` (ranged), else
/// an S3 ETag that is a plain MD5 (single-part upload, not SSE-KMS or SSE-C encrypted).
pub(super) fn store_md5(headers: &HeaderMap, whole: bool) -> Option<Expected> {
    let azure = if whole {
        header(headers, "content-md5").and_then(|v| Expected::from_md5_base64(&v, "the store's Content-MD5"))
    } else {
        header(headers, "x-ms-blob-content-md5").and_then(|v| Expected::from_md5_base64(&v, "the store's blob md5"))
    };
    azure.or_else(|| {
        let encryption = header(headers, "x-amz-server-side-encryption").unwrap_or_default();
        if encryption.starts_with("aws:kms") || headers.contains_key("x-amz-server-side-encryption-customer-algorithm")
        {
            return None;
        }
        let etag = header(headers, "etag")?;
        let etag = etag.trim().trim_matches('"');
        if etag.len() != 32 || !etag.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut md5 = [0u8; 16];
        for (i, byte) in md5.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&etag[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Expected { sum: Sum::Md5(md5), from: "the store's ETag" })
    })
}

/// Sums a whole file as it arrives, with the algorithm of the checksum it must match.
pub(super) enum Hasher {
    Md5(Md5),
    Crc(CrcAlgorithm, Box<CrcDigest>),
}

impl Hasher {
    pub(super) fn new(like: &Sum) -> Hasher {
        match like {
            Sum::Md5(_) => Hasher::Md5(Md5::new()),
            Sum::Crc32(_) => Hasher::crc(CrcAlgorithm::Crc32IsoHdlc),
            Sum::Crc32c(_) => Hasher::crc(CrcAlgorithm::Crc32Iscsi),
            Sum::Crc64Nvme(_) => Hasher::crc(CrcAlgorithm::Crc64Nvme),
        }
    }

    fn crc(algorithm: CrcAlgorithm) -> Hasher {
        Hasher::Crc(algorithm, Box::new(CrcDigest::new(algorithm)))
    }

    pub(super) fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Md5(md5) => md5.update(data),
            Hasher::Crc(_, crc) => crc.update(data),
        }
    }

    pub(super) fn finish(self) -> Sum {
        match self {
            Hasher::Md5(md5) => Sum::Md5(md5.finalize().into()),
            Hasher::Crc(CrcAlgorithm::Crc64Nvme, crc) => Sum::Crc64Nvme(crc.finalize()),
            Hasher::Crc(CrcAlgorithm::Crc32IsoHdlc, crc) => Sum::Crc32(crc.finalize() as u32),
            Hasher::Crc(_, crc) => Sum::Crc32c(crc.finalize() as u32),
        }
    }
}

/// The CRCs of one range of a big file, each kind (which one the store keeps is known only once
/// its first whole response arrived), over the bytes written so far.
#[derive(Debug, Clone, Copy)]
pub(super) struct RangeCrcs {
    crc32: CrcDigest,
    crc32c: CrcDigest,
    crc64nvme: CrcDigest,
    len: u64,
}

impl Default for RangeCrcs {
    fn default() -> Self {
        RangeCrcs {
            crc32: CrcDigest::new(CrcAlgorithm::Crc32IsoHdlc),
            crc32c: CrcDigest::new(CrcAlgorithm::Crc32Iscsi),
            crc64nvme: CrcDigest::new(CrcAlgorithm::Crc64Nvme),
            len: 0,
        }
    }
}

impl RangeCrcs {
    /// Sums `data` with every kind while the file's checksum is not known, then only with its
    /// kind (none for an MD5): only the kind the file is checked with must cover every byte.
    pub(super) fn update(&mut self, data: &[u8], known: Option<&Sum>) {
        match known {
            None => {
                self.crc32.update(data);
                self.crc32c.update(data);
                self.crc64nvme.update(data);
            }
            Some(Sum::Md5(_)) => {}
            Some(Sum::Crc32(_)) => self.crc32.update(data),
            Some(Sum::Crc32c(_)) => self.crc32c.update(data),
            Some(Sum::Crc64Nvme(_)) => self.crc64nvme.update(data),
        }
        self.len += data.len() as u64;
    }
}

/// The sum of a file from its ranges' CRCs, in order, of the kind `like`; `None` for an MD5.
pub(super) fn combine(ranges: &[RangeCrcs], like: &Sum) -> Option<Sum> {
    let (algorithm, pick): (CrcAlgorithm, fn(&RangeCrcs) -> u64) = match like {
        Sum::Md5(_) => return None,
        Sum::Crc32(_) => (CrcAlgorithm::Crc32IsoHdlc, |r| r.crc32.finalize()),
        Sum::Crc32c(_) => (CrcAlgorithm::Crc32Iscsi, |r| r.crc32c.finalize()),
        Sum::Crc64Nvme(_) => (CrcAlgorithm::Crc64Nvme, |r| r.crc64nvme.finalize()),
    };
    let mut crc = CrcDigest::new(algorithm).finalize(); // of no bytes
    for range in ranges {
        crc = crc_fast::checksum_combine(algorithm, crc, pick(range), range.len);
    }
    Some(match like {
        Sum::Crc64Nvme(_) => Sum::Crc64Nvme(crc),
        Sum::Crc32(_) => Sum::Crc32(crc as u32),
        _ => Sum::Crc32c(crc as u32),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_combine_into_the_whole_files_crcs() {
        let data: Vec<u8> = (0..300_001u32).map(|i| (i * 7 % 251) as u8).collect();
        let mut ranges = Vec::new();
        for chunk in data.chunks(65_536) {
            let mut range = RangeCrcs::default();
            chunk.chunks(1000).for_each(|c| range.update(c, None));
            ranges.push(range);
        }
        let crc32c = crc_fast::checksum(CrcAlgorithm::Crc32Iscsi, &data) as u32;
        let crc64 = crc_fast::checksum(CrcAlgorithm::Crc64Nvme, &data);
        let crc32 = crc_fast::checksum(CrcAlgorithm::Crc32IsoHdlc, &data) as u32;
        assert_eq!(combine(&ranges, &Sum::Crc32(0)), Some(Sum::Crc32(crc32)));
        assert_eq!(combine(&ranges, &Sum::Crc32c(0)), Some(Sum::Crc32c(crc32c)));
        assert_eq!(combine(&ranges, &Sum::Crc64Nvme(0)), Some(Sum::Crc64Nvme(crc64)));
        // The known check value of CRC-32C ("123456789" → 0xe3069283).
        assert_eq!(crc_fast::checksum(CrcAlgorithm::Crc32Iscsi, b"123456789"), 0xe306_9283);
        assert_eq!(combine(&[], &Sum::Crc32c(0)), Some(Sum::Crc32c(0)));
    }

    #[test]
    fn store_headers_give_full_object_crcs_only() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut map = HeaderMap::new();
            for (name, value) in pairs {
                map.insert(*name, value.parse().unwrap());
            }
            map
        };
        let crc = STANDARD.encode(0xe306_9283u32.to_be_bytes());
        let got = store_checksum(&headers(&[("x-amz-checksum-crc32c", &crc), ("etag", "\"0123\"")]));
        assert_eq!(got.map(|e| e.sum), Some(Sum::Crc32c(0xe306_9283)));
        let composite = [("x-amz-checksum-crc32c", "AAAAAA==-3"), ("etag", "\"abc-3\"")];
        assert_eq!(store_checksum(&headers(&composite)), None);
        let typed = [("x-amz-checksum-crc32c", crc.as_str()), ("x-amz-checksum-type", "COMPOSITE")];
        assert_eq!(store_checksum(&headers(&typed)), None);
        let both = [("x-amz-checksum-crc32c", crc.as_str()), ("x-amz-checksum-crc64nvme", "AAAAAAAAAAE=")];
        assert_eq!(store_checksum(&headers(&both)).map(|e| e.sum), Some(Sum::Crc64Nvme(1)));
        let plain = store_checksum(&headers(&[("x-amz-checksum-crc32", "y/Q5Jg==")])).unwrap();
        assert_eq!(plain.sum, Sum::Crc32(0xcbf4_3926)); // CRC-32 of "123456789"
        let md5 = "0123456789abcdef0123456789abcdef";
        let only_etag = store_checksum(&headers(&[("etag", &format!("\"{md5}\""))])).unwrap();
        assert_eq!(only_etag.sum.text(), md5);
        let err = Expected { sum: Sum::Crc32c(1), from: "x" }.check(&Sum::Crc32c(2)).unwrap_err();
        assert_eq!(err, "crc32c mismatch: x says AAAAAQ==, the downloaded data has AAAAAg==");
    }
}
