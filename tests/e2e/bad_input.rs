//! Invalid job specs are refused with clear errors naming the field, and nothing is stored.

use std::time::Duration;

use hybroker::proto::{self, SpecFormat};
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_refused_and_nothing_is_stored() {
    let cluster = Cluster::start(Duration::from_secs(5), &[]).await;
    let mut admin = cluster.admin().await;
    let cases: &[(&str, &str)] = &[
        ("command: [echo]\n", "name"),
        ("name: x\n", "command"),
        ("name: x\ncommand: []\n", "command"),
        ("name: x\ncommand: [echo]\nresources: {gpus: 65}\n", "resources.gpus"),
        ("name: x\ncommand: [echo]\nresources: {cpus: 0}\n", "resources.cpus"),
        ("name: x\ncommand: [echo]\nresources: {memory_gib: 0}\n", "resources.memory_gib"),
        ("name: x\ncommand: [echo]\nresources: {gpus: 1, gpu_model: [H100]}\n", "resources.gpu_model[0]"),
        ("name: x\ncommand: [echo]\nresources: {gpus: -1}\n", "resources.gpus"),
        ("name: x\ncommand: [echo]\nresources: {gpu: 1}\n", "gpu"),
        ("name: x\ncommand: [echo]\nmax_runtime: soon\n", "max_runtime"),
        ("name: x\ncommand: [echo]\nmax_runtime: 1m\nexpected_runtime: 2m\n", "expected_runtime"),
        ("name: x\ncommand: [echo]\nmax_attempts: 0\n", "max_attempts"),
        ("name: x\ncommand: [echo]\npriority: 101\n", "priority"),
        ("name: x\ncommand: [echo]\nenv: {HYBROKER_JOB_ID: x}\n", "env.HYBROKER_JOB_ID"),
        ("name: x\ncommand: [echo]\nenv: {1BAD: x}\n", "env.1BAD"),
        ("name: x\ncommand: [echo]\npolicy: {spot: sometimes}\n", "spot"),
        ("name: x\ncommand: [echo]\npolicy: {clouds: [gcp]}\n", "clouds"),
        ("name: x\ncommand: [echo]\ninputs: [{uri: 'https://evil.example/x', path: data/}]\n", "inputs[0].uri"),
        ("name: x\ncommand: [echo]\ninputs: [{uri: 'file:///etc/passwd', path: data/}]\n", "inputs[0].uri"),
        ("name: x\ncommand: [echo]\ninputs: [{uri: 's3://user@bucket/x', path: data/}]\n", "inputs[0].uri"),
        ("name: x\ncommand: [echo]\ninputs: [{uri: 's3://bucket/%2e%2e/x', path: data/}]\n", "inputs[0].uri"),
        ("name: x\ncommand: [echo]\ninputs: [{uri: 's3://bucket/x', path: ../up}]\n", "inputs[0].path"),
        ("name: x\ncommand: [echo]\npolicy: {residency: eu}\n", "cannot enforce a placement policy"),
        ("name: [x\n", "YAML"),
    ];
    for (spec, expected) in cases {
        let err = submit_keyed(&mut admin, spec, "").await.expect_err(spec);
        assert_eq!(err.code(), Code::InvalidArgument, "{spec}: {err:?}");
        assert!(err.message().contains(expected), "{spec}: message {:?} should name {expected:?}", err.message());
    }
    // Oversized, a bad format and a bad idempotency key.
    let huge = format!("name: x\ncommand: [echo, '{}']\n", "a".repeat(70_000));
    let err = submit_keyed(&mut admin, &huge, "").await.unwrap_err();
    assert!(err.message().contains("more than the 65536 allowed"), "{err:?}");
    let request = proto::SubmitRequest { spec: b"{}".to_vec(), format: 7, ..Default::default() };
    assert!(admin.submit(request).await.unwrap_err().message().contains("format"));
    let request =
        proto::SubmitRequest { spec: b"not json".to_vec(), format: SpecFormat::Json.into(), ..Default::default() };
    assert!(admin.submit(request).await.unwrap_err().message().contains("JSON"));
    let err = submit_keyed(&mut admin, "name: x\ncommand: [echo]\n", "has space").await.unwrap_err();
    assert!(err.message().contains("idempotency_key"));
    let err =
        admin.list(proto::ListJobsRequest { states: vec!["done".into()], ..Default::default() }).await.unwrap_err();
    assert!(err.message().contains("unknown job state"), "{err:?}");

    let jobs = admin.list(proto::ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert!(jobs.is_empty(), "nothing was stored: {jobs:?}");
}
