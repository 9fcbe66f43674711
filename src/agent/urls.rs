//! The broker's data calls for one attempt (its inputs' and outputs' presigned requests), as
//! the staging engine asks for them.

use async_trait::async_trait;

use super::staging::{CompletedUpload, FoundFile, UploadPlan, UrlSource};
use crate::model::presigned::{CompletedPart, Presigned};
use crate::proto::{self, agent_service_client::AgentServiceClient};
use crate::telemetry::grpc::TracedChannel;

/// The broker's data calls for one attempt.
pub(super) struct BrokerUrls {
    pub client: AgentServiceClient<TracedChannel>,
    pub job_id: String,
    pub epoch: u64,
}

#[async_trait]
impl UrlSource for BrokerUrls {
    async fn input_urls(&self, indices: &[u32]) -> Result<Vec<Presigned>, String> {
        let req = proto::InputUrlsRequest { job_id: self.job_id.clone(), epoch: self.epoch, indices: indices.to_vec() };
        let resp = self.client.clone().input_urls(req).await.map_err(|s| s.message().to_string())?;
        Ok(resp.into_inner().urls.into_iter().map(Presigned::from).collect())
    }

    async fn plan_outputs(&self, files: &[FoundFile]) -> Result<Vec<UploadPlan>, String> {
        let files =
            files.iter().map(|f| proto::OutputFile { output: f.output, path: f.path.clone(), size: f.size }).collect();
        let req = proto::PlanOutputsRequest { job_id: self.job_id.clone(), epoch: self.epoch, files };
        let resp = self.client.clone().plan_outputs(req).await.map_err(|s| s.message().to_string())?;
        upload_plans(resp.into_inner())
    }

    async fn part_urls(
        &self,
        output: u32,
        key: &str,
        upload_id: &str,
        numbers: &[u32],
    ) -> Result<Vec<Presigned>, String> {
        let req = proto::PartUrlsRequest {
            job_id: self.job_id.clone(),
            epoch: self.epoch,
            output,
            key: key.to_string(),
            upload_id: upload_id.to_string(),
            numbers: numbers.to_vec(),
        };
        let resp = self.client.clone().part_urls(req).await.map_err(|s| s.message().to_string())?;
        Ok(resp.into_inner().parts.into_iter().map(Presigned::from).collect())
    }

    async fn complete_outputs(&self, uploads: Vec<CompletedUpload>) -> Result<(), String> {
        let uploads = uploads.into_iter().map(|u| completed(u.output, u)).collect();
        let req = proto::CompleteOutputsRequest { job_id: self.job_id.clone(), epoch: self.epoch, uploads };
        self.client.clone().complete_outputs(req).await.map_err(|s| s.message().to_string())?;
        Ok(())
    }
}

/// The broker's upload plans as the staging engine takes them.
pub(super) fn upload_plans(resp: proto::PlanOutputsResponse) -> Result<Vec<UploadPlan>, String> {
    resp.uploads
        .into_iter()
        .map(|u| match u.put {
            Some(put) => Ok(UploadPlan::Single { key: u.key, put: Presigned::from(put) }),
            None if !u.upload_id.is_empty() && u.part_size > 0 => Ok(UploadPlan::Multipart {
                key: u.key,
                upload_id: u.upload_id,
                part_size: u.part_size,
                parts: u.parts.into_iter().map(Presigned::from).collect(),
            }),
            None => Err(format!("the broker sent an empty upload plan for {}", u.key)),
        })
        .collect()
}

/// A finished multipart upload of output `output`, for the broker to complete.
pub(super) fn completed(output: u32, u: CompletedUpload) -> proto::CompletedUpload {
    proto::CompletedUpload {
        output,
        key: u.key,
        upload_id: u.upload_id,
        parts: u
            .parts
            .into_iter()
            .map(|p: CompletedPart| proto::UploadedPart { number: p.number, etag: p.etag })
            .collect(),
    }
}
