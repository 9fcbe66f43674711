//! moto's EC2, read by the tests directly (not through the product's client): instances with
//! their tags, state, lifecycle, subnet, client token and metadata options; an instance's user data
//! (`DescribeInstanceAttribute Attribute=userData`, base64-decoded), which a cloud harness plays
//! with `hybroker::capacity::user_data::play`; the default subnets. moto serves EC2 on the port of
//! its S3 and routes a call by the service named in its `Authorization` header, which it does not
//! otherwise check.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::Deserialize;

use crate::emulators::Moto;

/// An instance as moto describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MotoInstance {
    pub instance_id: String,
    /// `pending`, `running`, `shutting-down`, `terminated`, …
    pub state: String,
    pub instance_type: String,
    /// `spot`, or `None` for on-demand.
    pub lifecycle: Option<String>,
    pub subnet_id: String,
    pub client_token: String,
    /// `required` = IMDSv2 only.
    pub http_tokens: String,
    pub image_id: String,
    pub tags: BTreeMap<String, String>,
}

impl Moto {
    /// Every instance matching `filters` (`(name, value)`; a name given twice means either value),
    /// terminated ones included unless filtered out.
    pub async fn ec2_instances(&self, filters: &[(&str, &str)]) -> Vec<MotoInstance> {
        let mut params: Vec<(String, String)> = Vec::new();
        let mut names: Vec<&str> = Vec::new();
        for (name, value) in filters {
            let n = match names.iter().position(|n| n == name) {
                Some(i) => i + 1,
                None => {
                    names.push(name);
                    params.push((format!("Filter.{}.Name", names.len()), (*name).to_owned()));
                    names.len()
                }
            };
            let values = params.iter().filter(|(k, _)| k.starts_with(&format!("Filter.{n}.Value."))).count();
            params.push((format!("Filter.{n}.Value.{}", values + 1), (*value).to_owned()));
        }
        let xml = self.ec2_call("DescribeInstances", &params).await;
        let answer: wire::Describe = quick_xml::de::from_str(&xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
        let reservations = answer.reservation_set.map(|s| s.item).unwrap_or_default();
        let wires = reservations.into_iter().flat_map(|r| r.instances_set.map(|s| s.item).unwrap_or_default());
        wires.map(wire::Instance::into_instance).collect()
    }

    /// The instances of one launch (by its `hybroker-launch` tag).
    pub async fn ec2_launched(&self, launch_id: &str) -> Vec<MotoInstance> {
        self.ec2_instances(&[("tag:hybroker-launch", launch_id)]).await
    }

    /// The instance's user data, decoded.
    pub async fn ec2_user_data(&self, instance_id: &str) -> String {
        let params = [("InstanceId".to_owned(), instance_id.to_owned()), ("Attribute".into(), "userData".into())];
        let xml = self.ec2_call("DescribeInstanceAttribute", &params).await;
        let answer: wire::Attribute = quick_xml::de::from_str(&xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
        let encoded = answer.user_data.and_then(|u| u.value).unwrap_or_default();
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).unwrap();
        String::from_utf8(bytes).unwrap()
    }

    /// The default subnets, by availability zone (`us-east-1a` first).
    pub async fn ec2_default_subnets(&self) -> Vec<String> {
        let params =
            [("Filter.1.Name".to_owned(), "default-for-az".to_owned()), ("Filter.1.Value.1".into(), "true".into())];
        let xml = self.ec2_call("DescribeSubnets", &params).await;
        let answer: wire::Subnets = quick_xml::de::from_str(&xml).unwrap_or_else(|e| panic!("{e}: {xml}"));
        let mut subnets: Vec<(String, String)> = answer
            .subnet_set
            .map(|s| s.item)
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s.availability_zone, s.subnet_id))
            .collect();
        subnets.sort();
        subnets.into_iter().map(|(_, id)| id).collect()
    }

    async fn ec2_call(&self, action: &str, params: &[(String, String)]) -> String {
        let mut url = reqwest::Url::parse("http://form/").unwrap();
        url.query_pairs_mut().append_pair("Action", action).append_pair("Version", "2016-11-15").extend_pairs(params);
        let body = url.query().unwrap_or_default().to_owned();
        let authorization = format!(
            "AWS4-HMAC-SHA256 Credential={}/20260101/{}/ec2/aws4_request, SignedHeaders=host, Signature=0",
            Moto::ACCESS_KEY,
            Moto::REGION
        );
        hybroker::tls::install_crypto_provider();
        let response = reqwest::Client::new()
            .post(format!("{}/", self.endpoint()))
            .header("authorization", authorization)
            .header("content-type", "application/x-www-form-urlencoded; charset=utf-8")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("moto ec2 {action}: {e}"));
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(status.is_success(), "moto ec2 {action}: {status}: {text}");
        text
    }
}

/// moto's answers as the tests read them.
mod wire {
    use super::*;

    #[derive(Deserialize)]
    pub struct Set<T> {
        #[serde(default = "Vec::new")]
        pub item: Vec<T>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Describe {
        pub reservation_set: Option<Set<Reservation>>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Reservation {
        pub instances_set: Option<Set<Instance>>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Instance {
        instance_id: String,
        instance_state: State,
        instance_type: String,
        instance_lifecycle: Option<String>,
        #[serde(default)]
        subnet_id: String,
        #[serde(default)]
        client_token: String,
        #[serde(default)]
        image_id: String,
        metadata_options: Option<Metadata>,
        tag_set: Option<Set<Tag>>,
    }

    #[derive(Deserialize)]
    struct State {
        name: String,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Metadata {
        #[serde(default)]
        http_tokens: String,
    }

    #[derive(Deserialize)]
    struct Tag {
        key: String,
        #[serde(default)]
        value: String,
    }

    impl Instance {
        pub fn into_instance(self) -> MotoInstance {
            MotoInstance {
                instance_id: self.instance_id,
                state: self.instance_state.name,
                instance_type: self.instance_type,
                lifecycle: self.instance_lifecycle,
                subnet_id: self.subnet_id,
                client_token: self.client_token,
                http_tokens: self.metadata_options.map(|m| m.http_tokens).unwrap_or_default(),
                image_id: self.image_id,
                tags: self.tag_set.map(|s| s.item).unwrap_or_default().into_iter().map(|t| (t.key, t.value)).collect(),
            }
        }
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Attribute {
        pub user_data: Option<Value>,
    }

    #[derive(Deserialize)]
    pub struct Value {
        pub value: Option<String>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Subnets {
        pub subnet_set: Option<Set<Subnet>>,
    }

    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    pub struct Subnet {
        pub subnet_id: String,
        pub availability_zone: String,
    }
}
