//! The instance catalog (issue 16 part 5): the cloud instance types placement may use, with their
//! GPUs, vCPUs, memory and the regions that offer them, as data. The shipped file
//! (`config/catalog/instance-types.json`, dated) is built into the binary and is the default; a
//! broker with `[placement] catalog = "FILE"` installs another at start, without a rebuild
//! (`hybroker catalog refresh` writes one from the providers' APIs).
//!
//! Placement reads the process-wide catalog through [`crate::model::site::instance_type`] and
//! [`crate::model::site::instance_types`]: one catalog, [installed](install) once before the first
//! read and never changed after, so a read is a lookup in an immutable table (no lock, no I/O) and
//! placement stays a deterministic function of its inputs for the life of the process. Pure: the
//! file is read by `config`, not here.

use std::collections::{BTreeMap, HashSet};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::gpu::known_models;
use super::price::Cloud;

/// The shipped catalog, built in.
pub const BUILTIN: &str = include_str!("../../config/catalog/instance-types.json");

/// One cloud instance type of the instance catalog, as placement reads it (a [`Catalog`] makes
/// them; `crate::model::site` re-exports it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InstanceType {
    /// `p5.48xlarge`, `Standard_NC24ads_A100_v4`: the name price feeds use.
    pub name: &'static str,
    pub cloud: Cloud,
    /// GPUs per instance (0 for CPU-only types).
    pub gpus: u32,
    /// Canonical GPU model id, `None` for CPU-only types.
    pub gpu_model: Option<&'static str>,
    pub vcpus: u32,
    pub memory_gib: u32,
}

/// A catalog file as written: its date, where its facts came from, and one entry per type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogFile {
    /// The day the facts were checked, `YYYY-MM-DD`.
    pub as_of: String,
    /// What the file is and what it is not (the regions are the ones checked, not exhaustive).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
    /// Where the facts came from, by the key entries name in `source`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sources: BTreeMap<String, String>,
    pub instance_types: Vec<CatalogEntry>,
}

/// One instance type of a catalog file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    pub cloud: Cloud,
    /// The provider's name (`p5.4xlarge`, `Standard_NC40ads_H100_v5`), as price feeds use it.
    pub name: String,
    /// GPUs per instance, 0 for a CPU-only type.
    pub gpus: u32,
    /// The canonical GPU model id (`H100-80GB`), absent for a CPU-only type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_model: Option<String>,
    /// Memory of one GPU, MiB, as the provider states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_mib: Option<u64>,
    pub vcpus: u32,
    pub memory_gib: u32,
    /// The regions that offer the type (of those checked).
    pub regions: Vec<String>,
    /// The key in [`CatalogFile::sources`] its facts came from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
}

/// Why a catalog was refused.
#[derive(Debug, Error)]
pub enum CatalogError {
    #[error("catalog is not valid json: {0}")]
    Json(#[from] serde_json::Error),
    #[error("catalog is invalid:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
    #[error("a catalog (of {installed}) is already in use: install it before the first placement")]
    AlreadyInstalled { installed: String },
}

/// A checked catalog: the [`InstanceType`]s placement reads and the regions of each.
#[derive(Debug, Clone)]
pub struct Catalog {
    as_of: String,
    types: Vec<InstanceType>,
    /// Per type, in the order of `types`: its regions, sorted.
    regions: Vec<Vec<String>>,
    file: CatalogFile,
}

impl Catalog {
    /// Parses and checks catalog text (JSON), reporting every problem at once.
    pub fn parse(text: &str) -> Result<Catalog, CatalogError> {
        Catalog::from_file(serde_json::from_str(text)?)
    }

    /// The built-in catalog.
    pub fn builtin() -> Catalog {
        Catalog::parse(BUILTIN).expect("the built-in catalog is valid (tested)")
    }

    /// Checks a catalog file, reporting every problem at once.
    ///
    /// The names of a catalog's types are kept for the life of the process (placement holds
    /// `&'static` types); a process makes one or two catalogs, so this is bounded.
    pub fn from_file(file: CatalogFile) -> Result<Catalog, CatalogError> {
        let problems = file_problems(&file);
        if !problems.is_empty() {
            return Err(CatalogError::Invalid(problems));
        }
        let mut types = Vec::with_capacity(file.instance_types.len());
        let mut regions = Vec::with_capacity(file.instance_types.len());
        for e in &file.instance_types {
            let model = e.gpu_model.as_deref().and_then(|m| known_models().iter().copied().find(|k| *k == m));
            let name: &'static str = Box::leak(e.name.clone().into_boxed_str());
            types.push(InstanceType {
                name,
                cloud: e.cloud,
                gpus: e.gpus,
                gpu_model: model,
                vcpus: e.vcpus,
                memory_gib: e.memory_gib,
            });
            let mut r = e.regions.clone();
            r.sort();
            regions.push(r);
        }
        Ok(Catalog { as_of: file.as_of.clone(), types, regions, file })
    }

    /// The day the catalog's facts were checked.
    pub fn as_of(&self) -> &str {
        &self.as_of
    }

    /// The type named `name` (exact, case-sensitive).
    pub fn get(&self, name: &str) -> Option<&InstanceType> {
        self.types.iter().find(|t| t.name == name)
    }

    /// Every type, in the file's order.
    pub fn types(&self) -> &[InstanceType] {
        &self.types
    }

    /// The regions that offer `name` (sorted; empty for an unknown type).
    pub fn regions(&self, name: &str) -> &[String] {
        self.types.iter().position(|t| t.name == name).map_or(&[], |i| &self.regions[i])
    }

    /// Whether `name` is offered in `region` (false for an unknown type).
    pub fn offered_in(&self, name: &str, region: &str) -> bool {
        self.regions(name).iter().any(|r| r == region)
    }

    /// The file the catalog was made from.
    pub fn file(&self) -> &CatalogFile {
        &self.file
    }
}

fn file_problems(file: &CatalogFile) -> Vec<String> {
    let mut p = Vec::new();
    if !is_date(&file.as_of) {
        p.push(format!("as_of: {:?} is not a date (YYYY-MM-DD)", file.as_of));
    }
    if file.instance_types.is_empty() {
        p.push("instance_types: a catalog needs at least one".into());
    }
    let mut names = HashSet::new();
    for (i, e) in file.instance_types.iter().enumerate() {
        let at = format!("instance_types[{i}] ({})", e.name);
        let mut bad = |m: String| p.push(format!("{at}: {m}"));
        if !is_type_name(&e.name) {
            bad("name: must be 1 to 64 characters of [A-Za-z0-9._-]".into());
        } else if !names.insert(e.name.as_str()) {
            bad("name: is listed twice".into());
        }
        match (&e.gpu_model, e.gpus) {
            (None, 0) => {}
            (Some(_), 0) => bad("gpu_model: a type with 0 gpus has no gpu model".into()),
            (None, _) => bad("gpu_model: a type with gpus needs its canonical gpu model".into()),
            (Some(m), _) if !known_models().contains(&m.as_str()) => bad(format!("gpu_model: unknown gpu model {m:?}")),
            (Some(_), _) => {}
        }
        if e.gpus == 0 && e.gpu_memory_mib.is_some() {
            bad("gpu_memory_mib: a type with 0 gpus has no gpu memory".into());
        }
        if e.gpu_memory_mib == Some(0) {
            bad("gpu_memory_mib: must be more than 0".into());
        }
        if e.vcpus == 0 || e.memory_gib == 0 {
            bad("vcpus and memory_gib must be more than 0".into());
        }
        if e.regions.is_empty() {
            bad("regions: must list at least one region".into());
        }
        let mut seen = HashSet::new();
        for r in &e.regions {
            if !is_region(r) {
                bad(format!("regions: {r:?} is not a region name"));
            } else if !seen.insert(r.as_str()) {
                bad(format!("regions: {r} is listed twice"));
            }
        }
        if !e.source.is_empty() && !file.sources.contains_key(&e.source) {
            bad(format!("source: {:?} is not a key of sources", e.source));
        }
    }
    p
}

fn is_date(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() == 10 && b.iter().enumerate().all(|(i, c)| if i == 4 || i == 7 { *c == b'-' } else { c.is_ascii_digit() })
}

fn is_type_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn is_region(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

static CURRENT: OnceLock<Catalog> = OnceLock::new();

/// The process-wide catalog: the one [installed](install), else the built-in one (from the first
/// read on, it cannot change).
pub fn current() -> &'static Catalog {
    CURRENT.get_or_init(Catalog::builtin)
}

/// Makes `catalog` the process-wide one. Done once at start, before anything reads the catalog;
/// refused when another (of another date or content) is already in use.
pub fn install(catalog: Catalog) -> Result<&'static Catalog, CatalogError> {
    let mut fresh = Some(catalog);
    let installed = CURRENT.get_or_init(|| fresh.take().expect("taken once"));
    match fresh {
        Some(other) if other.file != installed.file => {
            Err(CatalogError::AlreadyInstalled { installed: installed.as_of.clone() })
        }
        _ => Ok(installed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(cloud: Cloud, name: &str, gpus: u32, model: Option<&str>, regions: &[&str]) -> CatalogEntry {
        CatalogEntry {
            cloud,
            name: name.into(),
            gpus,
            gpu_model: model.map(Into::into),
            gpu_memory_mib: None,
            vcpus: 8,
            memory_gib: 32,
            regions: regions.iter().map(|r| (*r).to_owned()).collect(),
            source: String::new(),
        }
    }

    fn file(types: Vec<CatalogEntry>) -> CatalogFile {
        CatalogFile { as_of: "2026-12-01".into(), note: String::new(), sources: BTreeMap::new(), instance_types: types }
    }

    #[test]
    fn the_shipped_catalog_parses_and_covers_the_current_families() {
        let c = Catalog::builtin();
        assert!(is_date(c.as_of()));
        for (name, cloud, gpus, model) in [
            ("p5.48xlarge", Cloud::Aws, 8, Some("H100-80GB")),
            ("p5.4xlarge", Cloud::Aws, 1, Some("H100-80GB")),
            ("p5e.48xlarge", Cloud::Aws, 8, Some("H200-141GB")),
            ("p5en.48xlarge", Cloud::Aws, 8, Some("H200-141GB")),
            ("p6-b200.48xlarge", Cloud::Aws, 8, Some("B200-180GB")),
            ("p4d.24xlarge", Cloud::Aws, 8, Some("A100-40GB")),
            ("p4de.24xlarge", Cloud::Aws, 8, Some("A100-80GB")),
            ("g6e.xlarge", Cloud::Aws, 1, Some("L40S-48GB")),
            ("g6.xlarge", Cloud::Aws, 1, Some("L4-24GB")),
            ("g5.xlarge", Cloud::Aws, 1, Some("A10G-24GB")),
            ("g4dn.xlarge", Cloud::Aws, 1, Some("T4-16GB")),
            ("m7i.2xlarge", Cloud::Aws, 0, None),
            ("Standard_ND96isr_H100_v5", Cloud::Azure, 8, Some("H100-80GB")),
            ("Standard_NC40ads_H100_v5", Cloud::Azure, 1, Some("H100-94GB")),
            ("Standard_ND96isr_H200_v5", Cloud::Azure, 8, Some("H200-141GB")),
            ("Standard_NC24ads_A100_v4", Cloud::Azure, 1, Some("A100-80GB")),
            ("Standard_ND96asr_v4", Cloud::Azure, 8, Some("A100-40GB")),
            ("Standard_ND96amsr_A100_v4", Cloud::Azure, 8, Some("A100-80GB")),
            ("Standard_NV36ads_A10_v5", Cloud::Azure, 1, Some("A10-24GB")),
            ("Standard_NC4as_T4_v3", Cloud::Azure, 1, Some("T4-16GB")),
            ("Standard_ND96isr_MI300X_v5", Cloud::Azure, 8, Some("MI300X-192GB")),
            ("Standard_D4s_v5", Cloud::Azure, 0, None),
        ] {
            let t = c.get(name).unwrap_or_else(|| panic!("{name} is missing"));
            assert_eq!((t.cloud, t.gpus, t.gpu_model), (cloud, gpus, model), "{name}");
            assert!(!c.regions(name).is_empty(), "{name}");
        }
        let p5 = c.get("p5.4xlarge").unwrap();
        assert_eq!((p5.vcpus, p5.memory_gib), (16, 256));
        assert!(c.offered_in("p5.48xlarge", "us-east-1") && !c.offered_in("p4de.24xlarge", "eu-west-1"));
        assert!(c.file().instance_types.iter().all(|e| c.file().sources.contains_key(&e.source)));
    }

    #[test]
    fn every_problem_is_reported_with_its_entry() {
        let mut bad = file(vec![
            entry(Cloud::Aws, "g6.xlarge", 1, Some("L4-24GB"), &["us-east-1"]),
            entry(Cloud::Aws, "g6.xlarge", 1, Some("L4-24GB"), &["us-east-1"]),
            entry(Cloud::Aws, "x.cpu", 0, Some("L4-24GB"), &[]),
            entry(Cloud::Azure, "Standard_X", 2, None, &["West Europe", "eastus", "eastus"]),
            entry(Cloud::Azure, "Standard_Y", 1, Some("H100-81GB"), &["eastus"]),
            CatalogEntry { vcpus: 0, source: "nowhere".into(), ..entry(Cloud::Aws, "z/z", 1, Some("T4-16GB"), &["a"]) },
        ]);
        bad.as_of = "last week".into();
        let Err(CatalogError::Invalid(problems)) = Catalog::from_file(bad) else { panic!("accepted") };
        for want in [
            "as_of: \"last week\" is not a date",
            "instance_types[1] (g6.xlarge): name: is listed twice",
            "instance_types[2] (x.cpu): gpu_model: a type with 0 gpus has no gpu model",
            "instance_types[2] (x.cpu): regions: must list at least one region",
            "instance_types[3] (Standard_X): gpu_model: a type with gpus needs its canonical gpu model",
            "instance_types[3] (Standard_X): regions: \"West Europe\" is not a region name",
            "instance_types[3] (Standard_X): regions: eastus is listed twice",
            "instance_types[4] (Standard_Y): gpu_model: unknown gpu model \"H100-81GB\"",
            "instance_types[5] (z/z): name: must be 1 to 64 characters",
            "instance_types[5] (z/z): vcpus and memory_gib must be more than 0",
            "instance_types[5] (z/z): source: \"nowhere\" is not a key of sources",
        ] {
            assert!(problems.iter().any(|p| p.starts_with(want)), "{want:?} not in {problems:#?}");
        }
        assert_eq!(problems.len(), 11, "{problems:#?}");
        assert!(matches!(Catalog::parse("{\"as_of\": \"2026-01-01\", \"types\": []}"), Err(CatalogError::Json(_))));
        assert!(matches!(
            Catalog::parse(&serde_json::to_string(&file(vec![])).unwrap()),
            Err(CatalogError::Invalid(_))
        ));
    }

    #[test]
    fn a_catalog_round_trips_and_answers_by_region() {
        let f = file(vec![
            entry(Cloud::Aws, "p9.huge", 4, Some("B200-180GB"), &["us-west-2", "eu-north-1"]),
            entry(Cloud::Azure, "Standard_D2s_v9", 0, None, &["westeurope"]),
        ]);
        let c = Catalog::parse(&serde_json::to_string_pretty(&f).unwrap()).unwrap();
        assert_eq!(c.file(), &f);
        assert_eq!(c.types().len(), 2);
        assert_eq!(c.get("p9.huge").unwrap().gpu_model, Some("B200-180GB"));
        assert_eq!(c.regions("p9.huge"), ["eu-north-1", "us-west-2"]);
        assert!(c.offered_in("Standard_D2s_v9", "westeurope") && !c.offered_in("Standard_D2s_v9", "eastus"));
        assert!(c.get("P9.HUGE").is_none() && c.regions("nope").is_empty());
    }

    #[test]
    fn the_process_catalog_is_installed_once() {
        // The default is in use after the first read; the same catalog installs again, another not.
        assert_eq!(current().as_of(), Catalog::builtin().as_of());
        assert!(install(Catalog::builtin()).is_ok());
        let other = Catalog::from_file(file(vec![entry(Cloud::Aws, "p9.huge", 1, Some("L4-24GB"), &["x-1"])]));
        let err = install(other.unwrap()).unwrap_err();
        assert!(err.to_string().contains("already in use"), "{err}");
        assert!(current().get("p9.huge").is_none());
    }
}
