//! The data routes against a hostile tenant, and the CLI against a hostile gateway: transfers
//! through the gateway hold one of the tenant's stream slots (`max_streams_per_tenant`), so
//! stalled uploads and downloads cannot pile up; no URI spelling or output key reaches another
//! tenant's objects; the local store completes no multipart upload a tenant names; the CLI
//! writes nothing through a symbolic link in the download directory, nothing outside it, and
//! never more than an object's listed size.

use std::os::unix::fs::symlink;

use reqwest::StatusCode;

use crate::common::eventually;
use crate::outputs::{DataCluster, text};

/// `GET /v1/data/object?uri=` as `key` on `gateway`; its status.
async fn read_status(gateway: &str, key: &str, uri: &str) -> StatusCode {
    let client = reqwest::Client::new();
    let url = format!("{gateway}/v1/data/object");
    client.get(url).bearer_auth(key).query(&[("uri", uri)]).send().await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_upload_holds_a_stream_slot_until_its_client_goes() {
    let dc = DataCluster::start(None).await;
    let file = dc.cluster.path("small.txt");
    std::fs::write(&file, "hello").unwrap();
    dc.ok(&["data", "put", file.to_str().unwrap(), "local://lab/acme/small.txt"]).await;
    let tight = dc.cluster.start_gateway_keyed("tight", false, "max_streams_per_tenant = 1", "");
    let uri = "local://lab/acme/small.txt";
    assert_eq!(read_status(&tight.url, &dc.acme, uri).await, StatusCode::OK);

    // An upload announcing 1 MiB that sends 1 KiB and stalls.
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<Vec<u8>, std::io::Error>>();
    tx.unbounded_send(Ok(vec![0u8; 1024])).unwrap();
    let put = reqwest::Client::new()
        .put(format!("{}/v1/data/object", tight.url))
        .bearer_auth(&dc.acme)
        .query(&[("uri", "local://lab/acme/stalled.bin")])
        .header(reqwest::header::CONTENT_LENGTH, 1 << 20)
        .body(reqwest::Body::wrap_stream(rx));
    let upload = tokio::spawn(put.send());

    // While it stalls, the tenant's next transfer is refused; another tenant's is not.
    eventually("the stalled upload to hold acme's only stream slot", || async {
        (read_status(&tight.url, &dc.acme, uri).await == StatusCode::TOO_MANY_REQUESTS).then_some(())
    })
    .await;
    let globex = dc.cluster.tenant_key("globex");
    assert_eq!(read_status(&tight.url, &globex, "local://lab/globex/none").await, StatusCode::NOT_FOUND);

    // The client goes: its slot is freed and nothing was stored.
    drop(tx);
    upload.abort();
    eventually("acme's slot to be freed", || async {
        (read_status(&tight.url, &dc.acme, uri).await == StatusCode::OK).then_some(())
    })
    .await;
    assert!(!dc.objects.join("lab/acme/stalled.bin").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn downloads_write_nothing_through_symbolic_links_in_the_directory() {
    let dc = DataCluster::start(None).await;
    let local = dc.cluster.path("in");
    std::fs::create_dir_all(local.join("sub")).unwrap();
    std::fs::write(local.join("a.txt"), "hello ").unwrap();
    std::fs::write(local.join("sub/b.bin"), "bytes of b").unwrap();
    dc.ok(&["data", "put", local.to_str().unwrap(), "local://lab/acme/in/"]).await;

    // Someone who can write to the download directory left a `.part` pointing at a victim file:
    // resuming or restarting it must not write there.
    let victim = dc.cluster.path("victim.txt");
    std::fs::write(&victim, "precious bytes").unwrap();
    let got = dc.cluster.path("got");
    std::fs::create_dir_all(&got).unwrap();
    symlink(&victim, got.join("a.txt.part")).unwrap();
    let out = dc.cli(&["data", "get", "local://lab/acme/in/a.txt", got.to_str().unwrap()]).await;
    let stderr = text(&out.stderr);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious bytes", "{stderr}");
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("symbolic link") && stderr.contains("a.txt.part"), "{stderr}");

    // A directory on the way that is a link to elsewhere: nothing lands there.
    let elsewhere = dc.cluster.path("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let got = dc.cluster.path("got2");
    std::fs::create_dir_all(&got).unwrap();
    symlink(&elsewhere, got.join("sub")).unwrap();
    let out = dc.cli(&["data", "get", "local://lab/acme/in/", got.to_str().unwrap()]).await;
    let stderr = text(&out.stderr);
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0, "{stderr}");
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("symbolic link"), "{stderr}");

    // Without links, the same downloads work.
    std::fs::remove_file(got.join("sub")).unwrap();
    dc.ok(&["data", "get", "local://lab/acme/in/", got.to_str().unwrap()]).await;
    assert_eq!(std::fs::read(got.join("sub/b.bin")).unwrap(), b"bytes of b");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_multipart_upload_is_completed_in_the_local_store() {
    // The local store does not tie an upload id to its key: a completion there could assemble the
    // parts of another tenant's upload under the caller's key. Tenants never get a local upload id,
    // so the gateway refuses every local completion.
    let dc = DataCluster::start(None).await;
    let complete = serde_json::json!({
        "uri": "local://lab/acme/stolen.bin",
        "upload_id": "3f0e8c2a-5b7d-4c1e-9a6f-2d8b4e7c1a90",
        "parts": [{"number": 1, "etag": "\"0cc175b9c0f1b6a831c399e269772661\""}],
    });
    let response = reqwest::Client::new()
        .post(format!("{}/v1/data/uploads/complete", dc.gateway.url))
        .bearer_auth(&dc.acme)
        .json(&complete)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body = response.text().await.unwrap();
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("no multipart upload to complete"), "{body}");
    assert!(!dc.objects.join("lab/acme/stolen.bin").exists());
}

/// A hostile gateway for `data get`: its listing (`objects`) and a download route that sends
/// 64 MiB whatever the listing said.
async fn hostile_gateway(objects: serde_json::Value) -> String {
    use axum::routing::get;
    let endless = || async {
        let chunks = futures::stream::iter((0..64).map(|_| Ok::<_, std::io::Error>(vec![b'x'; 1 << 20])));
        axum::body::Body::from_stream(chunks)
    };
    let router = axum::Router::new()
        .route("/v1/data/objects", get(move || async move { axum::Json(objects) }))
        .route("/endless", get(endless));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    url
}

fn object(key: &str, size: u64) -> serde_json::Value {
    serde_json::json!({
        "key": key, "uri": format!("local://lab/acme/{key}"), "size": size,
        "download": {"method": "GET", "url": "/endless", "via": "gateway"},
    })
}

async fn get_from(gateway: &str, uri: &str, dir: &std::path::Path) -> std::process::Output {
    let mut command = tokio::process::Command::new(crate::common::BIN);
    command
        .args(["data", "get", uri, dir.to_str().unwrap()])
        .env("HYBROKER_GATEWAY", gateway)
        .env("HYBROKER_TOKEN", "any-key")
        .env_remove("HYBROKER_CA_CERT")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    tokio::time::timeout(crate::common::DEADLINE, command.output()).await.expect("hybroker data get finishes").unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_trusts_neither_the_keys_nor_the_bytes_of_a_hostile_gateway() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("dl");
    std::fs::create_dir_all(&dir).unwrap();

    // Keys that leave the directory: refused before anything is written.
    for key in ["../escape.txt", "/tmp/abs.txt", "a/../../escape.txt"] {
        let gateway = hostile_gateway(serde_json::json!({"objects": [object("ok.txt", 1), object(key, 1)]})).await;
        let out = get_from(&gateway, "local://lab/acme/", &dir).await;
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{key}: {stderr}");
        assert!(stderr.contains("cannot be written safely"), "{key}: {stderr}");
        assert!(!root.path().join("escape.txt").exists() && !std::path::Path::new("/tmp/abs.txt").exists());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "{key}: nothing written");
    }

    // A body longer than the listed size: the download stops there and leaves no file.
    let gateway = hostile_gateway(serde_json::json!({"objects": [object("big.bin", 1024)]})).await;
    let out = get_from(&gateway, "local://lab/acme/", &dir).await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("sent more than the object's 1024 bytes"), "{stderr}");
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn uris_and_keys_that_reach_for_another_tenants_objects_are_refused() {
    let dc = DataCluster::start(None).await;
    let globex = dc.cluster.tenant_key("globex");
    let file = dc.cluster.path("secret.txt");
    std::fs::write(&file, "globex secret").unwrap();
    let out =
        tenant_cli_as(&dc, &globex, &["data", "put", file.to_str().unwrap(), "local://lab/globex/secret.txt"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(read_status(&dc.gateway.url, &globex, "local://lab/globex/secret.txt").await, StatusCode::OK);

    // acme's prefix is local://lab/acme/: every spelling that reaches outside it is refused.
    for uri in [
        "local://lab/globex/secret.txt",
        "local://lab/acme/../globex/secret.txt",
        "local://lab/acme/%2e%2e/globex/secret.txt",
        "local://lab/acme/..%2fglobex/secret.txt",
        "local://lab/acme%2f..%2fglobex/secret.txt",
        "local://lab/acme//../globex/secret.txt",
        "local://lab/acme\\..\\globex/secret.txt",
        "local://lab/acme/./../globex/secret.txt",
        "local://lab/acmeglobex/secret.txt",
        "local://lab/acme",
        "local://lab/",
        "local://lab/acme/\u{ff0e}\u{ff0e}/globex/secret.txt",
        "local://lab@127.0.0.1:1/acme/x",
        "s3://lab/acme/x",
        "http://169.254.169.254/latest/meta-data/",
        "file:///etc/passwd",
    ] {
        let status = read_status(&dc.gateway.url, &dc.acme, uri).await;
        assert!(
            [StatusCode::BAD_REQUEST, StatusCode::FORBIDDEN, StatusCode::NOT_FOUND].contains(&status),
            "{uri}: {status}"
        );
        let list = reqwest::Client::new()
            .get(format!("{}/v1/data/objects", dc.gateway.url))
            .bearer_auth(&dc.acme)
            .query(&[("uri", uri)])
            .send()
            .await
            .unwrap();
        let (status, body) = (list.status(), list.text().await.unwrap());
        assert!(
            status == StatusCode::OK && !body.contains("secret") || status.is_client_error(),
            "{uri}: {status} {body}"
        );
    }

    // A job's output key cannot climb out of its attempt's prefix; another tenant's job is 404.
    let id = dc
        .run_job("name: w\ncommand: [\"sh\", \"-c\", \"mkdir out && echo hi > out/a.txt\"]\noutputs: [{path: out/, to: 'local://lab/acme/r/'}]\n")
        .await;
    let client = reqwest::Client::new();
    for key in [
        "a.txt",
        "../attempt-0/a.txt",
        "..%2f..%2f..%2fglobex/secret.txt",
        "../../../../globex/secret.txt",
        "/a.txt",
        "./a.txt",
        "a.txt/",
    ] {
        let response = client
            .get(format!("{}/v1/jobs/{id}/outputs/0", dc.gateway.url))
            .bearer_auth(&dc.acme)
            .query(&[("key", key)])
            .send()
            .await
            .unwrap();
        // `%2f` is no separator here: the key is those characters, and no such object exists.
        let expected = match key {
            "a.txt" => StatusCode::OK,
            k if k.contains('%') => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        assert_eq!(response.status(), expected, "{key}");
    }
    let theirs = client
        .get(format!("{}/v1/jobs/{id}/outputs/0", dc.gateway.url))
        .bearer_auth(&globex)
        .query(&[("key", "a.txt")])
        .send()
        .await
        .unwrap();
    assert_eq!(theirs.status(), StatusCode::NOT_FOUND);
}

async fn tenant_cli_as(dc: &DataCluster, key: &str, args: &[&str]) -> std::process::Output {
    crate::common::tenant_cli(&dc.gateway, key, args).await
}

/// The broker's data service answers gateways and admins only: a stolen agent certificate (or a
/// tenant's own, were one issued) gets PERMISSION_DENIED on every call that reads or lists data,
/// and a gateway must name the tenant it acts for.
#[tokio::test(flavor = "multi_thread")]
async fn the_data_service_refuses_agents_and_a_gateway_that_names_no_tenant() {
    use hybroker::model::identity::Role;
    use hybroker::proto::{self, data_service_client::DataServiceClient};
    let dc = DataCluster::start(None).await;
    let file = dc.cluster.path("secret.txt");
    std::fs::write(&file, "acme's").unwrap();
    dc.ok(&["data", "put", file.to_str().unwrap(), "local://lab/acme/secret.txt"]).await;
    let client = |paths: hybroker::tls::TlsPaths| {
        let addr = dc.cluster.addr;
        async move {
            let config = hybroker::tls::client_config(&paths, crate::common::TRUST_DOMAIN, Role::Broker).unwrap();
            DataServiceClient::new(hybroker::tls::connect(&format!("https://{addr}"), config, None).await.unwrap())
        }
    };
    let read = |tenant: &str| proto::ReadObjectRequest {
        tenant: tenant.into(),
        uri: "local://lab/acme/secret.txt".into(),
        ..Default::default()
    };
    let list = |tenant: &str| proto::ListDataRequest { tenant: tenant.into(), uri: "local://lab/acme/".into() };

    let mut agent = client(dc.cluster.issue(Role::Agent, "stolen", Some("lab"))).await;
    let Err(denied) = agent.read_object(read("acme")).await else { panic!("an agent may not read tenants' data") };
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    let denied = agent.list_data(list("acme")).await.unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");

    let mut gateway = client(dc.cluster.issue(Role::Gateway, "gw-direct", None)).await;
    let refused = gateway.list_data(list("")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    let refused = gateway.list_data(list("globex")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "globex may not list acme's prefix: {refused:?}");
    let listed = gateway.list_data(list("acme")).await.unwrap().into_inner();
    assert_eq!(listed.objects.len(), 1, "the same call for the owner succeeds: {listed:?}");
}
