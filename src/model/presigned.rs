//! The data shape of a presigned request: what the broker mints with a store's credentials and an
//! agent sends as it is. Agents hold no credentials and need only this shape, not `storage/`.

use std::fmt;
use std::time::SystemTime;

/// An HTTP request the agent can make without credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct Presigned {
    /// `GET` or `PUT`.
    pub method: String,
    /// Carries the signature (SigV4 query or SAS): never logged in full.
    pub url: String,
    /// Headers to send as they are (e.g. `x-ms-blob-type: BlockBlob`); the agent adds
    /// `Content-MD5` and `Content-Length` to uploads itself.
    pub headers: Vec<(String, String)>,
    pub expires_at: SystemTime,
}

impl fmt::Debug for Presigned {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Presigned")
            .field("method", &self.method)
            .field("url", &redact_url(&self.url))
            .field("headers", &self.headers)
            .finish()
    }
}

/// A URL with its query (where signatures live) replaced by `?…`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_string(),
    }
}

/// One uploaded part of a multipart upload (S3 part / Azure block).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompletedPart {
    /// 1-based, as in S3.
    pub number: u32,
    /// What the store answered to the part upload (`ETag` header); Azure ignores it.
    pub etag: String,
}
