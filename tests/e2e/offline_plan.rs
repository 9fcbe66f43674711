//! `hybroker plan JOB --config broker.toml` offline, as a user runs it: input sizes read from the
//! stores (moto for S3, Azurite for Azure Blob) with the broker's credentials, `size_hint` where a
//! store cannot tell, the sizes it assumed, what-if site state, and the broker's config checks.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use crate::common::{BIN, DEADLINE, no_boot_capacity};
use crate::emulators::{self, Azurite, Moto, unique_name};

/// A broker config (never started) with an on-prem lab in the `us` group, elastic AWS us-east-1
/// and Azure eastus sites, an S3 location in us-east-1 on moto and an Azure one on Azurite.
fn config(dir: &Path, moto: &Moto, bucket: &str, azurite: &Azurite, container: &str) -> PathBuf {
    let key_file = dir.join("azure.key");
    std::fs::write(&key_file, Azurite::KEY).unwrap();
    let text = format!(
        "[broker]\nlisten = \"127.0.0.1:0\"\nenroll_listen = \"127.0.0.1:0\"\nca_dir = \"{d}/pki\"\n\
         [tls]\nca_cert = \"{d}/pki/ca.pem\"\ncert = \"{d}/pki/broker.pem\"\nkey = \"{d}/pki/broker-key.pem\"\n\
         [store]\npath = \"{d}/broker.db\"\n\
         [prices]\nsnapshot = \"{snapshot}\"\n\
         [[residency]]\nname = \"us\"\naws = [\"us-east-1\"]\nazure = [\"eastus\"]\nonprem = [\"stockholm\"]\n\
         [[site]]\nname = \"lab\"\nkind = \"onprem\"\nregion = \"stockholm\"\nresidency = \"us\"\ngpu_hour_usd = 1.5\n\
         [[site]]\nname = \"aws-us-east-1\"\nkind = \"aws\"\nregion = \"us-east-1\"\nresidency = \"us\"\n\
         instance_types = [\"g6.xlarge\", \"p5.48xlarge\"]\n{nb}\
         [[site]]\nname = \"azure-eastus\"\nkind = \"azure\"\nregion = \"eastus\"\nresidency = \"us\"\n\
         instance_types = [\"Standard_ND96isr_H100_v5\"]\n{nb}\
         [[storage]]\nname = \"s3data\"\ncloud = \"aws\"\nregion = \"us-east-1\"\nbucket = \"{bucket}\"\nendpoint = \"{s3}\"\nresidency = \"us\"\n\
         [[storage]]\nname = \"azdata\"\ncloud = \"azure\"\nregion = \"eastus\"\naccount = \"{account}\"\ncontainer = \"{container}\"\n\
         endpoint = \"{az}\"\naccount_key_file = \"{key}\"\nresidency = \"us\"\n\
         [[tenant]]\nname = \"acme\"\nstorage = [\"s3://{bucket}/acme/\", \"az://{account}/{container}/acme/\"]\n",
        d = dir.display(),
        snapshot = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prices/snapshot.json").display(),
        nb = no_boot_capacity(),
        account = Azurite::ACCOUNT,
        s3 = moto.endpoint(),
        az = azurite.endpoint(),
        key = key_file.display(),
    );
    let path = dir.join("broker.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// The credentials the broker's default chain would find (here: the environment).
const AWS_ENV: [(&str, &str); 5] = [
    ("AWS_ACCESS_KEY_ID", Moto::ACCESS_KEY),
    ("AWS_SECRET_ACCESS_KEY", Moto::SECRET_KEY),
    ("AWS_EC2_METADATA_DISABLED", "true"),
    ("AWS_CONFIG_FILE", "/nonexistent"),
    ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent"),
];

/// Runs the CLI with no gateway and (unless `aws`) no AWS credentials at all.
async fn hybroker(args: &[&str], aws: bool) -> Output {
    let mut command = tokio::process::Command::new(BIN);
    command.args(args).kill_on_drop(true);
    for (k, v) in AWS_ENV {
        match (aws, k) {
            (true, _) => command.env(k, v),
            (false, "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY") => command.env_remove(k),
            (false, _) => command.env(k, v),
        };
    }
    command.env_remove("AWS_PROFILE").env_remove("HYBROKER_GATEWAY").env_remove("HYBROKER_TOKEN");
    tokio::time::timeout(DEADLINE, command.output()).await.expect("hybroker ran past the deadline").unwrap()
}

/// `hybroker plan JOB --config CONFIG --tenant acme ARGS --output json`, which must succeed.
async fn plan_json(job: &Path, config: &Path, extra: &[&str], aws: bool) -> Value {
    let mut args = vec!["plan", job.to_str().unwrap(), "--config", config.to_str().unwrap(), "--tenant", "acme"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--output", "json"]);
    let out = hybroker(&args, aws).await;
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn size<'a>(plan: &'a Value, field: &str) -> &'a Value {
    let sizes = plan["sizes"].as_array().unwrap();
    sizes.iter().find(|s| s["field"] == field).unwrap_or_else(|| panic!("{field} in {}", plan["sizes"]))
}

async fn emulated() -> (&'static Moto, String, &'static Azurite, String) {
    let (moto, azurite) = (emulators::moto().await, emulators::azurite().await);
    let (bucket, container) = (unique_name("plan"), unique_name("plan"));
    moto.create_bucket(&bucket).await;
    azurite.create_container(&container).await;
    (moto, bucket, azurite, container)
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_plan_reads_input_sizes_from_moto_and_azurite_and_says_what_it_assumed() {
    let (moto, bucket, azurite, container) = emulated().await;
    for (key, len) in [("acme/ds/a.bin", 1000), ("acme/ds/sub/b.bin", 2500)] {
        let put = moto.client().put_object().bucket(&bucket).key(key).body(vec![7u8; len].into()).send().await;
        put.unwrap_or_else(|e| panic!("seeding {key}: {e:?}"));
    }
    let blob = azurite.client().container_client(&container).blob_client("acme/w.bin");
    blob.put_block_blob(vec![1u8; 4096]).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), moto, &bucket, azurite, &container);
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        format!(
            "name: sizes\ncommand: [\"true\"]\nexpected_runtime: 1h\nresources: {{gpus: 1}}\ninputs:\n\
             - {{uri: s3://{bucket}/acme/ds/, path: ds/}}\n\
             - {{uri: az://{account}/{container}/acme/w.bin, path: w.bin}}\n\
             - {{uri: s3://{bucket}/acme/later.bin, path: later.bin, size_hint: 3GiB}}\n\
             - {{uri: s3://{bucket}/acme/unknown.bin, path: unknown.bin}}\n\
             outputs:\n- {{path: out/, to: s3://{bucket}/acme/out/, size_hint: 1GiB}}\n- {{path: logs/, residency: us}}\n",
            account = Azurite::ACCOUNT
        ),
    )
    .unwrap();

    let plan = plan_json(&job, &config, &[], true).await;
    let listed = |field: &str| (size(&plan, field)["bytes"].as_u64().unwrap(), size(&plan, field)["source"].clone());
    assert_eq!(listed("inputs[0]"), (3500, "store".into()), "listed under the prefix in moto");
    assert_eq!(listed("inputs[1]"), (4096, "store".into()), "HEADed in Azurite");
    assert_eq!(listed("inputs[2]"), (3 << 30, "size_hint".into()), "does not exist yet: its hint");
    assert_eq!(listed("inputs[3]"), (0, "assumed".into()), "neither: 0, said");
    assert_eq!(listed("outputs[0]"), (1 << 30, "size_hint".into()));
    assert_eq!(listed("outputs[1]").1, "estimate");
    let assumed: Vec<&str> = plan["assumed"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    let said = |start: &str| assumed.iter().any(|a| a.starts_with(start));
    assert!(said("inputs[2] ") && said("inputs[3] ") && said("outputs[1] ") && !said("inputs[0]"), "{assumed:?}");
    assert!(said("lab has room now"), "{assumed:?}");
    assert!(assumed.iter().any(|a| a.contains("unknown.bin does not exist")), "{assumed:?}");
    // Every output form is kept: `to` and `residency`.
    let chosen = &plan["chosen"];
    assert_eq!(chosen["output_locations"].as_array().unwrap().len(), 2, "{plan}");

    // Without AWS credentials the S3 sizes are unknown (said, with the reason); Azure's still read.
    let blind = plan_json(&job, &config, &[], false).await;
    assert_eq!(size(&blind, "inputs[0]")["source"], "assumed", "{}", blind["sizes"]);
    assert!(!size(&blind, "inputs[0]")["why"].as_str().unwrap().is_empty());
    assert_eq!(size(&blind, "inputs[1]")["bytes"], 4096);
    assert_eq!(size(&blind, "inputs[2]")["source"], "size_hint");

    // The table says the same.
    let args = ["plan", job.to_str().unwrap(), "--config", config.to_str().unwrap(), "--tenant", "acme"];
    let table = hybroker(&args, true).await;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains(&format!("sizes:     inputs[0] s3://{bucket}/acme/ds/: 3.4KiB (store)")), "{table}");
    assert!(table.contains("assumed:   inputs[2] "), "{table}");
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_plan_moves_compute_to_2tb_of_data_in_s3_us_east_1() {
    let (moto, bucket, azurite, container) = emulated().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), moto, &bucket, azurite, &container);
    let spec = |input: &str| {
        format!(
            "name: big\ncommand: [\"true\"]\nexpected_runtime: 1h\nresources: {{gpus: 1, gpu_model: [H100-80GB]}}\n{input}"
        )
    };
    let small = dir.path().join("small.yaml");
    std::fs::write(&small, spec("")).unwrap();
    let big = dir.path().join("big.yaml");
    let input = format!("inputs: [{{uri: s3://{bucket}/acme/corpus/, path: corpus/, size_hint: 2TB}}]\n");
    std::fs::write(&big, spec(&input)).unwrap();

    // Without data the owned lab's compute is cheapest ($1.50/h against the cloud's H100s)...
    let plan = plan_json(&small, &config, &[], true).await;
    assert_eq!(plan["chosen"]["site"], "lab", "{plan}");
    // ...with 2 TB in S3 us-east-1 (not listed yet: its size_hint), moving it out costs more than
    // the AWS instance next to it: the plan goes to the data.
    let plan = plan_json(&big, &config, &[], true).await;
    assert_eq!(size(&plan, "inputs[0]")["bytes"], 2_000_000_000_000u64);
    assert_eq!(plan["chosen"]["site"], "aws-us-east-1", "{plan}");
    let cost = &plan["chosen"]["cost"];
    assert_eq!(cost["egress_usd"], 0.0, "{cost}");
    let candidates = plan["candidates"].as_array().unwrap();
    let lab = candidates.iter().find(|c| c["site"] == "lab").unwrap();
    let lab_egress = lab["feasible"]["cost"]["egress_usd"].as_f64().unwrap();
    assert!(lab_egress > 100.0, "2 TB out of us-east-1 to the lab: {lab}");
    println!("lab {} vs aws {}", lab["feasible"]["cost"], cost);
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_plan_takes_site_state_and_refuses_a_bad_one() {
    let (moto, bucket, azurite, container) = emulated().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), moto, &bucket, azurite, &container);
    let job = dir.path().join("job.yaml");
    std::fs::write(
        &job,
        "name: w\ncommand: [\"true\"]\nexpected_runtime: 1h\nresources: {gpus: 2, gpu_model: [H100-80GB]}\n",
    )
    .unwrap();
    let state = dir.path().join("state.toml");
    let lab =
        |plan: &Value| plan["candidates"].as_array().unwrap().iter().find(|c| c["site"] == "lab").unwrap().clone();

    // One H100 free and a 5-minute queue: the 2-GPU job waits 5 minutes at the lab.
    std::fs::write(&state, "[site.lab]\nfree_gpus = { \"H100-80GB\" = 1 }\nwait = \"5m\"\n").unwrap();
    let plan = plan_json(&job, &config, &["--site-state", state.to_str().unwrap()], false).await;
    assert_eq!(lab(&plan)["feasible"]["wait_s"], 300, "{}", lab(&plan));
    let assumed: Vec<&str> = plan["assumed"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(!assumed.iter().any(|a| a.starts_with("lab ")), "the lab's state was given: {assumed:?}");
    assert!(assumed.iter().any(|a| a.starts_with("aws-us-east-1 can launch")), "{assumed:?}");
    // Two free: it starts now.
    std::fs::write(&state, "[site.lab]\nfree_gpus = { \"H100-80GB\" = 2 }\n").unwrap();
    let plan = plan_json(&job, &config, &["--site-state", state.to_str().unwrap()], false).await;
    assert_eq!(lab(&plan)["feasible"]["wait_s"], 0, "{}", lab(&plan));
    // Full and no wait known: busy.
    std::fs::write(&state, "[site.lab]\nfree_gpus = {}\n").unwrap();
    let plan = plan_json(&job, &config, &["--site-state", state.to_str().unwrap()], false).await;
    assert_eq!(lab(&plan)["kind"], "capacity", "{}", lab(&plan));

    // A state naming a site the config does not have, or an elastic site, is refused.
    std::fs::write(&state, "[site.nowhere]\nwait = \"1h\"\n[site.aws-us-east-1]\nwait = \"1h\"\n").unwrap();
    let args =
        ["plan", job.to_str().unwrap(), "--config", config.to_str().unwrap(), "--site-state", state.to_str().unwrap()];
    let out = hybroker(&args, false).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("site.nowhere: no such site in the config"), "{stderr}");
    assert!(stderr.contains("site.aws-us-east-1: launches instances on demand"), "{stderr}");
}

/// The `  - problem` lines of a config refusal (the CLI prints its error on one line, with line
/// breaks escaped).
fn problems(stderr: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(stderr).replace("\\u{a}", "\n");
    text.lines().filter_map(|l| l.strip_prefix("  - ")).map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_plan_refuses_an_invalid_config_like_the_broker() {
    let (moto, bucket, azurite, container) = emulated().await;
    let dir = tempfile::tempdir().unwrap();
    let good = config(dir.path(), moto, &bucket, azurite, &container);
    // The broker's host files exist, so the broker and the plan see the same problems.
    std::fs::create_dir_all(dir.path().join("pki")).unwrap();
    for f in ["ca.pem", "broker.pem", "broker-key.pem"] {
        std::fs::write(dir.path().join("pki").join(f), "").unwrap();
    }
    let text = std::fs::read_to_string(&good).unwrap();
    // An instance type the catalog does not know, and a site in no residency group.
    let bad = text.replace("\"g6.xlarge\", \"p5.48xlarge\"", "\"p9.huge\"").replace(
        "[[site]]\nname = \"lab\"\nkind = \"onprem\"\nregion = \"stockholm\"",
        "[[site]]\nname = \"lab\"\nkind = \"onprem\"\nregion = \"oslo\"",
    );
    assert_ne!(bad, text);
    let bad_path = dir.path().join("bad.toml");
    std::fs::write(&bad_path, bad).unwrap();
    let job = dir.path().join("job.yaml");
    std::fs::write(&job, "name: x\ncommand: [\"true\"]\n").unwrap();

    let broker = hybroker(&["broker", "--config", bad_path.to_str().unwrap()], false).await;
    assert!(!broker.status.success(), "the broker started on a bad config");
    let planned = hybroker(&["plan", job.to_str().unwrap(), "--config", bad_path.to_str().unwrap()], false).await;
    assert_eq!(planned.status.code(), Some(2), "{}", String::from_utf8_lossy(&planned.stderr));
    let (from_broker, from_plan) = (problems(&broker.stderr), problems(&planned.stderr));
    assert!(from_broker.len() >= 2, "{}", String::from_utf8_lossy(&broker.stderr));
    assert_eq!(from_plan, from_broker, "the plan refuses with the broker's messages");
    assert!(from_plan.iter().any(|p| p.contains("p9.huge")), "{from_plan:?}");
}
