//! What an operator installs (issue 17): systemd readiness from the real services (a fake
//! `NOTIFY_SOCKET` bound here), the units in `deploy/systemd/` through `systemd-analyze verify`
//! (any warning fails), the shell completions and man pages the binary writes (every command has
//! a page, `groff` finds nothing to warn about), and the archive `scripts/release.sh` packs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::common::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `program args` in `dir`; panics with the way to install it when it is missing.
fn run_tool(program: &str, args: &[&str], dir: &Path, env: &[(&str, &Path)]) -> std::process::Output {
    let mut command = Command::new(program);
    command.args(args).current_dir(dir);
    for (key, value) in env {
        command.env(key, value);
    }
    match command.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{program} is not installed: scripts/test.sh installs it (Debian: systemd, groff-base, man-db)")
        }
        Err(e) => panic!("running {program}: {e}"),
    }
}

fn text(out: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A datagram socket standing in for systemd's notification socket.
struct NotifySocket {
    socket: tokio::net::UnixDatagram,
    /// What `NOTIFY_SOCKET` says: a path, or `@name` for an abstract name.
    address: String,
}

impl NotifySocket {
    fn at_path(path: &Path) -> Self {
        let socket = tokio::net::UnixDatagram::bind(path).unwrap();
        NotifySocket { socket, address: path.to_str().unwrap().to_owned() }
    }

    fn abstract_named(name: &str) -> Self {
        use std::os::linux::net::SocketAddrExt;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = std::os::unix::net::UnixDatagram::bind_addr(&address).unwrap();
        socket.set_nonblocking(true).unwrap();
        NotifySocket { socket: tokio::net::UnixDatagram::from_std(socket).unwrap(), address: format!("@{name}") }
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![("NOTIFY_SOCKET".to_owned(), self.address.clone())]
    }

    /// The next message, within the deadline.
    async fn next(&self, waiting_for: &str) -> String {
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(DEADLINE, self.socket.recv(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no notification on {} while waiting for {waiting_for}", self.address))
            .unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    /// Messages until one has the line `line` (returned last).
    async fn until(&self, line: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            let message = self.next(line).await;
            let done = message.lines().any(|l| l == line);
            seen.push(message);
            if done {
                return seen;
            }
        }
    }

    /// After a SIGHUP: `RELOADING=1` with this boot's monotonic time, then `READY=1`.
    async fn reload_cycle(&self, pid: i32, who: &str) {
        let before = monotonic_usec();
        kill(Pid::from_raw(pid), Signal::SIGHUP).unwrap();
        let reloading = self.next(&format!("{who}'s RELOADING=1")).await;
        let mut lines = reloading.lines();
        assert_eq!(lines.next(), Some("RELOADING=1"), "{who}: {reloading:?}");
        let usec: u64 = lines
            .next()
            .and_then(|l| l.strip_prefix("MONOTONIC_USEC="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{who}: no MONOTONIC_USEC in {reloading:?}"));
        assert!(before <= usec && usec <= monotonic_usec(), "{who}: MONOTONIC_USEC {usec} is not now");
        let after = self.until("READY=1").await;
        assert!(!after.iter().any(|m| m.contains("RELOADING=1")), "{who}: a second RELOADING before READY: {after:?}");
    }
}

fn monotonic_usec() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_gateway_and_agent_tell_systemd_ready_reloading_and_stopping() {
    let sockets = tempfile::tempdir().unwrap();
    let broker_socket = NotifySocket::at_path(&sockets.path().join("broker.notify"));
    let mut cluster = Cluster::start_with(Duration::from_secs(5), &[], |_| Setup {
        broker_env: broker_socket.env(),
        ..Setup::default()
    })
    .await;
    let ready = broker_socket.next("the broker's READY=1").await;
    assert_eq!(ready, format!("READY=1\nSTATUS=serving gRPC on {}", cluster.addr));

    // The gateway, told through an abstract socket name; READY=1 means it answers at once.
    let gateway_socket = NotifySocket::abstract_named(&format!("hybroker-test-{}-gateway", std::process::id()));
    let config = cluster.plain_gateway_config("gw-notify");
    let mut gateway = spawn_with(
        &["gateway", "--config", config.to_str().unwrap()],
        &cluster.path("gw-notify.log"),
        &gateway_socket.env(),
    );
    let ready = gateway_socket.next("the gateway's READY=1").await;
    let url = ready
        .strip_prefix("READY=1\nSTATUS=serving ")
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("gateway: {ready:?}"))
        .to_owned();
    let health = reqwest::get(format!("{url}/healthz")).await.expect("the gateway answers once it said READY=1");
    assert!(health.status().is_success(), "{}", health.status());

    // The agent: ready when it starts dialling, then a status once registered.
    let agent_socket = NotifySocket::at_path(&sockets.path().join("agent.notify"));
    cluster.start_agent_with_env("node-n", "1xH100-80GB", &agent_socket.env());
    let ready = agent_socket.next("the agent's READY=1").await;
    assert_eq!(ready, format!("READY=1\nSTATUS=connecting to the broker at https://{}", cluster.addr));
    let registered = agent_socket.until("STATUS=registered with the broker as lab/node-n").await;
    assert!(!registered.iter().any(|m| m.contains("READY=1")), "{registered:?}");

    // SIGHUP reloads the certificate files: RELOADING=1 … READY=1, and each goes on serving.
    broker_socket.reload_cycle(cluster.broker_pid(), "broker").await;
    gateway_socket.reload_cycle(gateway.id() as i32, "gateway").await;
    agent_socket.reload_cycle(cluster.agent_pid("node-n"), "agent").await;
    assert!(reqwest::get(format!("{url}/healthz")).await.unwrap().status().is_success());

    // SIGTERM: STOPPING=1 first.
    kill(Pid::from_raw(cluster.agent_pid("node-n")), Signal::SIGTERM).unwrap();
    agent_socket.until("STOPPING=1").await;
    kill(Pid::from_raw(gateway.id() as i32), Signal::SIGTERM).unwrap();
    gateway_socket.until("STOPPING=1").await;
    assert!(gateway.wait().unwrap().success(), "the gateway's exit after SIGTERM");
    cluster.terminate_broker(DEADLINE);
    broker_socket.until("STOPPING=1").await;
}

/// The units, each copied with `ExecStart` on this build's binary (verify needs it to exist).
fn units_for_verify(dir: &Path) -> Vec<PathBuf> {
    let mut units = Vec::new();
    for role in ["broker", "gateway", "agent"] {
        let name = format!("hybroker-{role}.service");
        let unit = std::fs::read_to_string(repo().join("deploy/systemd").join(&name)).unwrap();
        let start = format!("ExecStart=/usr/local/bin/hybroker {role} --config /etc/hybroker/{role}.toml\n");
        assert!(unit.contains(&start), "{name}: {start}");
        for line in ["Type=notify\n", "ExecReload=/bin/kill -HUP $MAINPID\n", "NotifyAccess=main\n"] {
            assert!(unit.contains(line), "{name} lacks {line}");
        }
        assert!(unit.lines().any(|l| l.starts_with("StateDirectory=hybroker")), "{name}: no StateDirectory");
        if role == "agent" {
            // A host running broker or gateway too: their user must get through the agent's
            // /var/lib/hybroker to its own directory below.
            let mode =
                unit.lines().find_map(|l| l.strip_prefix("StateDirectoryMode=")).expect("agent StateDirectoryMode");
            assert!(u32::from_str_radix(mode, 8).unwrap() & 0o001 != 0, "agent StateDirectoryMode={mode}");
        } else {
            for line in
                ["User=hybroker\n", "CapabilityBoundingSet=\n", "ProtectSystem=strict\n", "NoNewPrivileges=yes\n"]
            {
                assert!(unit.contains(line), "{name} lacks {line}");
            }
        }
        let path = dir.join(&name);
        std::fs::write(&path, unit.replace("/usr/local/bin/hybroker", BIN)).unwrap();
        units.push(path);
    }
    units
}

#[test]
fn the_systemd_units_verify_without_a_warning_and_name_man_pages_that_exist() {
    let dir = tempfile::tempdir().unwrap();
    let units = units_for_verify(dir.path());
    // Documentation=man:hybroker-<role>(1): verify runs `man`, which finds this build's pages.
    let man = dir.path().join("man");
    let out = run_tool(BIN, &["manpages", man.join("man1").to_str().unwrap()], dir.path(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let mut args = vec!["verify"];
    args.extend(units.iter().map(|u| u.to_str().unwrap()));
    let out = run_tool("systemd-analyze", &args, dir.path(), &[("MANPATH", &man)]);
    assert!(out.status.success() && text(&out).is_empty(), "systemd-analyze verify:\n{}", text(&out));

    // The check sees warnings, not only errors: an unknown key is one.
    let broken = dir.path().join("broken.service");
    std::fs::write(
        &broken,
        std::fs::read_to_string(&units[0]).unwrap().replace("[Service]\n", "[Service]\nProtectEverything=yes\n"),
    )
    .unwrap();
    let out = run_tool("systemd-analyze", &["verify", broken.to_str().unwrap()], dir.path(), &[("MANPATH", &man)]);
    assert!(text(&out).contains("ProtectEverything"), "a warning goes unseen: {}", text(&out));

    // Broker and gateway stay well sandboxed: systemd's exposure score at most 2.0 of 10.
    for unit in &units[..2] {
        let out = run_tool(
            "systemd-analyze",
            &["security", "--offline=yes", "--threshold=20", unit.to_str().unwrap()],
            dir.path(),
            &[],
        );
        assert!(out.status.success(), "{} is exposed:\n{}", unit.display(), text(&out));
    }
}

/// Every command path the binary's own help lists (`["jobs", "list"]`, …), `help` left out.
fn commands(path: &[String], found: &mut Vec<Vec<String>>) {
    let out = Command::new(BIN).args(path).arg("--help").output().unwrap();
    assert!(out.status.success(), "hybroker {} --help", path.join(" "));
    let help = String::from_utf8(out.stdout).unwrap();
    let Some(listed) = help.split("\nCommands:\n").nth(1) else { return };
    for line in listed.lines().take_while(|l| l.starts_with("  ")) {
        let name = line.split_whitespace().next().unwrap();
        if name != "help" && !line.starts_with("   ") {
            let mut sub = path.to_vec();
            sub.push(name.to_owned());
            commands(&sub, found);
            found.push(sub);
        }
    }
}

#[test]
fn completions_and_man_pages_cover_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let mut found = Vec::new();
    commands(&[], &mut found);
    assert!(found.len() > 30, "{found:?}");

    let out = run_tool(BIN, &["completions", "bash"], dir.path(), &[]);
    let bash = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success() && bash.contains("complete -F _hybroker"), "{bash}");
    for top in found.iter().filter(|c| c.len() == 1) {
        assert!(bash.contains(&format!("hybroker,{})", top[0])), "bash completion lacks {}", top[0]);
    }
    for shell in ["zsh", "fish"] {
        let out = run_tool(BIN, &["completions", shell], dir.path(), &[]);
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success() && script.contains("submit") && script.contains("drain"), "{shell}: {script}");
    }

    let man1 = dir.path().join("man1");
    let out = run_tool(BIN, &["manpages", man1.to_str().unwrap()], dir.path(), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let pages: BTreeSet<String> =
        std::fs::read_dir(&man1).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let mut wanted: BTreeSet<String> = found.iter().map(|c| format!("hybroker-{}.1", c.join("-"))).collect();
    wanted.insert("hybroker.1".into());
    assert_eq!(pages, wanted, "one man page per command");
    for page in &pages {
        let path = man1.join(page);
        // -ww: every warning; -z: no output, only the check.
        let out = run_tool("groff", &["-man", "-Tutf8", "-ww", "-z", path.to_str().unwrap()], dir.path(), &[]);
        assert!(out.status.success() && text(&out).is_empty(), "groff on {page}:\n{}", text(&out));
    }
    let jobs = std::fs::read_to_string(man1.join("hybroker-jobs.1")).unwrap();
    assert!(jobs.contains(".TH hybroker-jobs 1") && jobs.contains("list"), "{jobs}");
}

#[test]
fn the_release_script_packs_a_built_binary_with_checksums_that_check() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path();
    let run = run_tool(
        "bash",
        &["scripts/release.sh", "--binary", BIN, "--allow-dynamic", "--out", out.to_str().unwrap()],
        repo(),
        &[],
    );
    assert!(run.status.success(), "release.sh:\n{}", text(&run));
    let name = format!("hybroker-{}-x86_64-linux", env!("CARGO_PKG_VERSION"));
    let sums = run_tool("sha256sum", &["-c", "SHA256SUMS"], out, &[]);
    assert!(sums.status.success() && text(&sums).contains(&format!("{name}.tar.gz: OK")), "{}", text(&sums));
    let untar = run_tool("tar", &["-xzf", &format!("{name}.tar.gz")], out, &[]);
    assert!(untar.status.success(), "{}", text(&untar));
    let root = out.join(&name);
    for file in [
        "bin/hybroker",
        "README.md",
        "config/broker.toml",
        "config/gateway.toml",
        "config/agent.toml",
        "deploy/systemd/hybroker-broker.service",
        "deploy/systemd/hybroker-gateway.service",
        "deploy/systemd/hybroker-agent.service",
        "deploy/systemd/hybroker.sysusers.conf",
        "deploy/image/build-image.sh",
        "share/bash-completion/completions/hybroker",
        "share/zsh/site-functions/_hybroker",
        "share/fish/vendor_completions.d/hybroker.fish",
        "share/man/man1/hybroker.1",
        "share/man/man1/hybroker-broker.1",
        "share/man/man1/hybroker-jobs-list.1",
    ] {
        assert!(root.join(file).is_file(), "the archive lacks {file}");
    }
    let version = run_tool(root.join("bin/hybroker").to_str().unwrap(), &["--version"], out, &[]);
    assert!(text(&version).contains(env!("CARGO_PKG_VERSION")), "{}", text(&version));
    // Every file is listed and checks; a changed one does not.
    let inner = run_tool("sha256sum", &["-c", "--strict", "SHA256SUMS"], &root, &[]);
    assert!(inner.status.success(), "{}", text(&inner));
    let listed = std::fs::read_to_string(root.join("SHA256SUMS")).unwrap();
    assert!(listed.lines().any(|l| l.ends_with("  deploy/systemd/hybroker-agent.service")), "{listed}");
    std::fs::write(root.join("config/agent.toml"), "changed").unwrap();
    let inner = run_tool("sha256sum", &["-c", "--quiet", "SHA256SUMS"], &root, &[]);
    assert!(!inner.status.success() && text(&inner).contains("config/agent.toml: FAILED"), "{}", text(&inner));
}
