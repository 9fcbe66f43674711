//! Price snapshots on disk: the dated snapshot file under `config/prices/` (offline prices, the
//! quickstart's, and the fallback for whatever the live feeds don't give) and the book's persisted
//! last good snapshot, written atomically so a restart starts warm.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{FeedPrices, PriceFeed, PricingError, Wanted, valid_price};
use crate::model::price::PriceSnapshot;

/// Prices from a snapshot file (a [`PriceSnapshot`] in JSON). It gives everything the file holds,
/// whatever is wanted; each price keeps the source and date written in the file.
#[derive(Debug, Clone)]
pub struct SnapshotFileFeed {
    path: PathBuf,
    name: String,
}

impl SnapshotFileFeed {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let name = format!("snapshot:{}", path.display());
        Self { path, name }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole snapshot.
    pub async fn load(&self) -> Result<PriceSnapshot, PricingError> {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || read_snapshot(&path))
            .await
            .map_err(|e| PricingError::File { path: self.path.display().to_string(), message: e.to_string() })?
    }
}

#[async_trait]
impl PriceFeed for SnapshotFileFeed {
    fn name(&self) -> &str {
        &self.name
    }

    async fn fetch(&self, _wanted: &Wanted) -> Result<FeedPrices, PricingError> {
        let snapshot = self.load().await?;
        Ok(FeedPrices {
            compute: snapshot.compute,
            egress: snapshot.egress,
            storage: snapshot.storage,
            warnings: Vec::new(),
        })
    }
}

/// Reads and checks a snapshot file: JSON errors name the field, and every price must be a
/// finite, non-negative number.
pub fn read_snapshot(path: &Path) -> Result<PriceSnapshot, PricingError> {
    let file_error = |message: String| PricingError::File { path: path.display().to_string(), message };
    let text = std::fs::read_to_string(path).map_err(|e| file_error(e.to_string()))?;
    let deserializer = &mut serde_json::Deserializer::from_str(&text);
    let snapshot: PriceSnapshot = serde_path_to_error::deserialize(deserializer)
        .map_err(|e| file_error(format!("at {}: {}", e.path(), e.inner())))?;
    let mut bad = Vec::new();
    for p in &snapshot.compute {
        if !valid_price(p.usd_per_hour) {
            bad.push(format!("{} {} {}: {}", p.cloud.as_str(), p.region, p.instance_type, p.usd_per_hour));
        }
    }
    for p in &snapshot.egress {
        if !valid_price(p.usd_per_gb) {
            bad.push(format!("{} {} egress: {}", p.cloud.as_str(), p.region, p.usd_per_gb));
        }
    }
    for p in &snapshot.storage {
        if !valid_price(p.usd_per_gb_month) {
            bad.push(format!("{} {} storage: {}", p.cloud.as_str(), p.region, p.usd_per_gb_month));
        }
    }
    if !bad.is_empty() {
        return Err(file_error(format!("prices that are not prices: {}", bad.join("; "))));
    }
    Ok(snapshot)
}

/// Writes `snapshot` to `path` so that a reader (or a restart after a crash) sees the old file or
/// the new one, never half of one: a temporary file beside it, flushed, then renamed over it.
pub fn write_snapshot_atomically(path: &Path, snapshot: &PriceSnapshot) -> Result<(), PricingError> {
    let file_error = |message: String| PricingError::File { path: path.display().to_string(), message };
    let json = serde_json::to_vec_pretty(snapshot).map_err(|e| file_error(e.to_string()))?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| file_error(format!("creating {}: {e}", dir.display())))?;
    let file_name = path.file_name().ok_or_else(|| file_error("not a file path".into()))?;
    let temp = dir.join(format!(".{}.tmp-{}", file_name.to_string_lossy(), std::process::id()));
    let written = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(&json)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(&temp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(file_error(format!("writing: {e}")));
    }
    // The rename itself is durable once the directory is synced (best effort: not every platform
    // can open a directory).
    if let Ok(dir) = std::fs::File::open(&dir) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::model::price::{Cloud, Destination, Market};

    fn repo_snapshot() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prices/snapshot.json")
    }

    /// The GPU instance types the docs and the quickstart use, in the regions the quickstart uses.
    const CATALOG: &[(Cloud, &str, &[&str])] = &[
        (
            Cloud::Aws,
            "us-east-1 eu-west-1",
            &["p5.48xlarge", "p5en.48xlarge", "p4d.24xlarge", "p4de.24xlarge", "g5.xlarge", "g6.xlarge", "g6e.xlarge"],
        ),
        (Cloud::Azure, "eastus westeurope", &["Standard_ND96isr_H100_v5", "Standard_NC24ads_A100_v4"]),
    ];

    #[test]
    fn the_shipped_snapshot_parses_is_dated_and_covers_the_catalog() {
        let snapshot = read_snapshot(&repo_snapshot()).unwrap();
        assert!(!snapshot.id.is_empty());
        assert!(snapshot.fetched_at > 1_750_000_000_000, "dated after mid-2025");
        assert!(!snapshot.sources.is_empty());
        let mut missing = BTreeSet::new();
        for (cloud, regions, types) in CATALOG {
            for region in regions.split(' ') {
                for instance_type in *types {
                    if snapshot.compute(*cloud, region, instance_type, Market::OnDemand).is_none() {
                        missing.insert(format!("{} {region} {instance_type}", cloud.as_str()));
                    }
                }
                for destination in [Destination::Internet, Destination::InterRegion] {
                    if snapshot.egress(*cloud, region, destination).is_none() {
                        missing.insert(format!("{} {region} egress {destination:?}", cloud.as_str()));
                    }
                }
                if snapshot.storage(*cloud, region).is_none() {
                    missing.insert(format!("{} {region} storage", cloud.as_str()));
                }
            }
        }
        assert!(missing.is_empty(), "the snapshot lacks {missing:?}");
        let p5 = snapshot.compute(Cloud::Aws, "us-east-1", "p5.48xlarge", Market::OnDemand).unwrap();
        assert_eq!(p5.usd_per_hour, 55.04, "the price after the 2025 cut");
    }

    #[tokio::test]
    async fn the_snapshot_feed_gives_everything_in_the_file() {
        let feed = SnapshotFileFeed::new(repo_snapshot());
        assert_eq!(feed.name(), format!("snapshot:{}", repo_snapshot().display()));
        let prices = feed.fetch(&Wanted::default()).await.unwrap();
        let snapshot = read_snapshot(&repo_snapshot()).unwrap();
        assert_eq!(
            (prices.compute, prices.egress, prices.storage),
            (snapshot.compute, snapshot.egress, snapshot.storage)
        );
        let missing = SnapshotFileFeed::new("/nonexistent/prices.json").fetch(&Wanted::default()).await.unwrap_err();
        assert!(missing.to_string().starts_with("/nonexistent/prices.json: "), "{missing}");
    }

    #[test]
    fn a_written_snapshot_reads_back_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/prices.json");
        let mut snapshot = read_snapshot(&repo_snapshot()).unwrap();
        snapshot.id = "p-written".into();
        write_snapshot_atomically(&path, &snapshot).unwrap();
        snapshot.id = "p-rewritten".into();
        write_snapshot_atomically(&path, &snapshot).unwrap();
        assert_eq!(read_snapshot(&path).unwrap(), snapshot);
        let names: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("prices.json")]);
    }

    #[test]
    fn a_snapshot_with_a_negative_or_misspelt_price_is_refused_with_where() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.json");
        let price = r#"{"cloud":"aws","region":"us-east-1","instance_type":"g5.xlarge","market":"ondemand","#;
        let negative = format!(
            r#"{{"id":"x","fetched_at":1,"sources":[],"compute":[{price}"usd_per_hour":-1,"source":"s","fetched_at":1}}]}}"#
        );
        std::fs::write(&path, negative).unwrap();
        let error = read_snapshot(&path).unwrap_err().to_string();
        assert!(error.contains("g5.xlarge: -1"), "{error}");
        std::fs::write(&path, r#"{"id":"x","fetched_at":1,"sources":[],"compute":[{"cloud":"gcp"}]}"#).unwrap();
        let error = read_snapshot(&path).unwrap_err().to_string();
        assert!(error.contains("compute[0]"), "{error}");
    }
}
