//! The instance catalog end to end: `hybroker catalog refresh` against moto's EC2
//! (`DescribeInstanceTypes`, `DescribeInstanceTypeOfferings` per region) and the ARM fixture's
//! resource SKUs (pages by `nextLink`) writes a catalog the broker loads; a broker started with
//! `[placement] catalog = FILE` places on a type only that file has; `catalog show` prints it.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use hybroker::model::catalog::Catalog;
use hybroker::model::price::Cloud;
use serde_json::{Value, json};

use crate::arm_fixture::{ArmFixture, CLIENT_ID, SECRET, SUBSCRIPTION, TENANT};
use crate::common::{BIN, Cluster, Setup, enrolling, no_boot_capacity, wait_job};
use crate::data::submit_as;
use crate::emulators::{Moto, moto};

fn sku(name: &str, family: &str, locations: &[&str], vcpus: u32, memory_gb: u32, gpus: u32) -> Value {
    let mut capabilities = vec![
        json!({ "name": "vCPUs", "value": vcpus.to_string() }),
        json!({ "name": "MemoryGB", "value": memory_gb.to_string() }),
    ];
    if gpus > 0 {
        capabilities.push(json!({ "name": "GPUs", "value": gpus.to_string() }));
    }
    json!({ "resourceType": "virtualMachines", "name": name, "tier": "Standard", "family": family,
            "locations": locations, "capabilities": capabilities, "restrictions": [] })
}

#[tokio::test(flavor = "multi_thread")]
async fn refresh_from_moto_and_the_arm_fixture_writes_a_catalog_that_loads() {
    let moto = moto().await;
    let arm = ArmFixture::start().await;
    let mut restricted = sku("Standard_ND96isr_H100_v5", "standardNDSH100v5Family", &["westeurope"], 96, 1900, 8);
    restricted["restrictions"] =
        json!([{ "type": "Location", "values": ["westeurope"], "reasonCode": "NotAvailableForSubscription" }]);
    arm.set_skus(vec![
        sku("Standard_NC40ads_H100_v5", "StandardNCadsH100v5Family", &["eastus"], 40, 320, 1),
        sku("Standard_NC40ads_H100_v5", "StandardNCadsH100v5Family", &["swedencentral"], 40, 320, 1),
        sku("Standard_ND96isr_H100_v5", "standardNDSH100v5Family", &["eastus"], 96, 1900, 8),
        restricted,
        sku("Standard_D4s_v5", "standardDSv5Family", &["eastus"], 4, 16, 0),
        sku("Standard_E2s_v5", "standardESv5Family", &["eastus"], 2, 16, 0),
        sku("Standard_ND128isr_NDR_GB200_v6", "standardNDGB200v6Family", &["eastus"], 128, 864, 4),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("catalog.json");
    let run = Command::new(BIN)
        .args(["catalog", "refresh", "--out"])
        .arg(&out)
        .args(["--aws-region", "us-east-1", "--aws-region", "eu-west-1", "--aws-endpoint", &moto.endpoint()])
        .args(["--azure-subscription", SUBSCRIPTION, "--azure-endpoint", &arm.endpoint])
        .args(["--azure-authority", &arm.endpoint, "--azure-ca-file"])
        .arg(&arm.ca_file)
        .env("AWS_ACCESS_KEY_ID", Moto::ACCESS_KEY)
        .env("AWS_SECRET_ACCESS_KEY", Moto::SECRET_KEY)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env("AZURE_TENANT_ID", TENANT)
        .env("AZURE_CLIENT_ID", CLIENT_ID)
        .env("AZURE_CLIENT_SECRET", SECRET)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    assert!(stdout.contains("wrote ") && stdout.contains("Standard_ND128isr_NDR_GB200_v6"), "{stdout}");

    let catalog = Catalog::parse(&std::fs::read_to_string(&out).unwrap()).unwrap();
    // AWS: shapes from DescribeInstanceTypes, regions from each region's offerings.
    let p5 = catalog.get("p5.4xlarge").expect("the single-GPU H100");
    assert_eq!((p5.cloud, p5.gpus, p5.gpu_model, p5.vcpus, p5.memory_gib), (Cloud::Aws, 1, Some("H100-80GB"), 16, 256));
    assert_eq!(catalog.regions("p5.4xlarge"), ["us-east-1"]);
    assert_eq!(catalog.regions("p4d.24xlarge"), ["eu-west-1", "us-east-1"]);
    assert_eq!(catalog.get("p6-b200.48xlarge").unwrap().gpu_model, Some("B200-180GB"));
    assert_eq!(catalog.get("g6e.xlarge").unwrap().gpu_model, Some("L40S-48GB"));
    assert!(catalog.get("m7i.2xlarge").is_some(), "the base catalog's CPU types are kept");
    assert!(catalog.get("m7i.large").is_none(), "other CPU types are not");
    // Azure: every page read, locations merged, a restricted location left out.
    assert_eq!(catalog.regions("Standard_NC40ads_H100_v5"), ["eastus", "swedencentral"]);
    assert_eq!(catalog.get("Standard_NC40ads_H100_v5").unwrap().gpu_model, Some("H100-94GB"));
    assert_eq!(catalog.regions("Standard_ND96isr_H100_v5"), ["eastus"]);
    assert_eq!(catalog.regions("Standard_D4s_v5"), ["eastus"]);
    assert!(catalog.get("Standard_E2s_v5").is_none() && catalog.get("Standard_ND128isr_NDR_GB200_v6").is_none());
    let pages = arm.requests().iter().filter(|r| r.path.ends_with("/Microsoft.Compute/skus")).count();
    assert_eq!(pages, 4, "seven SKUs in pages of two");
    let sources = &catalog.file().sources;
    assert!(sources["ec2-api"].contains("us-east-1, eu-west-1") && sources.contains_key("azure-skus"), "{sources:?}");

    // The file is one a broker config takes.
    let show =
        Command::new(BIN).args(["catalog", "show", "--region", "eu-west-1", "--catalog"]).arg(&out).output().unwrap();
    let shown = String::from_utf8_lossy(&show.stdout);
    assert!(show.status.success() && shown.contains("p4d.24xlarge") && !shown.contains("p5.4xlarge"), "{shown}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broker_with_a_catalog_file_places_on_a_type_only_that_file_has() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = dir.path().join("catalog.json");
    std::fs::write(
        &catalog,
        json!({ "as_of": "2026-12-01", "instance_types": [
            { "cloud": "aws", "name": "p9.test", "gpus": 1, "gpu_model": "B200-180GB", "vcpus": 16,
              "memory_gib": 256, "regions": ["us-east-1"] }
        ]})
        .to_string(),
    )
    .unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prices/snapshot.json");
    let mut snapshot: Value = serde_json::from_str(&std::fs::read_to_string(shipped).unwrap()).unwrap();
    let mut price = snapshot["compute"][0].clone();
    price["instance_type"] = "p9.test".into();
    price["usd_per_hour"] = 7.5.into();
    snapshot["compute"].as_array_mut().unwrap().push(price);
    snapshot["id"] = "with-p9".into();
    let prices = dir.path().join("snapshot.json");
    std::fs::write(&prices, snapshot.to_string()).unwrap();
    let extra = format!(
        "[prices]\nsnapshot = \"{}\"\n[placement]\ncatalog = \"{}\"\n\
         [[residency]]\nname = \"us\"\naws = [\"us-east-1\"]\nonprem = [\"stockholm\"]\n\
         [[site]]\nname = \"lab\"\nkind = \"onprem\"\nregion = \"stockholm\"\nresidency = \"us\"\ngpu_hour_usd = 1.5\n\
         [[site]]\nname = \"aws-us-east-1\"\nkind = \"aws\"\nregion = \"us-east-1\"\nresidency = \"us\"\n\
         instance_types = [\"p9.test\"]\n{}",
        prices.display(),
        catalog.display(),
        no_boot_capacity()
    );
    let cluster = Cluster::start_with(Duration::from_secs(3), &[("n1", "1xH100-80GB")], move |d| Setup {
        broker_extra: Some(extra),
        broker_env: enrolling(d, "24h"),
        ..Setup::default()
    })
    .await;
    let admin = cluster.admin().await;
    let yaml = "name: b200\ncommand: [\"true\"]\nexpected_runtime: 1h\nresources: {gpus: 1, gpu_model: [B200-180GB]}\n";
    let id = submit_as(&cluster, "default", yaml).await.unwrap();
    let placed = wait_job(&admin, &id, "placed", |j| j.state == "placed").await;
    let decision: Value = serde_json::from_str(&placed.placement_json).unwrap();
    assert_eq!(placed.site, "aws-us-east-1", "{decision}");
    assert_eq!(decision["chosen"]["instance_type"], "p9.test", "{decision}");
    assert!(cluster.broker_log().contains("instance catalog"), "the broker logs the catalog it uses");
}
