//! The price book: live feeds refreshed in the background, each feed's last good prices kept,
//! merged into one [`PriceSnapshot`] with the snapshot file filling the gaps.
//!
//! - A feed that fails keeps its last good prices (and its age grows: [`PriceBook::stale_feeds`]).
//! - A feed that succeeds replaces all of its prices; a price it could not give (ambiguous,
//!   missing) comes from the snapshot file, whose prices carry their own source and date.
//! - The merged snapshot's id is a hash of the prices and their sources, so it changes exactly
//!   when they do; readers get it with [`PriceBook::current`] (a cheap `Arc` clone).
//! - The last merged snapshot is persisted atomically after each refresh and read back at start,
//!   so a restart starts with the live prices (and their fetch times) it had.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::snapshot::{read_snapshot, write_snapshot_atomically};
use super::{
    AwsFeedSettings, AwsPriceFeed, AzureFeedSettings, AzureRetailPriceFeed, FeedPrices, PriceFeed, PricingError,
    Wanted, now_ms, source_of_feed,
};
use crate::model::UnixMillis;
use crate::model::price::{ComputePrice, EgressPrice, PriceSnapshot, StoragePrice};

/// The price book's settings (the config keys are wired by the broker's configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct PricingSettings {
    /// How often the live feeds are asked.
    pub refresh_interval: Duration,
    /// A feed whose last good fetch is older than this is flagged stale.
    pub max_age: Duration,
    /// The dated snapshot file (`config/prices/snapshot.json`): offline prices and the fallback.
    pub snapshot_path: Option<PathBuf>,
    /// Where the last merged snapshot is kept across restarts; `None` = not kept.
    pub persist_path: Option<PathBuf>,
    /// The Azure Retail Prices feed; `None` = off.
    pub azure: Option<AzureFeedSettings>,
    /// The AWS feed; `None` = off.
    pub aws: Option<AwsFeedSettings>,
}

impl Default for PricingSettings {
    /// Offline: the snapshot file only. Live feeds refresh every 30 minutes and are stale after 3 hours.
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(30 * 60),
            max_age: Duration::from_secs(3 * 3600),
            snapshot_path: Some(PathBuf::from("config/prices/snapshot.json")),
            persist_path: None,
            azure: None,
            aws: None,
        }
    }
}

/// How one live feed is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedStatus {
    pub name: String,
    /// When its last good prices were fetched; `None` = never.
    pub last_success: Option<UnixMillis>,
    /// How old those prices are.
    pub age: Option<Duration>,
    /// Older than the allowed age, or never fetched.
    pub stale: bool,
    /// The error of the last fetch, when it failed.
    pub last_error: Option<String>,
    /// The warnings of the last good fetch (prices refused or rows skipped).
    pub warnings: Vec<String>,
}

/// What one refresh did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefreshOutcome {
    /// The merged snapshot's id after the refresh.
    pub snapshot_id: String,
    /// Whether the prices changed.
    pub changed: bool,
    /// The feeds that failed, with their errors.
    pub failed: Vec<(String, String)>,
}

#[derive(Default)]
struct FeedState {
    last_good: Option<FeedPrices>,
    last_success: Option<UnixMillis>,
    last_error: Option<String>,
}

/// Live prices with fallbacks; see the module docs.
pub struct PriceBook {
    feeds: Vec<Arc<dyn PriceFeed>>,
    states: Mutex<Vec<FeedState>>,
    fallback: Option<PriceSnapshot>,
    wanted: Mutex<Arc<Wanted>>,
    current: watch::Sender<Arc<PriceSnapshot>>,
    refreshing: tokio::sync::Mutex<()>,
    refresh_interval: Duration,
    max_age: Duration,
    persist_path: Option<PathBuf>,
}

impl std::fmt::Debug for PriceBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let feeds: Vec<&str> = self.feeds.iter().map(|f| f.name()).collect();
        f.debug_struct("PriceBook").field("feeds", &feeds).field("current", &self.current.borrow().id).finish()
    }
}

impl PriceBook {
    /// A book over the live feeds `settings` turns on (AWS credentials from the default chain).
    pub async fn from_settings(settings: &PricingSettings, wanted: Wanted) -> Result<Self, PricingError> {
        let mut feeds: Vec<Arc<dyn PriceFeed>> = Vec::new();
        if let Some(azure) = &settings.azure {
            feeds.push(Arc::new(AzureRetailPriceFeed::new(azure.clone())?));
        }
        if let Some(aws) = &settings.aws {
            feeds.push(Arc::new(AwsPriceFeed::from_default_chain(aws.clone()).await?));
        }
        Self::new(settings, feeds, wanted)
    }

    /// A book over `feeds`. Reads the snapshot file (an error if it is set but unreadable) and the
    /// persisted snapshot (ignored with a warning if unreadable): each feed starts with the prices
    /// it had given before the restart, at their fetch times.
    pub fn new(
        settings: &PricingSettings,
        feeds: Vec<Arc<dyn PriceFeed>>,
        wanted: Wanted,
    ) -> Result<Self, PricingError> {
        if settings.refresh_interval.is_zero() {
            return Err(PricingError::Config("the refresh interval must be more than zero".into()));
        }
        let fallback = settings.snapshot_path.as_deref().map(read_snapshot).transpose()?;
        let persisted = match &settings.persist_path {
            Some(path) if path.exists() => match read_snapshot(path) {
                Ok(snapshot) => Some(snapshot),
                Err(e) => {
                    tracing::warn!("starting without the persisted prices: {e}");
                    None
                }
            },
            _ => None,
        };
        let states = feeds.iter().map(|feed| warm_state(feed.name(), persisted.as_ref())).collect::<Vec<_>>();
        let merged = merge(&states, fallback.as_ref());
        Ok(Self {
            feeds,
            states: Mutex::new(states),
            fallback,
            wanted: Mutex::new(Arc::new(wanted)),
            current: watch::Sender::new(Arc::new(merged)),
            refreshing: tokio::sync::Mutex::new(()),
            refresh_interval: settings.refresh_interval,
            max_age: settings.max_age,
            persist_path: settings.persist_path.clone(),
        })
    }

    /// The current merged snapshot.
    pub fn current(&self) -> Arc<PriceSnapshot> {
        self.current.borrow().clone()
    }

    /// Sees every new merged snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<PriceSnapshot>> {
        self.current.subscribe()
    }

    /// Changes what the feeds are asked for from the next refresh on.
    pub fn set_wanted(&self, wanted: Wanted) {
        *self.wanted.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(wanted);
    }

    /// Asks every live feed once (concurrently), keeps what succeeded, merges, publishes and
    /// persists. One refresh at a time.
    pub async fn refresh(&self) -> RefreshOutcome {
        let _one_at_a_time = self.refreshing.lock().await;
        let wanted = self.wanted.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let started = now_ms();
        let results = futures::future::join_all(self.feeds.iter().map(|feed| feed.fetch(&wanted))).await;
        let mut failed = Vec::new();
        let merged = {
            let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
            for ((feed, state), result) in self.feeds.iter().zip(states.iter_mut()).zip(results) {
                match result {
                    Ok(prices) => {
                        state.last_success = Some(oldest_fetch(&prices).unwrap_or(started));
                        state.last_good = Some(prices);
                        state.last_error = None;
                    }
                    Err(e) => {
                        tracing::warn!(feed = feed.name(), "price feed failed, keeping its last good prices: {e}");
                        state.last_error = Some(e.to_string());
                        failed.push((feed.name().to_string(), e.to_string()));
                    }
                }
            }
            Arc::new(merge(&states, self.fallback.as_ref()))
        };
        let previous = self.current.send_replace(merged.clone());
        let changed = previous.id != merged.id;
        if changed {
            tracing::info!(snapshot = merged.id, "prices changed");
        }
        if failed.len() < self.feeds.len() {
            self.persist(merged.clone()).await;
        }
        RefreshOutcome { snapshot_id: merged.id.clone(), changed, failed }
    }

    /// Refreshes every `refresh_interval` (the first time at once) until `shutdown` completes.
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()> + Send) {
        let mut ticker = tokio::time::interval(self.refresh_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => return,
                _ = ticker.tick() => {
                    let outcome = self.refresh().await;
                    tracing::debug!(snapshot = outcome.snapshot_id, failed = outcome.failed.len(), "prices refreshed");
                }
            }
        }
    }

    /// Every live feed's status now.
    pub fn feed_status(&self) -> Vec<FeedStatus> {
        self.feed_status_at(now_ms())
    }

    /// Every live feed's status as of `now`.
    pub fn feed_status_at(&self, now: UnixMillis) -> Vec<FeedStatus> {
        let states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        self.feeds
            .iter()
            .zip(states.iter())
            .map(|(feed, state)| {
                let age = state.last_success.map(|at| Duration::from_millis(now.saturating_sub(at).max(0) as u64));
                FeedStatus {
                    name: feed.name().to_string(),
                    last_success: state.last_success,
                    age,
                    stale: age.is_none_or(|age| age > self.max_age),
                    last_error: state.last_error.clone(),
                    warnings: state.last_good.as_ref().map(|p| p.warnings.clone()).unwrap_or_default(),
                }
            })
            .collect()
    }

    /// The names of the live feeds whose prices are older than allowed (or that never gave any).
    pub fn stale_feeds(&self) -> Vec<String> {
        self.stale_feeds_at(now_ms())
    }

    /// [`stale_feeds`](Self::stale_feeds) as of `now`.
    pub fn stale_feeds_at(&self, now: UnixMillis) -> Vec<String> {
        self.feed_status_at(now).into_iter().filter(|s| s.stale).map(|s| s.name).collect()
    }

    async fn persist(&self, snapshot: Arc<PriceSnapshot>) {
        let Some(path) = self.persist_path.clone() else { return };
        let written = tokio::task::spawn_blocking(move || write_snapshot_atomically(&path, &snapshot)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("keeping the prices for a restart: {e}"),
            Err(e) => tracing::warn!("keeping the prices for a restart: {e}"),
        }
    }
}

/// A feed's state from the persisted snapshot: the prices it gave, as of their oldest fetch.
fn warm_state(feed: &str, persisted: Option<&PriceSnapshot>) -> FeedState {
    let Some(snapshot) = persisted else { return FeedState::default() };
    let ours = |source: &str| source_of_feed(source, feed);
    let prices = FeedPrices {
        compute: snapshot.compute.iter().filter(|p| ours(&p.provenance.source)).cloned().collect(),
        egress: snapshot.egress.iter().filter(|p| ours(&p.provenance.source)).cloned().collect(),
        storage: snapshot.storage.iter().filter(|p| ours(&p.provenance.source)).cloned().collect(),
        warnings: Vec::new(),
    };
    match oldest_fetch(&prices) {
        Some(oldest) => FeedState { last_good: Some(prices), last_success: Some(oldest), last_error: None },
        None => FeedState::default(),
    }
}

/// When the oldest of `prices` was fetched.
fn oldest_fetch(prices: &FeedPrices) -> Option<UnixMillis> {
    let compute = prices.compute.iter().map(|p| p.provenance.fetched_at);
    let egress = prices.egress.iter().map(|p| p.provenance.fetched_at);
    compute.chain(egress).chain(prices.storage.iter().map(|p| p.provenance.fetched_at)).min()
}

/// The feeds' last good prices (the first feed wins a tie), then the fallback's for what they lack.
fn merge(states: &[FeedState], fallback: Option<&PriceSnapshot>) -> PriceSnapshot {
    let mut compute: BTreeMap<(&str, &str, &str, String), &ComputePrice> = BTreeMap::new();
    let mut egress: BTreeMap<(&str, &str, String), &EgressPrice> = BTreeMap::new();
    let mut storage: BTreeMap<(&str, &str), &StoragePrice> = BTreeMap::new();
    let layers = states.iter().filter_map(|s| s.last_good.as_ref()).map(|p| (&p.compute, &p.egress, &p.storage));
    let fallback_layer = fallback.map(|s| (&s.compute, &s.egress, &s.storage));
    for (c, e, s) in layers.chain(fallback_layer) {
        for p in c {
            let key = (p.cloud.as_str(), p.region.as_str(), p.instance_type.as_str(), format!("{:?}", p.market));
            compute.entry(key).or_insert(p);
        }
        for p in e {
            egress.entry((p.cloud.as_str(), p.region.as_str(), format!("{:?}", p.destination))).or_insert(p);
        }
        for p in s {
            storage.entry((p.cloud.as_str(), p.region.as_str())).or_insert(p);
        }
    }
    let mut snapshot = PriceSnapshot {
        compute: compute.into_values().cloned().collect(),
        egress: egress.into_values().cloned().collect(),
        storage: storage.into_values().cloned().collect(),
        ..PriceSnapshot::default()
    };
    let provenances = snapshot
        .compute
        .iter()
        .map(|p| &p.provenance)
        .chain(snapshot.egress.iter().map(|p| &p.provenance))
        .chain(snapshot.storage.iter().map(|p| &p.provenance));
    let mut sources = BTreeSet::new();
    let mut oldest: Option<UnixMillis> = None;
    for provenance in provenances {
        sources.insert(provenance.source.clone());
        oldest = Some(oldest.map_or(provenance.fetched_at, |o| o.min(provenance.fetched_at)));
    }
    snapshot.sources = sources.into_iter().collect();
    snapshot.fetched_at = oldest.unwrap_or(0);
    snapshot.id = snapshot_id(&snapshot);
    snapshot
}

/// A hash of the prices and their sources (not their fetch times): the same prices, the same id.
fn snapshot_id(snapshot: &PriceSnapshot) -> String {
    let mut text = String::new();
    for p in &snapshot.compute {
        let _ = writeln!(
            text,
            "c|{:?}|{}|{}|{:?}|{}|{}",
            p.cloud, p.region, p.instance_type, p.market, p.usd_per_hour, p.provenance.source
        );
    }
    for p in &snapshot.egress {
        let _ =
            writeln!(text, "e|{:?}|{}|{:?}|{}|{}", p.cloud, p.region, p.destination, p.usd_per_gb, p.provenance.source);
    }
    for p in &snapshot.storage {
        let _ = writeln!(text, "s|{:?}|{}|{}|{}", p.cloud, p.region, p.usd_per_gb_month, p.provenance.source);
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
    let hex: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("prices-{hex}")
}
