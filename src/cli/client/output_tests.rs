use super::*;
use crate::gateway::api::Gpu;

fn job(id: &str, name: &str, state: &str) -> Job {
    Job {
        id: id.into(),
        name: name.into(),
        tenant: "acme".into(),
        state: state.into(),
        attempts: 1,
        max_attempts: 3,
        preemptions: 0,
        site: None,
        agent: None,
        exit_code: None,
        reason: String::new(),
        labels: BTreeMap::new(),
        created_at: "2026-01-01T12:00:00.000Z".into(),
        updated_at: "2026-01-01T12:00:03.500Z".into(),
        spec: serde_json::json!({}),
        input_objects: 0,
        input_bytes: 0,
        outputs: Vec::new(),
        trace_id: None,
    }
}

fn gpu(model: &str, healthy: bool, simulated: bool) -> Gpu {
    Gpu {
        index: 0,
        uuid: "GPU-1".into(),
        model: model.into(),
        name: "NVIDIA".into(),
        memory_mib: 81920,
        healthy,
        simulated,
        utilization_pct: 0,
        temperature_c: 30,
        power_mw: 70_000,
        ecc_errors: 0,
        mig_enabled: false,
    }
}

fn agent(id: &str, gpus: Vec<Gpu>) -> Agent {
    let (site, node) = id.split_once('/').unwrap();
    Agent {
        id: id.into(),
        site: site.into(),
        node: node.into(),
        connected: true,
        draining: false,
        isolation: "sandbox".into(),
        dedicated_tenant: None,
        cpus: 8,
        memory_mib: 65536,
        gpus,
        labels: BTreeMap::new(),
        running_jobs: vec!["j1".into()],
        last_seen: "2026-01-01T12:00:00Z".into(),
        cert_not_after: None,
    }
}

fn at(s: &str) -> SystemTime {
    humantime::parse_rfc3339(s).unwrap()
}

#[test]
fn tables_align_columns_without_trailing_spaces() {
    let rows = vec![vec!["a".to_string(), "long value".into(), "x".into()], vec!["bbbb".into(), "v".into(), "".into()]];
    assert_eq!(table(&["ID", "V", "LAST"], &rows), "ID    V           LAST\na     long value  x\nbbbb  v\n");
    assert_eq!(table(&["ÄÖ", "B"], &[vec!["é".into(), "b".into()]]), "ÄÖ  B\né   b\n");
}

#[test]
fn the_jobs_table_shows_every_column() {
    let mut done = job("j1", "hello", "failed");
    done.site = Some("lab".into());
    done.agent = Some("lab/node-a".into());
    done.exit_code = Some(3);
    let queued = job("j2", "train-h100", "queued");
    let out = jobs_table(&[done, queued], at("2026-01-01T12:05:00Z"));
    assert_eq!(
        out,
        "ID  NAME        STATE   SITE  AGENT       EXIT  AGE\n\
         j1  hello       failed  lab   lab/node-a  3     5m\n\
         j2  train-h100  queued  -     -           -     5m\n"
    );
}

#[test]
fn the_agents_table_summarises_gpus() {
    let mixed = agent("lab/node-a", vec![gpu("H100-80GB", true, true), gpu("H100-80GB", true, true)]);
    let mut sick = agent("lab/node-b", vec![gpu("A100-80GB", false, false), gpu("L4-24GB", true, false)]);
    sick.draining = true;
    sick.connected = false;
    let mut none = agent("aws/i-1", vec![]);
    none.isolation = "none".into();
    none.dedicated_tenant = Some("acme".into());
    let out = agents_table(&[mixed, sick, none]);
    assert_eq!(
        out,
        "ID          CONNECTED  DRAINING  GPUS                                 RUNNING  ISOLATION  TENANTS\n\
         lab/node-a  yes        no        2xH100-80GB [sim]                    1        sandbox    any\n\
         lab/node-b  no         yes       1xA100-80GB,1xL4-24GB (1 unhealthy)  1        sandbox    any\n\
         aws/i-1     yes        no        -                                    1        none       acme\n"
    );
}

#[test]
fn details_list_one_field_per_line() {
    let mut j = job("j1", "hello", "running");
    j.reason = "started".into();
    j.labels.insert("team".into(), "vision".into());
    let out = job_details(&j);
    assert!(out.contains("state:     running (started)\n"), "{out}");
    assert!(out.contains("labels:    team=vision\n"), "{out}");
    assert!(out.contains("attempts:  1/3\n"), "{out}");
    let preempted = Job { attempts: 3, preemptions: 2, ..j.clone() };
    assert!(job_details(&preempted).contains("attempts:  3/3 (2 preempted, not counted)\n"));
    assert!(out.contains("secrets:   -\n"), "{out}");
    // Names only, whatever the answer holds as values.
    j.spec = serde_json::json!({"secret_env": {"TOKEN": "<redacted>", "PIN": "0042"}});
    let out = job_details(&j);
    assert!(out.contains("secrets:   PIN=<redacted>,TOKEN=<redacted>\n") && !out.contains("0042"), "{out}");
    let out = agent_details(&agent("lab/node-a", vec![gpu("H100-80GB", true, true)]));
    assert!(out.contains("gpus:      1xH100-80GB [sim]\n"), "{out}");
    assert!(out.contains("  gpu 0: H100-80GB (NVIDIA) 81920 MiB healthy [simulated]"), "{out}");
    assert!(out.contains("isolation: sandbox\n") && out.contains("tenants:   any\n"), "{out}");
    let mut dedicated = agent("lab/node-9", vec![]);
    (dedicated.isolation, dedicated.dedicated_tenant) = ("none".into(), Some("acme".into()));
    let out = agent_details(&dedicated);
    assert!(out.contains("isolation: none\n") && out.contains("tenants:   acme only (dedicated)\n"), "{out}");
}

#[test]
fn event_lines_show_time_state_agent_and_reason() {
    let mut e = JobEvent {
        seq: 3,
        job_id: "j1".into(),
        state: "running".into(),
        attempt: 1,
        agent: Some("lab/node-a".into()),
        reason: "started".into(),
        exit_code: None,
        at: "2026-01-01T12:00:01.250Z".into(),
    };
    assert_eq!(event_line(&e), "12:00:01 running    lab/node-a           started");
    e.state = "failed".into();
    e.exit_code = Some(3);
    e.reason = String::new();
    assert_eq!(event_line(&e), "12:00:01 failed     lab/node-a           exit code 3");
    e.agent = None;
    e.state = "queued".into();
    e.exit_code = None;
    e.reason = "submitted".into();
    assert_eq!(event_line(&e), "12:00:01 queued     -                    submitted");
}

#[test]
fn the_final_line_and_exit_status_follow_the_result() {
    let mut j = job("j1", "hello", "succeeded");
    j.agent = Some("lab/node-a".into());
    j.exit_code = Some(0);
    j.reason = "exited 0".into();
    assert_eq!(final_line(&j), "hello j1 succeeded on lab/node-a, exit code 0, in 3s");
    assert_eq!(exit_status(&j), 0);
    j.state = "failed".into();
    j.exit_code = Some(3);
    j.reason = "exited with 3".into();
    assert_eq!(final_line(&j), "hello j1 failed on lab/node-a, exit code 3, in 3s: exited with 3");
    assert_eq!(exit_status(&j), 3);
    j.exit_code = Some(255);
    assert_eq!(exit_status(&j), 125);
    j.exit_code = Some(-9);
    assert_eq!(exit_status(&j), 1);
    j.exit_code = None;
    assert_eq!(exit_status(&j), 1);
    j.state = "cancelled".into();
    j.exit_code = Some(137);
    assert_eq!(exit_status(&j), 1);
}

#[test]
fn ages_are_short() {
    let now = at("2026-01-02T12:00:00Z");
    assert_eq!(age("2026-01-02T11:59:18.5Z", now), "41s");
    assert_eq!(age("2026-01-02T09:00:00Z", now), "3h");
    assert_eq!(age("2025-12-30T12:00:00Z", now), "3d");
    assert_eq!(age("2026-01-02T12:00:05Z", now), "0s");
    assert_eq!(age("yesterday", now), "-");
    assert!(is_terminal("cancelled") && !is_terminal("running") && !is_terminal("bogus"));
}

#[test]
fn names_labels_reasons_and_events_are_shown_escaped() {
    // What an old broker (or another client) might still hand out: bidi and terminal controls.
    let evil = "report\u{202e}fdp.exe";
    let mut j = job("j1", evil, "failed");
    j.reason = "exited\u{1b}[2J with \u{2066}3\u{2069}".into();
    j.labels.insert("team".into(), "a\u{200f}b".into());
    j.agent = Some("lab/node\u{202d}-a".into());
    let shown = [
        jobs_table(std::slice::from_ref(&j), at("2026-01-01T12:05:00Z")),
        job_details(&j),
        final_line(&j),
        event_line(&JobEvent {
            seq: 1,
            job_id: "j1".into(),
            state: "failed".into(),
            attempt: 1,
            agent: j.agent.clone(),
            reason: j.reason.clone(),
            exit_code: Some(3),
            at: "2026-01-01T12:00:01Z".into(),
        }),
    ];
    for out in &shown {
        assert!(!out.chars().any(|c| c != '\n' && crate::model::text::is_display_control(c)), "{out:?}");
    }
    assert!(shown[0].contains("report\\u{202e}fdp.exe  failed"), "{}", shown[0]);
    assert!(shown[1].contains("name:      report\\u{202e}fdp.exe\n"), "{}", shown[1]);
    assert!(shown[1].contains("labels:    team=a\\u{200f}b\n"), "{}", shown[1]);
    assert!(shown[2].ends_with(": exited\\u{1b}[2J with \\u{2066}3\\u{2069}"), "{}", shown[2]);
    assert!(shown[3].contains("lab/node\\u{202d}-a"), "{}", shown[3]);
    let mut a = agent("lab/node-a", vec![gpu("H100-80GB", true, false)]);
    a.labels.insert("rack".into(), "r\u{202e}1".into());
    a.gpus[0].name = "NVIDIA\u{202e}".into();
    let out = agent_details(&a);
    assert!(out.contains("rack=r\\u{202e}1") && out.contains("(NVIDIA\\u{202e})"), "{out}");
}

#[test]
fn agent_details_say_when_the_certificate_expires_or_expired() {
    let mut a = agent("lab/node-a", vec![]);
    assert!(agent_details(&a).contains("cert:      -\n"), "{}", agent_details(&a));
    a.cert_not_after = Some("2000-01-01T00:00:00Z".into());
    assert!(agent_details(&a).contains("EXPIRED at 2000-01-01T00:00:00Z"), "{}", agent_details(&a));
    a.cert_not_after = Some("2999-01-01T00:00:00Z".into());
    assert!(agent_details(&a).contains("cert:      expires 2999-01-01T00:00:00Z"), "{}", agent_details(&a));
}
