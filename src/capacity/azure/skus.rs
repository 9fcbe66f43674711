//! The Azure part of `hybroker catalog refresh`: the subscription's resource SKUs
//! (`GET /subscriptions/{id}/providers/Microsoft.Compute/skus`, every page by `nextLink`), through
//! the provider's Resource Manager client and token credentials. A SKU is one VM size in one
//! location, with its `vCPUs`, `MemoryGB` and `GPUs` capabilities; a location the subscription
//! may not use (`restrictions` of type `Location`, `NotAvailableForSubscription`) is left out.
//! Resource SKUs do not name the GPU, so the model comes from the size's name and family
//! ([`gpu_model`]); sizes with a GPU it does not know, or a part of one, are counted as skipped.

use std::collections::BTreeMap;
use std::path::PathBuf;

use reqwest::Method;
use serde::Deserialize;

use super::arm::Arm;
use super::auth::{self, TokenSource};
use super::{DEFAULT_ENDPOINT, ResolvedCredential, http};
use crate::capacity::ProviderError;
use crate::model::catalog::CatalogEntry;
use crate::model::price::Cloud;

/// The resource SKUs API version asked.
pub const SKUS_API_VERSION: &str = "2021-07-01";
/// A listing with more pages than this is refused (a link that never ends).
const MAX_PAGES: usize = 200;

/// What to ask Resource Manager.
#[derive(Debug, Clone)]
pub struct AzureCatalogQuery {
    pub subscription_id: String,
    pub credential: ResolvedCredential,
    /// Resource Manager's base URL; `None` = the public cloud's.
    pub endpoint: Option<String>,
    /// Microsoft Entra's authority; `None` = the public cloud's.
    pub authority: Option<String>,
    /// Extra trusted roots (a test server's CA).
    pub ca_file: Option<PathBuf>,
    /// Keep only these locations (empty: every location the subscription sees).
    pub locations: Vec<String>,
    /// CPU-only sizes to keep (GPU sizes with a known model are always kept).
    pub cpu_types: Vec<String>,
    /// Written as each entry's `source`.
    pub source: String,
}

/// What Resource Manager answered, as catalog entries (sorted by name), and the sizes left out.
#[derive(Debug, Clone, Default)]
pub struct AzureCatalog {
    pub entries: Vec<CatalogEntry>,
    pub skipped: Vec<String>,
}

/// Lists the subscription's VM sizes and the locations that offer each.
pub async fn describe_catalog(query: &AzureCatalogQuery) -> Result<AzureCatalog, ProviderError> {
    let invalid = |message: String| ProviderError::Invalid { code: "InvalidSettings".into(), message };
    let http = http::client(query.ca_file.as_deref()).map_err(invalid)?;
    let authority = query.authority.as_deref().unwrap_or(auth::DEFAULT_AUTHORITY);
    let tokens = TokenSource::new(query.credential.clone(), authority, auth::DEFAULT_IMDS, http.clone());
    let arm = Arm::new(http, query.endpoint.as_deref().unwrap_or(DEFAULT_ENDPOINT), tokens);
    let mut url = format!(
        "{}/subscriptions/{}/providers/Microsoft.Compute/skus?api-version={SKUS_API_VERSION}",
        arm.endpoint(),
        query.subscription_id
    );
    let mut entries: BTreeMap<String, CatalogEntry> = BTreeMap::new();
    let mut skipped = std::collections::BTreeSet::new();
    for _ in 0..MAX_PAGES {
        let reply = arm.send(Method::GET, &url, None, &[]).await?;
        if !reply.status.is_success() {
            return Err(reply.error());
        }
        let page: SkuPage = serde_json::from_str(&reply.body)
            .map_err(|e| ProviderError::Transient { message: format!("unreadable resource skus page: {e}") })?;
        for sku in page.value.iter().filter(|s| s.resource_type == "virtualMachines") {
            match sku_entry(sku, &query.cpu_types, &query.source) {
                Ok(Some(fresh)) => {
                    let e = entries
                        .entry(fresh.name.clone())
                        .or_insert_with(|| CatalogEntry { regions: Vec::new(), ..fresh });
                    for l in usable_locations(sku) {
                        if (query.locations.is_empty() || query.locations.contains(&l)) && !e.regions.contains(&l) {
                            e.regions.push(l);
                        }
                    }
                }
                Ok(None) => {}
                Err(why) => {
                    skipped.insert(format!("{} ({why})", sku.name));
                }
            }
        }
        match page.next_link.filter(|l| !l.trim().is_empty()) {
            Some(next) => url = next,
            None => {
                let entries = entries
                    .into_values()
                    .filter(|e| !e.regions.is_empty())
                    .map(|mut e| {
                        e.regions.sort();
                        e
                    })
                    .collect();
                return Ok(AzureCatalog { entries, skipped: skipped.into_iter().collect() });
            }
        }
    }
    Err(ProviderError::Transient { message: format!("resource skus: more than {MAX_PAGES} pages") })
}

/// The canonical GPU model of an Azure GPU size, from its name and family (`None`: not known).
pub fn gpu_model(name: &str, family: &str) -> Option<&'static str> {
    let (n, f) = (name.to_ascii_uppercase(), family.to_ascii_uppercase());
    let has = |token: &str| n.contains(token) || f.contains(token);
    if has("GB200") || has("GB300") {
        None
    } else if has("MI300X") {
        Some("MI300X-192GB")
    } else if has("H200") {
        Some("H200-141GB")
    } else if has("H100") {
        // NC H100 v5 carries the H100 NVL (94 GB); ND H100 v5 the SXM (80 GB).
        Some(if n.starts_with("STANDARD_NC") { "H100-94GB" } else { "H100-80GB" })
    } else if has("B200") {
        Some("B200-180GB")
    } else if n.contains("A100") {
        Some("A100-80GB")
    } else if f.contains("A100") {
        // ND A100 v4 (`Standard_ND96asr_v4`) is the 40 GB part; the 80 GB sizes say A100 in the name.
        Some("A100-40GB")
    } else if n.contains("_A10_") || n.ends_with("_A10") {
        Some("A10-24GB")
    } else if has("T4") {
        Some("T4-16GB")
    } else {
        None
    }
}

/// The entry of a SKU (no regions yet): `Ok(None)` for a size not kept, `Err(why)` for a GPU size
/// left out.
fn sku_entry(sku: &Sku, cpu_types: &[String], source: &str) -> Result<Option<CatalogEntry>, String> {
    let number =
        |name: &str| sku.capabilities.iter().find(|c| c.name == name).and_then(|c| c.value.parse::<f64>().ok());
    let gpus = number("GPUs").unwrap_or(0.0);
    let vcpus = number("vCPUs").unwrap_or(0.0);
    let model = if gpus > 0.0 {
        let model = gpu_model(&sku.name, &sku.family).ok_or("gpu model not known")?;
        // NV A10 v5 sizes below 36 vCPUs hold a part of one GPU.
        if gpus.fract() != 0.0 || (model == "A10-24GB" && vcpus < 36.0) {
            return Err("a part of a gpu".into());
        }
        Some(model.to_owned())
    } else if cpu_types.contains(&sku.name) {
        None
    } else {
        return Ok(None);
    };
    Ok(Some(CatalogEntry {
        cloud: Cloud::Azure,
        name: sku.name.clone(),
        gpus: gpus as u32,
        gpu_model: model,
        gpu_memory_mib: None,
        vcpus: vcpus as u32,
        memory_gib: number("MemoryGB").unwrap_or(0.0) as u32,
        regions: Vec::new(),
        source: source.to_owned(),
    }))
}

/// The SKU's locations, lower case, less those restricted for the subscription.
fn usable_locations(sku: &Sku) -> Vec<String> {
    let restricted: Vec<String> = sku
        .restrictions
        .iter()
        .filter(|r| r.kind == "Location")
        .flat_map(|r| r.values.iter().map(|v| v.to_ascii_lowercase()))
        .collect();
    sku.locations.iter().map(|l| l.to_ascii_lowercase()).filter(|l| !restricted.contains(l)).collect()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SkuPage {
    #[serde(default)]
    value: Vec<Sku>,
    next_link: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Sku {
    #[serde(default)]
    resource_type: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    family: String,
    #[serde(default)]
    locations: Vec<String>,
    #[serde(default)]
    capabilities: Vec<Capability>,
    #[serde(default)]
    restrictions: Vec<Restriction>,
}

#[derive(Deserialize)]
struct Capability {
    name: String,
    value: String,
}

#[derive(Deserialize)]
struct Restriction {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    values: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_models_come_from_the_size_and_family() {
        for (name, family, want) in [
            ("Standard_ND96isr_H100_v5", "standardNDSH100v5Family", Some("H100-80GB")),
            ("Standard_NC40ads_H100_v5", "StandardNCadsH100v5Family", Some("H100-94GB")),
            ("Standard_ND96isr_H200_v5", "standardNDISRH200V5Family", Some("H200-141GB")),
            ("Standard_ND96isr_MI300X_v5", "standardNDISv5MI300XFamily", Some("MI300X-192GB")),
            ("Standard_NC24ads_A100_v4", "StandardNCADSA100v4Family", Some("A100-80GB")),
            ("Standard_ND96amsr_A100_v4", "standardNDAMSv4_A100Family", Some("A100-80GB")),
            ("Standard_ND96asr_v4", "standardNDASv4_A100Family", Some("A100-40GB")),
            ("Standard_NV36ads_A10_v5", "StandardNVADSA10v5Family", Some("A10-24GB")),
            ("Standard_NC4as_T4_v3", "Standard NCASv3_T4 Family", Some("T4-16GB")),
            ("Standard_ND128isr_NDR_GB200_v6", "standardNDGB200v6Family", None),
            ("Standard_NC6s_v3", "standardNCSv3Family", None),
        ] {
            assert_eq!(gpu_model(name, family), want, "{name}");
        }
    }

    #[test]
    fn skus_become_entries_with_their_usable_locations() {
        let page: SkuPage = serde_json::from_str(
            r#"{"value": [
              {"resourceType": "virtualMachines", "name": "Standard_NC40ads_H100_v5", "family": "StandardNCadsH100v5Family",
               "locations": ["EastUS"], "capabilities": [{"name": "vCPUs", "value": "40"}, {"name": "MemoryGB", "value": "320"},
               {"name": "GPUs", "value": "1"}], "restrictions": []},
              {"resourceType": "virtualMachines", "name": "Standard_NV6ads_A10_v5", "family": "StandardNVADSA10v5Family",
               "locations": ["eastus"], "capabilities": [{"name": "vCPUs", "value": "6"}, {"name": "MemoryGB", "value": "55"},
               {"name": "GPUs", "value": "1"}]},
              {"resourceType": "virtualMachines", "name": "Standard_D4s_v5", "family": "standardDSv5Family",
               "locations": ["westeurope"], "capabilities": [{"name": "vCPUs", "value": "4"}, {"name": "MemoryGB", "value": "16"}],
               "restrictions": [{"type": "Location", "values": ["westeurope"], "reasonCode": "NotAvailableForSubscription"}]},
              {"resourceType": "disks", "name": "Premium_LRS"}
            ], "nextLink": "https://management.azure.com/next"}"#,
        )
        .unwrap();
        let cpu = ["Standard_D4s_v5".to_owned()];
        let h100 = sku_entry(&page.value[0], &cpu, "arm").unwrap().unwrap();
        assert_eq!(
            (h100.gpus, h100.gpu_model.as_deref(), h100.vcpus, h100.memory_gib),
            (1, Some("H100-94GB"), 40, 320)
        );
        assert_eq!(usable_locations(&page.value[0]), ["eastus"]);
        assert_eq!(sku_entry(&page.value[1], &cpu, "arm").unwrap_err(), "a part of a gpu");
        let d4 = sku_entry(&page.value[2], &cpu, "arm").unwrap().unwrap();
        assert_eq!((d4.gpus, d4.gpu_model, d4.vcpus), (0, None, 4));
        assert!(usable_locations(&page.value[2]).is_empty());
        assert_eq!(sku_entry(&page.value[2], &[], "arm").unwrap(), None);
        assert_eq!(page.next_link.as_deref(), Some("https://management.azure.com/next"));
    }
}
