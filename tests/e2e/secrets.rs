//! Job secrets end to end: a job's `secret_env` reaches its environment and nothing else (not the
//! database file or its WAL, no API answer, no service's log, not `jobs get`); the key file is made
//! 0600 and refused when others may read it; a rotated key file still opens old key ids, and a key
//! id gone from it fails that job's attempt with a clear reason.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use base64::Engine as _;
use hybroker::proto;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::common::*;
use crate::gateway::{Api, wait_ready};

/// A value no test writes anywhere else, so finding it means it leaked.
fn fresh_secret() -> String {
    let mut rng = fastrand::Rng::new();
    format!("sv-{}", (0..24).map(|_| rng.alphanumeric()).collect::<String>())
}

/// The SHA-256 (hex) the job prints of its `$TOKEN`: proof it saw the value without printing it.
fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

const PRINT_TOKEN_HASH: &str = "printf %s \"$TOKEN\" | sha256sum; echo plain=$PLAIN";

fn secret_job(name: &str, secret: &str) -> Value {
    json!({
        "name": name,
        "command": ["sh", "-c", PRINT_TOKEN_HASH],
        "env": {"PLAIN": "visible"},
        "secret_env": {"TOKEN": secret},
        "max_attempts": 1,
        "max_runtime": "1m",
    })
}

fn bytes_contain(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// The database file and its WAL as they are on disk now.
fn database_bytes(cluster: &Cluster) -> Vec<(String, Vec<u8>)> {
    ["broker.db", "broker.db-wal"]
        .iter()
        .map(|name| (name.to_string(), std::fs::read(cluster.path(name)).unwrap_or_default()))
        .collect()
}

async fn job_output(cluster: &Cluster, id: &str) -> String {
    let logs = cluster.admin().await.logs(proto::LogsRequest { job_id: id.into(), ..Default::default() }).await;
    String::from_utf8_lossy(&logs.unwrap().into_inner().output).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_reaches_the_jobs_environment_and_nothing_else() {
    let cluster = Cluster::start(Duration::from_secs(5), &[("node-a", "1xH100-80GB")]).await;
    let gateway = cluster.start_gateway();
    wait_ready(&gateway).await;
    let api = Api::new(&gateway, &cluster.tenant_key("acme"));
    let secret = fresh_secret();
    let spec = secret_job("secret-job", &secret);

    let (status, _, body) = api.submit(&spec, Some("secret-idem-1")).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    // The same key and the same secrets: the first job.
    let (status, _, again) = api.submit(&spec, Some("secret-idem-1")).await;
    assert_eq!((status, again["id"].as_str()), (StatusCode::CREATED, Some(id.as_str())), "{again}");
    // The hash leaves secret values out, not the rest: another spec under the key is still refused.
    let (status, _, other) = api.submit(&secret_job("another-job", &secret), Some("secret-idem-1")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{other}");
    assert!(!other.to_string().contains(&secret), "{other}");

    let mut admin = cluster.admin().await;
    let job = wait_job(&admin, &id, "the secret job to end", |j| j.state == "succeeded" || j.state == "failed").await;
    let output = job_output(&cluster, &id).await;
    assert_eq!(job.state, "succeeded", "{job:?}\n{output}");
    assert!(output.contains(&sha256_hex(&secret)), "the job saw another value:\n{output}");
    assert!(output.contains("plain=visible"), "{output}");

    // Every answer about the job: the names with the placeholder, never the value.
    let (status, _, got) = api.get(&format!("/v1/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK, "{got}");
    assert_eq!(got["spec"]["secret_env"], json!({"TOKEN": "<redacted>"}), "{got}");
    assert_eq!(got["spec"]["env"], json!({"PLAIN": "visible"}), "{got}");
    let mut answers = vec![("GET job".to_string(), got.to_string())];
    for path in ["/v1/jobs", &format!("/v1/jobs/{id}/placement")] {
        let (_, _, body) = api.get(path).await;
        answers.push((format!("GET {path}"), body.to_string()));
    }
    let (_, _, plan) = api.post("/v1/plan", &spec).await;
    answers.push(("POST /v1/plan".into(), plan.to_string()));
    let events = api.request(Method::GET, &format!("/v1/jobs/{id}/events")).timeout(DEADLINE).send().await.unwrap();
    answers.push(("SSE events".into(), events.text().await.unwrap()));
    let admin_get = get(&mut admin, &id).await;
    assert!(admin_get.spec_json.contains("\"TOKEN\":\"<redacted>\""), "{}", admin_get.spec_json);
    answers.push(("admin get".into(), format!("{admin_get:?}")));
    let list = admin.list(proto::ListJobsRequest::default()).await.unwrap().into_inner();
    answers.push(("admin list".into(), format!("{list:?}")));
    answers.push(("admin watch".into(), format!("{:?}", watch_to_end(&mut admin, &id).await)));
    for (what, answer) in &answers {
        assert!(!answer.contains(&secret), "{what} shows the secret: {answer}");
    }

    // `hybroker jobs get`: redacted.
    let cli = tokio::process::Command::new(BIN)
        .args(["jobs", "get", &id])
        .env("HYBROKER_GATEWAY", &gateway.url)
        .env("HYBROKER_TOKEN", &api.key)
        .env_remove("HYBROKER_CA_CERT")
        .output();
    let cli = tokio::time::timeout(DEADLINE, cli).await.expect("jobs get finishes").unwrap();
    let shown = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success(), "{shown}{}", String::from_utf8_lossy(&cli.stderr));
    assert!(shown.contains("secrets:   TOKEN=<redacted>\n") && !shown.contains(&secret), "{shown}");

    // At rest: only the sealed value, in the database and in its WAL.
    let files = database_bytes(&cluster);
    assert!(files.iter().any(|(_, b)| bytes_contain(b, "aes256gcm:")), "no sealed secrets stored");
    for (name, bytes) in &files {
        assert!(!bytes_contain(bytes, &secret), "{name} holds the secret in clear");
    }
    // The key file was made for this broker, private, and said so once.
    let key_file = cluster.path("secrets.key");
    assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    let broker_log = cluster.broker_log();
    assert_eq!(broker_log.matches("created a new job secrets key file").count(), 1, "{broker_log}");
    for (what, log) in [("broker", broker_log), ("agent", cluster.agent_log("node-a")), ("gateway", gateway.log())] {
        assert!(log.contains(&id) || what != "agent", "the {what} log is not the one the job went through");
        assert!(!log.contains(&secret), "the {what} log shows the secret:\n{log}");
    }
}

/// Rewrites the key file with `lines` (mode 0600).
fn write_key_file(cluster: &Cluster, lines: &[String]) {
    let path = cluster.path("secrets.key");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn new_key_line(id: &str) -> String {
    let key: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
    format!("{id} {}", base64::engine::general_purpose::STANDARD.encode(key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_keys_open_old_secrets_and_a_lost_key_fails_its_job_clearly() {
    // No agent yet: jobs wait while the key file changes under restarts.
    let mut cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let (secret_a, secret_b) = (fresh_secret(), fresh_secret());
    let yaml = |name: &str, secret: &str| {
        format!(
            "name: {name}\ncommand: [sh, -c, '{PRINT_TOKEN_HASH}']\nmax_attempts: 1\nsecret_env: {{TOKEN: {secret}}}\n"
        )
    };
    let a = submit(&mut cluster.admin().await, &yaml("sealed-old", &secret_a)).await;
    let first = std::fs::read_to_string(cluster.path("secrets.key")).unwrap();
    let old_line = first.lines().find(|l| !l.starts_with('#') && !l.trim().is_empty()).unwrap().to_string();

    // Rotation: a new current key first, the old one kept.
    cluster.kill_broker();
    write_key_file(&cluster, &[new_key_line("k-new"), old_line.clone()]);
    cluster.start_broker(0);
    let b = submit(&mut cluster.admin().await, &yaml("sealed-new", &secret_b)).await;

    // The new key is lost (an old backup of the file, with yet another key added).
    cluster.kill_broker();
    write_key_file(&cluster, &[new_key_line("k-third"), old_line]);
    cluster.start_broker(0);
    cluster.start_agent("node-a", "1xH100-80GB");
    let admin = cluster.admin().await;
    let ended = |j: &proto::Job| j.state == "succeeded" || j.state == "failed";
    let job_a = wait_job(&admin, &a, "the job sealed with the old key to end", ended).await;
    let output = job_output(&cluster, &a).await;
    assert_eq!(job_a.state, "succeeded", "{job_a:?}\n{output}");
    assert!(output.contains(&sha256_hex(&secret_a)), "{output}");
    let job_b = wait_job(&admin, &b, "the job sealed with the lost key to fail", ended).await;
    assert_eq!(job_b.state, "failed", "{job_b:?}");
    assert!(job_b.reason.contains("attempt 1 failed: secret key k-new not found"), "{}", job_b.reason);
    // Nothing panicked: the broker still answers and seals with the current key.
    let c = submit(&mut cluster.admin().await, &yaml("sealed-third", &fresh_secret())).await;
    let job_c = wait_job(&admin, &c, "a job sealed with the current key to end", ended).await;
    assert_eq!(job_c.state, "succeeded", "{job_c:?}");
    let broker_log = cluster.broker_log();
    for secret in [&secret_a, &secret_b] {
        assert!(!broker_log.contains(secret.as_str()), "{broker_log}");
    }
    assert!(!broker_log.contains("panicked"), "{broker_log}");

    // A key file others may read is refused at start, saying why.
    cluster.kill_broker();
    std::fs::set_permissions(cluster.path("secrets.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let started = tokio::process::Command::new(BIN)
        .args(["broker", "--config", cluster.path("broker.toml").to_str().unwrap()])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(DEADLINE, started).await.expect("the broker exits").unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("secrets.key: has mode 0644") && said.contains("chmod 600"), "{said}");
}
