//! The registry: per family, a read-mostly map from label values to series whose values are
//! atomics, published through an [`ArcSwap`]. An update loads the family's current map (no lock
//! and no write to memory other threads share, so threads on many cores do not contend), does one
//! hash lookup and one atomic operation; only a label set seen for the first time copies the map,
//! under the family's writer mutex. A [`Handle`] resolved once skips the lookup too. Rendering
//! sorts each family's series by label values, so the text is stable.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use super::families::{FAMILIES, Family, Kind, index};

/// One labelled series.
#[derive(Debug)]
struct Series {
    family: &'static Family,
    labels: Box<[String]>,
    /// Declared (see [`Registry::declare`]): kept at 0 when [`Registry::set_family`] leaves it out.
    declared: AtomicBool,
    /// Counters and gauges: the value; histograms: the sum. An `f64`'s bits.
    value: AtomicU64,
    /// Histograms: per-bucket (not cumulative) counts, the last one for `+Inf`.
    buckets: Box<[AtomicU64]>,
}

impl Series {
    fn new(family: &'static Family, labels: Box<[String]>) -> Self {
        let buckets = match family.kind {
            Kind::Histogram => (0..=family.buckets.len()).map(|_| AtomicU64::new(0)).collect(),
            Kind::Counter | Kind::Gauge => Box::default(),
        };
        Self { family, labels, declared: AtomicBool::new(false), value: AtomicU64::new(0f64.to_bits()), buckets }
    }

    fn get(&self) -> f64 {
        f64::from_bits(self.value.load(Ordering::Relaxed))
    }

    fn set(&self, value: f64) {
        self.value.store(value.to_bits(), Ordering::Relaxed);
    }

    fn add(&self, by: f64) {
        let _ =
            self.value.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some((f64::from_bits(v) + by).to_bits()));
    }

    fn observe(&self, value: f64) {
        let bucket = self.family.buckets.iter().position(|b| value <= *b).unwrap_or(self.family.buckets.len());
        if let Some(b) = self.buckets.get(bucket) {
            b.fetch_add(1, Ordering::Relaxed);
            self.add(value);
        }
    }

    fn has_labels(&self, labels: &[&str]) -> bool {
        self.labels.iter().map(String::as_str).eq(labels.iter().copied())
    }
}

/// A series resolved once: updating it is one atomic operation, no lookup.
///
/// A handle stays valid for the registry's life, except that [`Registry::set_family`] detaches
/// the series it leaves out (its later updates are not rendered): use handles for counters,
/// histograms and gauges set one at a time.
#[derive(Debug, Clone)]
pub struct Handle(Arc<Series>);

impl Handle {
    /// Adds `by` (≥ 0) to a counter.
    pub fn inc(&self, by: f64) {
        self.0.add(by.max(0.0));
    }

    /// Sets a gauge.
    pub fn set(&self, value: f64) {
        self.0.set(value);
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, value: f64) {
        self.0.observe(value);
    }
}

/// A family's series, keyed by the hash of their label values (collisions share a bucket).
type SeriesMap = HashMap<u64, Vec<Arc<Series>>, foldhash::fast::FixedState>;

/// One family's series: read without locking; changed (copied, then swapped) one writer at a time.
#[derive(Debug, Default)]
struct FamilySeries {
    current: ArcSwap<SeriesMap>,
    writer: Mutex<()>,
}

impl FamilySeries {
    /// Changes the map: `change` gets a copy of the current one, which then replaces it.
    fn change<T>(&self, change: impl FnOnce(&mut SeriesMap) -> T) -> T {
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut next = SeriesMap::clone(&self.current.load());
        let out = change(&mut next);
        self.current.store(Arc::new(next));
        out
    }
}

fn find<'a>(map: &'a SeriesMap, hash: u64, labels: &[&str]) -> Option<&'a Arc<Series>> {
    map.get(&hash)?.iter().find(|s| s.has_labels(labels))
}

/// The process's metrics.
#[derive(Debug)]
pub struct Registry {
    families: Box<[FamilySeries]>,
    /// Hashes label values: foldhash, seeded per process (SipHash, std's default, made the
    /// lookup cost as much as the linear search it replaced, for a few short strings).
    hasher: foldhash::fast::RandomState,
}

impl Default for Registry {
    fn default() -> Self {
        Self { families: FAMILIES.iter().map(|_| FamilySeries::default()).collect(), hasher: Default::default() }
    }
}

/// The process-wide registry.
pub fn global() -> &'static Registry {
    static GLOBAL: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
    GLOBAL.get_or_init(Registry::default)
}

impl Registry {
    fn hash(&self, labels: impl IntoIterator<Item = impl AsRef<str>>) -> u64 {
        let mut h = self.hasher.build_hasher();
        for label in labels {
            label.as_ref().hash(&mut h);
        }
        h.finish()
    }

    /// Runs `f` on the series of `name` with `labels`, creating it the first time.
    fn with_series<T>(&self, name: &str, labels: &[&str], f: impl FnOnce(&Arc<Series>) -> T) -> Option<T> {
        let i = index(name)?;
        let family = &FAMILIES[i];
        debug_assert_eq!(family.labels.len(), labels.len(), "labels of {name}");
        let hash = self.hash(labels);
        if let Some(series) = find(&self.families[i].current.load(), hash, labels) {
            return Some(f(series));
        }
        let series = self.families[i].change(|map| {
            if let Some(series) = find(map, hash, labels) {
                return series.clone();
            }
            let series = Arc::new(Series::new(family, labels.iter().map(|l| l.to_string()).collect()));
            map.entry(hash).or_default().push(series.clone());
            series
        });
        Some(f(&series))
    }

    /// Adds `by` (≥ 0) to a counter.
    pub fn inc(&self, name: &str, labels: &[&str], by: f64) {
        self.with_series(name, labels, |s| s.add(by.max(0.0)));
    }

    /// Sets one gauge.
    pub fn set(&self, name: &str, labels: &[&str], value: f64) {
        self.with_series(name, labels, |s| s.set(value));
    }

    /// Records one observation in a histogram.
    pub fn observe(&self, name: &str, labels: &[&str], value: f64) {
        self.with_series(name, labels, |s| s.observe(value));
    }

    /// The series of `name` with `labels`, resolved once for updates without a lookup; `None` for
    /// a name not declared in [`FAMILIES`].
    pub fn handle(&self, name: &str, labels: &[&str]) -> Option<Handle> {
        self.with_series(name, labels, |s| Handle(s.clone()))
    }

    /// Declares a series known to exist: it is rendered (at 0 until updated) and
    /// [`Registry::set_family`] keeps it at 0 when leaving it out, so a configured site with no
    /// agents reads 0 rather than nothing.
    pub fn declare(&self, name: &str, labels: &[&str]) {
        self.with_series(name, labels, |s| s.declared.store(true, Ordering::Relaxed));
    }

    /// Replaces every series of a gauge family: series not given disappear, except declared ones,
    /// which read 0.
    pub fn set_family(&self, name: &str, series: impl IntoIterator<Item = (Vec<String>, f64)>) {
        let Some(i) = index(name) else { return };
        let family = &FAMILIES[i];
        let given: Vec<(Vec<String>, f64)> = series.into_iter().collect();
        debug_assert!(given.iter().all(|(l, _)| l.len() == family.labels.len()), "labels of {name}");
        self.families[i].change(|map| {
            let mut old = std::mem::take(map);
            for (labels, value) in given {
                let hash = self.hash(&labels);
                let reused = old.get_mut(&hash).and_then(|list| {
                    let at = list.iter().position(|s| s.labels.iter().eq(labels.iter()))?;
                    Some(list.swap_remove(at))
                });
                let list = map.entry(hash).or_default();
                // A label set given twice: the last value wins, as it did when it replaced the first.
                if let Some(existing) = list.iter().find(|s| s.labels.iter().eq(labels.iter())) {
                    existing.set(value);
                    continue;
                }
                let series = reused.unwrap_or_else(|| Arc::new(Series::new(family, labels.into())));
                series.set(value);
                list.push(series);
            }
            for (hash, list) in old {
                for series in list.into_iter().filter(|s| s.declared.load(Ordering::Relaxed)) {
                    series.set(0.0);
                    map.entry(hash).or_default().push(series);
                }
            }
        });
    }

    /// The text exposition (format 0.0.4) of every family with at least one series.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for (family, series) in FAMILIES.iter().zip(&self.families) {
            let mut list: Vec<Arc<Series>> = series.current.load().values().flatten().cloned().collect();
            if list.is_empty() {
                continue;
            }
            list.sort_by(|a, b| a.labels.cmp(&b.labels));
            let _ = writeln!(out, "# HELP {} {}", family.name, family.help.replace('\\', "\\\\").replace('\n', "\\n"));
            let _ = writeln!(out, "# TYPE {} {}", family.name, family.kind.as_str());
            for s in &list {
                render_series(&mut out, family, s);
            }
        }
        out
    }
}

/// One series' sample lines.
fn render_series(out: &mut String, family: &Family, s: &Series) {
    let name = family.name;
    if family.kind != Kind::Histogram {
        let _ = writeln!(out, "{name}{} {}", Labels(family.labels, &s.labels, None), Number(s.get()));
        return;
    }
    // Read the buckets once: `+Inf` and `_count` agree even while observations land.
    let counts: Vec<u64> = s.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
    let mut cumulative = 0;
    for (i, n) in counts.iter().enumerate() {
        cumulative += n;
        let le = family.buckets.get(i).copied().unwrap_or(f64::INFINITY);
        let _ = writeln!(out, "{name}_bucket{} {cumulative}", Labels(family.labels, &s.labels, Some(le)));
    }
    let _ = writeln!(out, "{name}_sum{} {}", Labels(family.labels, &s.labels, None), Number(s.get()));
    let _ = writeln!(out, "{name}_count{} {cumulative}", Labels(family.labels, &s.labels, None));
}

/// `{a="x",b="y"}` (with `le` last for buckets), or nothing without labels.
struct Labels<'a>(&'static [&'static str], &'a [String], Option<f64>);

impl std::fmt::Display for Labels<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Labels(keys, values, le) = self;
        if keys.is_empty() && le.is_none() {
            return Ok(());
        }
        f.write_str("{")?;
        for (i, (key, value)) in keys.iter().zip(values.iter()).enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{key}=\"{}\"", escape(value))?;
        }
        if let Some(le) = le {
            if !keys.is_empty() {
                f.write_str(",")?;
            }
            write!(f, "le=\"{}\"", Number(*le))?;
        }
        f.write_str("}")
    }
}

/// A label value escaped for the text format.
pub fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// A sample value as the text format spells it.
struct Number(f64);

impl std::fmt::Display for Number {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            v if v.is_nan() => f.write_str("NaN"),
            v if v == f64::INFINITY => f.write_str("+Inf"),
            v if v == f64::NEG_INFINITY => f.write_str("-Inf"),
            v => write!(f, "{v}"),
        }
    }
}
