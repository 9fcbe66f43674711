use super::*;
use nix::errno::Errno;
use nix::sys::signal::kill;
use std::time::Instant as StdInstant;

fn launch(dir: &Path, argv: &[&str]) -> Launch {
    Launch {
        job_id: "job-1".into(),
        attempt: 2,
        command: argv.iter().map(|s| (*s).to_owned()).collect(),
        env: BTreeMap::new(),
        cuda_visible_devices: String::new(),
        max_runtime: Duration::from_secs(60),
        work_dir: dir.join("attempts").join("job-1-2"),
        run_as: None,
        grace: Duration::from_millis(200),
        sandbox: None,
        preempt: None,
        preempt_order: None,
    }
}

/// Runs to the end, collecting the streamed output.
async fn run_collect(launch: Launch) -> (Outcome, Vec<u8>) {
    let (tx, mut rx) = mpsc::channel(4);
    let (_cancel_tx, cancel_rx) = watch::channel(false);
    let task = tokio::spawn(run(launch, tx, cancel_rx));
    let mut out = Vec::new();
    while let Some(chunk) = rx.recv().await {
        assert!(chunk.len() <= CHUNK_BYTES);
        out.extend(chunk);
    }
    (task.await.unwrap(), out)
}

/// Waits (bounded) until `pid` is gone or a zombie: a killed process that is not our child
/// dies asynchronously, and its reaper may be slow or absent.
async fn assert_dies(pid: i32) {
    let until = StdInstant::now() + Duration::from_secs(5);
    loop {
        let dead = match kill(Pid::from_raw(pid), None) {
            Err(Errno::ESRCH) => true,
            Ok(()) => std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z')))
                .unwrap_or(true),
            Err(e) => panic!("kill({pid}, 0): {e}"),
        };
        if dead {
            return;
        }
        assert!(StdInstant::now() < until, "process {pid} survived its attempt");
        sleep(Duration::from_millis(10)).await;
    }
}

fn read_pid(l: &Launch) -> i32 {
    let text = std::fs::read_to_string(l.work_dir.join("pid")).unwrap();
    text.trim().parse().unwrap()
}

#[tokio::test]
async fn exit_code_and_signal_propagate() {
    let dir = tempfile::tempdir().unwrap();
    let (outcome, _) = run_collect(launch(dir.path(), &["sh", "-c", "exit 3"])).await;
    assert_eq!(outcome, Outcome::Exited(3));
    assert_eq!(outcome.exit_code(), Some(3));
    assert!(!outcome.succeeded());
    assert_eq!(outcome.reason(), "exited with code 3");

    let (outcome, _) = run_collect(launch(dir.path(), &["true"])).await;
    assert!(outcome.succeeded());

    let (outcome, _) = run_collect(launch(dir.path(), &["sh", "-c", "kill -9 $$"])).await;
    assert_eq!(outcome, Outcome::Signaled(9));
    assert_eq!(outcome.reason(), "killed by signal 9");
    assert_eq!(outcome.exit_code(), None);
}

#[tokio::test]
async fn environment_is_clean_and_ours_wins() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = launch(dir.path(), &["env"]);
    l.cuda_visible_devices = "0,1".into();
    l.env.insert("BATCH_SIZE".into(), "256".into());
    l.env.insert("HYBROKER_JOB_ID".into(), "spoofed".into());
    l.env.insert("CUDA_VISIBLE_DEVICES".into(), "7".into());
    let (outcome, out) = run_collect(l).await;
    assert!(outcome.succeeded(), "{outcome:?}");
    let text = String::from_utf8(out).unwrap();
    let vars: BTreeMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(vars.get("HYBROKER_JOB_ID"), Some(&"job-1"));
    assert_eq!(vars.get("HYBROKER_ATTEMPT"), Some(&"2"));
    assert_eq!(vars.get("CUDA_VISIBLE_DEVICES"), Some(&"0,1"));
    assert_eq!(vars.get("BATCH_SIZE"), Some(&"256"));
    let allowed = ["PATH", "HOME", "LANG", "TZ", "BATCH_SIZE"];
    for key in vars.keys() {
        assert!(
            allowed.contains(key)
                || ["HYBROKER_JOB_ID", "HYBROKER_ATTEMPT", "CUDA_VISIBLE_DEVICES", PREEMPT_FILE_ENV].contains(key),
            "agent variable {key} leaked into the job"
        );
    }

    // A CPU job sees CUDA_VISIBLE_DEVICES set and empty.
    let (_, out) = run_collect(launch(dir.path(), &["env"])).await;
    let text = String::from_utf8(out).unwrap();
    assert!(text.lines().any(|l| l == "CUDA_VISIBLE_DEVICES="), "{text}");
}

#[tokio::test]
async fn output_reaches_channel_and_file_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let script = "i=0; while [ $i -lt 5000 ]; do echo \"line $i\"; i=$((i+1)); done; echo oops >&2";
    let l = launch(dir.path(), &["sh", "-c", script]);
    let log = l.work_dir.join(OUTPUT_LOG);
    let (outcome, out) = run_collect(l).await;
    assert!(outcome.succeeded());
    assert_eq!(std::fs::read(&log).unwrap(), out, "file and stream differ");
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("line ")).collect();
    let want: Vec<String> = (0..5000).map(|i| format!("line {i}")).collect();
    assert_eq!(lines, want);
    assert!(text.lines().any(|l| l == "oops"));
}

#[tokio::test]
async fn work_dir_is_private_and_used() {
    let dir = tempfile::tempdir().unwrap();
    let l = launch(dir.path(), &["sh", "-c", "pwd; echo hi > made-here"]);
    let work = l.work_dir.clone();
    let (outcome, out) = run_collect(l).await;
    assert!(outcome.succeeded());
    assert_eq!(String::from_utf8(out).unwrap().trim(), work.to_str().unwrap());
    assert!(work.join("made-here").exists());
    let mode = std::fs::metadata(&work).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
}

#[tokio::test]
async fn max_runtime_kills_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = launch(dir.path(), &["sh", "-c", "sleep 30 & echo $! > pid; wait"]);
    l.max_runtime = Duration::from_millis(300);
    let started = StdInstant::now();
    let (outcome, _) = run_collect(l.clone()).await;
    assert_eq!(outcome, Outcome::TimedOut(Duration::from_millis(300)));
    assert_eq!(outcome.reason(), "killed after max runtime 300ms");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_dies(read_pid(&l)).await;
}

#[tokio::test]
async fn sigterm_is_followed_by_sigkill_after_grace() {
    let dir = tempfile::tempdir().unwrap();
    // Both the shell and its sleep ignore SIGTERM.
    let mut l = launch(dir.path(), &["sh", "-c", "trap '' TERM; sleep 30 & echo $! > pid; wait"]);
    l.max_runtime = Duration::from_millis(100);
    let started = StdInstant::now();
    let (outcome, _) = run_collect(l.clone()).await;
    assert!(matches!(outcome, Outcome::TimedOut(_)), "{outcome:?}");
    assert!(started.elapsed() < DEFAULT_GRACE, "grace of the launch not used");
    assert_dies(read_pid(&l)).await;
}

#[tokio::test]
async fn background_children_do_not_outlive_the_attempt() {
    let dir = tempfile::tempdir().unwrap();
    // The shell exits at once; its sleep keeps stdout open.
    let l = launch(dir.path(), &["sh", "-c", "sleep 30 & echo $! > pid"]);
    let started = StdInstant::now();
    let (outcome, _) = run_collect(l.clone()).await;
    assert_eq!(outcome, Outcome::Exited(0));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_dies(read_pid(&l)).await;
}

#[tokio::test]
async fn cancel_kills() {
    let dir = tempfile::tempdir().unwrap();
    let l = launch(dir.path(), &["sh", "-c", "sleep 30 & echo $! > pid; echo ready; wait"]);
    let (tx, mut rx) = mpsc::channel(4);
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let task = tokio::spawn(run(l.clone(), tx, cancel_rx));
    assert_eq!(rx.recv().await.unwrap(), b"ready\n");
    cancel_tx.send(true).unwrap();
    let outcome = task.await.unwrap();
    assert_eq!(outcome, Outcome::Cancelled);
    assert_eq!(outcome.reason(), "cancelled");
    assert_dies(read_pid(&l)).await;
}

/// A notice due `after` from now.
fn notice(after: Duration) -> SpotNotice {
    SpotNotice {
        action: "terminate".into(),
        deadline: std::time::SystemTime::now() + after,
        event_id: None,
        seen_at: StdInstant::now(),
        by_broker: None,
    }
}

#[tokio::test]
async fn a_spot_notice_writes_the_deadline_then_terms_the_group() {
    let dir = tempfile::tempdir().unwrap();
    // The handler reads the deadline the agent wrote before the signal.
    let script = r#"trap 'echo "term: $(cat "$HYBROKER_PREEMPT_FILE")"; exit 0' TERM
        test -e "$HYBROKER_PREEMPT_FILE" && echo early
        echo ready; while :; do sleep 0.05; done"#;
    let mut l = launch(dir.path(), &["sh", "-c", script]);
    let (notice_tx, notice_rx) = watch::channel(None);
    l.preempt = Some(notice_rx);
    let (tx, mut rx) = mpsc::channel(4);
    let (_cancel_tx, cancel_rx) = watch::channel(false);
    let task = tokio::spawn(run(l.clone(), tx, cancel_rx));
    assert_eq!(rx.recv().await.unwrap(), b"ready\n");
    let n = notice(Duration::from_secs(60));
    notice_tx.send_replace(Some(n.clone()));
    let mut out = Vec::new();
    while let Some(chunk) = rx.recv().await {
        out.extend(chunk);
    }
    let outcome = task.await.unwrap();
    assert_eq!(outcome, Outcome::Preempted(n.reason()));
    assert!(outcome.reason().starts_with("spot interruption notice: terminate at 20"), "{}", outcome.reason());
    // (The shell may also say that its `sleep` was terminated.)
    let out = String::from_utf8(out).unwrap();
    assert!(out.lines().any(|l| l == format!("term: {}", n.deadline_rfc3339())), "{out}");
    assert!(!out.contains("early"), "no deadline before the notice: {out}");
    let file = l.work_dir.join(AGENT_FILES_DIR).join(PREEMPT_FILE);
    assert_eq!(std::fs::read_to_string(file).unwrap(), format!("{}\n", n.deadline_rfc3339()));
}

#[tokio::test]
async fn the_brokers_order_to_preempt_stops_the_attempt_like_a_notice_with_the_brokers_reason() {
    let dir = tempfile::tempdir().unwrap();
    let script = r#"trap 'echo "term: $(cat "$HYBROKER_PREEMPT_FILE")"; exit 0' TERM
        echo ready; while :; do sleep 0.05; done"#;
    let mut l = launch(dir.path(), &["sh", "-c", script]);
    // The node's spot watch says nothing; the broker's order for this attempt does.
    let (_spot_tx, spot_rx) = watch::channel(None);
    let (order_tx, order_rx) = watch::channel(None);
    (l.preempt, l.preempt_order) = (Some(spot_rx), Some(order_rx));
    let (tx, mut rx) = mpsc::channel(4);
    let (_cancel_tx, cancel_rx) = watch::channel(false);
    let task = tokio::spawn(run(l, tx, cancel_rx));
    assert_eq!(rx.recv().await.unwrap(), b"ready\n");
    let order = SpotNotice {
        by_broker: Some("by the broker for job j2: a higher priority".into()),
        ..notice(Duration::from_secs(5))
    };
    order_tx.send_replace(Some(order.clone()));
    let mut out = Vec::new();
    let ended = async {
        while let Some(chunk) = rx.recv().await {
            out.extend(chunk);
        }
        task.await.unwrap()
    };
    let outcome = timeout(Duration::from_secs(20), ended).await.expect("stopped by the order");
    assert_eq!(outcome, Outcome::Preempted("by the broker for job j2: a higher priority".into()));
    let out = String::from_utf8(out).unwrap();
    assert!(out.lines().any(|l| l == format!("term: {}", order.deadline_rfc3339())), "{out}");
}

#[tokio::test]
async fn a_job_ignoring_the_notice_is_killed_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = launch(dir.path(), &["sh", "-c", "trap '' TERM; echo ready; while :; do sleep 0.05; done"]);
    l.grace = Duration::from_secs(60); // the deadline, not the grace, decides
    let (notice_tx, notice_rx) = watch::channel(None);
    l.preempt = Some(notice_rx);
    let (tx, mut rx) = mpsc::channel(4);
    let (_cancel_tx, cancel_rx) = watch::channel(false);
    let task = tokio::spawn(run(l, tx, cancel_rx));
    assert_eq!(rx.recv().await.unwrap(), b"ready\n");
    notice_tx.send_replace(Some(notice(Duration::from_millis(300))));
    let outcome = timeout(Duration::from_secs(20), task).await.expect("killed at the deadline").unwrap();
    assert!(matches!(outcome, Outcome::Preempted(_)), "{outcome:?}");
}

#[tokio::test]
async fn gone_receiver_still_fills_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let l = launch(dir.path(), &["sh", "-c", "echo one; echo two"]);
    let log = l.work_dir.join(OUTPUT_LOG);
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let (_cancel_tx, cancel_rx) = watch::channel(false);
    assert!(run(l, tx, cancel_rx).await.succeeded());
    assert_eq!(std::fs::read_to_string(log).unwrap(), "one\ntwo\n");
}

#[tokio::test]
async fn start_failures_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let (outcome, _) = run_collect(launch(dir.path(), &["no-such-command-hybroker"])).await;
    let reason = outcome.reason();
    assert!(matches!(outcome, Outcome::StartFailed(_)), "{outcome:?}");
    assert!(reason.starts_with("could not start: ") && reason.contains("no-such-command-hybroker"), "{reason}");

    let (outcome, _) = run_collect(launch(dir.path(), &[])).await;
    assert_eq!(outcome, Outcome::StartFailed("empty command".into()));

    let mut l = launch(dir.path(), &["true"]);
    l.env.insert("A=B".into(), "x".into());
    assert!(matches!(run_collect(l).await.0, Outcome::StartFailed(_)));
}

#[tokio::test]
async fn run_as_drops_privileges_when_root() {
    if !crate::agent::sandbox::cgroup::tests::root_or_skip() {
        return;
    }
    let nobody = User::from_name("nobody").unwrap().expect("this test needs the user nobody");
    let dir = tempfile::tempdir().unwrap();
    let mut l = launch(dir.path(), &["sh", "-c", "id -u; id -G; echo $HOME"]);
    l.run_as = Some("nobody".into());
    let work = l.work_dir.clone();
    let (outcome, out) = run_collect(l).await;
    assert!(outcome.succeeded(), "{outcome:?}");
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], nobody.uid.to_string());
    assert!(!lines[1].split(' ').any(|g| g == "0"), "kept root's groups: {text}");
    assert_eq!(lines[2], nobody.dir.to_str().unwrap());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&work).unwrap().uid(), nobody.uid.as_raw());

    let mut l = launch(dir.path(), &["true"]);
    l.run_as = Some("no-such-user-hybroker".into());
    let reason = run_collect(l).await.0.reason();
    assert!(reason.contains("no-such-user-hybroker"), "{reason}");
}
