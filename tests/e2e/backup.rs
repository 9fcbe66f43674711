//! `hybroker admin backup DIR` taken while the broker runs, and `admin restore DIR` into a broker
//! whose database, secrets key and issuing CA key are gone: the restored broker serves the same
//! jobs, its agent still connects (the same CA), and a queued job's sealed secret still opens.

use std::time::Duration;

use crate::common::*;

const TTL: Duration = Duration::from_secs(3);

/// The CLI as an operator runs it on the broker's host, with the cluster's env overrides.
fn admin_local(cluster: &Cluster, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(BIN)
        .arg("admin")
        .args(args)
        .args(["--config", path_str(&cluster.path("broker.toml"))])
        .envs(cluster.broker_env.iter().cloned())
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_online_restores_into_a_fresh_broker_with_the_same_jobs_ca_and_secrets() {
    let mut cluster = Cluster::start_with(TTL, &[("n1", "1xH100-80GB")], |dir| Setup {
        broker_env: vec![("HYBROKER_BROKER__CA_DIR".into(), dir.join("pki").display().to_string())],
        ..Setup::default()
    })
    .await;
    let mut admin = cluster.admin().await;
    let done = submit(&mut admin, "name: before\ncommand: [echo, hi]\nmax_attempts: 1\n").await;
    wait_job(&admin, &done, "the first job succeeds", |j| j.state == "succeeded").await;
    // A job that must wait for the restore: its node is drained; its secret is sealed with the key.
    let (ok, _, stderr) = cluster.admin_command(&["drain", "lab/n1"]);
    assert!(ok, "{stderr}");
    let secret = format!("s{:016x}", fastrand::u64(..));
    let sealed = submit(
        &mut admin,
        &format!("name: sealed\ncommand: [sh, -c, 'test \"$TOKEN\" = {secret}']\nmax_attempts: 1\nsecret_env: {{TOKEN: {secret}}}\n"),
    )
    .await;

    let backup = cluster.path("backup");
    let (ok, stdout, stderr) = admin_local(&cluster, &["backup", path_str(&backup)]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("backed up 2 jobs"), "{stdout}");
    for name in ["broker.db", "secrets.key", "ca/issuing-ca-key.pem", "ca/ca.pem", "broker.toml", "MANIFEST.json"] {
        let path = backup.join(name);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{name}: {e}")).permissions().mode();
        assert_eq!(mode & 0o077, 0, "{name} is private: {mode:o}");
    }
    let (again, _, stderr) = admin_local(&cluster, &["backup", path_str(&backup)]);
    assert!(!again && stderr.contains("not empty"), "{stderr}");

    // The broker's host is lost: its database, the secrets key and the issuing CA key are gone.
    let port = cluster.addr.port();
    cluster.terminate_broker(DEADLINE);
    let (refused, _, stderr) = admin_local(&cluster, &["restore", path_str(&backup)]);
    assert!(!refused && stderr.contains("never writes over a database"), "{stderr}");
    for lost in ["broker.db", "broker.db-wal", "broker.db-shm", "secrets.key", "pki/issuing-ca-key.pem"] {
        let _ = std::fs::remove_file(cluster.path(lost));
    }
    // A damaged backup is refused before anything is written.
    let key = backup.join("secrets.key");
    let good = std::fs::read(&key).unwrap();
    std::fs::write(&key, b"tampered").unwrap();
    let (damaged, _, stderr) = admin_local(&cluster, &["restore", path_str(&backup)]);
    assert!(!damaged && stderr.contains("secrets.key does not match the manifest"), "{stderr}");
    assert!(!cluster.path("broker.db").exists(), "nothing restored from a damaged backup");
    std::fs::write(&key, good).unwrap();
    let (ok, stdout, stderr) = admin_local(&cluster, &["restore", path_str(&backup)]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains("ca/ca.pem") && stdout.contains("already there"), "{stdout}");

    // On the same address, where the agent keeps dialling.
    cluster.start_broker(port);
    let mut admin = cluster.admin().await;
    let list = admin.list(hybroker::proto::ListJobsRequest { limit: 10, ..Default::default() }).await.unwrap();
    let mut names: Vec<(String, String)> = list.into_inner().jobs.into_iter().map(|j| (j.id, j.name)).collect();
    names.sort();
    let mut want = vec![(done.clone(), "before".to_string()), (sealed.clone(), "sealed".to_string())];
    want.sort();
    assert_eq!(names, want);
    assert_eq!(get(&mut admin, &done).await.state, "succeeded");
    // The agent (its certificate from the restored CA) reconnects; the drain was kept; the sealed
    // secret opens with the restored key.
    let (ok, _, stderr) = cluster.admin_command(&["undrain", "lab/n1"]);
    assert!(ok, "{stderr}");
    let job =
        wait_job(&admin, &sealed, "the sealed job ends", |j| matches!(j.state.as_str(), "succeeded" | "failed")).await;
    assert_eq!(job.state, "succeeded", "{}", job.reason);
}
