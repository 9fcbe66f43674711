//! The embedded `local` store: an S3-compatible server (s3s-fs) in-process over a directory,
//! signing with a key made at start. STUB: being written.

use std::future::Future;
use std::path::{Path, PathBuf};

use super::StorageError;
use super::s3::S3Store;

/// An S3-compatible endpoint over `root`; bucket `b` is the directory `root/b`.
pub struct LocalS3Server {
    root: PathBuf,
    listener: tokio::net::TcpListener,
}

impl LocalS3Server {
    /// Takes the listener the server will answer on; makes `root` if needed.
    pub fn new(root: &Path, listener: tokio::net::TcpListener) -> Result<Self, StorageError> {
        Ok(Self { root: root.to_path_buf(), listener })
    }

    /// `http://127.0.0.1:PORT`: what agents and the broker's client use.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.listener.local_addr().expect("bound"))
    }

    /// A client for bucket `bucket` (its directory is made if missing), signing with this server's key.
    pub async fn store(&self, bucket: &str) -> Result<S3Store, StorageError> {
        let _ = (bucket, &self.root);
        todo!()
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let _ = shutdown;
        todo!()
    }
}
