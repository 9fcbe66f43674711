//! The container image of `deploy/container`: built with buildah from the static binary (built
//! once per test run into `target/static`, its build time printed), checked with `buildah inspect`
//! and a listing of its one layer, and run with podman: the broker from the image with the
//! Kubernetes ConfigMap's config and the README's Secrets mounted where the pod mounts them, as the
//! image's non-root user, and a gateway container that finds the broker by its Service's DNS name
//! (a DNS server in the test answers it: the static binary resolves without any NSS library) and
//! turns ready.
//!
//! podman here: cgroup v1 (hybrid), no CAP_SYS_RESOURCE. crun 1.8 refuses hybrid cgroups ("cgroups
//! in hybrid mode not supported, drop all controllers from cgroupv2") even with --cgroups=disabled,
//! so runc runs the containers; podman's default ulimits (nofile 1048576) exceed the hard limits
//! and must be given lower. Storage is vfs in a temporary directory.

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Instant;

use serde_json::Value as Json;

use crate::common::{DEADLINE, eventually};
use crate::manifests::{Manifests, PodRoot, Readme, container, items};

mod dns;

/// The image's user and group.
const IMAGE_UID: u32 = 65532;
const TAG: &str = "localhost/hybroker:test";
/// What podman may set: below this machine's hard limits (no CAP_SYS_RESOURCE to raise them).
const ULIMITS: [&str; 4] = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The static binary, built once per test run into `target/static` (its own target directory, so
/// it never waits on the test build's lock); prints how long the build took.
fn static_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let target = repo().join("target/static");
        let started = Instant::now();
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--locked", "--bin", "hybroker", "--target", "x86_64-unknown-linux-gnu", "--target-dir"])
            .arg(&target)
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .current_dir(repo())
            .output()
            .expect("running cargo");
        assert!(out.status.success(), "the static build failed:\n{}", String::from_utf8_lossy(&out.stderr));
        println!("static build (target/static): {:.1} s", started.elapsed().as_secs_f64());
        target.join("x86_64-unknown-linux-gnu/debug/hybroker")
    })
}

/// A temporary container store (vfs) and podman's run directory, removed at the end.
struct Store {
    dir: tempfile::TempDir,
}

impl Store {
    fn new() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let conf = format!(
            "[storage]\ndriver = \"vfs\"\ngraphroot = \"{0}/graph\"\nrunroot = \"{0}/run\"\n",
            dir.path().display()
        );
        std::fs::write(dir.path().join("storage.conf"), conf).unwrap();
        Store { dir }
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("CONTAINERS_STORAGE_CONF", self.dir.path().join("storage.conf"));
        if program == "podman" {
            let tmp = self.dir.path().join("libpod");
            command.arg("--tmpdir").arg(tmp).args(["--runtime", "runc", "--cgroup-manager", "cgroupfs"]);
            command.args(["--events-backend", "none"]);
        }
        command
    }

    /// Runs `program ARGS`; panics with its output unless it succeeds.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let out = self.command(program).args(args).output().unwrap_or_else(|e| {
            panic!("{program} cannot run ({e}): scripts/test.sh installs podman, buildah and runc")
        });
        assert!(out.status.success(), "{program} {}:\n{}", args.join(" "), both(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Builds the image from the static binary with `deploy/container/build.sh`.
    fn build_image(&self) {
        let binary = static_binary();
        let started = Instant::now();
        let out = self
            .command(&repo().join("deploy/container/build.sh").display().to_string())
            .arg(binary)
            .arg(TAG)
            .output()
            .unwrap();
        assert!(out.status.success(), "build.sh:\n{}", both(&out));
        println!("image build: {:.1} s", started.elapsed().as_secs_f64());
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Containers first (their processes, then their files); the directory goes with TempDir.
        let _ = self.command("podman").args(["rm", "--all", "--force", "--time", "0"]).output();
        let _ = self.command("buildah").args(["rm", "--all"]).output();
    }
}

fn both(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

#[test]
fn the_image_is_the_static_binary_and_ca_certificates_for_a_non_root_user() {
    let store = Store::new();
    store.build_image();
    let inspect: Json = serde_json::from_str(&store.run("buildah", &["inspect", "--type", "image", TAG])).unwrap();
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(config["Entrypoint"], serde_json::json!(["/hybroker/bin/hybroker"]));
    assert_eq!(config["User"], format!("{IMAGE_UID}:{IMAGE_UID}"));
    assert_eq!(config["WorkingDir"], "/var/lib/hybroker");
    assert!(config["Volumes"]["/var/lib/hybroker"].is_object(), "{config}");
    let env: Vec<&str> = config["Env"].as_array().unwrap().iter().filter_map(Json::as_str).collect();
    assert!(env.contains(&"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"), "{env:?}");
    let labels = &config["Labels"];
    assert_eq!(labels["org.opencontainers.image.version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(labels["org.opencontainers.image.licenses"], env!("CARGO_PKG_LICENSE"));
    assert_eq!(labels["org.opencontainers.image.title"], "hybroker");
    for key in ["revision", "created"] {
        let value = text_of(&labels[format!("org.opencontainers.image.{key}")]);
        assert!(!value.is_empty() && value != "unknown", "label {key}: {labels}");
    }
    // Every port a pod of deploy/kubernetes opens is exposed.
    let manifests = Manifests::render();
    for workload in manifests.workloads() {
        for port in items(&container(workload)["ports"]) {
            let exposed = format!("{}/tcp", port["containerPort"].as_u64().unwrap());
            assert!(config["ExposedPorts"][&exposed].is_object(), "{exposed} is not exposed: {config}");
        }
    }

    // One layer holding exactly these files.
    assert_eq!(inspect["OCIv1"]["rootfs"]["diff_ids"].as_array().map(Vec::len), Some(1), "one layer");
    let container = store.run("buildah", &["from", TAG]);
    let root = PathBuf::from(store.run("buildah", &["mount", &container]));
    let mut files = BTreeSet::new();
    list(&root, &root, &mut files);
    let expected: BTreeSet<String> = [
        "etc/group",
        "etc/nsswitch.conf",
        "etc/passwd",
        "etc/ssl/certs/ca-certificates.crt",
        "hybroker/bin/hybroker",
        "tmp/",
        "var/lib/hybroker/",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(files, expected, "the image's files");
    let meta = |p: &str| std::fs::metadata(root.join(p)).unwrap();
    assert_eq!((meta("var/lib/hybroker").uid(), meta("var/lib/hybroker").gid()), (IMAGE_UID, IMAGE_UID));
    assert_eq!((meta("var/lib").uid(), meta("tmp").permissions().mode() & 0o7777), (0, 0o1777));
    let host_bundle = std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap();
    assert_eq!(std::fs::read(root.join("etc/ssl/certs/ca-certificates.crt")).unwrap(), host_bundle);
    assert_eq!(std::fs::read(root.join("hybroker/bin/hybroker")).unwrap(), std::fs::read(static_binary()).unwrap());
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
    assert!(passwd.contains(&format!("hybroker:x:{IMAGE_UID}:{IMAGE_UID}:")), "{passwd}");

    // It runs, from scratch: the binary needs nothing the image lacks.
    let version =
        store.run("podman", &[&["run", "--rm", "--network", "host"][..], &ULIMITS, &[TAG, "--version"]].concat());
    assert!(version.starts_with(&format!("hybroker {}", env!("CARGO_PKG_VERSION"))), "{version}");
    // Host names from /etc/hosts resolve (glibc's `files` lookup is inside the static binary): the
    // client reaches the address and is refused there, while an unknown name fails in DNS.
    for (host, expected) in [("gw.hosts-file.test", "Connection refused"), ("gw.unknown.invalid", "dns error")] {
        let out = store
            .command("podman")
            .args(["run", "--rm", "--network", "host", "--add-host", "gw.hosts-file.test:127.0.0.1"])
            .args(ULIMITS)
            .args(["-e", "HYBROKER_TOKEN=hbk_x_y", "-e", &format!("HYBROKER_GATEWAY=https://{host}:1")])
            .args([TAG, "jobs", "list"])
            .output()
            .unwrap();
        assert!(!out.status.success() && both(&out).contains(expected), "{host}: {}", both(&out));
    }
}

/// The paths under `dir` (relative to `root`): files, and directories with nothing below them
/// (ending in `/`).
fn list(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    let mut empty = true;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        empty = false;
        if path.is_dir() {
            list(root, &path, out);
        } else {
            out.insert(path.strip_prefix(root).unwrap().display().to_string());
        }
    }
    if empty && dir != root {
        out.insert(format!("{}/", dir.strip_prefix(root).unwrap().display()));
    }
}

fn text_of(v: &Json) -> &str {
    v.as_str().unwrap_or("")
}

/// Gives `dir` and everything in it to the image's user, as a pod's `fsGroup` gives its volumes.
fn give_to_image_user(dir: &Path) {
    std::os::unix::fs::chown(dir, Some(IMAGE_UID), Some(IMAGE_UID)).unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            give_to_image_user(&path);
        } else {
            std::os::unix::fs::chown(&path, Some(IMAGE_UID), Some(IMAGE_UID)).unwrap();
        }
    }
}

/// `podman run -d` of the image as `role` with `pod`'s `/etc/hybroker` and `mounts`, host network;
/// returns the container's name.
fn run_role(store: &Store, role: &str, pod: &PodRoot, mounts: &[(PathBuf, &str)], args: &[&str]) -> String {
    let name = format!("hybroker-{role}-{}", std::process::id());
    let etc = format!("{}:/etc/hybroker:ro", pod.host(Path::new("/etc/hybroker")).display());
    let mut all = vec!["run", "-d", "--name", &name, "--network", "host", "-v", &etc];
    all.extend(ULIMITS);
    let volumes: Vec<String> = mounts.iter().map(|(from, to)| format!("{}:{to}", from.display())).collect();
    for v in &volumes {
        all.extend(["-v", v.as_str()]);
    }
    all.extend(args);
    store.run("podman", &all);
    name
}

/// Waits for `file`, which the container `name` writes once it listens.
fn wait_for_file(store: &Store, name: &str, file: &Path) -> String {
    let started = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(file)
            && !text.trim().is_empty()
        {
            return text.trim().to_string();
        }
        let state = store.run("podman", &["inspect", "--format", "{{.State.Status}}", name]);
        if state != "running" || started.elapsed() > DEADLINE {
            panic!("{name} is {state}, {} not written:\n{}", file.display(), store.run("podman", &["logs", name]));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_runs_the_broker_and_a_gateway_that_finds_it_by_its_service_name() {
    hybroker::tls::install_crypto_provider();
    let store = Store::new();
    store.build_image();
    let manifests = Manifests::render();
    let readme = Readme::load();
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("operator");
    std::fs::create_dir_all(&work).unwrap();
    crate::manifests::make_pki(&readme, &work);
    let secrets = readme.secrets();

    // The broker's pod: its ConfigMap and Secrets at /etc/hybroker, its claim at /var/lib/hybroker.
    let broker_pod = manifests.workload("broker");
    let broker_root = PodRoot::lay_out(&manifests, broker_pod, &secrets, &work, &dir.path().join("broker"));
    give_to_image_user(&broker_root.root);
    let state = broker_root.host(Path::new("/var/lib/hybroker"));
    let config = crate::manifests::config_arg(broker_pod).display().to_string();
    let broker = run_role(
        &store,
        "broker",
        &broker_root,
        &[(state.clone(), "/var/lib/hybroker")],
        &[
            "-e",
            "HYBROKER_BROKER__LISTEN=127.0.0.1:0",
            "-e",
            "HYBROKER_BROKER__ENROLL_LISTEN=127.0.0.1:0",
            "-e",
            "HYBROKER_METRICS__LISTEN=127.0.0.1:0",
            TAG,
            "broker",
            "--config",
            &config,
            "--addr-file",
            "/var/lib/hybroker/broker.addr",
        ],
    );
    let broker_addr = wait_for_file(&store, &broker, &state.join("broker.addr"));
    let broker_port = broker_addr.rsplit(':').next().unwrap();
    // The image's user made the database and the secrets key, owner-only.
    let key_file = state.join("secrets.key");
    let key = eventually("the broker's secrets key", || {
        let key = std::fs::metadata(&key_file).ok();
        async move { key }
    })
    .await;
    assert_eq!((key.uid(), key.permissions().mode() & 0o777), (IMAGE_UID, 0o600));
    let processes = store.run("podman", &["top", &broker, "user"]);
    assert!(!processes.lines().skip(1).any(|l| l.trim() == "root"), "the broker runs as root:\n{processes}");

    // The gateway's pod, resolving the broker's Service name through DNS (no /etc/hosts entry).
    let service = manifests.service_url("hybroker-broker", "grpc");
    let host = service.trim_start_matches("https://").split(':').next().unwrap().to_string();
    let dns = dns::Server::start(&host).await;
    let gateway_pod = manifests.workload("gateway");
    let gateway_root = PodRoot::lay_out(&manifests, gateway_pod, &secrets, &work, &dir.path().join("gateway"));
    let out = dir.path().join("gateway-out");
    std::fs::create_dir_all(&out).unwrap();
    give_to_image_user(&gateway_root.root);
    give_to_image_user(&out);
    let broker_url = format!("HYBROKER_BROKER__URL=https://{host}:{broker_port}");
    let config = crate::manifests::config_arg(gateway_pod).display().to_string();
    let gateway = run_role(
        &store,
        "gateway",
        &gateway_root,
        &[(out.clone(), "/out")],
        &[
            "--dns",
            &dns.ip().to_string(),
            "-e",
            "HYBROKER_GATEWAY__LISTEN=127.0.0.1:0",
            "-e",
            "HYBROKER_METRICS__LISTEN=127.0.0.1:0",
            "-e",
            &broker_url,
            TAG,
            "gateway",
            "--config",
            &config,
            "--addr-file",
            "/out/gateway.addr",
        ],
    );
    let gateway_addr = wait_for_file(&store, &gateway, &out.join("gateway.addr"));
    let port = gateway_addr.rsplit(':').next().unwrap().to_string();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(work.join("pki/ca.pem")).unwrap()).unwrap();
    let http = reqwest::Client::builder().tls_certs_only([ca]).build().unwrap();
    let readyz = format!("https://localhost:{port}/readyz");
    eventually("the gateway container's /readyz to answer 200", || {
        let get = http.get(&readyz).send();
        async move { get.await.ok().filter(|r| r.status() == 200) }
    })
    .await;
    assert!(dns.asked().contains(&host), "the gateway did not ask DNS for {host}: {:?}", dns.asked());
}
