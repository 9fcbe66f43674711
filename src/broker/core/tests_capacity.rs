//! Cloud capacity in the core with plain values: launch intents written before the calls, a
//! capacity error leaving its pool out of placement (the job goes to the next candidate, with the
//! reason), launch tokens that enrol only once bound, and a restarted core that lists before it
//! re-sends or gives up.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};

use super::tests::{Harness, K1, settings};
use super::*;
use crate::capacity::{Instance, InstanceState, ProviderError};
use crate::config::{BrokerConfig, parse_toml};
use crate::model::price::{Market, PriceSnapshot};
use crate::store::IdentityWrite;

/// AWS us-east-1 (p5) and Azure eastus (ND96isr H100), both elastic through the local provider.
fn capacity_harness() -> Harness {
    let text = "[broker]\nlisten = \"127.0.0.1:1\"\n[tls]\nca_cert = \"a\"\ncert = \"b\"\nkey = \"c\"\n\
        [store]\npath = \"x.db\"\n\
        [[residency]]\nname = \"us\"\naws = [\"us-east-1\"]\nazure = [\"eastus\"]\n\
        [[site]]\nname = \"aws-us-east-1\"\nkind = \"aws\"\nregion = \"us-east-1\"\nresidency = \"us\"\n\
        instance_types = [\"p5.48xlarge\"]\n[site.capacity]\nprovider = \"local\"\n\
        [[site]]\nname = \"azure-eastus\"\nkind = \"azure\"\nregion = \"eastus\"\nresidency = \"us\"\n\
        instance_types = [\"Standard_ND96isr_H100_v5\"]\n[site.capacity]\nprovider = \"local\"\n";
    let config: BrokerConfig = parse_toml(text, Path::new("t.toml"), []).unwrap();
    let snapshot: PriceSnapshot = serde_json::from_str(include_str!("../../../config/prices/snapshot.json")).unwrap();
    let (_keep, prices) = watch::channel(Arc::new(snapshot));
    let mut s = settings(K1);
    s.placer = Arc::new(crate::broker::placer::Placer::new(&config, prices));
    let now = Now::system();
    Harness { core: Core::new(s, now), now }
}

/// One controller step: the calls the core asks for (released after the commit).
fn step(
    h: &mut Harness,
    results: Vec<CallResult>,
    listed: Vec<(String, Result<Vec<Instance>, ProviderError>)>,
) -> (StepReply, Effects) {
    let (reply, mut rx) = oneshot::channel();
    let out = h.step(vec![Cmd::Capacity(CapacityCmd::Step { results, listed, reply })]);
    (rx.try_recv().expect("the step answers after its commit"), out)
}

fn launches(out: &Effects) -> Vec<crate::store::LaunchRecord> {
    out.batch
        .writes
        .iter()
        .filter_map(|w| match w {
            Write::Identity(IdentityWrite::Launch(l)) => Some(l.clone()),
            _ => None,
        })
        .collect()
}

fn launch_call(reply: &StepReply) -> (String, String, String, Market, String) {
    match reply.calls.as_slice() {
        [Call::Launch { launch_id, site, instance_type, market, token }] => {
            (launch_id.clone(), site.clone(), instance_type.clone(), *market, token.clone())
        }
        calls => panic!("one launch expected, got {calls:?}"),
    }
}

const BIG: &str = "name: big\ncommand: [\"true\"]\nresources: {gpus: 8, cpus: 4, memory_gib: 16}\n";

#[test]
fn a_launch_is_written_with_its_token_before_it_is_asked_for() {
    let mut h = capacity_harness();
    let (id, _) = h.submit_ok(BIG);
    assert_eq!(h.core.jobs[&id].site.as_deref(), Some("aws-us-east-1"), "p5 is cheaper than ND96isr");
    let (reply, out) = step(&mut h, vec![], vec![]);
    let (launch_id, site, ty, market, token) = launch_call(&reply);
    assert_eq!((site.as_str(), ty.as_str(), market), ("aws-us-east-1", "p5.48xlarge", Market::OnDemand));
    let written = launches(&out);
    assert_eq!(written.len(), 1);
    assert_eq!((written[0].launch_id.as_str(), written[0].state.as_str()), (launch_id.as_str(), "requested"));
    let token_written = out.batch.writes.iter().any(
        |w| matches!(w, Write::Identity(IdentityWrite::NewJoinToken(t)) if t.launch_id == launch_id && t.uses_left == 1),
    );
    assert!(token_written, "the launch's single-use token is in the same batch");
    // The launch is counted as capacity: the next step launches nothing more.
    let (again, _) = step(&mut h, vec![], vec![]);
    assert!(again.calls.is_empty(), "{:?}", again.calls);
    // Before the cloud answers, the token enrols nobody; after, exactly the instance.
    let check = |h: &mut Harness| {
        let (tx, mut rx) = oneshot::channel();
        let token = JoinToken::parse(&token).unwrap();
        h.step(vec![Cmd::Token(TokenCmd::Check { token, reply: tx })]);
        rx.try_recv().unwrap()
    };
    assert_eq!(check(&mut h), Err(Refusal::Unbound));
    let instance = Instance {
        instance_id: "i-0abc".into(),
        launch_id: Some(launch_id.clone()),
        site: Some("aws-us-east-1".into()),
        instance_type: "p5.48xlarge".into(),
        market: Market::OnDemand,
        state: InstanceState::Pending,
        launched_at: None,
    };
    let (_, out) = step(&mut h, vec![CallResult::Launched { launch_id, result: Ok(instance) }], vec![]);
    assert_eq!(launches(&out)[0].instance_id, "i-0abc");
    assert_eq!(check(&mut h).map(|s| s.node), Ok(Some("i-0abc".to_string())));
}

#[test]
fn a_capacity_error_sends_the_job_to_the_next_candidate_with_the_reason() {
    let mut h = capacity_harness();
    let (id, _) = h.submit_ok(BIG);
    let (reply, _) = step(&mut h, vec![], vec![]);
    let (launch_id, ..) = launch_call(&reply);
    let ice = ProviderError::Capacity {
        code: "InsufficientInstanceCapacity".into(),
        message: "We currently do not have sufficient p5.48xlarge capacity".into(),
    };
    let (reply, out) = step(&mut h, vec![CallResult::Launched { launch_id, result: Err(ice) }], vec![]);
    assert_eq!(launches(&out)[0].state, "failed");
    let job = &h.core.jobs[&id];
    assert_eq!(job.site.as_deref(), Some("azure-eastus"), "placed again, elsewhere");
    let decision = job.decision.as_ref().unwrap();
    let aws = decision.candidates.iter().find(|c| c.site == "aws-us-east-1").unwrap();
    let crate::placement::engine::Verdict::Rejected(why) = &aws.verdict else { panic!("{aws:?}") };
    assert!(
        why.as_str().starts_with("unavailable: p5.48xlarge on-demand since 0s ago: InsufficientInstanceCapacity"),
        "{why:?}"
    );
    assert!(reply.calls.is_empty(), "nothing more in the pool just left out: {:?}", reply.calls);
    let (reply, _) = step(&mut h, vec![], vec![]);
    let (_, site, ty, ..) = launch_call(&reply);
    assert_eq!((site.as_str(), ty.as_str()), ("azure-eastus", "Standard_ND96isr_H100_v5"));
}

#[test]
fn a_restarted_core_adopts_a_listed_instance_and_gives_up_an_unlisted_launch() {
    let mut h = capacity_harness();
    h.submit_ok(BIG);
    h.submit_ok(BIG);
    let (reply, out) = step(&mut h, vec![], vec![]);
    assert_eq!(reply.calls.len(), 2);
    // The broker dies before either launch answers; the store holds both intents.
    let stored = launches(&out);
    let mut restarted = capacity_harness();
    restarted.core.cloud = capacity::Capacity::load(stored.clone(), restarted.now);
    let found = Instance {
        instance_id: "i-found".into(),
        launch_id: Some(stored[0].launch_id.clone()),
        site: Some("aws-us-east-1".into()),
        instance_type: "p5.48xlarge".into(),
        market: Market::OnDemand,
        state: InstanceState::Running,
        launched_at: None,
    };
    let listed = vec![("aws-us-east-1".to_string(), Ok(vec![found])), ("azure-eastus".to_string(), Ok(vec![]))];
    let (_, out) = step(&mut restarted, vec![], listed);
    let by_id = |id: &str| launches(&out).into_iter().find(|l| l.launch_id == id).unwrap();
    assert_eq!(by_id(&stored[0].launch_id).state, "booting");
    assert_eq!(by_id(&stored[0].launch_id).instance_id, "i-found");
    assert_eq!(by_id(&stored[1].launch_id).state, "failed", "no instance and no token to re-send: given up");
}
