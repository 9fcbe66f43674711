//! An online copy of the job store for backups: SQLite's `VACUUM INTO` from a read-only connection
//! is one consistent snapshot of the last committed transaction, taken while the broker keeps
//! writing (WAL mode lets the reader and the writer run at once), compacted and without a WAL of
//! its own, so the copy is one self-contained file.

use std::path::Path;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{Connection, Row, SqliteConnection};

use super::StoreError;
use crate::private_files;

/// What a snapshot holds, read back from the copy itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// The schema version (`PRAGMA user_version`) of the copy.
    pub schema_version: i64,
    pub jobs: i64,
    pub bytes: u64,
}

/// Copies the store at `db` to `dest`, a new 0600 file, and checks the copy
/// (`PRAGMA integrity_check`). `dest` must not exist.
pub async fn snapshot(db: &Path, dest: &Path) -> Result<SnapshotSummary, StoreError> {
    let fail = |path: &Path, message: String| StoreError::Open { path: path.display().to_string(), message };
    if !db.is_file() {
        return Err(fail(db, "no such database file".into()));
    }
    if dest.exists() {
        return Err(fail(dest, "exists already; a snapshot never overwrites".into()));
    }
    // SQLite writes into an empty file it is given; made here so that it is private from the start.
    private_files::create_file(dest).map_err(|e| fail(dest, e.to_string()))?;
    let source = SqliteConnectOptions::new().filename(db).read_only(true);
    let mut conn = SqliteConnection::connect_with(&source).await.map_err(|e| fail(db, e.to_string()))?;
    let into = dest.to_str().ok_or_else(|| fail(dest, "the path is not UTF-8".into()))?;
    let copied = sqlx::query("VACUUM INTO ?").bind(into).execute(&mut conn).await;
    conn.close().await.ok();
    if let Err(e) = copied {
        let _ = std::fs::remove_file(dest);
        return Err(fail(dest, format!("copying {}: {e}", db.display())));
    }
    summarize(dest).await
}

/// Reads a snapshot (or any store file) back, read-only: its schema version, its job count, and
/// whether SQLite finds it intact.
pub async fn summarize(path: &Path) -> Result<SnapshotSummary, StoreError> {
    let fail = |message: String| StoreError::Open { path: path.display().to_string(), message };
    let options = SqliteConnectOptions::new().filename(path).read_only(true);
    let mut conn = SqliteConnection::connect_with(&options).await.map_err(|e| fail(e.to_string()))?;
    let check: String = sqlx::query("PRAGMA integrity_check").fetch_one(&mut conn).await?.get(0);
    if check != "ok" {
        return Err(StoreError::Corrupt(format!("{}: {check}", path.display())));
    }
    let schema_version: i64 = sqlx::query("PRAGMA user_version").fetch_one(&mut conn).await?.get(0);
    let jobs: i64 = sqlx::query("SELECT count(*) FROM jobs").fetch_one(&mut conn).await?.get(0);
    conn.close().await.ok();
    let bytes = std::fs::metadata(path).map_err(|e| fail(e.to_string()))?.len();
    Ok(SnapshotSummary { schema_version, jobs, bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_snapshot_of_a_store_in_use_is_complete_private_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("broker.db");
        let (_writer, _reader) = super::super::open(&db).await.unwrap();
        let dest = dir.path().join("copy.db");
        let summary = snapshot(&db, &dest).await.unwrap();
        assert_eq!(summary.jobs, 0);
        assert!(summary.schema_version > 0, "{summary:?}");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o600);
        let again = snapshot(&db, &dest).await.unwrap_err();
        assert!(again.to_string().contains("never overwrites"), "{again}");
        let missing = snapshot(&dir.path().join("none.db"), &dir.path().join("x.db")).await.unwrap_err();
        assert!(missing.to_string().contains("no such database file"), "{missing}");
    }
}
