//! The price book with scripted feeds: last good prices kept, the snapshot file as the fallback,
//! staleness, persistence across a restart, the snapshot id and the refresh loop.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::{FeedPrices, PriceBook, PriceFeed, PricingError, PricingSettings, Wanted, WantedInstance, now_ms};
use crate::model::price::{Cloud, ComputePrice, Market, PriceSnapshot, Provenance};

/// A feed that answers from a script (the last answer repeats) and records what it was asked.
struct ScriptedFeed {
    name: &'static str,
    script: Mutex<VecDeque<Result<f64, &'static str>>>,
    asked: Mutex<Vec<Wanted>>,
}

impl ScriptedFeed {
    /// Answers are the on-demand price of p5.48xlarge in us-east-1, or an error.
    fn new(script: Vec<Result<f64, &'static str>>) -> Arc<Self> {
        Arc::new(Self { name: "aws", script: Mutex::new(script.into()), asked: Mutex::default() })
    }
}

#[async_trait]
impl PriceFeed for ScriptedFeed {
    fn name(&self) -> &str {
        self.name
    }

    async fn fetch(&self, wanted: &Wanted) -> Result<FeedPrices, PricingError> {
        self.asked.lock().unwrap().push(wanted.clone());
        let answer = {
            let mut script = self.script.lock().unwrap();
            if script.len() > 1 { script.pop_front().unwrap() } else { script[0] }
        };
        let usd_per_hour = answer.map_err(|e| PricingError::Http { what: "scripted".into(), message: e.into() })?;
        let provenance = Provenance { source: format!("{}:price-list", self.name), fetched_at: now_ms() };
        let price = ComputePrice {
            cloud: Cloud::Aws,
            region: "us-east-1".into(),
            instance_type: "p5.48xlarge".into(),
            market: Market::OnDemand,
            usd_per_hour,
            provenance,
        };
        Ok(FeedPrices { compute: vec![price], ..FeedPrices::default() })
    }
}

fn repo_snapshot() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prices/snapshot.json")
}

fn settings(persist: Option<PathBuf>) -> PricingSettings {
    PricingSettings {
        refresh_interval: Duration::from_millis(5),
        max_age: Duration::from_secs(3600),
        snapshot_path: Some(repo_snapshot()),
        persist_path: persist,
        azure: None,
        aws: None,
    }
}

fn book(settings: &PricingSettings, feed: &Arc<ScriptedFeed>) -> PriceBook {
    PriceBook::new(settings, vec![feed.clone() as Arc<dyn PriceFeed>], Wanted::default()).unwrap()
}

/// Waits for the book's next snapshot (failing rather than hanging).
async fn next_update(updates: &mut tokio::sync::watch::Receiver<Arc<PriceSnapshot>>) {
    tokio::time::timeout(Duration::from_secs(20), updates.changed()).await.unwrap().unwrap();
}

fn p5(book: &PriceBook) -> ComputePrice {
    book.current().compute(Cloud::Aws, "us-east-1", "p5.48xlarge", Market::OnDemand).unwrap().clone()
}

#[tokio::test]
async fn a_failed_feed_keeps_its_last_good_prices() {
    let feed = ScriptedFeed::new(vec![Ok(50.0), Err("connection refused")]);
    let book = book(&settings(None), &feed);
    assert_eq!(p5(&book).usd_per_hour, 55.04, "before any fetch: the snapshot file");

    let first = book.refresh().await;
    assert!(first.changed && first.failed.is_empty(), "{first:?}");
    assert_eq!(p5(&book).usd_per_hour, 50.0);

    let second = book.refresh().await;
    assert_eq!(second.failed, vec![("aws".to_string(), "scripted: connection refused".to_string())]);
    assert!(!second.changed);
    assert_eq!(second.snapshot_id, first.snapshot_id);
    let kept = p5(&book);
    assert_eq!((kept.usd_per_hour, kept.provenance.source.as_str()), (50.0, "aws:price-list"));
    let status = &book.feed_status()[0];
    assert_eq!(status.last_error.as_deref(), Some("scripted: connection refused"));
    assert_eq!(status.last_success, Some(kept.provenance.fetched_at), "the age of the prices kept");
}

#[tokio::test]
async fn what_the_live_feeds_lack_comes_from_the_snapshot_file() {
    let feed = ScriptedFeed::new(vec![Ok(50.0)]);
    let book = book(&settings(None), &feed);
    book.refresh().await;
    let current = book.current();
    let g5 = current.compute(Cloud::Aws, "us-east-1", "g5.xlarge", Market::OnDemand).expect("from the file");
    assert_eq!((g5.usd_per_hour, g5.provenance.source.as_str()), (1.006, "snapshot:config/prices/snapshot.json"));
    assert!(current.sources.contains(&"aws:price-list".to_string()), "{:?}", current.sources);
    assert!(current.sources.contains(&"snapshot:config/prices/snapshot.json".to_string()), "{:?}", current.sources);
    assert_eq!(current.fetched_at, g5.provenance.fetched_at, "the snapshot's age is its oldest price's");
    let p5s = current.compute.iter().filter(|p| p.instance_type == "p5.48xlarge" && p.region == "us-east-1");
    assert_eq!(p5s.count(), 1, "the live price replaces the file's, it isn't added beside it");
}

#[tokio::test]
async fn a_feed_older_than_its_allowed_age_is_flagged() {
    let feed = ScriptedFeed::new(vec![Ok(50.0)]);
    let book = book(&settings(None), &feed);
    assert_eq!(book.stale_feeds(), vec!["aws".to_string()], "never fetched is stale");

    book.refresh().await;
    let fetched = book.feed_status()[0].last_success.unwrap();
    assert!(book.stale_feeds_at(fetched + 3_600_000).is_empty(), "exactly the allowed age is not stale");
    assert_eq!(book.stale_feeds_at(fetched + 3_600_001), vec!["aws".to_string()]);
    let status = &book.feed_status_at(fetched + 7_200_000)[0];
    assert_eq!(status.age, Some(Duration::from_secs(7200)));
    assert!(status.stale);
}

#[tokio::test]
async fn a_restart_starts_warm_from_the_persisted_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let persist = dir.path().join("state/last-prices.json");
    let settings = settings(Some(persist.clone()));

    let before = book(&settings, &ScriptedFeed::new(vec![Ok(50.0)]));
    let outcome = before.refresh().await;
    let fetched_at = p5(&before).provenance.fetched_at;
    assert!(persist.exists());
    drop(before);

    let failing = ScriptedFeed::new(vec![Err("offline")]);
    let after = book(&settings, &failing);
    assert_eq!(after.current().id, outcome.snapshot_id, "the same prices as before the restart");
    let warm = p5(&after);
    assert_eq!((warm.usd_per_hour, warm.provenance.fetched_at), (50.0, fetched_at));
    assert_eq!(after.feed_status()[0].last_success, Some(fetched_at), "its age goes on from the old fetch");
    after.refresh().await;
    assert_eq!(p5(&after).usd_per_hour, 50.0, "the failing feed keeps the persisted prices");

    std::fs::write(&persist, "{ not json").unwrap();
    let cold = book(&settings, &failing);
    assert_eq!(p5(&cold).usd_per_hour, 55.04, "an unreadable persisted file is ignored");
    assert_eq!(cold.feed_status()[0].last_success, None);
}

#[tokio::test]
async fn the_snapshot_id_changes_exactly_when_the_prices_do() {
    let feed = ScriptedFeed::new(vec![Ok(50.0), Ok(50.0), Ok(48.5)]);
    let book = book(&settings(None), &feed);
    let offline = book.current().id.clone();
    let first = book.refresh().await;
    let same = book.refresh().await;
    let cheaper = book.refresh().await;
    assert_ne!(first.snapshot_id, offline);
    assert_eq!((same.snapshot_id.as_str(), same.changed), (first.snapshot_id.as_str(), false));
    assert!(cheaper.changed && cheaper.snapshot_id != first.snapshot_id, "{cheaper:?}");
}

#[tokio::test]
async fn the_refresh_loop_refreshes_on_its_interval_with_the_wanted_list_until_shutdown() {
    let feed = ScriptedFeed::new(vec![Ok(50.0), Ok(49.0)]);
    let book = Arc::new(book(&settings(None), &feed));
    let mut updates = book.subscribe();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(book.clone().run(async move {
        let _ = stopped.await;
    }));

    next_update(&mut updates).await;
    assert_eq!(p5(&book).usd_per_hour, 50.0, "the first refresh runs at once");
    let wanted = Wanted {
        compute: vec![WantedInstance {
            cloud: Cloud::Aws,
            region: "us-east-1".into(),
            instance_type: "g6e.xlarge".into(),
            spot: true,
        }],
        regions: Vec::new(),
    };
    book.set_wanted(wanted.clone());
    loop {
        next_update(&mut updates).await;
        if feed.asked.lock().unwrap().last() == Some(&wanted) {
            break;
        }
    }
    assert_eq!(p5(&book).usd_per_hour, 49.0, "later refreshes follow on the interval");
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), running).await.unwrap().unwrap();
}
