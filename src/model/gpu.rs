//! GPU models and inventory entries.
//!
//! Every part of hybroker (job specs, sites, prices, agent inventory) names GPU models by one
//! canonical id such as `H100-80GB`. This module owns that list, maps the names NVML reports
//! ("NVIDIA H100 80GB HBM3") to it, describes one GPU of an agent's inventory ([`Gpu`]) and parses
//! the agent's `--simulate-gpus` specification. It is pure: no I/O and no NVML.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Canonical model ids with the total memory NVML typically reports for them, in MiB.
///
/// The memory figure is what a real board shows as "total" (slightly below the marketing size);
/// simulated GPUs take it so they look like real ones.
const MODELS: [(&str, u64); 19] = [
    ("H100-80GB", 81_559),
    ("H100-94GB", 95_830),
    ("H200-141GB", 143_771),
    ("B200-180GB", 183_359),
    ("A100-80GB", 81_920),
    ("A100-40GB", 40_960),
    ("L40S-48GB", 46_068),
    ("L40-48GB", 46_068),
    ("L4-24GB", 23_034),
    ("A10G-24GB", 23_028),
    ("A10-24GB", 23_028),
    ("A30-24GB", 24_576),
    ("A40-48GB", 46_068),
    ("T4-16GB", 15_360),
    ("V100-16GB", 16_384),
    ("V100-32GB", 32_768),
    ("RTX6000ADA-48GB", 49_140),
    ("A6000-48GB", 49_140),
    // AMD: for the instance catalog and placement only (the agent's inventory is NVML), so no
    // agent reports it; the figure is the board's 192 GiB.
    ("MI300X-192GB", 196_608),
];

/// The canonical ids alone, in the order of [`MODELS`].
const MODEL_IDS: [&str; MODELS.len()] = {
    let mut ids = [""; MODELS.len()];
    let mut i = 0;
    while i < MODELS.len() {
        ids[i] = MODELS[i].0;
        i += 1;
    }
    ids
};

/// Prefix of the id given to a GPU whose NVML name is not recognised (see [`canonical_model`]).
pub const UNKNOWN_PREFIX: &str = "UNKNOWN";

/// Most simulated GPUs one agent may declare; keeps a typo from building a huge inventory.
pub const MAX_SIMULATED_GPUS: u32 = 256;

/// All canonical GPU model ids.
pub fn known_models() -> &'static [&'static str] {
    &MODEL_IDS
}

/// Whether `id` is a canonical GPU model id (exact, case-sensitive match).
pub fn is_known_model(id: &str) -> bool {
    MODEL_IDS.contains(&id)
}

/// The typical total memory in MiB of a canonical model, `None` for an unknown id.
pub fn model_memory_mib(id: &str) -> Option<u64> {
    MODELS.iter().find(|(m, _)| *m == id).map(|(_, mib)| *mib)
}

/// Maps an NVML device name and its total memory (MiB, 0 if unknown) to a canonical model id.
///
/// A canonical id is returned as it is. Other names are matched on their upper-cased alphanumeric tokens, so "NVIDIA A100-SXM4-80GB",
/// "NVIDIA A100 80GB PCIe" and "Tesla T4" all work. Where the name leaves the size open
/// (an H100 PCIe vs NVL, an A100 without a size), the memory decides.
///
/// A name that is not recognised gives `UNKNOWN-<name>`: the name upper-cased, a leading
/// `NVIDIA`/`TESLA` dropped, every run of other characters than `A-Z0-9` turned into one `-`, cut
/// to 48 characters ("NVIDIA GH200 480GB" gives `UNKNOWN-GH200-480GB`; an empty name gives
/// `UNKNOWN`). Such ids are never [known](is_known_model), so no job asks for them by accident.
pub fn canonical_model(nvml_name: &str, memory_mib: u64) -> String {
    if let Some(id) = MODEL_IDS.iter().find(|m| m.eq_ignore_ascii_case(nvml_name.trim())) {
        return (*id).to_owned();
    }
    let upper = nvml_name.to_ascii_uppercase();
    let tokens: Vec<&str> = upper.split(|c: char| !c.is_ascii_alphanumeric()).filter(|t| !t.is_empty()).collect();
    let has = |t: &str| tokens.contains(&t);
    let mem_known = memory_mib > 0;
    let id = if has("H200") {
        Some("H200-141GB")
    } else if has("H100") {
        let nvl = has("NVL") || (mem_known && (90_000..=110_000).contains(&memory_mib));
        Some(if nvl { "H100-94GB" } else { "H100-80GB" })
    } else if has("B200") {
        Some("B200-180GB")
    } else if has("A100") {
        let big = if has("80GB") {
            true
        } else if has("40GB") {
            false
        } else {
            mem_known && memory_mib >= 60_000
        };
        Some(if big { "A100-80GB" } else { "A100-40GB" })
    } else if has("V100") || has("V100S") {
        let big = if has("32GB") {
            true
        } else if has("16GB") {
            false
        } else {
            mem_known && memory_mib >= 24_000
        };
        Some(if big { "V100-32GB" } else { "V100-16GB" })
    } else if has("L40S") {
        Some("L40S-48GB")
    } else if has("L40") {
        Some("L40-48GB")
    } else if has("L4") {
        Some("L4-24GB")
    } else if has("A10G") {
        Some("A10G-24GB")
    } else if has("A10") {
        Some("A10-24GB")
    } else if has("A30") {
        Some("A30-24GB")
    } else if has("A40") {
        Some("A40-48GB")
    } else if has("T4") {
        Some("T4-16GB")
    } else if has("A6000") {
        Some("A6000-48GB")
    } else if has("RTX") && has("6000") && has("ADA") {
        Some("RTX6000ADA-48GB")
    } else {
        None
    };
    match id {
        Some(id) => id.to_owned(),
        None => unknown_model_id(&tokens),
    }
}

/// Builds the documented `UNKNOWN-<name>` id from a name's upper-cased tokens.
fn unknown_model_id(tokens: &[&str]) -> String {
    let skip = usize::from(matches!(tokens.first(), Some(&"NVIDIA" | &"TESLA")));
    let mut name = tokens[skip..].join("-");
    name.truncate(48);
    let name = name.trim_end_matches('-');
    if name.is_empty() { UNKNOWN_PREFIX.to_owned() } else { format!("{UNKNOWN_PREFIX}-{name}") }
}

/// One GPU of an agent's inventory, real (from NVML) or simulated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// NVML index on the node (the number `CUDA_VISIBLE_DEVICES` uses); simulated GPUs follow
    /// the real ones.
    pub index: u32,
    /// NVML UUID (`GPU-…`), or `GPU-sim-<node>-<index>` for a simulated GPU.
    pub uuid: String,
    /// Canonical model id (see [`canonical_model`]).
    pub model: String,
    /// The name NVML reports, for people.
    pub name: String,
    /// Total memory in MiB.
    pub memory_mib: u64,
    /// Memory in use, MiB (0 when unknown; not sent to the broker).
    #[serde(default)]
    pub memory_used_mib: u64,
    /// False when the GPU is lost, needs a reset or has uncorrected ECC errors.
    pub healthy: bool,
    /// True for a GPU made up by `--simulate-gpus`.
    pub simulated: bool,
    /// GPU utilisation over NVML's last sample period, percent.
    pub utilization_pct: u32,
    /// GPU die temperature, degrees Celsius.
    pub temperature_c: u32,
    /// Power draw, milliwatts.
    pub power_mw: u32,
    /// Volatile (since driver load) uncorrected ECC error count.
    pub ecc_errors: u64,
    /// Whether MIG mode is currently enabled.
    pub mig_enabled: bool,
}

/// One part of a `--simulate-gpus` specification: `count` GPUs of `model`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimulatedGpus {
    /// How many GPUs, at least 1.
    pub count: u32,
    /// Canonical model id.
    pub model: String,
}

/// Why a `--simulate-gpus` specification was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GpuSpecError {
    /// The part is not `<count>x<model>`.
    #[error("invalid gpu spec `{part}`: {reason}; expected <count>x<model>, like 4xH100-80GB")]
    Malformed {
        /// The offending comma-separated part.
        part: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The model is not a canonical id.
    #[error("unknown gpu model `{model}` in gpu spec `{part}`; known models: {known}")]
    UnknownModel {
        /// The offending comma-separated part.
        part: String,
        /// The model as written.
        model: String,
        /// The known models, comma separated.
        known: String,
    },
    /// The whole specification asks for more than [`MAX_SIMULATED_GPUS`].
    #[error("too many simulated gpus: {total} (at most {MAX_SIMULATED_GPUS})")]
    TooMany {
        /// The total requested.
        total: u64,
    },
}

/// Parses a `--simulate-gpus` specification: comma-separated `<count>x<model>` parts such as
/// `4xH100-80GB,2xL4-24GB`.
///
/// Whitespace around parts is ignored, the model is matched case-insensitively and returned in
/// its canonical spelling; an empty (or blank) specification means no simulated GPUs.
pub fn parse_simulated(spec: &str) -> Result<Vec<SimulatedGpus>, GpuSpecError> {
    if spec.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let mut total: u64 = 0;
    for raw in spec.split(',') {
        let part = raw.trim();
        let malformed = |reason: &str| GpuSpecError::Malformed { part: part.to_owned(), reason: reason.to_owned() };
        if part.is_empty() {
            return Err(malformed("empty part"));
        }
        let (count, model) =
            part.split_once(['x', 'X']).ok_or_else(|| malformed("missing `x` between count and model"))?;
        let count = count.trim();
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed("count must be a whole number"));
        }
        let count: u32 = count.parse().map_err(|_| malformed("count is too large"))?;
        if count == 0 {
            return Err(malformed("count must be at least 1"));
        }
        let model = model.trim();
        let canonical = MODEL_IDS.iter().find(|m| m.eq_ignore_ascii_case(model)).ok_or_else(|| {
            GpuSpecError::UnknownModel { part: part.to_owned(), model: model.to_owned(), known: MODEL_IDS.join(", ") }
        })?;
        total += u64::from(count);
        if total > u64::from(MAX_SIMULATED_GPUS) {
            return Err(GpuSpecError::TooMany { total });
        }
        out.push(SimulatedGpus { count, model: (*canonical).to_owned() });
    }
    Ok(out)
}

/// Builds the simulated GPUs of `specs`, numbered from `first_index`.
///
/// They are healthy, idle and `simulated`, with the typical memory of their model and the
/// deterministic UUID `GPU-sim-<node>-<index>`, so an agent restart reports the same ids.
pub fn simulated_gpus(specs: &[SimulatedGpus], first_index: u32, node: &str) -> Vec<Gpu> {
    let mut gpus = Vec::new();
    let mut index = first_index;
    for spec in specs {
        for _ in 0..spec.count {
            gpus.push(Gpu {
                index,
                uuid: format!("GPU-sim-{node}-{index}"),
                model: spec.model.clone(),
                name: format!("Simulated {}", spec.model),
                memory_mib: model_memory_mib(&spec.model).unwrap_or(0),
                memory_used_mib: 0,
                healthy: true,
                simulated: true,
                utilization_pct: 0,
                temperature_c: 0,
                power_mw: 0,
                ecc_errors: 0,
                mig_enabled: false,
            });
            index += 1;
        }
    }
    gpus
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_ids_are_known_and_map_to_themselves() {
        for (id, mib) in MODELS {
            assert!(is_known_model(id));
            assert_eq!(canonical_model(id, mib), id);
            assert_eq!(canonical_model(&id.to_lowercase(), 0), id);
        }
        assert_eq!(known_models().len(), MODELS.len());
        assert!(!is_known_model("h100-80gb"));
        assert!(!is_known_model("UNKNOWN-GH200-480GB"));
    }

    #[test]
    fn maps_nvml_names() {
        let cases = [
            ("NVIDIA H100 80GB HBM3", 81_559, "H100-80GB"),
            ("NVIDIA H100 PCIe", 81_559, "H100-80GB"),
            ("NVIDIA H100 NVL", 95_830, "H100-94GB"),
            ("NVIDIA H100 NVL", 0, "H100-94GB"),
            ("NVIDIA H200", 143_771, "H200-141GB"),
            ("NVIDIA H200 NVL", 143_771, "H200-141GB"),
            ("NVIDIA B200", 183_359, "B200-180GB"),
            ("NVIDIA A100-SXM4-80GB", 81_920, "A100-80GB"),
            ("NVIDIA A100 80GB PCIe", 81_920, "A100-80GB"),
            ("NVIDIA A100-SXM4-40GB", 40_960, "A100-40GB"),
            ("NVIDIA A100-PCIE-40GB", 40_960, "A100-40GB"),
            ("NVIDIA A100", 81_920, "A100-80GB"),
            ("NVIDIA L40S", 46_068, "L40S-48GB"),
            ("NVIDIA L40", 46_068, "L40-48GB"),
            ("NVIDIA L4", 23_034, "L4-24GB"),
            ("NVIDIA A10G", 23_028, "A10G-24GB"),
            ("NVIDIA A10", 23_028, "A10-24GB"),
            ("NVIDIA A30", 24_576, "A30-24GB"),
            ("NVIDIA A40", 46_068, "A40-48GB"),
            ("Tesla T4", 15_360, "T4-16GB"),
            ("Tesla V100-SXM2-16GB", 16_160, "V100-16GB"),
            ("Tesla V100-SXM2-32GB", 32_510, "V100-32GB"),
            ("Tesla V100S-PCIE-32GB", 32_510, "V100-32GB"),
            ("NVIDIA RTX 6000 Ada Generation", 49_140, "RTX6000ADA-48GB"),
            ("NVIDIA RTX A6000", 49_140, "A6000-48GB"),
        ];
        for (name, mib, want) in cases {
            assert_eq!(canonical_model(name, mib), want, "{name} {mib}");
        }
    }

    #[test]
    fn unknown_names_are_sanitised() {
        assert_eq!(canonical_model("NVIDIA GH200 480GB", 97_871), "UNKNOWN-GH200-480GB");
        assert_eq!(canonical_model("Quadro RTX 6000", 24_576), "UNKNOWN-QUADRO-RTX-6000");
        assert_eq!(canonical_model("NVIDIA GB200", 0), "UNKNOWN-GB200");
        assert_eq!(canonical_model("", 0), "UNKNOWN");
        assert_eq!(canonical_model("  ;; ", 0), "UNKNOWN");
        let long = canonical_model(&"x/".repeat(100), 0);
        assert!(long.len() <= UNKNOWN_PREFIX.len() + 1 + 48, "{long}");
        assert!(!long.ends_with('-'));
        assert!(!is_known_model(&long));
    }

    #[test]
    fn parses_simulated_specs() {
        assert_eq!(parse_simulated("").unwrap(), vec![]);
        assert_eq!(parse_simulated("  ").unwrap(), vec![]);
        let want = vec![
            SimulatedGpus { count: 4, model: "H100-80GB".into() },
            SimulatedGpus { count: 2, model: "L4-24GB".into() },
        ];
        assert_eq!(parse_simulated("4xH100-80GB,2xL4-24GB").unwrap(), want);
        assert_eq!(parse_simulated(" 4x h100-80gb , 2XL4-24GB ").unwrap(), want);
    }

    #[test]
    fn refuses_bad_simulated_specs() {
        let err = parse_simulated("4xH100-81GB").unwrap_err();
        let text = err.to_string();
        assert!(text.contains("`H100-81GB`") && text.contains("H200-141GB"), "{text}");
        for (spec, bad) in [
            ("0xH100-80GB", "0xH100-80GB"),
            ("H100-80GB", "H100-80GB"),
            ("4xH100-80GB,,1xL4-24GB", ""),
            ("-1xL4-24GB", "-1xL4-24GB"),
            ("99999999999xL4-24GB", "99999999999xL4-24GB"),
            ("garbage", "garbage"),
        ] {
            let err = parse_simulated(spec).unwrap_err();
            assert!(matches!(&err, GpuSpecError::Malformed { part, .. } if part == bad), "{spec}: {err:?}");
        }
        assert_eq!(parse_simulated("200xL4-24GB,57xT4-16GB").unwrap_err(), GpuSpecError::TooMany { total: 257 });
    }

    #[test]
    fn builds_simulated_gpus() {
        let specs = parse_simulated("2xH200-141GB,1xL4-24GB").unwrap();
        let gpus = simulated_gpus(&specs, 1, "node-a");
        assert_eq!(gpus.len(), 3);
        assert_eq!(gpus[0].index, 1);
        assert_eq!(gpus[0].uuid, "GPU-sim-node-a-1");
        assert_eq!(gpus[0].model, "H200-141GB");
        assert_eq!(gpus[0].memory_mib, 143_771);
        assert_eq!(gpus[2].uuid, "GPU-sim-node-a-3");
        assert_eq!(gpus[2].model, "L4-24GB");
        assert!(gpus.iter().all(|g| g.healthy && g.simulated && !g.mig_enabled));
    }
}
