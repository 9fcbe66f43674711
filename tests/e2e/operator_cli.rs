//! The operators' CLI end to end: `hybroker tenants …` and `hybroker admin …`, the real binary
//! against a real broker and agent, configured the way an operator does it — connection flags
//! before or after the subcommand, or `HYBROKER_BROKER`/`HYBROKER_ADMIN_*` in the environment — with
//! `--output json` parsed, and every failure an `error:` line, a `hint:` and exit status 2.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use hybroker::gateway::api::{Agent, AgentList, Job, JobList, Submitted};
use hybroker::model::identity::Role;
use hybroker::pki::{self, Ca, IssueRequest};
use hybroker::proto::{self, admin_service_client::AdminServiceClient};
use hybroker::tls::{self, TlsPaths};
use serde_json::Value;

use crate::common::*;

/// The variables an operator may have set; every run starts without them.
const OPERATOR_ENV: [&str; 4] =
    ["HYBROKER_BROKER", "HYBROKER_ADMIN_CA_CERT", "HYBROKER_ADMIN_CERT", "HYBROKER_ADMIN_KEY"];

/// A broker with one agent, and an admin certificate `pki/admin.pem` (the CLI's default path).
struct Operator {
    cluster: Cluster,
    admin: TlsPaths,
    url: String,
}

impl Operator {
    async fn start() -> Operator {
        let cluster = Cluster::start(Duration::from_secs(5), &[("node-a", "")]).await;
        let admin = cluster.issue(Role::Admin, "admin", None);
        let url = format!("https://{}", cluster.addr);
        Operator { cluster, admin, url }
    }

    /// `--broker … --ca-cert … --cert … --key …` for the admin certificate.
    fn flags(&self) -> Vec<String> {
        let path = |p: &Path| p.to_str().unwrap().to_string();
        let (ca, cert, key) = (path(&self.admin.ca_cert), path(&self.admin.cert), path(&self.admin.key));
        ["--broker", &self.url, "--ca-cert", &ca, "--cert", &cert, "--key", &key].map(String::from).to_vec()
    }

    /// The same through the environment.
    fn env(&self) -> Vec<(&'static str, String)> {
        let path = |p: &Path| p.to_str().unwrap().to_string();
        vec![
            ("HYBROKER_BROKER", self.url.clone()),
            ("HYBROKER_ADMIN_CA_CERT", path(&self.admin.ca_cert)),
            ("HYBROKER_ADMIN_CERT", path(&self.admin.cert)),
            ("HYBROKER_ADMIN_KEY", path(&self.admin.key)),
        ]
    }

    /// Runs `hybroker ARGS` with only `env` of the operator's variables, in `dir`.
    async fn run_in(&self, dir: &Path, env: &[(&str, String)], args: &[String]) -> Output {
        let mut command = tokio::process::Command::new(BIN);
        command.args(args).current_dir(dir).stdin(std::process::Stdio::null()).kill_on_drop(true);
        for name in OPERATOR_ENV {
            command.env_remove(name);
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        tokio::time::timeout(DEADLINE, command.output())
            .await
            .unwrap_or_else(|_| panic!("hybroker {args:?} did not finish within {DEADLINE:?}"))
            .unwrap()
    }

    /// Runs `hybroker ARGS` configured through the environment, away from the PKI directory.
    async fn run(&self, args: &[&str]) -> Output {
        self.run_in(std::env::temp_dir().as_path(), &self.env(), &strings(args)).await
    }

    /// Runs `hybroker ARGS` with no operator variables, away from the PKI directory.
    async fn run_bare(&self, args: &[String]) -> Output {
        self.run_in(std::env::temp_dir().as_path(), &[], args).await
    }

    fn spec(&self, name: &str, text: &str) -> String {
        let path = self.cluster.path(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn show(out: &Output) -> String {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    format!("status {:?}\nstdout:\n{}\nstderr:\n{}", out.status.code(), text(&out.stdout), text(&out.stderr))
}

/// The command's stdout as JSON of type `T`, after checking it succeeded.
fn parse<T: serde::de::DeserializeOwned>(out: &Output) -> T {
    assert_eq!(out.status.code(), Some(0), "{}", show(out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("stdout is not the expected JSON ({e}): {}", show(out)))
}

/// The `error: …` line and the `hint: …` line right after it, of a command that failed with status 2
/// (log lines may come before them).
fn error_and_hint(out: &Output) -> (String, String) {
    assert_eq!(out.status.code(), Some(2), "{}", show(out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("Error:") && !stderr.contains("Caused by"), "{}", show(out));
    let mut lines = stderr.lines().skip_while(|l| !l.starts_with("error: "));
    let error = lines.next().unwrap_or_else(|| panic!("no `error:` line: {}", show(out))).to_string();
    let hint = lines.next().filter(|l| l.starts_with("hint: ")).unwrap_or_else(|| panic!("no hint: {}", show(out)));
    (error, hint.to_string())
}

const ECHO_JOB: &str = "name: op-echo\ncommand: [sh, -c, 'echo hello operator']\nmax_runtime: 1m\n";
const EXIT3_JOB: &str = "name: op-exit3\ncommand: [sh, -c, 'exit 3']\nmax_attempts: 1\nmax_runtime: 1m\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_take_flags_anywhere_or_the_environment_and_print_json() {
    let op = Operator::start().await;

    // Flags after the subcommand, then before it (as before), then none at all: the environment.
    let mut args = strings(&["tenants", "add", "acme", "--output", "json"]);
    args.extend(op.flags());
    let added: Value = parse(&op.run_bare(&args).await);
    let key_id = added["key_id"].as_str().unwrap().to_string();
    assert!(added["key"].as_str().unwrap().starts_with("hbk_"), "{added}");
    assert_eq!(added["tenant"], "acme");
    let mut args = strings(&["tenants"]);
    args.extend(op.flags());
    args.extend(strings(&["list", "--tenant", "acme", "--output", "json"]));
    let listed: Value = parse(&op.run_bare(&args).await);
    assert_eq!(listed["keys"][0]["key_id"], key_id.as_str(), "{listed}");
    let listed: Value = parse(&op.run(&["tenants", "list", "--output", "json"]).await);
    let row = listed["keys"].as_array().unwrap().iter().find(|k| k["key_id"] == key_id.as_str()).expect("listed");
    assert_eq!((&row["tenant"], &row["status"], &row["last_used"]), (&"acme".into(), &"active".into(), &Value::Null));
    assert!(row["created"].as_str().unwrap().ends_with('Z'), "{row}");

    // Only the broker's address in the environment: the certificates at their default paths.
    let at_pki = [("HYBROKER_BROKER", op.url.clone())];
    let agents = eventually("lab/node-a connected", || async {
        let out = op.run_in(op.cluster.dir.path(), &at_pki, &strings(&["admin", "agents", "--output", "json"])).await;
        let list: AgentList = parse(&out);
        list.agents.into_iter().find(|a| a.id == "lab/node-a" && a.connected)
    })
    .await;
    assert!(!agents.draining);

    // `--wait` exits with the job's result, as the tenants' `--follow` does; with JSON, stdout is
    // the ended job (the events go to stderr).
    let echo = op.spec("echo.yaml", ECHO_JOB);
    let ok = op.run(&["admin", "submit", &echo, "--wait", "--output", "json"]).await;
    let job: Job = parse(&ok);
    assert_eq!((job.state.as_str(), job.exit_code, job.name.as_str()), ("succeeded", Some(0), "op-echo"));
    assert!(String::from_utf8_lossy(&ok.stderr).contains("succeeded"), "{}", show(&ok));
    let failed = op.run(&["admin", "submit", &op.spec("exit3.yaml", EXIT3_JOB), "--wait"]).await;
    assert_eq!(failed.status.code(), Some(3), "the job's own exit code: {}", show(&failed));
    let text = String::from_utf8_lossy(&failed.stdout);
    assert!(text.starts_with("submitted ") && text.contains("state failed"), "{}", show(&failed));
    let queued: Submitted = parse(&op.run(&["admin", "submit", &echo, "--output", "json"]).await);
    assert_eq!(queued.url, format!("/v1/jobs/{}", queued.id));

    let list: JobList = parse(&op.run(&["admin", "list", "--output", "json", "--limit", "10"]).await);
    let ids: Vec<&str> = list.jobs.iter().map(|j| j.id.as_str()).collect();
    assert!(ids.contains(&job.id.as_str()) && ids.contains(&queued.id.as_str()), "{ids:?}");
    let table = op.run(&["admin", "list"]).await;
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    assert_eq!(
        table.lines().next().unwrap_or_default().split_whitespace().collect::<Vec<_>>(),
        ["ID", "NAME", "STATE", "TENANT", "AGENT"]
    );
    let got: Job = parse(&op.run(&["admin", "get", &job.id, "--output", "json"]).await);
    assert_eq!(got, job);
    let logs: Value = parse(&op.run(&["admin", "logs", &job.id, "--output", "json"]).await);
    assert_eq!((&logs["job_id"], &logs["output"]), (&job.id.as_str().into(), &"hello operator\n".into()), "{logs}");

    let drained: Agent = parse(&op.run(&["admin", "drain", "lab/node-a", "--output", "json"]).await);
    assert!(drained.draining && drained.id == "lab/node-a", "{drained:?}");
    let revoked: Value = parse(&op.run(&["tenants", "revoke", &key_id, "--output", "json"]).await);
    assert_eq!((&revoked["key_id"], &revoked["status"]), (&key_id.as_str().into(), &"revoked".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_mistakes_get_an_error_a_hint_and_status_2() {
    let op = Operator::start().await;
    let with = |name: &'static str, value: &str| {
        let mut env = op.env();
        env.retain(|(k, _)| *k != name);
        env.push((name, value.to_string()));
        env
    };
    let run_with = |env: Vec<(&'static str, String)>, args: &'static [&'static str]| {
        let op = &op;
        async move { op.run_in(std::env::temp_dir().as_path(), &env, &strings(args)).await }
    };

    // Missing files: the hint names the flag and the variable.
    let (error, hint) =
        error_and_hint(&run_with(with("HYBROKER_ADMIN_CERT", "/nonexistent/admin.pem"), &["tenants", "list"]).await);
    assert!(error.starts_with("error: could not read certificate /nonexistent/admin.pem"), "{error}");
    assert!(hint.contains("--cert") && hint.contains("HYBROKER_ADMIN_CERT"), "{hint}");
    let (error, hint) =
        error_and_hint(&run_with(with("HYBROKER_ADMIN_KEY", "/nonexistent/key.pem"), &["admin", "list"]).await);
    assert!(error.contains("private key /nonexistent/key.pem"), "{error}");
    assert!(hint.contains("--key") && hint.contains("HYBROKER_ADMIN_KEY"), "{hint}");
    let (error, hint) =
        error_and_hint(&run_with(with("HYBROKER_ADMIN_CA_CERT", "/nonexistent/ca.pem"), &["admin", "agents"]).await);
    assert!(error.contains("CA certificate /nonexistent/ca.pem"), "{error}");
    assert!(hint.contains("--ca-cert") && hint.contains("HYBROKER_ADMIN_CA_CERT"), "{hint}");

    // No broker there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nobody = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);
    let (error, hint) = error_and_hint(&run_with(with("HYBROKER_BROKER", &nobody), &["tenants", "list"]).await);
    assert!(error.contains("could not reach the broker"), "{error}");
    assert!(hint.contains("--broker") && hint.contains("HYBROKER_BROKER"), "{hint}");
    let (_, hint) = error_and_hint(&run_with(with("HYBROKER_BROKER", "http://broker:7443"), &["admin", "list"]).await);
    assert!(hint.contains("https://"), "{hint}");

    // Certificates of another CA: the broker refuses ours; we refuse the broker's.
    let other = op.cluster.path("other-pki");
    pki::init_ca(&other, TRUST_DOMAIN).unwrap();
    let request =
        IssueRequest { role: Role::Admin, name: "stranger".into(), site: None, dns: vec![], ips: vec![], days: 1 };
    let (cert, key) = Ca::load(&other).unwrap().issue_to_dir(&other, &request).unwrap();
    let mut stranger = with("HYBROKER_ADMIN_CERT", cert.to_str().unwrap());
    stranger.retain(|(k, _)| *k != "HYBROKER_ADMIN_KEY");
    stranger.push(("HYBROKER_ADMIN_KEY", key.to_str().unwrap().to_string()));
    let (error, hint) = error_and_hint(&run_with(stranger, &["tenants", "list"]).await);
    assert!(error.contains("refused"), "{error}");
    assert!(hint.contains("issued by the broker's CA") && hint.contains("--cert"), "{hint}");
    let other_ca = other.join("ca.pem");
    let (error, hint) =
        error_and_hint(&run_with(with("HYBROKER_ADMIN_CA_CERT", other_ca.to_str().unwrap()), &["admin", "list"]).await);
    assert!(error.contains("refused the broker's certificate"), "{error}");
    assert!(hint.contains("--ca-cert"), "{hint}");

    // A certificate of another role: refused here, and by the broker too.
    let gateway = op.cluster.issue(Role::Gateway, "gw", None);
    let mut as_gateway = with("HYBROKER_ADMIN_CERT", gateway.cert.to_str().unwrap());
    as_gateway.retain(|(k, _)| *k != "HYBROKER_ADMIN_KEY");
    as_gateway.push(("HYBROKER_ADMIN_KEY", gateway.key.to_str().unwrap().to_string()));
    let (error, hint) = error_and_hint(&run_with(as_gateway, &["tenants", "add", "acme"]).await);
    assert!(error.contains("role gateway"), "{error}");
    assert!(hint.contains("admin certificate"), "{hint}");
    let config = tls::client_config(&gateway, TRUST_DOMAIN, Role::Broker).unwrap();
    let channel = tls::connect(&op.url, config, None).await.unwrap();
    let refused = AdminServiceClient::new(channel).add_key(proto::AddKeyRequest { tenant: "acme".into() }).await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::PermissionDenied);

    // Error answers and usage errors.
    let out = op.run(&["admin", "get", "no-such-job"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "), "{}", show(&out));
    let out = op.run(&["tenants", "add", "initech"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).starts_with("error: tenant \"initech\" is not declared"),
        "{}",
        show(&out)
    );
    let out = op.run(&["admin", "submit", "/nonexistent/job.yaml"]).await;
    assert!(
        out.status.code() == Some(2) && show(&out).contains("error: cannot read /nonexistent/job.yaml"),
        "{}",
        show(&out)
    );
    let out = op.run(&["pki", "issue", "--dir", "/nonexistent/pki", "--role", "admin", "--name", "x"]).await;
    assert!(out.status.code() == Some(2) && show(&out).contains("error: "), "{}", show(&out));
    for usage in [&["tenants", "add"][..], &["admin", "list", "--output", "yaml"], &["admin", "frobnicate"]] {
        let out = op.run(usage).await;
        assert_eq!(out.status.code(), Some(2), "a usage error: {}", show(&out));
    }
}
