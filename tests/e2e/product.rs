//! The product as a new user meets it: the quickstart, the shipped configs and examples, and the
//! architecture invariants of the README.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use hybroker::config::{AgentConfig, BrokerConfig, QuickstartConfig, parse_toml};
use hybroker::model::job::JobSpec;

use crate::common::BIN;

#[test]
fn quickstart_once_runs_the_samples_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    // As the README says to run it: the default, relative state directory (jobs run in sandboxes
    // whose working directory is not the agent's, so relative paths must not leak into them).
    let out = Command::new(BIN).args(["quickstart", "--once"]).current_dir(dir.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "quickstart failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(!stdout.contains("metrics: http://"), "metrics only when a --config asks for them");
    // Owned GPUs win for H100 work; the cheaper cloud L4 wins over the owned one; EU data stays in
    // the EU; a job bigger than any owned node spills to the cheapest cloud.
    for (sample, site) in [
        ("hello", "lab-sto"),
        ("train-h100", "lab-sto"),
        ("inference-l4", "aws-us-east-1"),
        ("wordcount", "lab-sto"),
        ("finetune-8xh100", "aws-us-east-1"),
        ("pretrain-4xh100", "lab-sto"),
        ("sweep-4xh100", "lab-sto"),
    ] {
        let row =
            stdout.lines().find(|l| l.starts_with(sample)).unwrap_or_else(|| panic!("no row for {sample}:\n{stdout}"));
        assert!(row.contains("succeeded") && row.contains(site), "{row}");
    }
    // Placement that waits: behind pretrain-4xh100, the sweep waits for the lab (cheaper counting
    // the delay) and the eval, due in 45 minutes, bursts to a cloud.
    let sweep = stdout.lines().find(|l| l.starts_with("sweep-4xh100")).unwrap();
    assert!(sweep.contains("wait ~20 min, worth $3.33 of delay, rather than $"), "{sweep}");
    let eval = stdout.lines().find(|l| l.starts_with("eval-4xh100")).unwrap();
    assert!(eval.contains("succeeded") && !eval.contains("lab-sto  "), "{eval}");
    assert!(eval.contains("lab-sto: deadline: wait 1h 19m") && eval.contains("+ run 30m > 45m"), "{eval}");
    assert!(stdout.contains("why inference-l4 ran where it did"), "{stdout}");
    assert!(stdout.contains("rejected: residency: data in eu, site in us"), "{stdout}");
    assert!(stdout.contains("broker (gRPC, mTLS): https://127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("gateway (HTTP API):  http://127.0.0.1:"), "{stdout}");
    assert!(stdout.contains("hello from job"), "{stdout}");
    // The data sample read two objects from the local store and wrote its result back there.
    assert!(stdout.contains("counts.txt:  21 total"), "{stdout}");
    let on_disk = stdout.lines().find_map(|l| l.trim().strip_prefix("on disk: ")).expect("an output path");
    let counts = std::fs::read_to_string(dir.path().join(on_disk).join("counts.txt")).unwrap();
    assert!(counts.contains("data/fog.txt"), "{counts}");
    let key = stdout.lines().find_map(|l| l.trim().strip_prefix("demo tenant key:")).expect("the demo key").trim();
    assert!(key.starts_with("hbk_"), "{key}");
    assert!(!stderr.contains(key) && !stderr.contains("hbk_"), "logs never carry the key");
    assert!(!stderr.contains("-----BEGIN"), "no key material in logs");
}

#[test]
fn shipped_configs_parse() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("config/broker.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let broker: BrokerConfig = parse_toml(&text, &path, []).unwrap();
    assert_eq!(broker.leases.ttl.0.as_secs(), 30);
    only_missing_certificates(broker.validate(&path));
    let path = root.join("config/broker-hybrid.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let hybrid: BrokerConfig = parse_toml(&text, &path, []).unwrap();
    assert_eq!(hybrid.storage.len(), 4);
    only_missing_certificates(hybrid.validate(&path));
    let path = root.join("config/agent.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let agent: AgentConfig = parse_toml(&text, &path, []).unwrap();
    assert!(agent.agent.broker_url.starts_with("https://"));
    let quickstart = QuickstartConfig::load(&root.join("config/quickstart.toml")).unwrap();
    assert!(quickstart.metrics.listen.is_some() && quickstart.telemetry.otlp_endpoint.is_some());
}

/// The shipped configs point at certificates made by `hybroker pki`; nothing else may be wrong.
fn only_missing_certificates(validated: Result<(), hybroker::config::ConfigError>) {
    if let Err(hybroker::config::ConfigError::Invalid { problems, .. }) = validated {
        assert!(problems.iter().all(|p| p.starts_with("tls.")), "{problems:?}");
    }
}

#[test]
fn every_example_job_is_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut count = 0;
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let doc = std::fs::read(&path).unwrap();
            JobSpec::from_yaml(&doc, 65536).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            count += 1;
        }
    }
    assert!(count >= 3);
}

#[test]
fn logs_can_be_one_json_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["quickstart", "--once", "--state-dir"])
        .arg(dir.path().join("qs"))
        .env("HYBROKER_LOG_FORMAT", "json")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() > 10, "{stderr}");
    let mut traced_requests = 0;
    for line in lines {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string() && v["fields"].is_object(), "{line}");
        // The gateway's request lines are inside the request's span: they name its trace.
        if v["fields"]["message"] == "request" && v["fields"]["route"] == "/v1/jobs" {
            let hex = |key: &str, len: usize| {
                v[key].as_str().is_some_and(|s| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()))
            };
            assert!(hex("trace_id", 32) && hex("span_id", 16), "{line}");
            assert_eq!(v["span"]["otel.name"], format!("{} /v1/jobs", v["fields"]["method"].as_str().unwrap()));
            traced_requests += 1;
        }
    }
    assert!(traced_requests > 0, "{stderr}");
    assert!(!stderr.contains("hbk_"), "logs never carry the key");
}

/// Starts `hybroker quickstart` (serving, not `--once`) with `args` and waits until it says it
/// serves; returns the child and every line it printed until then.
fn serving_quickstart(args: &[&std::ffi::OsStr]) -> (std::process::Child, Vec<String>) {
    use std::io::BufRead;
    let mut child = Command::new(BIN)
        .arg("quickstart")
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with("serving;") => return (child, lines),
            Ok(line) => lines.push(line),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the quickstart serves ({e}): {lines:#?}");
            }
        }
    }
}

#[test]
fn a_second_quickstart_on_a_busy_state_directory_refuses_and_leaves_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("qs");
    let (mut first, _) = serving_quickstart(&["--state-dir".as_ref(), state.as_ref()]);
    let second = Command::new(BIN).args(["quickstart", "--once", "--state-dir"]).arg(&state).output().unwrap();
    let _ = first.kill();
    let _ = first.wait();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(stderr.contains("is in use by another quickstart"), "{stderr}");
    assert!(state.join("broker.db").exists(), "the running quickstart's state is left alone");
}

#[test]
fn the_version_names_the_commit_it_was_built_from() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let commit = text
        .trim()
        .strip_prefix(&format!("hybroker {} (commit ", env!("CARGO_PKG_VERSION")))
        .and_then(|rest| rest.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{text}"));
    // Built from a checkout: its abbreviated hash, `-dirty` with local changes.
    if !Path::new(env!("CARGO_MANIFEST_DIR")).join(".git").exists() {
        assert_eq!(commit, "unknown", "{text}");
        return;
    }
    let hash = commit.strip_suffix("-dirty").unwrap_or(commit);
    assert!(hash.len() == 12 && hash.bytes().all(|b| b.is_ascii_hexdigit()), "{text}");
}

#[test]
fn services_find_their_config_by_flag_environment_working_directory_or_etc() {
    let dir = tempfile::tempdir().unwrap();
    let run = |env: Option<&str>| {
        let mut command = Command::new(BIN);
        command.args(["broker"]).current_dir(dir.path()).env_remove("HYBROKER_CONFIG").env("RUST_BACKTRACE", "0");
        if let Some(path) = env {
            command.env("HYBROKER_CONFIG", path);
        }
        let out = command.output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Nothing anywhere (unless this host has /etc/hybroker/broker.toml): every place is named.
    if !Path::new("/etc/hybroker/broker.toml").exists() {
        let err = run(None);
        assert!(err.contains("neither config/broker.toml nor /etc/hybroker/broker.toml exists"), "{err}");
    }
    // ./config/broker.toml is found (and read: this one is not a valid config).
    std::fs::create_dir_all(dir.path().join("config")).unwrap();
    std::fs::write(dir.path().join("config/broker.toml"), "not = [valid\n").unwrap();
    let err = run(None);
    assert!(err.contains("config/broker.toml"), "{err}");
    // HYBROKER_CONFIG wins over the working directory.
    let elsewhere = dir.path().join("elsewhere.toml");
    let err = run(Some(elsewhere.to_str().unwrap()));
    assert!(err.contains("elsewhere.toml"), "{err}");
}

/// The "try next" commands a serving quickstart prints run as printed (with `hybroker` on the PATH,
/// from the repository root, in a shell with its `export` line). `quickstart --config` with
/// `[metrics]`: one /metrics endpoint with the broker's, the gateway's and
/// the agents' series (one process, one registry), its address printed, and the broker's
/// Prometheus service discovery beside it (without `--config`, nothing listens: see
/// `quickstart_once_runs_the_samples_and_exits_zero`); a bad config is refused with its path and key.
#[test]
fn a_serving_quickstart_runs_the_commands_it_prints_and_serves_metrics_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let (state, config) = (dir.path().join("qs"), dir.path().join("quickstart.toml"));
    std::fs::write(&config, "[metrics]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let (mut child, lines) =
        serving_quickstart(&["--state-dir".as_ref(), state.as_ref(), "--config".as_ref(), config.as_ref()]);
    let scrape = |path: &str| {
        let printed =
            lines.iter().find_map(|l| l.strip_prefix("metrics: http://")).expect("the metrics address is printed");
        let addr = printed.split('/').next().unwrap();
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
        let mut body = String::new();
        std::io::Read::read_to_string(&mut stream, &mut body).unwrap();
        body
    };
    let metrics = scrape("/metrics");
    let discovery = scrape("/sd/agents");
    let printed = run_printed_commands(&lines);
    let _ = child.kill();
    let _ = child.wait();
    for (command, out) in &printed {
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "`{command}` as printed failed:\n{stdout}{stderr}");
        assert!(!stdout.trim().is_empty(), "`{command}` printed nothing");
    }
    assert!(printed.len() >= 9, "{printed:?}");
    assert!(
        printed
            .iter()
            .any(|(c, out)| c.contains("--download") && String::from_utf8_lossy(&out.stdout).contains("counts.txt"))
    );
    assert!(metrics.starts_with("HTTP/1.0 200") || metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    for family in [
        "hybroker_jobs_finished_total",
        "hybroker_gateway_requests_total",
        "hybroker_agent_attempts_running",
        "process_threads",
    ] {
        assert!(
            metrics.contains(&format!("\n{family}{{")) || metrics.contains(&format!("\n{family} ")),
            "{family} missing:\n{metrics}"
        );
    }
    assert!(discovery.contains("200"), "{discovery}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[metrics]\nlisten = \"nowhere\"\n").unwrap();
    let refused = Command::new(BIN).args(["quickstart", "--once", "--config"]).arg(&bad).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("bad.toml") && stderr.contains("listen"), "{stderr}");
}

/// Runs each command of the quickstart's "try next" block in `sh` beside the repository's examples, after
/// its `export` line, with the built `hybroker` first on the PATH; returns (command, output).
fn run_printed_commands(lines: &[String]) -> Vec<(String, std::process::Output)> {
    let block = lines.iter().skip_while(|l| !l.starts_with("try next")).skip(2);
    let commands: Vec<&str> = block.map_while(|l| l.strip_prefix("  ")).collect();
    let export = commands.iter().find(|c| c.starts_with("export ")).expect("an export line");
    // A working directory with the repository's examples, for the files the commands write.
    let cwd = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"), cwd.path().join("examples"))
        .unwrap();
    let bin_dir = Path::new(BIN).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    commands
        .iter()
        .filter(|c| !c.starts_with("export "))
        .map(|command| {
            let out = Command::new("sh")
                .args(["-c", &format!("{export}\n{command}")])
                .env("PATH", &path)
                .current_dir(cwd.path())
                .output()
                .unwrap();
            (command.to_string(), out)
        })
        .collect()
}
