//! The `azure` capacity provider against the Resource Manager and Entra fixture
//! (`arm_fixture.rs`: HTTPS with a test CA, the real wire format): the create bodies Azure
//! documents (on-demand, spot, disks and NIC deleted with the VM), the operation followed, list by
//! tag across pages, delete, a repeated launch, throttling, quota and allocation errors (the
//! latter only in the poll), and the three token credentials — the managed identity in a network
//! namespace of its own that owns 169.254.169.254.

use std::time::{Duration, Instant};

use hybroker::capacity::azure::{AzureProvider, AzureSettings, ResolvedCredential};
use hybroker::capacity::user_data::{self, Boot};
use hybroker::capacity::{InstanceState, LaunchSpec, Provider, ProviderError, TAG_BROKER, TAG_LAUNCH, TAG_SITE};
use hybroker::model::capacity::AzureLaunch;
use hybroker::model::price::Market;
use serde_json::json;

use crate::arm_fixture::{self, ArmFixture, Fault, Logged};
use crate::common::DEADLINE;

const SITE: &str = "azure-westeurope";
const BROKER: &str = "broker-test";

fn provider_with(launch: AzureLaunch, credential: ResolvedCredential) -> AzureProvider {
    let settings =
        AzureSettings { site: SITE.into(), location: "westeurope".into(), broker: BROKER.into(), launch, credential };
    AzureProvider::new(settings).unwrap()
}

fn provider(fixture: &ArmFixture) -> AzureProvider {
    provider_with(fixture.launch_settings(), ArmFixture::client_secret())
}

fn spec(launch_id: &str, market: Market) -> LaunchSpec {
    let boot = Boot {
        launch_id,
        site: SITE,
        cloud: Some("azure"),
        node: None,
        token: "hbj_0123456789abcdef_secret",
        trust_domain: "hybroker.test",
        enroll_url: "https://broker.test:7443",
        broker_url: "https://broker.test:7070",
        server_name: None,
        ca_bundle: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    };
    LaunchSpec {
        launch_id: launch_id.into(),
        broker: BROKER.into(),
        site: SITE.into(),
        instance_type: "Standard_NC24ads_A100_v4".into(),
        market,
        user_data: user_data::render(&boot),
    }
}

fn puts(requests: &[Logged]) -> Vec<&Logged> {
    requests.iter().filter(|r| r.method == "PUT").collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_vms_are_created_as_azure_documents_them_on_demand_and_spot() {
    let fixture = ArmFixture::start().await;
    let p = provider(&fixture);
    let on_demand = spec("hbl-00000000000000a1", Market::OnDemand);
    let instance = p.launch(&on_demand).await.unwrap();
    assert_eq!(instance.instance_id, "hbl-00000000000000a1");
    assert_eq!(instance.launch_id.as_deref(), Some("hbl-00000000000000a1"));
    assert_eq!(instance.site.as_deref(), Some(SITE));
    assert_eq!((instance.state, instance.market), (InstanceState::Running, Market::OnDemand));
    assert_eq!(instance.instance_type, "Standard_NC24ads_A100_v4");
    assert!(instance.launched_at.is_some_and(|t| t > 1_700_000_000_000), "{instance:?}");

    let requests = fixture.requests();
    let put = puts(&requests)[0];
    assert_eq!(
        put.path,
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/hbl-00000000000000a1",
            arm_fixture::SUBSCRIPTION,
            arm_fixture::GROUP
        )
    );
    assert_eq!(put.query, "api-version=2024-07-01");
    assert_eq!(put.if_none_match.as_deref(), Some("*"));
    let body = put.body.as_ref().unwrap();
    assert_eq!(body["location"], "westeurope");
    assert_eq!(body["tags"], json!({ TAG_BROKER: BROKER, TAG_SITE: SITE, TAG_LAUNCH: "hbl-00000000000000a1" }));
    let props = &body["properties"];
    assert_eq!(props["hardwareProfile"]["vmSize"], "Standard_NC24ads_A100_v4");
    assert_eq!(
        props["storageProfile"]["imageReference"],
        json!({ "publisher": "Canonical", "offer": "ubuntu-24_04-lts", "sku": "server", "version": "latest" })
    );
    assert_eq!(props["storageProfile"]["osDisk"]["createOption"], "FromImage");
    assert_eq!(props["storageProfile"]["osDisk"]["deleteOption"], "Delete");
    let os = &props["osProfile"];
    assert_eq!(
        (os["computerName"].as_str(), os["adminUsername"].as_str()),
        (Some("hbl-00000000000000a1"), Some("hybroker"))
    );
    assert_eq!(os["linuxConfiguration"]["disablePasswordAuthentication"], true);
    let key = &os["linuxConfiguration"]["ssh"]["publicKeys"][0];
    assert_eq!(key["path"], "/home/hybroker/.ssh/authorized_keys");
    assert!(key["keyData"].as_str().unwrap().starts_with("ssh-ed25519 "));
    let net = &props["networkProfile"];
    assert!(net["networkApiVersion"].as_str().is_some_and(|v| v.len() == 10), "{net}");
    let nic = &net["networkInterfaceConfigurations"][0]["properties"];
    assert_eq!(nic["deleteOption"], "Delete");
    assert_eq!(nic["ipConfigurations"][0]["properties"]["subnet"]["id"], json!(fixture.launch_settings().subnet_id));
    for absent in ["priority", "evictionPolicy", "billingProfile"] {
        assert!(props.get(absent).is_none(), "on-demand body has {absent}");
    }
    assert!(body.get("identity").is_none(), "no managed identity unless configured");
    // The creation's operation was polled before the launch returned.
    assert!(requests.iter().any(|r| r.method == "GET" && r.path.contains("/operations/")), "{requests:?}");

    // customData is the user data, and cloud-init (played here) gets the join file from it.
    let custom = fixture.custom_data("hbl-00000000000000a1").unwrap();
    assert_eq!(custom, on_demand.user_data);
    let root = tempfile::tempdir().unwrap();
    let played = user_data::play(&custom, root.path()).unwrap();
    assert!(std::fs::read_to_string(&played.join_file).unwrap().contains("hbj_0123456789abcdef_secret"));

    // Spot, with a user-assigned identity configured.
    let identity =
        "/subscriptions/s/resourceGroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/agents";
    let launch = AzureLaunch { managed_identity: Some(identity.into()), ..fixture.launch_settings() };
    let spot = provider_with(launch, ArmFixture::client_secret());
    let instance = spot.launch(&spec("hbl-00000000000000a2", Market::Spot)).await.unwrap();
    assert_eq!((instance.state, instance.market), (InstanceState::Running, Market::Spot));
    let requests = fixture.requests();
    let body = puts(&requests)[1].body.clone().unwrap();
    let props = &body["properties"];
    assert_eq!((props["priority"].as_str(), props["evictionPolicy"].as_str()), (Some("Spot"), Some("Delete")));
    assert_eq!(props["billingProfile"], json!({ "maxPrice": -1 }));
    assert_eq!(body["identity"], json!({ "type": "UserAssigned", "userAssignedIdentities": { identity: {} } }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_list_keeps_this_brokers_site_across_pages_and_terminate_deletes() {
    let fixture = ArmFixture::start().await;
    let p = provider(&fixture);
    for n in 1..=3 {
        p.launch(&spec(&format!("hbl-00000000000000b{n}"), Market::OnDemand)).await.unwrap();
    }
    fixture.insert_vm("other-broker", json!({ TAG_BROKER: "someone-else", TAG_SITE: SITE, TAG_LAUNCH: "hbl-1" }));
    fixture.insert_vm("other-site", json!({ TAG_BROKER: BROKER, TAG_SITE: "aws-eu-west-1", TAG_LAUNCH: "hbl-2" }));
    fixture.insert_vm("untagged", json!({}));
    let mut listed = p.list().await.unwrap();
    listed.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
    let names: Vec<_> = listed.iter().map(|i| i.instance_id.as_str()).collect();
    assert_eq!(names, ["hbl-00000000000000b1", "hbl-00000000000000b2", "hbl-00000000000000b3"]);
    assert!(listed.iter().all(|i| i.state == InstanceState::Running && i.launched_at.is_some()), "{listed:?}");
    assert!(
        fixture.requests().iter().any(|r| r.method == "GET" && r.query.contains("skiptoken")),
        "the second page (nextLink) was not read"
    );

    p.terminate("hbl-00000000000000b2").await.unwrap();
    assert!(fixture.vm("hbl-00000000000000b2").is_none(), "the delete's operation was not followed to its end");
    let requests = fixture.requests();
    assert!(requests.iter().any(|r| r.method == "DELETE" && r.path.ends_with("/hbl-00000000000000b2")));
    assert!(requests.iter().any(|r| r.method == "GET" && r.query.contains("monitor=true")), "Location not polled");
    assert_eq!(p.list().await.unwrap().len(), 2);
    // Gone already: still a success.
    p.terminate("hbl-00000000000000b2").await.unwrap();
    assert!(matches!(p.terminate("../escape").await, Err(ProviderError::Invalid { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_the_same_launch_twice_makes_one_vm() {
    let fixture = ArmFixture::start().await;
    let p = provider(&fixture);
    let s = spec("hbl-00000000000000c1", Market::Spot);
    let first = p.launch(&s).await.unwrap();
    let second = p.launch(&s).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(fixture.vm_names(), ["hbl-00000000000000c1"]);
    assert_eq!(puts(&fixture.requests()).len(), 2, "the repeat was not sent with If-None-Match");

    // A VM of that name that this broker did not launch is not taken for ours.
    fixture.insert_vm("hbl-00000000000000c2", json!({ TAG_BROKER: "someone-else" }));
    let err = p.launch(&spec("hbl-00000000000000c2", Market::OnDemand)).await.unwrap_err();
    assert_eq!(err.code(), "NameTaken", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_throttling_is_waited_out_for_retry_after_or_handed_back() {
    let fixture = ArmFixture::start().await;
    let p = provider(&fixture);
    fixture.fault(Fault::Throttle { retry_after_s: 1 });
    fixture.set_polls(1, 1);
    p.launch(&spec("hbl-00000000000000d1", Market::OnDemand)).await.unwrap();
    let requests = fixture.requests();
    let puts = puts(&requests);
    assert_eq!(puts.len(), 2);
    let waited = puts[1].at - puts[0].at;
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}, Retry-After was 1 s");
    // The operation's Retry-After (1 s) is honoured between polls too.
    let polls: Vec<_> = requests.iter().filter(|r| r.path.contains("/operations/")).collect();
    assert_eq!(polls.len(), 2, "{polls:?}");
    assert!(polls[0].at - puts[1].at >= Duration::from_secs(1) && polls[1].at - polls[0].at >= Duration::from_secs(1));

    // Longer than the provider waits: handed back with the wait, after one request.
    fixture.fault(Fault::Throttle { retry_after_s: 120 });
    let started = Instant::now();
    let err = p.launch(&spec("hbl-00000000000000d2", Market::OnDemand)).await.unwrap_err();
    assert_eq!(
        err,
        ProviderError::Throttled { code: "TooManyRequests".into(), retry_after: Some(Duration::from_secs(120)) }
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(err.retryable());
    assert!(fixture.vm("hbl-00000000000000d2").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_quota_and_allocation_errors_are_classified_the_latter_from_the_poll() {
    let fixture = ArmFixture::start().await;
    let p = provider(&fixture);
    fixture.fault(Fault::Quota);
    let err = p.launch(&spec("hbl-00000000000000e1", Market::Spot)).await.unwrap_err();
    let ProviderError::Quota { code, message } = &err else { panic!("{err:?}") };
    assert_eq!(code, "OperationNotAllowed");
    assert!(message.contains("Total Regional Cores quota"), "{message}");
    assert!(fixture.vm("hbl-00000000000000e1").is_none());

    fixture.fault(Fault::AllocationFailedInPoll);
    let failing = spec("hbl-00000000000000e2", Market::OnDemand);
    let err = tokio::time::timeout(DEADLINE, p.launch(&failing))
        .await
        .expect("the failed operation was not seen")
        .unwrap_err();
    assert!(matches!(&err, ProviderError::Capacity { code, .. } if code == "AllocationFailed"), "{err:?}");
    assert!(!err.retryable());
    let requests = fixture.requests();
    let put = requests.iter().position(|r| r.method == "PUT" && r.path.ends_with("e2")).unwrap();
    let poll = requests.iter().position(|r| r.path.contains("/operations/")).unwrap();
    let delete = requests.iter().position(|r| r.method == "DELETE" && r.path.ends_with("e2"));
    assert!(put < poll && delete.is_some_and(|d| poll < d), "the failed VM was not deleted after the poll");
    let vm = fixture.vm("hbl-00000000000000e2").unwrap();
    assert_eq!(vm["properties"]["provisioningState"], "Deleting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_client_secret_tokens_are_requested_once_and_refused_when_wrong() {
    let fixture = ArmFixture::start().await;
    let p = provider(&fixture);
    // Four launches at once share one token request, and later calls reuse the token.
    let launches = (1..=4).map(|n| spec(&format!("hbl-00000000000000f{n}"), Market::OnDemand)).collect::<Vec<_>>();
    for result in futures::future::join_all(launches.iter().map(|s| p.launch(s))).await {
        result.unwrap();
    }
    p.list().await.unwrap();
    let tokens = fixture.token_requests();
    assert_eq!(tokens.len(), 1, "the token was not cached: {} requests", tokens.len());
    let form = &tokens[0];
    assert_eq!(form["grant_type"], "client_credentials");
    assert_eq!(form["client_id"], arm_fixture::CLIENT_ID);
    assert_eq!(form["client_secret"], arm_fixture::SECRET);
    assert_eq!(form["scope"], "https://management.azure.com/.default");
    // A token Resource Manager refuses is replaced once, and the call goes through.
    fixture.revoke_tokens();
    assert_eq!(p.list().await.unwrap().len(), 4);
    assert_eq!(fixture.token_requests().len(), 2);

    let wrong = ResolvedCredential::ClientSecret {
        tenant_id: arm_fixture::TENANT.into(),
        client_id: arm_fixture::CLIENT_ID.into(),
        secret: hybroker::model::secret::SecretValue::new("not-the-secret"),
    };
    let err = provider_with(fixture.launch_settings(), wrong).list().await.unwrap_err();
    assert!(
        matches!(&err, ProviderError::Invalid { code, message } if code == "invalid_client" && message.contains("AADSTS7000215")),
        "{err:?}"
    );
    assert!(!err.to_string().contains("not-the-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_workload_identity_rereads_its_assertion_file_for_each_token() {
    let fixture = ArmFixture::start().await;
    // Tokens shorter than the 5-minute margin: every call asks for a new one.
    fixture.set_token_lifetime(60);
    fixture.accept_assertion("federated-assertion-1");
    fixture.accept_assertion("federated-assertion-2");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("azure-identity-token");
    std::fs::write(&file, "federated-assertion-1\n").unwrap();
    let credential = ResolvedCredential::WorkloadIdentity {
        tenant_id: arm_fixture::TENANT.into(),
        client_id: arm_fixture::CLIENT_ID.into(),
        token_file: file.clone(),
    };
    let p = provider_with(fixture.launch_settings(), credential);
    p.list().await.unwrap();
    std::fs::write(&file, "federated-assertion-2\n").unwrap();
    p.list().await.unwrap();
    let tokens = fixture.token_requests();
    let assertions: Vec<_> = tokens.iter().map(|f| f.get("client_assertion").cloned().unwrap_or_default()).collect();
    assert_eq!(assertions, ["federated-assertion-1", "federated-assertion-2"]);
    for form in &tokens {
        assert_eq!(form["client_assertion_type"], "urn:ietf:params:oauth:client-assertion-type:jwt-bearer");
        assert!(!form.contains_key("client_secret"));
    }
    std::fs::write(&file, "a-revoked-assertion\n").unwrap();
    let err = p.list().await.unwrap_err();
    assert_eq!(err.code(), "invalid_client", "{err:?}");
}

/// The managed identity's token comes from the metadata service at its real address: the test
/// makes a network namespace for one thread (as root), adds 169.254.169.254 to its loopback and
/// serves the fixture there; the provider keeps its default `imds_endpoint`.
#[test]
fn azure_managed_identity_token_from_the_metadata_service_in_a_network_namespace() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("managed identity untested: a network namespace needs root");
        return;
    }
    let outcome = std::thread::spawn(|| {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
        for args in [&["link", "set", "lo", "up"][..], &["addr", "add", "169.254.169.254/32", "dev", "lo"]] {
            let status = std::process::Command::new("ip").args(args).status().expect("ip");
            assert!(status.success(), "ip {args:?}");
        }
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let mut fixture = ArmFixture::start().await;
            fixture.serve_imds(tokio::net::TcpListener::bind("169.254.169.254:80").await.unwrap());
            let credential = ResolvedCredential::ManagedIdentity { client_id: Some("user-assigned-client".into()) };
            let launch = AzureLaunch { imds_endpoint: None, ..fixture.launch_settings() };
            let p = provider_with(launch, credential);
            p.launch(&spec("hbl-0000000000000101", Market::OnDemand)).await.map_err(|e| e.to_string())?;
            p.list().await.map_err(|e| e.to_string())?;
            Ok::<_, String>(fixture.token_requests())
        })
    })
    .join()
    .expect("the namespace thread panicked");
    let tokens = outcome.unwrap();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    let query = &tokens[0];
    assert_eq!(query["api-version"], "2018-02-01");
    assert_eq!(query["resource"], "https://management.azure.com/");
    assert_eq!(query["client_id"], "user-assigned-client");
}
