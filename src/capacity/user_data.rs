//! A launched instance's user data: a `#cloud-config` document that writes the agent's join file
//! (`/etc/hybroker/join.toml`, 0600: the launch's single-use join token, the broker's enrol address
//! and CA bundle) and its configuration (`/etc/hybroker/agent.toml`), then starts the agent's
//! systemd unit (installed in the image by `deploy/image/build-image.sh`). The agent names itself
//! after the instance id it reads from the metadata service (`agent.cloud`).
//!
//! [`play`] does what cloud-init does with it, under a directory instead of `/`: the `local`
//! provider and the tests' cloud harness start real agents from it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where the agent's files live on an instance.
pub const ETC: &str = "/etc/hybroker";
pub const VAR: &str = "/var/lib/hybroker";

/// What an instance needs to join the broker.
#[derive(Clone)]
pub struct Boot<'a> {
    pub launch_id: &'a str,
    pub site: &'a str,
    /// `aws` or `azure`: where the agent reads its node name and spot notices; `None` (local):
    /// `node` names it.
    pub cloud: Option<&'a str>,
    /// The node name when no metadata service names it (local instances).
    pub node: Option<&'a str>,
    /// `hbj_<id>_<secret>`, single use, scoped to the site and the launch.
    pub token: &'a str,
    pub trust_domain: &'a str,
    /// The broker's enrol listener and gRPC address as instances reach them.
    pub enroll_url: &'a str,
    pub broker_url: &'a str,
    /// The name in the broker's certificate, when it is not the URLs' host.
    pub server_name: Option<&'a str>,
    /// The trust bundle (PEM) the agent verifies the broker with.
    pub ca_bundle: &'a str,
}

/// The join file's fields (the agent reads it as its `JoinFile`).
#[derive(Serialize)]
struct Join<'a> {
    token: &'a str,
    enroll_url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_name: Option<&'a str>,
    trust_domain: &'a str,
    site: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    ca_bundle: &'a str,
}

#[derive(Serialize, Deserialize)]
struct CloudConfig {
    write_files: Vec<WriteFile>,
    #[serde(default)]
    runcmd: Vec<Vec<String>>,
}

#[derive(Serialize, Deserialize)]
struct WriteFile {
    path: String,
    permissions: String,
    content: String,
}

/// The `#cloud-config` user data of one launch.
pub fn render(boot: &Boot<'_>) -> String {
    let join = Join {
        token: boot.token,
        enroll_url: boot.enroll_url,
        server_name: boot.server_name,
        trust_domain: boot.trust_domain,
        site: boot.site,
        node: boot.node,
        ca_bundle: boot.ca_bundle,
    };
    let join = toml::to_string(&join).expect("a join file serialises");
    let mut agent = toml::Table::new();
    let mut section = toml::Table::new();
    section.insert("broker_url".into(), boot.broker_url.into());
    if let Some(name) = boot.server_name {
        section.insert("broker_server_name".into(), name.into());
    }
    section.insert("work_dir".into(), format!("{VAR}/work").into());
    section.insert("join_token_file".into(), format!("{ETC}/join.toml").into());
    if let Some(cloud) = boot.cloud {
        section.insert("cloud".into(), cloud.into());
    }
    agent.insert("agent".into(), section.into());
    let mut tls = toml::Table::new();
    tls.insert("ca_cert".into(), format!("{VAR}/tls/ca.pem").into());
    tls.insert("cert".into(), format!("{VAR}/tls/agent.pem").into());
    tls.insert("key".into(), format!("{VAR}/tls/agent-key.pem").into());
    agent.insert("tls".into(), tls.into());
    let mut metrics = toml::Table::new();
    metrics.insert("listen".into(), "0.0.0.0:9466".into());
    agent.insert("metrics".into(), metrics.into());
    let doc = CloudConfig {
        write_files: vec![
            WriteFile { path: format!("{ETC}/join.toml"), permissions: "0600".into(), content: join },
            WriteFile {
                path: format!("{ETC}/agent.toml"),
                permissions: "0644".into(),
                content: toml::to_string(&agent).expect("agent config serialises"),
            },
        ],
        runcmd: vec![vec!["systemctl".into(), "enable".into(), "--now".into(), "hybroker-agent.service".into()]],
    };
    let yaml = serde_yaml_ng::to_string(&doc).expect("cloud-config serialises");
    format!("#cloud-config\n# hybroker launch {} of site {}\n{yaml}", boot.launch_id, boot.site)
}

/// The files [`play`] wrote.
#[derive(Debug, Clone)]
pub struct Played {
    /// The agent's configuration, its paths moved under the root.
    pub agent_config: PathBuf,
    pub join_file: PathBuf,
}

/// Writes the user data's files under `root` as cloud-init would under `/`, with every
/// `/etc/hybroker` and `/var/lib/hybroker` in their contents moved under `root` too, so that
/// `hybroker agent --config <agent_config>` runs as on the instance (without the unit).
pub fn play(user_data: &str, root: &Path) -> Result<Played, String> {
    let body = user_data.strip_prefix("#cloud-config").ok_or("user data is not a #cloud-config document")?;
    let doc: CloudConfig = serde_yaml_ng::from_str(body).map_err(|e| format!("user data: {e}"))?;
    let moved = |text: &str| {
        text.replace(ETC, &root.join("etc").to_string_lossy()).replace(VAR, &root.join("var").to_string_lossy())
    };
    let mut played = Played { agent_config: PathBuf::new(), join_file: PathBuf::new() };
    for file in &doc.write_files {
        let path = PathBuf::from(moved(&file.path));
        let dir = path.parent().ok_or("a file without a directory")?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mode = u32::from_str_radix(&file.permissions, 8).map_err(|_| "bad permissions")?;
        write_with_mode(&path, moved(&file.content).as_bytes(), mode)?;
        if file.path.ends_with("/agent.toml") {
            played.agent_config = path;
        } else if file.path.ends_with("/join.toml") {
            played.join_file = path;
        }
    }
    if played.agent_config.as_os_str().is_empty() || played.join_file.as_os_str().is_empty() {
        return Err("user data lacks agent.toml or join.toml".into());
    }
    Ok(played)
}

fn write_with_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(bytes).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_plays_back_under_a_root() {
        let boot = Boot {
            launch_id: "hbl-0123456789abcdef",
            site: "aws-us-east-1",
            cloud: Some("aws"),
            node: None,
            token: "hbj_0123456789abcdef_0123456789abcdef0123456789abcdef",
            trust_domain: "acme.example",
            enroll_url: "https://broker:7444",
            broker_url: "https://broker:7443",
            server_name: None,
            ca_bundle: "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        };
        let text = render(&boot);
        assert!(text.starts_with("#cloud-config\n"), "{text}");
        assert!(text.len() < 16 * 1024, "EC2 takes at most 16 KiB of user data");
        let root = tempfile::tempdir().unwrap();
        let played = play(&text, root.path()).unwrap();
        let agent = std::fs::read_to_string(&played.agent_config).unwrap();
        assert!(agent.contains(&root.path().join("var/tls/agent.pem").to_string_lossy().into_owned()), "{agent}");
        assert!(agent.contains("cloud = \"aws\""), "{agent}");
        let join: toml::Table = toml::from_str(&std::fs::read_to_string(&played.join_file).unwrap()).unwrap();
        assert_eq!(join["token"].as_str(), Some(boot.token));
        assert_eq!(join["ca_bundle"].as_str(), Some(boot.ca_bundle));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&played.join_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(play("#!/bin/sh\necho", root.path()).is_err());
    }

    /// `deploy/image/cloud-init.yaml` is what a launch's user data looks like (placeholders for the
    /// token and bundle), and stays playable.
    #[test]
    fn the_sample_cloud_init_is_a_launch_s_user_data() {
        let sample = include_str!("../../deploy/image/cloud-init.yaml");
        let boot = Boot {
            launch_id: "hbl-0123456789abcdef",
            site: "aws-eu-west-1",
            cloud: Some("aws"),
            node: None,
            token: "hbj_0123456789abcdef_00000000000000000000000000000000",
            trust_domain: "acme.example",
            enroll_url: "https://broker.acme.example:7444",
            broker_url: "https://broker.acme.example:7443",
            server_name: None,
            ca_bundle: "-----BEGIN CERTIFICATE-----\n(the broker's tls.ca_cert)\n-----END CERTIFICATE-----\n",
        };
        let rendered = render(&boot);
        let body = |t: &str| t.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n");
        assert_eq!(body(sample), body(&rendered), "regenerate deploy/image/cloud-init.yaml from render():\n{rendered}");
        let root = tempfile::tempdir().unwrap();
        let played = play(sample, root.path()).unwrap();
        let join: toml::Table = toml::from_str(&std::fs::read_to_string(&played.join_file).unwrap()).unwrap();
        assert!(join["token"].as_str().unwrap().starts_with("hbj_"));
    }
}
