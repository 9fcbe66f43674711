//! AWS Signature Version 4 for the two calls the AWS feed makes (Price List `GetProducts`, EC2
//! `DescribeSpotPriceHistory`) through `aws-sigv4`, the signer the S3 SDK already builds: neither
//! service's SDK is needed. Checked against the AWS signing test suite.

use std::time::SystemTime;

use aws_sdk_s3::config::Credentials;
use aws_sigv4::http_request::{self, SignableBody, SigningSettings};
use aws_sigv4::sign::v4;

/// What of a request is signed.
pub(crate) struct SignableRequest<'a> {
    pub method: &'a str,
    pub url: &'a reqwest::Url,
    /// The headers to sign besides `host` (from `url`) and `x-amz-date` (added): `content-type`,
    /// `x-amz-target`, …
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// The headers to add to `request` so that it is signed for `service` in `region` at `time`:
/// `x-amz-date`, `x-amz-security-token` when the credentials have one, and `authorization`.
pub(crate) fn sign(
    request: &SignableRequest<'_>,
    credentials: &Credentials,
    region: &str,
    service: &str,
    time: SystemTime,
) -> Result<Vec<(String, String)>, String> {
    let SignableRequest { method, url, headers, body } = *request;
    let identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| format!("signing: {e}"))?
        .into();
    let signable =
        http_request::SignableRequest::new(method, url.as_str(), headers.iter().copied(), SignableBody::Bytes(body))
            .map_err(|e| format!("signing: {e}"))?;
    let (instructions, _signature) =
        http_request::sign(signable, &params).map_err(|e| format!("signing: {e}"))?.into_parts();
    Ok(instructions.headers().map(|(name, value)| (name.to_string(), value.to_string())).collect())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    /// 2015-08-30T12:36:00Z, the AWS signing test suite's moment.
    fn suite_time() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_440_938_160)
    }

    fn suite_credentials() -> Credentials {
        Credentials::new("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None, None, "suite")
    }

    fn header<'a>(added: &'a [(String, String)], name: &str) -> &'a str {
        &added.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name} in {added:?}")).1
    }

    fn authorization(added: &[(String, String)]) -> &str {
        header(added, "authorization")
    }

    #[test]
    fn signs_the_suites_post_vanilla() {
        let url = reqwest::Url::parse("https://example.amazonaws.com/").unwrap();
        let request = SignableRequest { method: "POST", url: &url, headers: &[], body: b"" };
        let added = sign(&request, &suite_credentials(), "us-east-1", "service", suite_time()).unwrap();
        assert_eq!(header(&added, "x-amz-date"), "20150830T123600Z");
        assert_eq!(
            authorization(&added),
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b"
        );
    }

    #[test]
    fn signs_the_suites_form_post_with_its_headers() {
        let url = reqwest::Url::parse("https://example.amazonaws.com/").unwrap();
        let body = b"Param1=value1";
        let headers = [
            ("Content-Type", "application/x-www-form-urlencoded"),
            ("Content-Length", "13"),
            ("x-amz-content-sha256", "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"),
        ];
        let request = SignableRequest { method: "POST", url: &url, headers: &headers, body };
        let added = sign(&request, &suite_credentials(), "us-east-1", "service", suite_time()).unwrap();
        assert!(authorization(&added).ends_with(
            "SignedHeaders=content-length;content-type;host;x-amz-content-sha256;x-amz-date, \
             Signature=d3875051da38690788ef43de4db0d8f280229d82040bfac253562e56c3f20e0b"
        ));
    }

    #[test]
    fn signs_the_suites_encoded_query_in_order() {
        let url =
            reqwest::Url::parse("https://example.amazonaws.com/?Param-3=Value3&Param=Value2&%E1%88%B4=Value1").unwrap();
        let request = SignableRequest { method: "GET", url: &url, headers: &[], body: b"" };
        let added = sign(&request, &suite_credentials(), "us-east-1", "service", suite_time()).unwrap();
        assert!(
            authorization(&added)
                .ends_with("Signature=371d3713e185cc334048618a97f809c9ffe339c62934c032af5a0e595648fcac")
        );
    }

    #[test]
    fn a_session_token_is_sent_and_signed_and_a_port_is_part_of_the_host() {
        let url = reqwest::Url::parse("http://127.0.0.1:8123/ec2/us-east-1").unwrap();
        let credentials = Credentials::new("AKIDEXAMPLE", "secret", Some("token".into()), None, "test");
        let request = SignableRequest { method: "POST", url: &url, headers: &[], body: b"" };
        let added = sign(&request, &credentials, "us-east-1", "ec2", suite_time()).unwrap();
        assert!(added.contains(&("x-amz-security-token".to_string(), "token".to_string())));
        assert!(authorization(&added).contains("SignedHeaders=host;x-amz-date;x-amz-security-token,"));
        let other_port = reqwest::Url::parse("http://127.0.0.1:8124/ec2/us-east-1").unwrap();
        let request_elsewhere = SignableRequest { url: &other_port, ..request };
        let elsewhere = sign(&request_elsewhere, &credentials, "us-east-1", "ec2", suite_time()).unwrap();
        assert_ne!(authorization(&added), authorization(&elsewhere), "the port is signed with the host");
        let request = SignableRequest { body: b"x", ..request };
        let other = sign(&request, &credentials, "us-east-1", "ec2", suite_time()).unwrap();
        assert_ne!(authorization(&added), authorization(&other), "the body is signed");
    }
}
