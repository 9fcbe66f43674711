//! The EC2 capacity provider against moto's EC2 behind the fault-injecting proxy (`ec2_proxy.rs`):
//! launches (on-demand, spot, tags, IMDSv2, user data that cloud-init can play), listing by tag,
//! termination, idempotent launches, error classes, subnets in turn, and a lost reply found again
//! by its launch tag. moto is shared by the test binary: every test uses its own broker name.

use std::collections::BTreeSet;

use hybroker::capacity::aws::{AwsProvider, AwsSettings};
use hybroker::capacity::user_data::{Boot, play, render};
use hybroker::capacity::{
    Instance, InstanceState, LaunchSpec, Provider, ProviderError, TAG_BROKER, TAG_LAUNCH, TAG_SITE,
};
use hybroker::model::capacity::AwsLaunch;
use hybroker::model::price::Market;

use crate::ec2_proxy::{Ec2Proxy, Fault, param};
use crate::emulators::{Moto, moto, unique_name};

const SITE: &str = "aws-us-east-1";
/// One of moto's stock images (moto does not check it either).
const IMAGE: &str = "ami-12c6146b";

struct Fixture {
    moto: &'static Moto,
    proxy: Ec2Proxy,
    broker: String,
    subnets: Vec<String>,
}

impl Fixture {
    async fn new(name: &str) -> Fixture {
        let moto = moto().await;
        let proxy = Ec2Proxy::start(&moto.endpoint()).await;
        let subnets = moto.ec2_default_subnets().await;
        assert!(subnets.len() >= 2, "moto has default subnets in several zones: {subnets:?}");
        Fixture { moto, proxy, broker: unique_name(name), subnets }
    }

    /// Settings of this test's broker at `site`, launching into `subnets`.
    fn settings(&self, broker: &str, site: &str, subnets: &[String]) -> AwsSettings {
        AwsSettings {
            site: site.into(),
            region: Moto::REGION.into(),
            broker: broker.into(),
            launch: AwsLaunch {
                image_id: Some(IMAGE.into()),
                subnets: subnets.to_vec(),
                endpoint: Some(self.proxy.endpoint()),
                ..AwsLaunch::default()
            },
            static_credentials: Some((Moto::ACCESS_KEY.into(), Moto::SECRET_KEY.into())),
        }
    }

    /// A provider for this test's broker and [`SITE`] with the first subnet.
    async fn provider(&self) -> AwsProvider {
        self.provider_with(&self.broker, SITE, &self.subnets[..1]).await
    }

    async fn provider_with(&self, broker: &str, site: &str, subnets: &[String]) -> AwsProvider {
        AwsProvider::new(self.settings(broker, site, subnets)).await.unwrap()
    }

    fn spec(&self, launch: &str, market: Market) -> LaunchSpec {
        spec_for(&self.broker, SITE, launch, market)
    }
}

fn spec_for(broker: &str, site: &str, launch: &str, market: Market) -> LaunchSpec {
    LaunchSpec {
        launch_id: launch.into(),
        broker: broker.into(),
        site: site.into(),
        instance_type: "p5.48xlarge".into(),
        market,
        user_data: "#cloud-config\nwrite_files: []\n".into(),
    }
}

/// A launch id no other test uses.
fn launch_id() -> String {
    let n = unique_name("l").trim_start_matches("l-").parse::<u64>().unwrap();
    format!("hbl-{:08x}{n:08x}", std::process::id())
}

fn ids(instances: &[Instance]) -> BTreeSet<String> {
    instances.iter().map(|i| i.instance_id.clone()).collect()
}

#[tokio::test]
async fn capacity_aws_launches_on_demand_and_spot_with_tags_imdsv2_and_user_data_cloud_init_can_play() {
    let f = Fixture::new("aws-launch").await;
    let provider = f.provider().await;
    let ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    let launch = launch_id();
    let boot = Boot {
        launch_id: &launch,
        site: SITE,
        cloud: Some("aws"),
        node: None,
        token: "hbj_0123_secret",
        trust_domain: "test.hybroker.local",
        enroll_url: "https://127.0.0.1:7444",
        broker_url: "https://127.0.0.1:7443",
        server_name: None,
        ca_bundle: ca,
    };
    let on_demand = LaunchSpec { user_data: render(&boot), ..f.spec(&launch, Market::OnDemand) };
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let instance = provider.launch(&on_demand).await.unwrap();
    assert!(instance.instance_id.starts_with("i-"), "{instance:?}");
    assert_eq!(instance.launch_id.as_deref(), Some(launch.as_str()));
    assert_eq!(instance.site.as_deref(), Some(SITE));
    assert_eq!((instance.instance_type.as_str(), instance.market), ("p5.48xlarge", Market::OnDemand));
    assert!(matches!(instance.state, InstanceState::Pending | InstanceState::Running), "{instance:?}");
    let launched_at = instance.launched_at.expect("a launch time");
    assert!((launched_at - started).abs() < 120_000, "launched at {launched_at}, asked at {started}");

    let seen = f.moto.ec2_launched(&launch).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let seen = &seen[0];
    assert_eq!(seen.instance_id, instance.instance_id);
    let name = format!("hybroker-{SITE}-{launch}");
    let want_tags =
        [("Name", name.as_str()), (TAG_BROKER, f.broker.as_str()), (TAG_SITE, SITE), (TAG_LAUNCH, launch.as_str())];
    let want_tags = want_tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    assert_eq!(seen.tags, want_tags);
    assert_eq!((seen.lifecycle.as_deref(), seen.http_tokens.as_str()), (None, "required"), "on-demand, IMDSv2 only");
    assert_eq!((seen.client_token.as_str(), seen.image_id.as_str()), (launch.as_str(), IMAGE));
    assert_eq!(seen.subnet_id, f.subnets[0]);

    // The user data comes back as it was sent, and cloud-init's part can be played from it.
    let user_data = f.moto.ec2_user_data(&instance.instance_id).await;
    assert_eq!(user_data, on_demand.user_data);
    let root = tempfile::tempdir().unwrap();
    let played = play(&user_data, root.path()).unwrap();
    let join = std::fs::read_to_string(&played.join_file).unwrap();
    assert!(join.contains("hbj_0123_secret") && join.contains(ca.trim()), "{join}");
    assert!(std::fs::read_to_string(&played.agent_config).unwrap().contains("cloud = \"aws\""));

    let spot_launch = launch_id();
    let spot = provider.launch(&f.spec(&spot_launch, Market::Spot)).await.unwrap();
    assert_eq!(spot.market, Market::Spot);
    assert_eq!(f.moto.ec2_launched(&spot_launch).await[0].lifecycle.as_deref(), Some("spot"));

    let listed = provider.list().await.unwrap();
    let markets: BTreeSet<_> = listed.iter().map(|i| (i.instance_id.clone(), i.market, i.launch_id.clone())).collect();
    let want = BTreeSet::from([
        (instance.instance_id.clone(), Market::OnDemand, Some(launch.clone())),
        (spot.instance_id.clone(), Market::Spot, Some(spot_launch.clone())),
    ]);
    assert_eq!(markets, want);

    // What went on the wire: volumes tagged too, no instance profile unless configured.
    let requests = f.proxy.run_requests();
    assert_eq!(requests.len(), 2);
    for request in &requests {
        assert_eq!(param(request, "TagSpecification.2.ResourceType"), Some("volume"));
        assert_eq!(param(request, "TagSpecification.2.Tag.4.Value"), param(request, "ClientToken"));
        assert!(request.iter().all(|(k, _)| !k.starts_with("IamInstanceProfile")), "{request:?}");
    }
    assert_eq!(param(&requests[1], "InstanceMarketOptions.SpotOptions.SpotInstanceType"), Some("one-time"));
}

#[tokio::test]
async fn capacity_aws_lists_only_its_brokers_live_instances_of_its_site_over_every_page() {
    let f = Fixture::new("aws-list").await;
    let ours = f.provider().await;
    let other_broker = unique_name("aws-list-other");
    let theirs = f.provider_with(&other_broker, SITE, &f.subnets[..1]).await;
    let other_site = "aws-us-east-2";
    let elsewhere = f.provider_with(&f.broker, other_site, &f.subnets[..1]).await;

    let mut launched = Vec::new();
    for _ in 0..3 {
        launched.push(ours.launch(&f.spec(&launch_id(), Market::OnDemand)).await.unwrap());
    }
    theirs.launch(&spec_for(&other_broker, SITE, &launch_id(), Market::OnDemand)).await.unwrap();
    elsewhere.launch(&spec_for(&f.broker, other_site, &launch_id(), Market::Spot)).await.unwrap();
    let gone = launched.pop().unwrap();
    ours.terminate(&gone.instance_id).await.unwrap();

    f.proxy.page_size(1);
    let before = f.proxy.counts().describe;
    let listed = ours.list().await.unwrap();
    assert_eq!(ids(&listed), ids(&launched), "only this broker's live instances of its site");
    assert!(listed.iter().all(|i| i.site.as_deref() == Some(SITE) && i.state != InstanceState::Terminated));
    assert!(f.proxy.counts().describe - before >= 2, "one instance per page: the next token was followed");
    assert_eq!(theirs.list().await.unwrap().len(), 1);
    assert_eq!(elsewhere.list().await.unwrap().len(), 1);
}

#[tokio::test]
async fn capacity_aws_terminating_twice_or_an_unknown_instance_succeeds() {
    let f = Fixture::new("aws-terminate").await;
    let provider = f.provider().await;
    let launch = launch_id();
    let instance = provider.launch(&f.spec(&launch, Market::Spot)).await.unwrap();
    provider.terminate(&instance.instance_id).await.unwrap();
    provider.terminate(&instance.instance_id).await.unwrap();
    provider.terminate("i-0123456789abcdef0").await.unwrap();
    assert_eq!(f.moto.ec2_launched(&launch).await[0].state, "terminated");
    assert!(provider.list().await.unwrap().is_empty());
}

#[tokio::test]
async fn capacity_aws_the_same_launch_id_twice_makes_one_instance() {
    let f = Fixture::new("aws-idempotent").await;
    let provider = f.provider().await;
    let launch = launch_id();
    let first = provider.launch(&f.spec(&launch, Market::OnDemand)).await.unwrap();
    let again = provider.launch(&f.spec(&launch, Market::OnDemand)).await.unwrap();
    assert_eq!(again.instance_id, first.instance_id);

    let together = launch_id();
    let spec = f.spec(&together, Market::Spot);
    let (a, b) = tokio::join!(provider.launch(&spec), provider.launch(&spec));
    assert_eq!(a.unwrap().instance_id, b.unwrap().instance_id);
    assert_eq!(f.proxy.counts().run_received, 4);
    assert_eq!(f.proxy.counts().run_forwarded, 2, "one instance per launch id reached moto");
    assert_eq!(f.moto.ec2_launched(&launch).await.len(), 1);
    assert_eq!(f.moto.ec2_launched(&together).await.len(), 1);

    // The configuration changed before the retry: EC2 refuses the token's reuse, the provider
    // finds the launch's instance by its tag.
    let changed = LaunchSpec { instance_type: "p4d.24xlarge".into(), ..f.spec(&launch, Market::OnDemand) };
    let found = provider.launch(&changed).await.unwrap();
    assert_eq!((found.instance_id.as_str(), found.instance_type.as_str()), (first.instance_id.as_str(), "p5.48xlarge"));
    assert_eq!(f.proxy.counts().run_forwarded, 2);
    assert_eq!(provider.list().await.unwrap().len(), 2);
}

#[tokio::test]
async fn capacity_aws_capacity_quota_throttle_and_invalid_errors_are_classified() {
    let f = Fixture::new("aws-errors").await;
    let provider = f.provider().await;
    let cases = [
        (Fault::insufficient_capacity(), "capacity", "InsufficientInstanceCapacity"),
        (Fault::error(500, "InsufficientCapacity"), "capacity", "InsufficientCapacity"),
        (Fault::error(400, "SpotMaxPriceTooLow"), "capacity", "SpotMaxPriceTooLow"),
        (Fault::error(400, "VcpuLimitExceeded"), "quota", "VcpuLimitExceeded"),
        (Fault::error(400, "MaxSpotInstanceCountExceeded"), "quota", "MaxSpotInstanceCountExceeded"),
        (Fault::throttled(), "throttled", "RequestLimitExceeded"),
        (Fault::error(400, "InvalidAMIID.NotFound"), "invalid", "InvalidAMIID.NotFound"),
        (Fault::error(401, "AuthFailure"), "invalid", "AuthFailure"),
        (Fault::error(403, "UnauthorizedOperation"), "invalid", "UnauthorizedOperation"),
        (Fault::error(500, "InternalError"), "transient", "transient"),
    ];
    for (fault, class, code) in cases {
        f.proxy.script([fault.clone()]);
        let error = provider.launch(&f.spec(&launch_id(), Market::Spot)).await.unwrap_err();
        assert_eq!((error.class(), error.code()), (class, code), "{fault:?}: {error}");
        assert_eq!(error.retryable(), matches!(class, "throttled" | "transient"), "{error}");
    }
    assert_eq!(f.proxy.counts().run_forwarded, 0);
    assert!(f.moto.ec2_instances(&[("tag:hybroker-broker", f.broker.as_str())]).await.is_empty());

    // A bad subnet, as moto itself answers it.
    let bad = f.provider_with(&f.broker, SITE, &["subnet-0000000000000bad".to_owned()]).await;
    let error = bad.launch(&f.spec(&launch_id(), Market::OnDemand)).await.unwrap_err();
    assert_eq!((error.class(), error.code()), ("invalid", "InvalidSubnetID.NotFound"), "{error}");
    // With the faults used up, the same provider launches.
    assert_eq!(f.proxy.faults_left(), 0);
    provider.launch(&f.spec(&launch_id(), Market::Spot)).await.unwrap();
}

#[tokio::test]
async fn capacity_aws_a_capacity_error_in_the_first_subnet_launches_in_the_second() {
    let f = Fixture::new("aws-subnets").await;
    let provider = f.provider_with(&f.broker, SITE, &f.subnets[..2]).await;
    f.proxy.script([Fault::insufficient_capacity()]);
    let launch = launch_id();
    let instance = provider.launch(&f.spec(&launch, Market::OnDemand)).await.unwrap();
    let seen = f.moto.ec2_launched(&launch).await;
    assert_eq!((seen.len(), seen[0].instance_id.as_str()), (1, instance.instance_id.as_str()));
    assert_eq!(seen[0].subnet_id, f.subnets[1], "launched in the second subnet");
    let requests = f.proxy.run_requests();
    let tried: Vec<_> = requests.iter().map(|r| param(r, "SubnetId").unwrap().to_owned()).collect();
    assert_eq!(tried, f.subnets[..2]);
    // Its retry (a lost answer) starts in the first subnet again: the token's launch had another
    // subnet, EC2 answers IdempotentParameterMismatch, the instance is found by its tag.
    let again = provider.launch(&f.spec(&launch, Market::OnDemand)).await.unwrap();
    assert_eq!(again.instance_id, instance.instance_id);
    assert_eq!(f.moto.ec2_launched(&launch).await.len(), 1);

    // No capacity in either: a capacity error naming both.
    f.proxy.script([Fault::insufficient_capacity(), Fault::error(500, "InsufficientInstanceCapacity")]);
    let error = provider.launch(&f.spec(&launch_id(), Market::Spot)).await.unwrap_err();
    let ProviderError::Capacity { code, message } = &error else { panic!("not a capacity error: {error}") };
    assert_eq!(code, "InsufficientInstanceCapacity");
    assert!(message.contains(&f.subnets[0]) && message.contains(&f.subnets[1]), "{message}");

    // A quota is the account's: the next subnet is not tried.
    f.proxy.script([Fault::error(400, "VcpuLimitExceeded")]);
    let received = f.proxy.counts().run_received;
    let error = provider.launch(&f.spec(&launch_id(), Market::OnDemand)).await.unwrap_err();
    assert_eq!(error.class(), "quota");
    assert_eq!(f.proxy.counts().run_received, received + 1);
    assert_eq!(f.proxy.counts().run_forwarded, 1);
}

#[tokio::test]
async fn capacity_aws_a_dropped_reply_leaves_an_instance_that_list_finds_by_its_launch_tag() {
    let f = Fixture::new("aws-dropped").await;
    let provider = f.provider().await;
    f.proxy.script([Fault::DropReply]);
    let launch = launch_id();
    let error = provider.launch(&f.spec(&launch, Market::OnDemand)).await.unwrap_err();
    assert_eq!(error.class(), "transient", "{error}");
    assert_eq!(f.proxy.counts().run_forwarded, 1, "moto made the instance");

    let listed = provider.list().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].launch_id.as_deref(), Some(launch.as_str()));
    let again = provider.launch(&f.spec(&launch, Market::OnDemand)).await.unwrap();
    assert_eq!(again.instance_id, listed[0].instance_id, "the retry answers with the first instance");
    assert_eq!(f.proxy.counts().run_forwarded, 1);
    assert_eq!(f.moto.ec2_launched(&launch).await.len(), 1);
}
