//! Text that reorders or rewrites a terminal line: bidirectional controls (U+202E, "Trojan
//! Source") and C0/C1 controls are refused in job names and labels (400 naming the field), and the
//! CLI shows any that reach it (a cancel reason is free text) escaped, as `\u{202e}`.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::json;

use super::{Api, problem};
use crate::common::*;

/// Runs the CLI against the gateway with `key`; returns (exit code, stdout, stderr).
pub async fn cli(gateway: &Gateway, key: &str, args: &[&str]) -> (i32, String, String) {
    let out = crate::common::tenant_cli(gateway, key, args).await;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

/// No raw display control anywhere (line breaks aside).
fn assert_no_raw_controls(what: &str, text: &str) {
    let raw = text.chars().find(|&c| c != '\n' && hybroker::model::text::is_display_control(c));
    assert!(raw.is_none(), "{what} prints {:?} raw: {text:?}", raw.map(char::escape_unicode));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidi_and_control_characters_are_refused_in_names_and_labels_and_shown_escaped() {
    // No agent: the job below stays queued until it is cancelled.
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let gateway = cluster.start_gateway();
    let key = cluster.tenant_key("acme");
    let acme = Api::new(&gateway, &key);

    let cases = [
        (json!({"name": "report\u{202e}fdp.exe", "command": ["true"]}), "name", "\\u{202e}"),
        (json!({"name": "isolate\u{2066}x\u{2069}", "command": ["true"]}), "name", "\\u{2066}"),
        (json!({"name": "mark\u{200f}", "command": ["true"]}), "name", "\\u{200f}"),
        (json!({"name": "clear\u{1b}[2J", "command": ["true"]}), "name", "\\u{1b}"),
        (json!({"name": "c1\u{9b}", "command": ["true"]}), "name", "\\u{9b}"),
        (json!({"name": "ok", "command": ["true"], "labels": {"team": "a\u{202e}b"}}), "labels.team", "\\u{202e}"),
    ];
    for (spec, field, shown) in cases {
        let (status, headers, body) = acme.submit(&spec, None).await;
        let detail = problem(status, &headers, &body, StatusCode::BAD_REQUEST);
        // `invalid job spec: name: must not contain … (found \u{202e} at character 6)`
        assert!(detail.contains(&format!(" {field}: ")), "{detail}");
        assert!(detail.contains(shown), "{detail}");
        assert_no_raw_controls("the problem", &detail);
    }
    assert!(acme.job_ids("").await.is_empty(), "nothing was stored");
    // Right-to-left scripts without controls are names like any other.
    acme.submit_ok(&json!({"name": "تدريب-模型", "command": ["true"], "labels": {"team": "ج"}})).await;

    // The CLI refuses the same spec with the broker's reason, escaped.
    let file = cluster.path("evil.yaml");
    std::fs::write(&file, "name: \"report\\u202Efdp.exe\"\ncommand: [\"true\"]\n").unwrap();
    let (code, _, stderr) = cli(&gateway, &key, &["submit", file.to_str().unwrap()]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("name: must not contain") && stderr.contains("found \\u{202e}"), "{stderr}");
    assert_no_raw_controls("submit's error", &stderr);

    // A cancel reason is free text: it reaches the job's reason and its events, and every view of
    // the CLI shows it escaped.
    let id = acme.submit_ok(&json!({"name": "plain", "command": ["true"]})).await;
    let reason = "by \u{202e}nimda\u{202c} \u{1b}[31mred";
    let (status, _, body) =
        super::send(acme.request(Method::POST, &format!("/v1/jobs/{id}/cancel")).json(&json!({"reason": reason})))
            .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body["reason"].as_str().unwrap().contains(reason), "the API keeps the text as it is: {body}");
    for args in [vec!["jobs", "get", &id], vec!["jobs", "events", &id], vec!["jobs", "list"]] {
        let (code, stdout, stderr) = cli(&gateway, &key, &args).await;
        assert_eq!(code, 0, "{args:?}: {stderr}");
        assert_no_raw_controls(&format!("{args:?}"), &stdout);
        if args[1] != "list" {
            assert!(stdout.contains("by \\u{202e}nimda\\u{202c} \\u{1b}[31mred"), "{args:?}: {stdout}");
        }
    }
}
