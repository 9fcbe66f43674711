//! The tenants' data service (`DataService`, for the gateway and admins): the objects of a
//! succeeded job's outputs, and objects under the tenant's own storage prefixes
//! (`hybroker data put|ls|get`).
//!
//! Answers carry presigned URLs where tenants can reach the store (S3, Azure). The embedded local
//! store listens on loopback only, so its bytes stream through here: the broker makes the request
//! to it with its own presigned URL and passes the bytes on (`ReadObject`, `WriteObject`). Keys
//! stay inside the tenant's prefixes: an output's key lies under its succeeded attempt's prefix
//! and has no `.`/`..` or empty segment; a URI is checked against the tenant's `storage` list.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::data::{DataPlane, store_error};
use crate::config::TenantConfig;
use crate::error::ApiError;
use crate::model::data::{DataUri, JobData, OutputTarget};
use crate::model::identity::{Identity, Role, validate_name};
use crate::model::state::JobState;
use crate::proto;
use crate::storage::{CompletedPart, ObjectMeta};
use crate::store::{JobRecord, Reader};
use crate::tls;

const CALLERS: &[Role] = &[Role::Gateway, Role::Admin];
/// Most objects one listing returns.
const MAX_LISTED: usize = 10_000;

type ChunkStream = Pin<Box<dyn Stream<Item = Result<proto::ObjectChunk, Status>> + Send>>;

pub struct DataService {
    reader: Reader,
    tenants: Arc<HashMap<String, TenantConfig>>,
    data: Arc<DataPlane>,
    /// Plain HTTP to the embedded local stores on loopback (no TLS roots needed).
    http: reqwest::Client,
}

impl DataService {
    pub fn new(reader: Reader, tenants: Arc<HashMap<String, TenantConfig>>, data: Arc<DataPlane>) -> Self {
        let http = reqwest::Client::builder().tls_certs_only([]).build().expect("a plain http client builds");
        Self { reader, tenants, data, http }
    }

    /// The tenant the call acts for: gateways must name one; admins may leave it out where a
    /// call needs none (`None`).
    fn tenant(&self, who: &Identity, tenant: &str) -> Result<Option<&TenantConfig>, Status> {
        if tenant.is_empty() {
            return match who.role {
                Role::Gateway => Err(Status::invalid_argument("tenant: required when calling as a gateway")),
                _ => Ok(None),
            };
        }
        validate_name("tenant", tenant).map_err(|e| Status::invalid_argument(e.to_string()))?;
        self.tenants
            .get(tenant)
            .map(Some)
            .ok_or_else(|| Status::permission_denied(format!("tenant {tenant} is not declared in the broker config")))
    }

    /// The tenant a data call acts for (data calls need its prefixes).
    fn data_tenant(&self, who: &Identity, tenant: &str) -> Result<&TenantConfig, Status> {
        self.tenant(who, tenant)?.ok_or_else(|| Status::invalid_argument("tenant: required for data calls"))
    }

    /// The job if the caller may see it and it succeeded, with its data plan (placement's choice
    /// of output locations filled in).
    async fn succeeded_job(&self, id: &str, tenant: Option<&TenantConfig>) -> Result<(JobRecord, JobData), Status> {
        let job = match self.reader.job(id).await.map_err(ApiError::from)? {
            Some(job) if tenant.is_none_or(|t| job.submission.tenant == t.name) => job,
            _ => return Err(ApiError::job_not_found(id).into()),
        };
        if job.status.state != JobState::Succeeded {
            return Err(Status::failed_precondition(format!(
                "job {id} is {}: its outputs can be listed and read once it has succeeded",
                job.status.state
            )));
        }
        let data = job.effective_data();
        Ok((job, data))
    }

    /// A listed object as a tenant sees it: with a presigned GET unless the store is local.
    async fn describe(
        &self,
        location: &str,
        meta: ObjectMeta,
        key: String,
        uri: String,
    ) -> Result<proto::DataObject, Status> {
        let store = self.data.object_store(location)?;
        let local = self.data.is_local(location);
        // The local store's listings carry no ETag; its HEAD gives the MD5 it recorded.
        let meta = match meta.etag {
            None if local => store.head(&meta.key).await.map_err(|e| store_error("uri", e))?.unwrap_or(meta),
            _ => meta,
        };
        let download = if local {
            None
        } else {
            let get = store.presign_get(&meta.key, self.data.url_ttl()).await.map_err(|e| store_error("uri", e))?;
            Some(get.into())
        };
        Ok(proto::DataObject {
            key,
            uri,
            size: meta.size,
            md5: md5_hex(&meta).unwrap_or_default(),
            etag: meta.etag.unwrap_or_default(),
            download,
        })
    }

    /// The location and key of the object a read names: an output's object or a URI.
    async fn object_of(&self, who: &Identity, req: &proto::ReadObjectRequest) -> Result<(String, String), Status> {
        if !req.job_id.is_empty() {
            let tenant = self.tenant(who, &req.tenant)?;
            let (job, data) = self.succeeded_job(&req.job_id, tenant).await?;
            let target = data
                .outputs
                .get(req.output as usize)
                .ok_or_else(|| Status::not_found(format!("job {} has no output {}", req.job_id, req.output)))?;
            if !safe_key(&req.key) {
                return Err(Status::invalid_argument(format!("key: {:?} is not an object key of the output", req.key)));
            }
            let prefix = target.attempt_prefix(&job.submission.tenant, &job.submission.id, job.status.attempts);
            return Ok((target.location.clone(), format!("{prefix}{}", req.key)));
        }
        let tenant = self.data_tenant(who, &req.tenant)?;
        let (uri, location, _) = self.data.tenant_uri(&req.uri, tenant)?;
        if uri.is_prefix() {
            return Err(Status::invalid_argument(format!("uri: {} names a prefix, not an object", req.uri)));
        }
        Ok((location, uri.path))
    }

    /// Refuses streaming for a store tenants reach themselves (they use presigned URLs there).
    fn require_local(&self, location: &str) -> Result<(), Status> {
        if self.data.is_local(location) {
            return Ok(());
        }
        Err(Status::failed_precondition(format!(
            "storage location {location} is reachable by tenants: use the presigned URL of the listing or upload plan"
        )))
    }
}

/// A key relative to an output's prefix: `/`-separated, no empty, `.` or `..` segment, no control
/// character.
fn safe_key(key: &str) -> bool {
    !key.is_empty()
        && !key.split('/').any(|s| s.is_empty() || s == "." || s == "..")
        && !key.chars().any(char::is_control)
}

/// The whole object's MD5 in hex, where the store gives one: an ETag that is a plain MD5
/// (single-part S3 uploads, the local store), else Azure's Content-MD5.
fn md5_hex(meta: &ObjectMeta) -> Option<String> {
    if let Some(etag) = &meta.etag
        && etag.len() == 32
        && etag.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Some(etag.to_ascii_lowercase());
    }
    let md5 = B64.decode(meta.content_md5.as_deref()?).ok().filter(|m| m.len() == 16)?;
    Some(super::keys::hex(&md5))
}

/// The target `plan_upload` writes to: a location, keys as given.
fn upload_target(location: String) -> OutputTarget {
    OutputTarget {
        path: String::new(),
        location,
        to: String::new(),
        prefix: String::new(),
        residency: None,
        choices: Vec::new(),
    }
}

/// The URI of a key in the store `uri` names.
fn uri_of(uri: &DataUri, key: &str) -> String {
    format!("{}://{}/{key}", uri.scheme.as_str(), uri.store)
}

#[tonic::async_trait]
impl proto::data_service_server::DataService for DataService {
    async fn list_outputs(
        &self,
        req: Request<proto::ListOutputsRequest>,
    ) -> Result<Response<proto::ListOutputsResponse>, Status> {
        let who = tls::require_role(&req, CALLERS)?;
        let req = req.into_inner();
        let tenant = self.tenant(&who, &req.tenant)?;
        let (job, data) = self.succeeded_job(&req.job_id, tenant).await?;
        let (owner, id, attempt) = (&job.submission.tenant, &job.submission.id, job.status.attempts);
        let mut outputs = Vec::with_capacity(data.outputs.len());
        for (index, target) in data.outputs.iter().enumerate() {
            let prefix = target.attempt_prefix(owner, id, attempt);
            let base = target.attempt_uri(owner, id, attempt);
            let store = self.data.object_store(&target.location)?;
            let listed = store.list(&prefix, MAX_LISTED).await.map_err(|e| store_error("outputs", e))?;
            let mut objects = Vec::with_capacity(listed.len());
            for meta in listed {
                let Some(key) = meta.key.strip_prefix(&prefix).filter(|k| safe_key(k)).map(str::to_string) else {
                    continue;
                };
                let uri = format!("{base}{key}");
                objects.push(self.describe(&target.location, meta, key, uri).await?);
            }
            outputs.push(proto::OutputObjects { index: index as u32, path: target.path.clone(), uri: base, objects });
        }
        Ok(Response::new(proto::ListOutputsResponse { attempt, outputs }))
    }

    async fn list_data(
        &self,
        req: Request<proto::ListDataRequest>,
    ) -> Result<Response<proto::ListDataResponse>, Status> {
        let who = tls::require_role(&req, CALLERS)?;
        let req = req.into_inner();
        let tenant = self.data_tenant(&who, &req.tenant)?;
        let (uri, location, _) = self.data.tenant_uri(&req.uri, tenant)?;
        let store = self.data.object_store(&location)?;
        // One object, else (no such object) everything under `path/`.
        let single =
            if uri.is_prefix() { None } else { store.head(&uri.path).await.map_err(|e| store_error("uri", e))? };
        let (listed, dir) = match single {
            Some(meta) => (vec![meta], uri.path.rsplit_once('/').map_or(String::new(), |(d, _)| format!("{d}/"))),
            None => {
                let dir = if uri.is_prefix() { uri.path.clone() } else { format!("{}/", uri.path) };
                (store.list(&dir, MAX_LISTED).await.map_err(|e| store_error("uri", e))?, dir)
            }
        };
        let mut objects = Vec::with_capacity(listed.len());
        for meta in listed {
            let Some(key) = meta.key.strip_prefix(&dir).filter(|k| safe_key(k)).map(str::to_string) else {
                continue;
            };
            let full = uri_of(&uri, &meta.key);
            objects.push(self.describe(&location, meta, key, full).await?);
        }
        Ok(Response::new(proto::ListDataResponse { objects }))
    }

    type ReadObjectStream = ChunkStream;

    async fn read_object(&self, req: Request<proto::ReadObjectRequest>) -> Result<Response<ChunkStream>, Status> {
        let who = tls::require_role(&req, CALLERS)?;
        let req = req.into_inner();
        let (location, key) = self.object_of(&who, &req).await?;
        self.require_local(&location)?;
        let store = self.data.object_store(&location)?;
        let meta = store.head(&key).await.map_err(|e| store_error("key", e))?.ok_or_else(|| {
            Status::not_found(format!("object {} not found", if req.uri.is_empty() { &req.key } else { &req.uri }))
        })?;
        if req.offset > meta.size {
            return Err(Status::out_of_range(format!(
                "offset {} is past the object's end ({} bytes)",
                req.offset, meta.size
            )));
        }
        let first = proto::ObjectChunk { data: Vec::new(), size: meta.size, md5: md5_hex(&meta).unwrap_or_default() };
        if req.offset == meta.size {
            return Ok(Response::new(Box::pin(futures::stream::iter([Ok(first)]))));
        }
        let get = store.presign_get(&key, self.data.url_ttl()).await.map_err(|e| store_error("key", e))?;
        let mut request = self.http.get(&get.url);
        for (name, value) in &get.headers {
            request = request.header(name, value);
        }
        if req.offset > 0 {
            request = request.header(reqwest::header::RANGE, format!("bytes={}-", req.offset));
        }
        let answer =
            request.send().await.map_err(|e| Status::unavailable(format!("the local store: {}", e.without_url())))?;
        let expected = if req.offset > 0 { reqwest::StatusCode::PARTIAL_CONTENT } else { reqwest::StatusCode::OK };
        if answer.status() != expected {
            return Err(Status::unavailable(format!(
                "the local store answered {} to a read of {key}",
                answer.status()
            )));
        }
        let body = answer.bytes_stream().map(|chunk| match chunk {
            Ok(data) => Ok(proto::ObjectChunk { data: data.to_vec(), size: 0, md5: String::new() }),
            // Never the presigned URL: errors reach tenants and logs.
            Err(e) => Err(Status::unavailable(format!("the local store: {}", e.without_url()))),
        });
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(first)]).chain(body))))
    }

    async fn plan_upload(
        &self,
        req: Request<proto::PlanUploadRequest>,
    ) -> Result<Response<proto::PlanUploadResponse>, Status> {
        let who = tls::require_role(&req, CALLERS)?;
        let req = req.into_inner();
        let tenant = self.data_tenant(&who, &req.tenant)?;
        let (uri, location, local) = self.data.tenant_uri(&req.uri, tenant)?;
        if uri.is_prefix() {
            return Err(Status::invalid_argument(format!("uri: {} names a prefix, not an object", req.uri)));
        }
        if local {
            return Ok(Response::new(proto::PlanUploadResponse { plan: None, stream: true }));
        }
        let plan = self.data.plan_upload(&upload_target(location), uri.path, req.size).await?.into();
        Ok(Response::new(proto::PlanUploadResponse { plan: Some(plan), stream: false }))
    }

    async fn complete_upload(
        &self,
        req: Request<proto::CompleteUploadRequest>,
    ) -> Result<Response<proto::CompleteUploadResponse>, Status> {
        let who = tls::require_role(&req, CALLERS)?;
        let req = req.into_inner();
        let tenant = self.data_tenant(&who, &req.tenant)?;
        let (uri, location, local) = self.data.tenant_uri(&req.uri, tenant)?;
        // The local store does not tie an upload id to its key, and tenants never get one of its
        // upload ids: completing there could only assemble someone else's parts.
        if local {
            return Err(Status::failed_precondition(format!(
                "storage location {location} takes uploads whole at the gateway's PUT route: there is no multipart upload to complete"
            )));
        }
        let parts: Vec<CompletedPart> =
            req.parts.into_iter().map(|p| CompletedPart { number: p.number, etag: p.etag }).collect();
        self.data.complete(&upload_target(location), &uri.path, &req.upload_id, &parts).await?;
        Ok(Response::new(proto::CompleteUploadResponse {}))
    }

    async fn write_object(
        &self,
        req: Request<Streaming<proto::WriteObjectChunk>>,
    ) -> Result<Response<proto::DataObject>, Status> {
        let who = tls::require_role(&req, CALLERS)?;
        let mut chunks = req.into_inner();
        let first =
            chunks.message().await?.ok_or_else(|| Status::invalid_argument("no chunk: the first names the object"))?;
        let tenant = self.data_tenant(&who, &first.tenant)?;
        let (uri, location, _) = self.data.tenant_uri(&first.uri, tenant)?;
        if uri.is_prefix() {
            return Err(Status::invalid_argument(format!("uri: {} names a prefix, not an object", first.uri)));
        }
        self.require_local(&location)?;
        let store = self.data.object_store(&location)?;
        let put = store.presign_put(&uri.path, self.data.url_ttl()).await.map_err(|e| store_error("uri", e))?;
        let mut request = self.http.put(&put.url).header(reqwest::header::CONTENT_LENGTH, first.size);
        for (name, value) in &put.headers {
            request = request.header(name, value);
        }
        if !first.content_md5.is_empty() {
            request = request.header("content-md5", &first.content_md5);
        }
        let rest = chunks.map(|chunk| chunk.map(|c| c.data));
        let body = futures::stream::iter([Ok::<_, Status>(first.data)]).chain(rest);
        let answer = request
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await
            .map_err(|e| Status::aborted(format!("the upload of {} broke off: {}", first.uri, e.without_url())))?;
        let status = answer.status();
        if !status.is_success() {
            let text = answer.text().await.unwrap_or_default();
            return Err(if text.contains("BadDigest") || text.contains("InvalidDigest") {
                Status::invalid_argument(format!("content-md5 does not match the bytes of {}", first.uri))
            } else if status == reqwest::StatusCode::BAD_REQUEST {
                Status::invalid_argument(format!("the local store refused the upload of {} ({status})", first.uri))
            } else {
                Status::unavailable(format!("the local store answered {status} to the upload of {}", first.uri))
            });
        }
        let meta = store
            .head(&uri.path)
            .await
            .map_err(|e| store_error("uri", e))?
            .ok_or_else(|| Status::unavailable(format!("{} is missing right after its upload", first.uri)))?;
        let key = uri.path.rsplit('/').next().unwrap_or_default().to_string();
        Ok(Response::new(self.describe(&location, meta, key, first.uri.clone()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_keys_stay_inside_their_prefix() {
        assert!(safe_key("a.bin") && safe_key("sub/b.bin"));
        for bad in ["", "../x", "a/../../x", "a//b", "./a", "/abs", "a/", "a\nb"] {
            assert!(!safe_key(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_md5_comes_from_a_plain_etag_or_azures_content_md5() {
        let meta = |etag: Option<&str>, md5: Option<&str>| ObjectMeta {
            key: "k".into(),
            size: 1,
            etag: etag.map(Into::into),
            content_md5: md5.map(Into::into),
        };
        let hex = "0CC175B9C0F1B6A831C399E269772661";
        assert_eq!(md5_hex(&meta(Some(hex), None)).as_deref(), Some("0cc175b9c0f1b6a831c399e269772661"));
        assert_eq!(md5_hex(&meta(Some("abc-3"), None)), None, "a multipart etag is no md5");
        let b64 = "DMF1ucDxtqgxw5niaXcmYQ==";
        assert_eq!(md5_hex(&meta(Some("0x8D"), Some(b64))).as_deref(), Some("0cc175b9c0f1b6a831c399e269772661"));
    }
}
