//! Placement end to end: a broker with on-prem, AWS and Azure sites and the offline price
//! snapshot places jobs at the cheapest allowed site, stores the decision with every candidate,
//! flips between clouds when only the prices change, refuses a job over its tenant's budget, and
//! keeps the outputs of EU data in the EU.

use std::path::Path;
use std::time::Duration;

use hybroker::proto;
use serde_json::Value;
use tonic::Code;

use crate::common::{Cluster, Setup, enrolling, get, no_boot_capacity, wait_job, watch_to_end};
use crate::data::submit_as;

const TTL: Duration = Duration::from_secs(3);

/// Sites: the test agents' on-prem `lab`, and elastic AWS and Azure sites without agents.
fn sites(snapshot: &Path) -> String {
    format!(
        "[prices]\nsnapshot = \"{}\"\n\
         [[residency]]\nname = \"us\"\naws = [\"us-east-1\"]\nazure = [\"eastus\"]\nonprem = [\"stockholm\"]\n\
         [[site]]\nname = \"lab\"\nkind = \"onprem\"\nregion = \"stockholm\"\nresidency = \"us\"\ngpu_hour_usd = 1.5\n\
         [[site]]\nname = \"aws-us-east-1\"\nkind = \"aws\"\nregion = \"us-east-1\"\nresidency = \"us\"\n\
         instance_types = [\"g6.xlarge\", \"p4de.24xlarge\", \"p5.48xlarge\"]\n{nb}\
         [[site]]\nname = \"azure-eastus\"\nkind = \"azure\"\nregion = \"eastus\"\nresidency = \"us\"\n\
         instance_types = [\"Standard_NC24ads_A100_v4\", \"Standard_ND96isr_H100_v5\"]\n{nb}\
         [[tenant]]\nname = \"acme\"\n[[tenant]]\nname = \"thrifty\"\nmonthly_budget_usd = 1.0\n",
        snapshot.display(),
        nb = no_boot_capacity(),
    )
}

pub fn shipped_snapshot() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("config/prices/snapshot.json")
}

/// The cluster, once its lab agent is connected: placement sees only connected agents' capacity,
/// so a job submitted before would (rightly) go to a cloud site.
pub async fn cluster(snapshot: std::path::PathBuf) -> Cluster {
    cluster_with_ttl(snapshot, TTL).await
}

/// [`cluster`] with another lease TTL (the hold after a restart lasts one lease period).
async fn cluster_with_ttl(snapshot: std::path::PathBuf, ttl: Duration) -> Cluster {
    let cluster = Cluster::start_with(ttl, &[("n1", "1xH100-80GB")], move |dir| Setup {
        broker_extra: Some(sites(&snapshot)),
        broker_env: enrolling(dir, "24h"),
        ..Setup::default()
    })
    .await;
    lab_agent_connected(&cluster).await;
    cluster
}

/// Waits until the lab agent has its stream open.
pub async fn lab_agent_connected(cluster: &Cluster) {
    let admin = cluster.admin().await;
    crate::common::eventually("the lab agent to connect", || {
        let mut admin = admin.clone();
        async move {
            let agents = admin.list_agents(proto::ListAgentsRequest {}).await.ok()?.into_inner().agents;
            agents.iter().any(|a| a.id == "lab/n1" && a.connected).then_some(())
        }
    })
    .await;
}

fn job(gpu: &str) -> String {
    format!("name: {gpu}\ncommand: [\"true\"]\nexpected_runtime: 1h\nresources: {{gpus: 1, gpu_model: [{gpu}]}}\n")
}

pub fn decision(job: &proto::Job) -> Value {
    assert!(!job.placement_json.is_empty(), "no decision stored: {job:?}");
    serde_json::from_str(&job.placement_json).unwrap()
}

pub fn verdict<'a>(d: &'a Value, site: &str) -> &'a Value {
    d["candidates"].as_array().unwrap().iter().find(|c| c["site"] == site).unwrap_or_else(|| panic!("{site} in {d}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn jobs_go_to_the_cheapest_allowed_site_with_every_candidate_explained() {
    let cluster = cluster(shipped_snapshot()).await;
    let mut admin = cluster.admin().await;

    // An H100 job: the lab's owned GPU ($1.50/h) beats an 8-GPU p5 or ND96 instance.
    let h100 = submit_as(&cluster, "acme", &job("H100-80GB")).await.unwrap();
    watch_to_end(&mut admin, &h100).await;
    let done = get(&mut admin, &h100).await;
    assert_eq!((done.state.as_str(), done.site.as_str()), ("succeeded", "lab"));
    let d = decision(&done);
    assert_eq!(d["chosen"]["site"], "lab", "{d}");
    assert!(verdict(&d, "aws-us-east-1")["feasible"]["cost"]["total_usd"].as_f64().unwrap() > 50.0, "{d}");

    // An A100-80GB job: none on-prem; Azure's 1-GPU instance beats AWS's 8-GPU p4de.
    let a100 = submit_as(&cluster, "acme", &job("A100-80GB")).await.unwrap();
    let placed = wait_job(&admin, &a100, "placed", |j| j.state == "placed").await;
    assert_eq!(placed.site, "azure-eastus");
    let d = decision(&placed);
    assert_eq!(d["chosen"]["instance_type"], "Standard_NC24ads_A100_v4", "{d}");
    assert!(verdict(&d, "lab")["rejected"].as_str().unwrap().contains("A100-80GB"), "{d}");
    let aws = verdict(&d, "aws-us-east-1")["feasible"]["cost"]["total_usd"].as_f64().unwrap();
    assert!((aws - 27.44705).abs() < 0.01, "p4de for one hour: {aws}");
    assert!(placed.reason.starts_with("placed at site azure-eastus: est. $3.67"), "{}", placed.reason);
}

#[tokio::test(flavor = "multi_thread")]
async fn changing_only_the_prices_flips_the_cloud() {
    let dir = tempfile::tempdir().unwrap();
    let mut snapshot: Value = serde_json::from_str(&std::fs::read_to_string(shipped_snapshot()).unwrap()).unwrap();
    for p in snapshot["compute"].as_array_mut().unwrap() {
        if p["instance_type"] == "Standard_NC24ads_A100_v4" {
            p["usd_per_hour"] = 40.0.into();
        }
    }
    snapshot["id"] = "pricier-azure".into();
    let path = dir.path().join("snapshot.json");
    std::fs::write(&path, snapshot.to_string()).unwrap();
    let cluster = cluster(path).await;
    let admin = cluster.admin().await;
    let a100 = submit_as(&cluster, "acme", &job("A100-80GB")).await.unwrap();
    let placed = wait_job(&admin, &a100, "placed", |j| j.state == "placed").await;
    assert_eq!(placed.site, "aws-us-east-1");
    let d = decision(&placed);
    let azure = verdict(&d, "azure-eastus")["feasible"]["cost"]["total_usd"].as_f64().unwrap();
    assert!((azure - 40.0).abs() < 0.01, "{d}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_over_its_tenants_budget_is_refused_with_the_numbers() {
    let cluster = cluster(shipped_snapshot()).await;
    let err = submit_as(&cluster, "thrifty", &job("A100-80GB")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("budget: $1 left, estimate $"), "{}", err.message());
    let list = proto::ListJobsRequest { limit: 10, ..Default::default() };
    assert!(cluster.admin().await.list(list).await.unwrap().into_inner().jobs.is_empty());
}

/// Runs the CLI against the gateway as `tenant`.
async fn cli(gateway: &crate::common::Gateway, key: &str, args: &[&str]) -> std::process::Output {
    let mut command = tokio::process::Command::new(crate::common::BIN);
    command.args(args).env("HYBROKER_GATEWAY", &gateway.url).env("HYBROKER_TOKEN", key).kill_on_drop(true);
    tokio::time::timeout(crate::common::DEADLINE, command.output()).await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_agrees_with_the_stored_decision_and_prices_show_per_site() {
    let cluster = cluster(shipped_snapshot()).await;
    let gateway = cluster.start_gateway();
    let key = cluster.tenant_key("acme");
    let spec = cluster.path("a100.yaml");
    std::fs::write(&spec, job("A100-80GB")).unwrap();
    let spec = spec.to_str().unwrap();

    let planned = cli(&gateway, &key, &["plan", spec, "--output", "json"]).await;
    assert!(planned.status.success(), "{}", String::from_utf8_lossy(&planned.stderr));
    let planned: Value = serde_json::from_slice(&planned.stdout).unwrap();
    let table = cli(&gateway, &key, &["plan", spec]).await;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("chosen:    site azure-eastus 1x Standard_NC24ads_A100_v4"), "{table}");
    assert!(table.contains("rejected: no A100-80GB at site"), "{table}");

    let id = submit_as(&cluster, "acme", &job("A100-80GB")).await.unwrap();
    let placed = wait_job(&cluster.admin().await, &id, "placed", |j| j.state == "placed").await;
    let stored = decision(&placed);
    assert_eq!(stored["chosen"], planned["chosen"], "plan and the stored decision differ");
    assert_eq!(stored["candidates"], planned["candidates"]);
    let explained = cli(&gateway, &key, &["jobs", "explain", &id]).await;
    // The same table, but for the prices' age (a little older by now).
    let without_age = |t: &str| t.lines().filter(|l| !l.starts_with("prices:")).collect::<Vec<_>>().join("\n");
    let explained = String::from_utf8_lossy(&explained.stdout);
    assert_eq!(without_age(&explained), without_age(&table), "explain shows what plan showed");

    let prices = cli(&gateway, &key, &["prices", "--site", "azure-eastus"]).await;
    let prices = String::from_utf8_lossy(&prices.stdout);
    assert!(prices.contains("azure-eastus") && prices.contains("Standard_NC24ads_A100_v4"), "{prices}");
    assert!(prices.contains("3.6730") && !prices.contains("aws-us-east-1"), "{prices}");
}

#[tokio::test(flavor = "multi_thread")]
async fn placement_chooses_the_location_of_an_output_given_by_residency() {
    let snapshot = shipped_snapshot();
    let cluster = Cluster::start_with(TTL, &[("n1", "1xH100-80GB")], |dir| {
        let extra = sites(&snapshot).replace(
            "[[tenant]]\nname = \"acme\"\n",
            &format!(
                "[[storage]]\nname = \"vault\"\ncloud = \"local\"\nregion = \"stockholm\"\nresidency = \"us\"\ndir = \"{}\"\n\
                 [[tenant]]\nname = \"acme\"\nstorage = [\"local://vault/acme/\"]\n",
                dir.join("objects").display()
            ),
        );
        Setup { broker_extra: Some(extra), broker_env: enrolling(dir, "24h"), ..Setup::default() }
    })
    .await;
    lab_agent_connected(&cluster).await;
    let mut admin = cluster.admin().await;
    let yaml = "name: keep-in-us\ncommand: [\"sh\", \"-c\", \"mkdir out && echo kept > out/r.txt\"]\n\
                outputs: [{path: out/, residency: us}]\n";
    let id = submit_as(&cluster, "acme", yaml).await.unwrap();
    watch_to_end(&mut admin, &id).await;
    let job = get(&mut admin, &id).await;
    assert_eq!(job.state, "succeeded", "{job:?}");
    assert_eq!(decision(&job)["chosen"]["output_locations"][0], "vault");
    assert_eq!(job.outputs, [format!("local://vault/acme/acme/{id}/attempt-1/")]);
    let written = cluster.path(&format!("objects/vault/acme/acme/{id}/attempt-1/r.txt"));
    assert_eq!(std::fs::read_to_string(written).unwrap(), "kept\n");
    // A residency the tenant cannot write in is refused at submit.
    let err = submit_as(&cluster, "acme", &yaml.replace("residency: us", "residency: eu")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("may write to no storage location in residency group eu"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_broker_restart_jobs_wait_for_known_agents_instead_of_spilling() {
    // The hold lasts one lease period: long enough here for the agent's reconnect backoff on a
    // loaded machine (the job is not placed before the agent is back or the hold ends).
    let mut cluster = cluster_with_ttl(shipped_snapshot(), Duration::from_secs(15)).await;
    let port = cluster.addr.port();
    cluster.kill_broker();
    cluster.start_broker(port);
    // Submitted before the lab agent is back: without the hold, the empty lab would send it to AWS.
    let id = submit_as(&cluster, "acme", &job("H100-80GB")).await.unwrap();
    let mut admin = cluster.admin().await;
    watch_to_end(&mut admin, &id).await;
    let done = get(&mut admin, &id).await;
    assert_eq!((done.state.as_str(), done.site.as_str()), ("succeeded", "lab"), "{done:?}");
}

/// EU and US residency groups, a lab in the EU and AWS in the US; two EU local locations and a US
/// one, all writable by `acme`; an input object in the EU.
fn residency_setup(dir: &Path, snapshot: &Path) -> Setup {
    let objects = dir.join("objects");
    let input = objects.join("eu-a/acme/in/data.txt");
    std::fs::create_dir_all(input.parent().unwrap()).unwrap();
    std::fs::write(&input, b"eu bytes\n").unwrap();
    let local = |name: &str, region: &str, group: &str| {
        format!(
            "[[storage]]\nname = \"{name}\"\ncloud = \"local\"\nregion = \"{region}\"\nresidency = \"{group}\"\ndir = \"{}\"\n",
            objects.display()
        )
    };
    let extra = format!(
        "[prices]\nsnapshot = \"{}\"\n\
         [[residency]]\nname = \"eu\"\nonprem = [\"stockholm\"]\n\
         [[residency]]\nname = \"us\"\naws = [\"us-east-1\"]\nonprem = [\"virginia\"]\n\
         [[site]]\nname = \"lab\"\nkind = \"onprem\"\nregion = \"stockholm\"\nresidency = \"eu\"\ngpu_hour_usd = 1.5\n\
         [[site]]\nname = \"aws-us-east-1\"\nkind = \"aws\"\nregion = \"us-east-1\"\nresidency = \"us\"\n\
         instance_types = [\"g6.xlarge\", \"m7i.2xlarge\"]\n{nb}{}{}{}\
         [[tenant]]\nname = \"acme\"\nstorage = [\"local://eu-a/acme/\", \"local://eu-b/acme/\", \"local://us-a/acme/\"]\n",
        snapshot.display(),
        local("eu-a", "stockholm", "eu"),
        local("eu-b", "stockholm", "eu"),
        local("us-a", "virginia", "us"),
        nb = no_boot_capacity(),
    );
    Setup { broker_extra: Some(extra), broker_env: enrolling(dir, "24h"), ..Setup::default() }
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_of_eu_data_stay_in_the_eu_and_plan_says_why() {
    let snapshot = shipped_snapshot();
    let cluster = Cluster::start_with(TTL, &[("n1", "1xH100-80GB")], |dir| residency_setup(dir, &snapshot)).await;
    lab_agent_connected(&cluster).await;
    let gateway = cluster.start_gateway();
    let key = cluster.tenant_key("acme");
    let to_us = "name: leak\ncommand: [\"sh\", \"-c\", \"mkdir out && cp data.txt out/\"]\n\
                 inputs: [{uri: local://eu-a/acme/in/data.txt, path: data.txt}]\n\
                 outputs: [{path: out/, to: local://us-a/acme/results/}]\n";
    let why = "residency: output out/ goes to us, data in eu";

    // Refused at submit, with the reason; nothing is stored.
    let err = submit_as(&cluster, "acme", to_us).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains(why), "{}", err.message());
    let list = proto::ListJobsRequest { limit: 10, ..Default::default() };
    assert!(cluster.admin().await.list(list).await.unwrap().into_inner().jobs.is_empty());
    // Through the gateway: 400 with the reason.
    let api = crate::gateway::Api::new(&gateway, &key);
    let spec: Value = serde_yaml_ng::from_str(to_us).unwrap();
    let (status, _, body) = crate::gateway::send(api.request(reqwest::Method::POST, "/v1/jobs").json(&spec)).await;
    assert_eq!(status, reqwest::StatusCode::BAD_REQUEST, "{body}");
    assert!(body["detail"].as_str().unwrap().contains(why), "{body}");

    // `hybroker plan` shows why: every candidate, the EU lab included, is rejected for it.
    let file = cluster.path("to-us.yaml");
    std::fs::write(&file, to_us).unwrap();
    let table = cli(&gateway, &key, &["plan", file.to_str().unwrap()]).await;
    assert!(table.status.success(), "{}", String::from_utf8_lossy(&table.stderr));
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("chosen:    none") && table.contains("residency: eu"), "{table}");
    for site in ["lab", "aws-us-east-1"] {
        let row = table.lines().find(|l| l.starts_with(site)).unwrap_or_else(|| panic!("{site}: {table}"));
        assert!(row.contains("us-a") && row.ends_with(&format!("rejected: {why}")), "{row}");
    }

    // An output given by residency: only EU locations are candidates, and it runs there.
    let in_eu = to_us.replace("to: local://us-a/acme/results/", "residency: eu").replace("leak", "kept");
    let file = cluster.path("in-eu.yaml");
    std::fs::write(&file, &in_eu).unwrap();
    let planned = cli(&gateway, &key, &["plan", file.to_str().unwrap(), "--output", "json"]).await;
    assert!(planned.status.success(), "{}", String::from_utf8_lossy(&planned.stderr));
    let planned: Value = serde_json::from_slice(&planned.stdout).unwrap();
    let candidates = planned["candidates"].as_array().unwrap();
    let mut locations: Vec<&str> = candidates.iter().map(|c| c["output_locations"][0].as_str().unwrap()).collect();
    locations.sort();
    locations.dedup();
    assert_eq!(locations, ["eu-a", "eu-b"], "{planned}");
    let id = submit_as(&cluster, "acme", &in_eu).await.unwrap();
    let mut admin = cluster.admin().await;
    watch_to_end(&mut admin, &id).await;
    let job = get(&mut admin, &id).await;
    assert_eq!((job.state.as_str(), job.site.as_str()), ("succeeded", "lab"), "{job:?}");
    let d = decision(&job);
    let chosen = d["chosen"]["output_locations"][0].as_str().unwrap();
    let written = cluster.path(&format!("objects/{chosen}/acme/acme/{id}/attempt-1/data.txt"));
    assert_eq!(std::fs::read_to_string(written).unwrap(), "eu bytes\n");
}
