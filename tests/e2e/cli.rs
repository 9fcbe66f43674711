//! The tenants' CLI end to end: the real `hybroker` binary as a client of a real gateway, broker and
//! agent, configured the way a user does it (HYBROKER_GATEWAY / HYBROKER_TOKEN).

use std::process::Output;
use std::time::Duration;

use hybroker::gateway::api::{Agent, Job, JobEvent, JobList, Submitted};

use crate::common::*;

/// A cluster with one agent, a gateway, and an API key of tenant `acme`.
struct Cli {
    /// Dropped (killed) before the cluster.
    gateway: Gateway,
    cluster: Cluster,
    key: String,
}

impl Cli {
    async fn start() -> Cli {
        let cluster = Cluster::start(Duration::from_secs(5), &[("node-a", "2xH100-80GB")]).await;
        let gateway = cluster.start_gateway();
        let key = cluster.tenant_key("acme");
        Cli { gateway, cluster, key }
    }

    /// Runs `hybroker ARGS` with the gateway and `key` in the environment, as a user would.
    async fn run_as(&self, key: &str, args: &[&str]) -> Output {
        crate::common::tenant_cli(&self.gateway, key, args).await
    }

    async fn run(&self, args: &[&str]) -> Output {
        self.run_as(&self.key, args).await
    }

    fn spec(&self, name: &str, text: &str) -> String {
        let path = self.cluster.path(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn show(out: &Output) -> String {
    format!("status {:?}\nstdout:\n{}\nstderr:\n{}", out.status.code(), stdout(out), stderr(out))
}

/// The command's stdout as JSON of type `T`.
fn parse<T: serde::de::DeserializeOwned>(out: &Output) -> T {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not the expected JSON ({e}): {}", show(out)))
}

/// The id from `submitted ID`, the first line a table-output submit prints.
fn submitted_id(out: &Output) -> String {
    let text = stdout(out);
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("submitted ").unwrap_or_else(|| panic!("no `submitted ID` line: {}", show(out))).to_string()
}

const ECHO_JOB: &str = "name: cli-echo\ncommand: [sh, -c, 'echo hello from the cli test']\nmax_runtime: 1m\n";
const EXIT3_JOB: &str = "name: cli-exit3\ncommand: [sh, -c, 'echo about to fail; exit 3']\nmax_attempts: 1\n\
                         max_runtime: 1m\nlabels: {suite: cli}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_follow_exits_with_the_jobs_result_and_logs_show_its_output() {
    let cli = Cli::start().await;

    let ok = cli.run(&["submit", &cli.spec("echo.yaml", ECHO_JOB), "--follow"]).await;
    assert_eq!(ok.status.code(), Some(0), "{}", show(&ok));
    let ok_id = submitted_id(&ok);
    let last = stdout(&ok).lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with(&format!("cli-echo {ok_id} succeeded on lab/node-a")), "{}", show(&ok));
    // Not a terminal: one plain line per event on stderr, in order, ending with the result.
    let states: Vec<String> =
        stderr(&ok).lines().filter_map(|l| l.split_whitespace().nth(1).map(str::to_string)).collect();
    assert_eq!(states.first().map(String::as_str), Some("queued"), "{}", show(&ok));
    assert_eq!(states.last().map(String::as_str), Some("succeeded"), "{}", show(&ok));
    assert!(states.iter().any(|s| s == "running"), "{}", show(&ok));
    assert!(!stderr(&ok).contains('\r'), "no spinner when stderr is not a terminal");

    let failed = cli.run(&["submit", &cli.spec("exit3.yaml", EXIT3_JOB), "--follow"]).await;
    assert_eq!(failed.status.code(), Some(3), "the job's own exit code: {}", show(&failed));
    let failed_id = submitted_id(&failed);
    assert!(stdout(&failed).contains(&format!("{failed_id} failed")), "{}", show(&failed));

    let logs = cli.run(&["jobs", "logs", &ok_id]).await;
    assert!(logs.status.success(), "{}", show(&logs));
    assert!(stdout(&logs).contains("hello from the cli test"), "{}", show(&logs));
    // Following an ended job prints its output and exits with its result.
    let logs = cli.run(&["jobs", "logs", &failed_id, "--follow"]).await;
    assert_eq!(logs.status.code(), Some(3), "{}", show(&logs));
    assert!(stdout(&logs).contains("about to fail"), "{}", show(&logs));

    let list = cli.run(&["jobs", "list", "--output", "json"]).await;
    assert!(list.status.success(), "{}", show(&list));
    let list: JobList = parse(&list);
    let ids: Vec<&str> = list.jobs.iter().map(|j| j.id.as_str()).collect();
    assert!(ids.contains(&ok_id.as_str()) && ids.contains(&failed_id.as_str()), "{ids:?}");

    let filtered = cli.run(&["jobs", "list", "--state", "failed", "--label", "suite=cli", "--output", "json"]).await;
    let filtered: JobList = parse(&filtered);
    assert_eq!(filtered.jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(), vec![failed_id.as_str()]);

    // Every page with --all, one job per page.
    let all = cli.run(&["jobs", "list", "--all", "--limit", "1", "--output", "json"]).await;
    let all: JobList = parse(&all);
    assert_eq!(all.jobs.len(), list.jobs.len());
    assert_eq!(all.next_cursor, None);

    let table = cli.run(&["jobs", "list"]).await;
    let table = stdout(&table);
    let header = table.lines().next().unwrap_or_default();
    assert_eq!(header.split_whitespace().collect::<Vec<_>>(), ["ID", "NAME", "STATE", "SITE", "AGENT", "EXIT", "AGE"]);
    let row = table.lines().find(|l| l.starts_with(&failed_id)).unwrap_or_else(|| panic!("{table}"));
    assert_eq!(row.split_whitespace().nth(5), Some("3"), "{row}");

    let get = cli.run(&["jobs", "get", &ok_id, "--output", "json"]).await;
    let job: Job = parse(&get);
    assert_eq!((job.state.as_str(), job.exit_code), ("succeeded", Some(0)));

    let events = cli.run(&["jobs", "events", &ok_id, "--output", "json"]).await;
    assert!(events.status.success(), "{}", show(&events));
    let events: Vec<JobEvent> = stdout(&events).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq), "{events:?}");
    assert_eq!(events.last().map(|e| e.state.as_str()), Some("succeeded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_agents_work_for_the_right_tenants() {
    let cli = Cli::start().await;
    let sleeper = cli.spec("sleep.yaml", "name: cli-sleep\ncommand: [sleep, 300]\nmax_runtime: 10m\n");
    let out = cli.run(&["submit", &sleeper, "--output", "json"]).await;
    let id = parse::<Submitted>(&out).id;
    let cancelled = cli.run(&["jobs", "cancel", &id, "--reason", "not needed"]).await;
    assert!(cancelled.status.success(), "{}", show(&cancelled));
    assert!(stdout(&cancelled).contains("state:     cancelled"), "{}", show(&cancelled));
    let events = cli.run(&["jobs", "events", &id]).await;
    assert!(stdout(&events).lines().last().unwrap_or_default().contains("cancelled"), "{}", show(&events));

    let denied = cli.run(&["agents", "list"]).await;
    assert_eq!(denied.status.code(), Some(2), "acme is not an admin tenant: {}", show(&denied));
    let admin = cli.cluster.tenant_key("ops");
    let row = eventually("lab/node-a listed as connected", || async {
        let agents = cli.run_as(&admin, &["agents", "list"]).await;
        assert!(agents.status.success(), "{}", show(&agents));
        let text = stdout(&agents);
        text.lines()
            .find(|l| l.starts_with("lab/node-a ") && l.split_whitespace().nth(1) == Some("yes"))
            .map(String::from)
    })
    .await;
    // ID, CONNECTED, DRAINING, GPUS (RUNNING depends on how far the cancelled job's kill got).
    assert_eq!(row.split_whitespace().take(5).collect::<Vec<_>>(), ["lab/node-a", "yes", "no", "2xH100-80GB", "[sim]"]);
    let drained = cli.run_as(&admin, &["agents", "drain", "lab/node-a", "--output", "json"]).await;
    assert!(parse::<Agent>(&drained).draining, "{}", show(&drained));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mistakes_get_clear_errors() {
    let cli = Cli::start().await;

    let bad = cli.spec("bad.yaml", "name: broken\ncommand: [sh, -c\nresources: {cpus: 1}\n");
    let out = cli.run(&["submit", &bad]).await;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(stderr(&out).starts_with(&format!("error: {bad}: invalid YAML at line 3")), "{}", show(&out));

    let unknown = cli.spec("unknown.yaml", "name: x\ncommand: [true]\ngpus: 2\n");
    let out = cli.run(&["submit", &unknown]).await;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    // Refused before sending, at its line in the file.
    let want = format!("error: {unknown}: invalid job spec at line 3 column 1: unknown field `gpus`");
    assert!(stderr(&out).starts_with(&want), "{}", show(&out));

    let out = cli.run(&["submit", "/nonexistent/job.yaml"]).await;
    assert!(out.status.code() == Some(2) && stderr(&out).contains("/nonexistent/job.yaml"), "{}", show(&out));

    let out = cli.run_as("hbk_not-a-real-key", &["jobs", "list"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    let err = stderr(&out);
    assert!(err.starts_with("error: ") && err.contains("(401)"), "{err}");
    assert!(err.contains("hint: ") && err.contains("HYBROKER_TOKEN"), "{err}");

    let out = cli.run_as("", &["jobs", "list"]).await;
    assert!(out.status.code() == Some(2) && stderr(&out).contains("no API key"), "{}", show(&out));

    let out = cli.run(&["jobs", "get", "no-such-job"]).await;
    assert!(out.status.code() == Some(2) && stderr(&out).contains("(404)"), "{}", show(&out));

    let out = cli.run(&["jobs", "list", "--state", "sleeping"]).await;
    assert_eq!(out.status.code(), Some(2), "a usage error: {}", show(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_gateway_is_trusted_with_ca_cert_and_only_then() {
    let cli = Cli::start().await;
    let https = cli.cluster.start_gateway_named("gw-https", true);
    let ca = cli.cluster.path("pki/ca.pem");
    let list = |ca: Option<&std::path::Path>| {
        let mut command = tokio::process::Command::new(BIN);
        command.args(["jobs", "list", "--gateway", &https.url, "--token", &cli.key]).env_remove("HYBROKER_CA_CERT");
        if let Some(ca) = ca {
            command.env("HYBROKER_CA_CERT", ca);
        }
        async move { tokio::time::timeout(DEADLINE, command.output()).await.unwrap().unwrap() }
    };
    let trusted = list(Some(&ca)).await;
    assert!(trusted.status.success(), "{}", show(&trusted));
    assert!(stdout(&trusted).starts_with("ID "), "{}", show(&trusted));
    let untrusted = list(None).await;
    assert_eq!(untrusted.status.code(), Some(2), "{}", show(&untrusted));
    assert!(stderr(&untrusted).contains("--ca-cert"), "{}", show(&untrusted));
}
