//! A local Azure Resource Manager and Microsoft Entra token endpoint, in their real wire format,
//! over HTTPS on 127.0.0.1:0 with a test CA (its PEM in a file for `ca_file`): client-credential
//! tokens (secret or federated assertion checked), virtual machines created with `If-None-Match`,
//! an `Azure-AsyncOperation` polled to its end (creation) or a `Location` monitor (deletion),
//! read, listed in pages with `nextLink`, deleted; the metadata service's managed-identity token
//! on plain HTTP ([`ArmFixture::serve_imds`]). Faults are scripted per VM PUT; every request is
//! logged for assertions.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hybroker::capacity::azure::ResolvedCredential;
use hybroker::model::capacity::AzureLaunch;
use hybroker::model::secret::SecretValue;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub const TENANT: &str = "72f988bf-0000-4000-8000-000000000001";
pub const CLIENT_ID: &str = "0e1c2d3f-0000-4000-8000-000000000002";
pub const SECRET: &str = "fixture-client-secret";
pub const SUBSCRIPTION: &str = "00000000-0000-4000-8000-000000000003";
pub const GROUP: &str = "hybroker-test";
const QUOTA_MESSAGE: &str = "Operation could not be completed as it results in exceeding approved Total Regional Cores \
     quota. Additional details - Deployment Model: Resource Manager, Location: westeurope, Current Limit: 10, Current \
     Usage: 8, Additional Required: 24, (Minimum) New Limit Required: 32.";
const ALLOCATION_MESSAGE: &str = "Allocation failed. We do not have sufficient capacity for the requested VM size in \
     this region. Read more about improving likelihood of allocation success at http://aka.ms/allocation-guidance";

/// A fault the next VM PUT meets.
#[derive(Debug, Clone)]
pub enum Fault {
    /// 429 `TooManyRequests` with this `Retry-After`.
    Throttle { retry_after_s: u64 },
    /// 409 `OperationNotAllowed`: the regional cores quota.
    Quota,
    /// Accepted (201), then the operation ends `Failed` with `AllocationFailed`.
    AllocationFailedInPoll,
}

/// One request as the fixture received it.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub query: String,
    pub at: Instant,
    pub if_none_match: Option<String>,
    pub body: Option<Value>,
}

struct Operation {
    vm: String,
    polls_left: u32,
    failure: Option<(&'static str, &'static str)>,
    delete: bool,
}

struct Fixture {
    base: String,
    vms: BTreeMap<String, Value>,
    operations: HashMap<u64, Operation>,
    next_id: u64,
    faults: VecDeque<Fault>,
    requests: Vec<Logged>,
    token_requests: Vec<BTreeMap<String, String>>,
    issued: HashSet<String>,
    assertions: Vec<String>,
    token_lifetime_s: u64,
    polls: u32,
    poll_retry_after_s: u64,
    page_size: usize,
    /// The subscription's resource SKUs (`Microsoft.Compute/skus`), served in pages.
    skus: Vec<Value>,
}

type Shared = Arc<Mutex<Fixture>>;

/// The running fixture; its servers stop when it is dropped.
pub struct ArmFixture {
    /// `https://127.0.0.1:<port>`: both Resource Manager and the Entra authority.
    pub endpoint: String,
    pub ca_file: PathBuf,
    shared: Shared,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for ArmFixture {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

impl ArmFixture {
    pub async fn start() -> ArmFixture {
        hybroker::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "arm fixture test ca");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let ca_file = dir.path().join("arm-ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).unwrap();
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        let cert = params.signed_by(&key, &Issuer::from_params(&ca_params, &ca_key)).unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("https://{}", listener.local_addr().unwrap());
        let shared = Arc::new(Mutex::new(Fixture {
            base: endpoint.clone(),
            vms: BTreeMap::new(),
            operations: HashMap::new(),
            next_id: 1,
            faults: VecDeque::new(),
            requests: Vec::new(),
            token_requests: Vec::new(),
            issued: HashSet::new(),
            assertions: Vec::new(),
            token_lifetime_s: 3599,
            polls: 1,
            poll_retry_after_s: 0,
            page_size: 2,
            skus: Vec::new(),
        }));
        let router = Router::new().fallback(handle).with_state(shared.clone());
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, router) = (acceptor.clone(), router.clone());
                tokio::spawn(async move {
                    if let Ok(stream) = acceptor.accept(tcp).await {
                        let service = TowerToHyperService::new(router);
                        let _ = auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                });
            }
        });
        ArmFixture { endpoint, ca_file, shared, tasks: vec![task], _dir: dir }
    }

    /// Serves the metadata service's token endpoint (and everything else) on plain HTTP.
    pub fn serve_imds(&mut self, listener: TcpListener) {
        let router = Router::new().fallback(handle).with_state(self.shared.clone());
        self.tasks.push(tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        }));
    }

    /// Launch settings for this fixture (endpoint, authority and CA set).
    pub fn launch_settings(&self) -> AzureLaunch {
        AzureLaunch {
            subscription_id: SUBSCRIPTION.into(),
            resource_group: GROUP.into(),
            image: "Canonical:ubuntu-24_04-lts:server:latest".into(),
            subnet_id: format!(
                "/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}/providers/Microsoft.Network/virtualNetworks/v/subnets/s"
            ),
            admin_username: "hybroker".into(),
            ssh_public_key: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFixtureKey test@hybroker".into(),
            endpoint: Some(self.endpoint.clone()),
            authority: Some(self.endpoint.clone()),
            ca_file: Some(self.ca_file.clone()),
            ..AzureLaunch::default()
        }
    }

    pub fn client_secret() -> ResolvedCredential {
        ResolvedCredential::ClientSecret {
            tenant_id: TENANT.into(),
            client_id: CLIENT_ID.into(),
            secret: SecretValue::new(SECRET),
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut Fixture) -> T) -> T {
        f(&mut self.shared.lock().unwrap())
    }

    pub fn fault(&self, fault: Fault) {
        self.with(|s| s.faults.push_back(fault));
    }

    /// Federated assertions the token endpoint takes from now on.
    pub fn accept_assertion(&self, assertion: &str) {
        self.with(|s| s.assertions.push(assertion.to_owned()));
    }

    /// Every token issued so far is refused from now on (401 `InvalidAuthenticationToken`).
    pub fn revoke_tokens(&self) {
        self.with(|s| s.issued.clear());
    }

    pub fn set_token_lifetime(&self, seconds: u64) {
        self.with(|s| s.token_lifetime_s = seconds);
    }

    /// How many polls answer `InProgress` before an operation ends, and their `Retry-After`.
    pub fn set_polls(&self, polls: u32, retry_after_s: u64) {
        self.with(|s| (s.polls, s.poll_retry_after_s) = (polls, retry_after_s));
    }

    /// The resource SKUs `GET …/providers/Microsoft.Compute/skus` lists, in pages of two.
    pub fn set_skus(&self, skus: Vec<Value>) {
        self.with(|s| s.skus = skus);
    }

    pub fn requests(&self) -> Vec<Logged> {
        self.with(|s| s.requests.clone())
    }

    /// The token requests' form fields (the metadata service's: its query).
    pub fn token_requests(&self) -> Vec<BTreeMap<String, String>> {
        self.with(|s| s.token_requests.clone())
    }

    /// The VM resource as stored (with `customData`, which Resource Manager never returns).
    pub fn vm(&self, name: &str) -> Option<Value> {
        self.with(|s| s.vms.get(name).cloned())
    }

    pub fn vm_names(&self) -> Vec<String> {
        self.with(|s| s.vms.keys().cloned().collect())
    }

    /// A VM's user data, decoded from `customData`: what cloud-init would get
    /// (`hybroker::capacity::user_data::play` it to start the instance's agent).
    pub fn custom_data(&self, name: &str) -> Option<String> {
        let vm = self.vm(name)?;
        let encoded = vm.pointer("/properties/osProfile/customData")?.as_str()?.to_owned();
        Some(String::from_utf8(B64.decode(encoded).unwrap()).unwrap())
    }

    /// Puts a VM in the group as another tool would (tags of the caller's choice).
    pub fn insert_vm(&self, name: &str, tags: Value) {
        let vm = json!({ "name": name, "tags": tags, "properties": {
            "hardwareProfile": { "vmSize": "Standard_D2s_v5" }, "provisioningState": "Succeeded",
            "timeCreated": "2026-01-02T03:04:05.1234567+00:00" } });
        self.with(|s| s.vms.insert(name.to_owned(), vm));
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (status, axum::Json(json!({ "error": { "code": code, "message": message } }))).into_response()
}

fn pairs(text: &str) -> BTreeMap<String, String> {
    reqwest::Url::parse(&format!("http://x/?{text}")).unwrap().query_pairs().into_owned().collect()
}

fn now_rfc3339() -> String {
    let text = humantime::format_rfc3339_micros(SystemTime::now()).to_string();
    format!("{}0+00:00", text.trim_end_matches('Z'))
}

/// What Resource Manager returns of a VM: all but `customData`.
fn shown(vm: &Value) -> Value {
    let mut vm = vm.clone();
    if let Some(os) = vm.pointer_mut("/properties/osProfile").and_then(Value::as_object_mut) {
        os.remove("customData");
    }
    vm
}

async fn handle(State(shared): State<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let mut s = shared.lock().unwrap();
    let query = pairs(uri.query().unwrap_or(""));
    let segments: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    match (&method, segments.as_slice()) {
        (&Method::POST, [tenant, "oauth2", "v2.0", "token"]) => {
            let form = pairs(std::str::from_utf8(&body).unwrap_or(""));
            s.token_requests.push(form.clone());
            return entra_token(&mut s, tenant, &form);
        }
        (&Method::GET, ["metadata", "identity", "oauth2", "token"]) => {
            s.token_requests.push(query.clone());
            if header("metadata").as_deref() != Some("true") {
                let body = json!({ "error": "invalid_request", "error_description": "Required metadata header not specified" });
                return (StatusCode::BAD_REQUEST, axum::Json(body)).into_response();
            }
            if query.get("api-version").map(String::as_str) != Some("2018-02-01") {
                return (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": "invalid_request" }))).into_response();
            }
            let token = issue(&mut s);
            let lifetime = s.token_lifetime_s.to_string();
            return axum::Json(json!({ "access_token": token, "expires_in": lifetime, "expires_on": "1900000000",
                "resource": query.get("resource"), "token_type": "Bearer" }))
            .into_response();
        }
        _ => {}
    }
    s.requests.push(Logged {
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or("").to_owned(),
        at: Instant::now(),
        if_none_match: header("if-none-match"),
        body: serde_json::from_slice(&body).ok(),
    });
    let token = header("authorization").and_then(|a| a.strip_prefix("Bearer ").map(str::to_owned));
    if !token.is_some_and(|t| s.issued.contains(&t)) {
        return error(StatusCode::UNAUTHORIZED, "InvalidAuthenticationToken", "The access token is invalid.");
    }
    if !query.contains_key("api-version") {
        return error(
            StatusCode::BAD_REQUEST,
            "MissingApiVersionParameter",
            "The api-version query parameter is required.",
        );
    }
    match (&method, segments.as_slice()) {
        (
            _,
            [
                "subscriptions",
                SUBSCRIPTION,
                "resourceGroups",
                GROUP,
                "providers",
                "Microsoft.Compute",
                "virtualMachines",
                name,
            ],
        ) => {
            let name = name.to_string();
            match method {
                Method::PUT => put_vm(&mut s, &name, header("if-none-match"), &body),
                Method::GET => match s.vms.get(&name) {
                    Some(vm) => axum::Json(shown(vm)).into_response(),
                    None => error(StatusCode::NOT_FOUND, "ResourceNotFound", "The Resource was not found."),
                },
                Method::DELETE => delete_vm(&mut s, &name),
                _ => error(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", "no"),
            }
        }
        (
            &Method::GET,
            [
                "subscriptions",
                SUBSCRIPTION,
                "resourceGroups",
                GROUP,
                "providers",
                "Microsoft.Compute",
                "virtualMachines",
            ],
        ) => {
            let skip: usize = query.get("$skiptoken").and_then(|t| t.parse().ok()).unwrap_or(0);
            let value: Vec<Value> = s.vms.values().skip(skip).take(s.page_size).map(shown).collect();
            let mut page = json!({ "value": value });
            if skip + s.page_size < s.vms.len() {
                let next = format!("{}{}?api-version=2024-07-01&$skiptoken={}", s.base, uri.path(), skip + s.page_size);
                page["nextLink"] = json!(next);
            }
            axum::Json(page).into_response()
        }
        (&Method::GET, ["subscriptions", SUBSCRIPTION, "providers", "Microsoft.Compute", "skus"]) => {
            let skip: usize = query.get("$skiptoken").and_then(|t| t.parse().ok()).unwrap_or(0);
            let value: Vec<Value> = s.skus.iter().skip(skip).take(s.page_size).cloned().collect();
            let mut page = json!({ "value": value });
            if skip + s.page_size < s.skus.len() {
                let next = format!("{}{}?api-version=2021-07-01&$skiptoken={}", s.base, uri.path(), skip + s.page_size);
                page["nextLink"] = json!(next);
            }
            axum::Json(page).into_response()
        }
        (
            &Method::GET,
            ["subscriptions", SUBSCRIPTION, "providers", "Microsoft.Compute", "locations", _, "operations", id],
        ) => poll(
            &mut s,
            id.parse().unwrap_or(0),
            query.contains_key("monitor"),
            uri.path_and_query().map(|p| p.to_string()).unwrap_or_default(),
        ),
        _ => error(StatusCode::NOT_FOUND, "InvalidResourceType", "no such resource type"),
    }
}

fn issue(s: &mut Fixture) -> String {
    let token = format!("fixture-token-{}", s.next_id);
    s.next_id += 1;
    s.issued.insert(token.clone());
    token
}

fn entra_token(s: &mut Fixture, tenant: &str, form: &BTreeMap<String, String>) -> Response {
    let field = |name: &str| form.get(name).map(String::as_str).unwrap_or("");
    let refuse = |status: StatusCode, error: &str, description: &str| {
        (status, axum::Json(json!({ "error": error, "error_description": description, "error_codes": [7000215] })))
            .into_response()
    };
    if tenant != TENANT {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request", "AADSTS90002: Tenant not found.");
    }
    if field("grant_type") != "client_credentials" || field("scope") != "https://management.azure.com/.default" {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request", "AADSTS900144: bad grant_type or scope.");
    }
    let by_secret = field("client_secret") == SECRET;
    let by_assertion = field("client_assertion_type") == "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
        && s.assertions.iter().any(|a| a == field("client_assertion"));
    if field("client_id") != CLIENT_ID || !(by_secret || by_assertion) {
        return refuse(StatusCode::UNAUTHORIZED, "invalid_client", "AADSTS7000215: Invalid client secret provided.");
    }
    let token = issue(s);
    axum::Json(json!({ "token_type": "Bearer", "expires_in": s.token_lifetime_s, "ext_expires_in": s.token_lifetime_s,
        "access_token": token }))
    .into_response()
}

fn operation_url(s: &Fixture, id: u64, monitor: bool) -> String {
    let monitor = if monitor { "monitor=true&" } else { "" };
    format!(
        "{}/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Compute/locations/westeurope/operations/{id}?{monitor}api-version=2024-07-01",
        s.base
    )
}

fn put_vm(s: &mut Fixture, name: &str, if_none_match: Option<String>, body: &[u8]) -> Response {
    let failure = match s.faults.pop_front() {
        Some(Fault::Throttle { retry_after_s }) => {
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, "TooManyRequests", "The request is being throttled.");
            r.headers_mut().insert("retry-after", retry_after_s.to_string().parse().unwrap());
            return r;
        }
        Some(Fault::Quota) => return error(StatusCode::CONFLICT, "OperationNotAllowed", QUOTA_MESSAGE),
        Some(Fault::AllocationFailedInPoll) => Some(("AllocationFailed", ALLOCATION_MESSAGE)),
        None => None,
    };
    if s.vms.contains_key(name) && if_none_match.as_deref() == Some("*") {
        return error(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            "The condition specified using HTTP conditional header(s) is not met.",
        );
    }
    let Ok(mut vm) = serde_json::from_slice::<Value>(body) else {
        return error(StatusCode::BAD_REQUEST, "InvalidRequestContent", "The request content was invalid.");
    };
    for pointer in ["/location", "/properties/hardwareProfile/vmSize", "/properties/storageProfile/imageReference"] {
        if vm.pointer(pointer).is_none() {
            return error(
                StatusCode::BAD_REQUEST,
                "InvalidParameter",
                &format!("Required parameter '{pointer}' is missing"),
            );
        }
    }
    vm["name"] = json!(name);
    vm["type"] = json!("Microsoft.Compute/virtualMachines");
    vm["id"] = json!(format!(
        "/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}/providers/Microsoft.Compute/virtualMachines/{name}"
    ));
    vm["properties"]["provisioningState"] = json!("Creating");
    vm["properties"]["timeCreated"] = json!(now_rfc3339());
    vm["properties"]["vmId"] = json!(format!("00000000-0000-4000-9000-{:012}", s.next_id));
    let id = s.next_id;
    s.next_id += 1;
    s.operations.insert(id, Operation { vm: name.to_owned(), polls_left: s.polls, failure, delete: false });
    s.vms.insert(name.to_owned(), vm.clone());
    let mut r = (StatusCode::CREATED, axum::Json(shown(&vm))).into_response();
    r.headers_mut().insert("azure-asyncoperation", operation_url(s, id, false).parse().unwrap());
    r.headers_mut().insert("retry-after", s.poll_retry_after_s.to_string().parse().unwrap());
    r
}

fn delete_vm(s: &mut Fixture, name: &str) -> Response {
    let Some(vm) = s.vms.get_mut(name) else { return StatusCode::NO_CONTENT.into_response() };
    vm["properties"]["provisioningState"] = json!("Deleting");
    let id = s.next_id;
    s.next_id += 1;
    s.operations.insert(id, Operation { vm: name.to_owned(), polls_left: s.polls, failure: None, delete: true });
    let mut r = StatusCode::ACCEPTED.into_response();
    r.headers_mut().insert("location", operation_url(s, id, true).parse().unwrap());
    r.headers_mut().insert("retry-after", s.poll_retry_after_s.to_string().parse().unwrap());
    r
}

fn poll(s: &mut Fixture, id: u64, monitor: bool, url: String) -> Response {
    let retry_after = s.poll_retry_after_s.to_string();
    let Some(op) = s.operations.get_mut(&id) else {
        return error(StatusCode::NOT_FOUND, "OperationNotFound", "no such operation");
    };
    if op.polls_left > 0 {
        op.polls_left -= 1;
        let mut r = if monitor {
            let mut r = StatusCode::ACCEPTED.into_response();
            r.headers_mut().insert("location", format!("{}{url}", s.base).parse().unwrap());
            r
        } else {
            axum::Json(json!({ "status": "InProgress", "startTime": now_rfc3339() })).into_response()
        };
        r.headers_mut().insert("retry-after", retry_after.parse().unwrap());
        return r;
    }
    let (vm, failure, delete) = (op.vm.clone(), op.failure, op.delete);
    if delete {
        s.vms.remove(&vm);
    } else if let Some(vm) = s.vms.get_mut(&vm) {
        vm["properties"]["provisioningState"] = json!(if failure.is_some() { "Failed" } else { "Succeeded" });
    }
    match (monitor, failure) {
        (true, _) => StatusCode::OK.into_response(),
        (false, None) => axum::Json(json!({ "status": "Succeeded", "endTime": now_rfc3339() })).into_response(),
        (false, Some((code, message))) => {
            axum::Json(json!({ "status": "Failed", "error": { "code": code, "message": message } })).into_response()
        }
    }
}
