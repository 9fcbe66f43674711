//! The AWS part of `hybroker catalog refresh`: EC2 `DescribeInstanceTypes` (GPUs, GPU memory,
//! vCPUs, memory; the same in every region, so asked once) and `DescribeInstanceTypeOfferings`
//! with `LocationType=region` in each region asked, through the provider's EC2 Query client, every
//! page followed. A type is kept when its GPU maps to a canonical model (or it is a CPU type the
//! caller names); the others (Inferentia, Trainium, unknown GPUs) are counted as skipped.

use std::collections::{BTreeMap, BTreeSet};

use aws_sdk_s3::config::{Credentials, SharedCredentialsProvider};
use serde::Deserialize;

use super::query::Ec2Client;
use super::reply::ItemSet;
use super::{default_chain, regional_endpoint};
use crate::capacity::ProviderError;
use crate::model::catalog::CatalogEntry;
use crate::model::gpu::{canonical_model, is_known_model};
use crate::model::price::Cloud;

/// A listing with more pages than this is refused (a token that never ends).
const MAX_PAGES: usize = 100;

/// What to ask EC2.
#[derive(Debug, Clone)]
pub struct AwsCatalogQuery {
    /// The regions whose offerings are asked (the first also answers `DescribeInstanceTypes`).
    pub regions: Vec<String>,
    /// One endpoint for every region (an emulator); `None` = each region's own.
    pub endpoint: Option<String>,
    /// Fixed credentials (an emulator); `None` = the AWS default chain.
    pub static_credentials: Option<(String, String)>,
    /// CPU-only types to keep (GPU types with a known model are always kept).
    pub cpu_types: Vec<String>,
    /// Written as each entry's `source`.
    pub source: String,
}

/// What EC2 answered, as catalog entries (sorted by name), and the GPU types left out.
#[derive(Debug, Clone, Default)]
pub struct AwsCatalog {
    pub entries: Vec<CatalogEntry>,
    /// GPU types whose GPU has no canonical model, by name with the GPU EC2 named.
    pub skipped: Vec<String>,
}

/// Asks EC2 for the types and the regions that offer them.
pub async fn describe_catalog(query: &AwsCatalogQuery) -> Result<AwsCatalog, ProviderError> {
    let invalid = |message: String| ProviderError::Invalid { code: "InvalidQuery".into(), message };
    let first = query.regions.first().ok_or_else(|| invalid("name at least one aws region".into()))?;
    let credentials = match &query.static_credentials {
        Some((id, secret)) => {
            SharedCredentialsProvider::new(Credentials::new(id, secret, None, None, "hybroker-static"))
        }
        None => default_chain(first)
            .await
            .ok_or_else(|| invalid("the aws default credential chain has no provider".into()))?,
    };
    let client = |region: &str| {
        let endpoint = query.endpoint.clone().unwrap_or_else(|| regional_endpoint(region));
        Ec2Client::new(&endpoint, region, credentials.clone())
    };
    let mut shapes = BTreeMap::new();
    let mut skipped = Vec::new();
    let first_client = client(first)?;
    for t in pages(&first_client, "DescribeInstanceTypes", 100, parse_types).await? {
        match entry_of(&t, &query.cpu_types, &query.source) {
            Ok(Some(e)) => {
                shapes.insert(e.name.clone(), e);
            }
            Ok(None) => {}
            Err(gpu) => skipped.push(format!("{} ({gpu})", t.instance_type)),
        }
    }
    for region in &query.regions {
        let offered = pages(&client(region)?, "DescribeInstanceTypeOfferings", 1000, parse_offerings).await?;
        let offered: BTreeSet<String> = offered.into_iter().collect();
        for e in shapes.values_mut().filter(|e| offered.contains(&e.name)) {
            e.regions.push(region.clone());
        }
    }
    let entries = shapes.into_values().filter(|e| !e.regions.is_empty()).collect();
    skipped.sort();
    Ok(AwsCatalog { entries, skipped })
}

/// One parsed page: its items and the next page's token.
type Page<T> = Result<(Vec<T>, Option<String>), String>;

/// Every page of `action`, each parsed by `parse` into its items and next token.
async fn pages<T>(
    client: &Ec2Client,
    action: &str,
    page_size: u32,
    parse: fn(&str) -> Page<T>,
) -> Result<Vec<T>, ProviderError> {
    let mut all = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut params = vec![("MaxResults".to_owned(), page_size.to_string())];
        if action == "DescribeInstanceTypeOfferings" {
            params.push(("LocationType".into(), "region".into()));
        }
        if let Some(t) = &token {
            params.push(("NextToken".into(), t.clone()));
        }
        let xml = client.call(action, &params).await?;
        let (items, next) = parse(&xml).map_err(|message| ProviderError::Transient { message })?;
        all.extend(items);
        match next {
            Some(next) => token = Some(next),
            None => return Ok(all),
        }
    }
    Err(ProviderError::Transient { message: format!("ec2 {action}: more than {MAX_PAGES} pages") })
}

/// The catalog entry of a type (no regions yet): `Ok(None)` for a type not kept, `Err(gpu)` for a
/// GPU type whose GPU has no canonical model.
fn entry_of(t: &WireType, cpu_types: &[String], source: &str) -> Result<Option<CatalogEntry>, String> {
    let gpu = t.gpu_info.as_ref().and_then(|g| g.gpus.as_ref()).and_then(|s| s.items.first());
    let (gpus, model, memory) = match gpu {
        Some(g) => {
            let memory = g.memory_info.as_ref().and_then(|m| m.size_in_mi_b).unwrap_or(0);
            let name = format!("{} {}", g.manufacturer.as_deref().unwrap_or(""), g.name.as_deref().unwrap_or(""));
            let model = canonical_model(&name, memory);
            if !is_known_model(&model) {
                return Err(name.trim().to_owned());
            }
            (g.count.unwrap_or(0), Some(model), (memory > 0).then_some(memory))
        }
        None if cpu_types.contains(&t.instance_type) => (0, None, None),
        None => return Ok(None),
    };
    if gpus == 0 && model.is_some() {
        return Ok(None);
    }
    let vcpus = t.v_cpu_info.as_ref().and_then(|v| v.default_v_cpus).unwrap_or(0);
    let memory_gib = t.memory_info.as_ref().and_then(|m| m.size_in_mi_b).unwrap_or(0) / 1024;
    Ok(Some(CatalogEntry {
        cloud: Cloud::Aws,
        name: t.instance_type.clone(),
        gpus,
        gpu_model: model,
        gpu_memory_mib: memory,
        vcpus,
        memory_gib: u32::try_from(memory_gib).unwrap_or(u32::MAX),
        regions: Vec::new(),
        source: source.to_owned(),
    }))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TypesAnswer {
    instance_type_set: Option<ItemSet<WireType>>,
    next_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireType {
    instance_type: String,
    v_cpu_info: Option<WireVcpus>,
    memory_info: Option<WireMemory>,
    gpu_info: Option<WireGpuInfo>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireVcpus {
    default_v_cpus: Option<u32>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireMemory {
    size_in_mi_b: Option<u64>,
}

#[derive(Deserialize)]
struct WireGpuInfo {
    gpus: Option<ItemSet<WireGpu>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireGpu {
    name: Option<String>,
    manufacturer: Option<String>,
    count: Option<u32>,
    memory_info: Option<WireMemory>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OfferingsAnswer {
    instance_type_offering_set: Option<ItemSet<WireOffering>>,
    next_token: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireOffering {
    instance_type: String,
}

fn token(next: Option<String>) -> Option<String> {
    next.map(|t| t.trim().to_owned()).filter(|t| !t.is_empty())
}

fn parse_types(xml: &str) -> Page<WireType> {
    let answer: TypesAnswer =
        quick_xml::de::from_str(xml).map_err(|e| format!("not a DescribeInstanceTypes answer: {e}"))?;
    Ok((answer.instance_type_set.map(|s| s.items).unwrap_or_default(), token(answer.next_token)))
}

fn parse_offerings(xml: &str) -> Page<String> {
    let answer: OfferingsAnswer =
        quick_xml::de::from_str(xml).map_err(|e| format!("not a DescribeInstanceTypeOfferings answer: {e}"))?;
    let items = answer.instance_type_offering_set.map(|s| s.items).unwrap_or_default();
    Ok((items.into_iter().map(|o| o.instance_type.trim().to_owned()).collect(), token(answer.next_token)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TYPES: &str = r#"<DescribeInstanceTypesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
  <requestId>r</requestId>
  <instanceTypeSet>
    <item><instanceType>p5.4xlarge</instanceType><vCpuInfo><defaultVCpus>16</defaultVCpus></vCpuInfo>
      <memoryInfo><sizeInMiB>262144</sizeInMiB></memoryInfo>
      <gpuInfo><gpus><item><name>H100</name><manufacturer>NVIDIA</manufacturer><count>1</count>
        <memoryInfo><sizeInMiB>81920</sizeInMiB></memoryInfo></item></gpus><totalGpuMemoryInMiB>81920</totalGpuMemoryInMiB></gpuInfo></item>
    <item><instanceType>g4ad.xlarge</instanceType><vCpuInfo><defaultVCpus>4</defaultVCpus></vCpuInfo>
      <memoryInfo><sizeInMiB>16384</sizeInMiB></memoryInfo>
      <gpuInfo><gpus><item><name>Radeon Pro V520</name><manufacturer>AMD</manufacturer><count>1</count>
        <memoryInfo><sizeInMiB>8192</sizeInMiB></memoryInfo></item></gpus></gpuInfo></item>
    <item><instanceType>m7i.2xlarge</instanceType><vCpuInfo><defaultVCpus>8</defaultVCpus></vCpuInfo>
      <memoryInfo><sizeInMiB>32768</sizeInMiB></memoryInfo></item>
    <item><instanceType>c7i.large</instanceType><vCpuInfo><defaultVCpus>2</defaultVCpus></vCpuInfo>
      <memoryInfo><sizeInMiB>4096</sizeInMiB></memoryInfo></item>
  </instanceTypeSet>
  <nextToken>page-2</nextToken>
</DescribeInstanceTypesResponse>"#;

    #[test]
    fn types_map_to_entries_by_their_gpu() {
        let (types, next) = parse_types(TYPES).unwrap();
        assert_eq!((types.len(), next.as_deref()), (4, Some("page-2")));
        let cpu = ["m7i.2xlarge".to_owned()];
        let p5 = entry_of(&types[0], &cpu, "ec2").unwrap().unwrap();
        assert_eq!((p5.gpus, p5.gpu_model.as_deref(), p5.gpu_memory_mib), (1, Some("H100-80GB"), Some(81920)));
        assert_eq!((p5.vcpus, p5.memory_gib, p5.source.as_str()), (16, 256, "ec2"));
        assert_eq!(entry_of(&types[1], &cpu, "ec2").unwrap_err(), "AMD Radeon Pro V520");
        let m7i = entry_of(&types[2], &cpu, "ec2").unwrap().unwrap();
        assert_eq!((m7i.gpus, m7i.gpu_model, m7i.vcpus, m7i.memory_gib), (0, None, 8, 32));
        assert_eq!(entry_of(&types[3], &cpu, "ec2").unwrap(), None);
    }

    #[test]
    fn offerings_parse_with_and_without_a_next_page() {
        let xml = "<DescribeInstanceTypeOfferingsResponse><instanceTypeOfferingSet>\
                   <item><instanceType>p5.4xlarge</instanceType><locationType>region</locationType><location>us-east-1</location></item>\
                   <item><instanceType> g6.xlarge </instanceType></item></instanceTypeOfferingSet>\
                   <nextToken> </nextToken></DescribeInstanceTypeOfferingsResponse>";
        assert_eq!(parse_offerings(xml).unwrap(), (vec!["p5.4xlarge".to_owned(), "g6.xlarge".to_owned()], None));
        let empty =
            "<DescribeInstanceTypeOfferingsResponse><instanceTypeOfferingSet/></DescribeInstanceTypeOfferingsResponse>";
        assert_eq!(parse_offerings(empty).unwrap(), (vec![], None));
        assert!(parse_offerings("<html>").is_err());
    }
}
