//! AWS Signature Version 4 for the two calls the AWS feed makes (Price List `GetProducts`, EC2
//! `DescribeSpotPriceHistory`), with ring's HMAC-SHA256 and SHA-256: the process keeps one crypto
//! provider and needs no SDK for either service. Checked against the AWS signing test suite.

use std::fmt::Write as _;
use std::time::SystemTime;

use ring::{digest, hmac};

use super::http::percent_encode;

/// The credentials a request is signed with.
#[derive(Clone)]
pub(crate) struct AwsCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Set for temporary credentials (STS, SSO, instance roles); sent as `x-amz-security-token`.
    pub session_token: Option<String>,
}

impl std::fmt::Debug for AwsCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsCredentials").field("access_key_id", &self.access_key_id).finish_non_exhaustive()
    }
}

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
    credentials: &AwsCredentials,
    region: &str,
    service: &str,
    time: SystemTime,
) -> Vec<(String, String)> {
    let SignableRequest { method, url, headers, body } = *request;
    let at = time::OffsetDateTime::from(time);
    let date = format!("{:04}{:02}{:02}", at.year(), u8::from(at.month()), at.day());
    let amz_date = format!("{date}T{:02}{:02}{:02}Z", at.hour(), at.minute(), at.second());

    let mut added = vec![("x-amz-date".to_string(), amz_date.clone())];
    if let Some(token) = &credentials.session_token {
        added.push(("x-amz-security-token".to_string(), token.clone()));
    }
    let mut signed: Vec<(String, String)> = headers
        .iter()
        .map(|(name, value)| (name.to_ascii_lowercase(), canonical_value(value)))
        .chain(added.iter().cloned())
        .chain(std::iter::once(("host".to_string(), host(url))))
        .collect();
    signed.sort();
    let signed_names = signed.iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>().join(";");
    let mut canonical_headers = String::new();
    for (name, value) in &signed {
        let _ = writeln!(canonical_headers, "{name}:{value}");
    }

    let canonical_request = format!(
        "{method}\n{}\n{}\n{canonical_headers}\n{signed_names}\n{}",
        canonical_path(url),
        canonical_query(url),
        hex(digest::digest(&digest::SHA256, body).as_ref()),
    );
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex(digest::digest(&digest::SHA256, canonical_request.as_bytes()).as_ref())
    );
    let key = [date.as_str(), region, service, "aws4_request"]
        .iter()
        .fold(format!("AWS4{}", credentials.secret_access_key).into_bytes(), |key, part| {
            hmac_sha256(&key, part.as_bytes())
        });
    let signature = hex(&hmac_sha256(&key, string_to_sign.as_bytes()));
    added.push((
        "authorization".to_string(),
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_names}, Signature={signature}",
            credentials.access_key_id
        ),
    ));
    added
}

fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data).as_ref().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// The `host` header reqwest sends: the host, and the port when it isn't the scheme's default.
fn host(url: &reqwest::Url) -> String {
    let host = url.host_str().unwrap_or_default();
    match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    }
}

/// Header values are trimmed and runs of spaces collapsed.
fn canonical_value(value: &str) -> String {
    value.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Each path segment encoded (again: services other than S3 double-encode).
fn canonical_path(url: &reqwest::Url) -> String {
    let path = url.path();
    if path.is_empty() {
        return "/".to_string();
    }
    path.split('/').map(percent_encode).collect::<Vec<_>>().join("/")
}

/// Query parameters decoded, encoded the SigV4 way and sorted.
fn canonical_query(url: &reqwest::Url) -> String {
    let mut pairs: Vec<(String, String)> =
        url.query_pairs().map(|(k, v)| (percent_encode(&k), percent_encode(&v))).collect();
    pairs.sort();
    pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    /// 2015-08-30T12:36:00Z, the AWS signing test suite's moment.
    fn suite_time() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_440_938_160)
    }

    fn suite_credentials() -> AwsCredentials {
        AwsCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    fn authorization(added: &[(String, String)]) -> &str {
        &added.iter().find(|(name, _)| name == "authorization").unwrap().1
    }

    #[test]
    fn signs_the_suites_post_vanilla() {
        let url = reqwest::Url::parse("https://example.amazonaws.com/").unwrap();
        let request = SignableRequest { method: "POST", url: &url, headers: &[], body: b"" };
        let added = sign(&request, &suite_credentials(), "us-east-1", "service", suite_time());
        assert_eq!(added[0], ("x-amz-date".to_string(), "20150830T123600Z".to_string()));
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
        let added = sign(&request, &suite_credentials(), "us-east-1", "service", suite_time());
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
        let added = sign(&request, &suite_credentials(), "us-east-1", "service", suite_time());
        assert!(
            authorization(&added)
                .ends_with("Signature=371d3713e185cc334048618a97f809c9ffe339c62934c032af5a0e595648fcac")
        );
    }

    #[test]
    fn a_session_token_is_sent_and_signed_and_a_port_is_part_of_the_host() {
        let url = reqwest::Url::parse("http://127.0.0.1:8123/ec2/us-east-1").unwrap();
        let credentials = AwsCredentials { session_token: Some("token".into()), ..suite_credentials() };
        let request = SignableRequest { method: "POST", url: &url, headers: &[], body: b"" };
        let added = sign(&request, &credentials, "us-east-1", "ec2", suite_time());
        assert!(added.contains(&("x-amz-security-token".to_string(), "token".to_string())));
        assert!(authorization(&added).contains("SignedHeaders=host;x-amz-date;x-amz-security-token,"));
        assert_eq!(host(&url), "127.0.0.1:8123");
        let request = SignableRequest { body: b"x", ..request };
        let other = sign(&request, &credentials, "us-east-1", "ec2", suite_time());
        assert_ne!(authorization(&added), authorization(&other), "the body is signed");
    }
}
