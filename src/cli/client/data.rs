//! `hybroker data put|ls|get`: objects under the tenant's own storage prefixes, with nothing but
//! `hybroker`. The gateway hands out presigned URLs for S3 and Azure (single PUTs, or the parts of
//! a multipart upload for big files) and streams the local store's bytes itself.

use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use clap::{Args, Subcommand};
use reqwest::Method;
use reqwest::header::{CONTENT_LENGTH, ETAG};
use serde::Serialize;
use tokio::io::AsyncReadExt;

use super::download::{self, Wanted};
use super::gateway::Gateway;
use super::output::table;
use super::{GatewayArgs, connect, typed};
use crate::cli::report::{Output, print_json};
use crate::gateway::api::{CompleteUpload, DataObjectList, UploadPlan, UploadRequest, UploadedPart};

/// Bytes read per chunk of a streamed upload body.
const READ_CHUNK: usize = 256 << 10;

#[derive(Args)]
pub struct DataArgs {
    #[command(subcommand)]
    command: DataCommand,
    #[command(flatten)]
    gw: GatewayArgs,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Upload a file, or a directory recursively, to a URI inside your storage prefixes (a
    /// directory, or a URI ending in `/`, goes under it as a prefix).
    Put {
        #[arg(value_name = "LOCAL_PATH")]
        local: PathBuf,
        uri: String,
    },
    /// List the objects at a URI: one object, or every object under a prefix.
    Ls { uri: String },
    /// Download the objects at a URI: one object to LOCAL_PATH (into it when it is a directory),
    /// a prefix's objects under LOCAL_PATH; resumed, checked, skipped when already there.
    Get {
        uri: String,
        #[arg(value_name = "LOCAL_PATH")]
        local: PathBuf,
    },
}

/// One uploaded file, as printed.
#[derive(Serialize)]
struct Uploaded {
    file: String,
    uri: String,
    size: u64,
    md5: String,
}

pub async fn data(args: DataArgs) -> anyhow::Result<i32> {
    let gw = connect(&args.gw)?;
    let out = args.gw.output;
    match args.command {
        DataCommand::Put { local, uri } => {
            let mut uploaded = Vec::new();
            for (file, uri) in upload_list(&local, &uri)? {
                uploaded.push(upload(&gw, &file, &uri).await?);
            }
            match out {
                Output::Json => print_json(&serde_json::json!({ "uploaded": uploaded })),
                Output::Table => {
                    let rows: Vec<Vec<String>> =
                        uploaded.iter().map(|u| vec![u.size.to_string(), u.md5.clone(), u.uri.clone()]).collect();
                    print!("{}", table(&["SIZE", "MD5", "URI"], &rows));
                }
            }
        }
        DataCommand::Ls { uri } => {
            let value = list(&gw, &uri).await?;
            match out {
                Output::Json => print_json(&value),
                Output::Table => {
                    let objects: DataObjectList = typed(value)?;
                    let rows: Vec<Vec<String>> = objects
                        .objects
                        .iter()
                        .map(|o| vec![o.size.to_string(), o.md5.clone().unwrap_or_else(|| "-".into()), o.uri.clone()])
                        .collect();
                    print!("{}", table(&["SIZE", "MD5", "URI"], &rows));
                }
            }
        }
        DataCommand::Get { uri, local } => {
            let objects: DataObjectList = typed(list(&gw, &uri).await?)?;
            let wanted = download_list(objects, &uri, &local)?;
            download::download_all(&gw, &wanted).await?;
            if out == Output::Json {
                let files: Vec<_> = wanted
                    .iter()
                    .map(|w| serde_json::json!({ "uri": w.object.uri, "file": w.dest.display().to_string(), "size": w.object.size }))
                    .collect();
                print_json(&serde_json::json!({ "files": files }));
            }
        }
    }
    Ok(0)
}

async fn list(gw: &Gateway, uri: &str) -> anyhow::Result<serde_json::Value> {
    gw.json(gw.request(Method::GET, &["v1", "data", "objects"], false).query(&[("uri", uri)])).await
}

/// Where each listed object goes: a single object named by the URI to `local` (into it when it is
/// a directory), else each object under `local` by its key.
fn download_list(objects: DataObjectList, uri: &str, local: &Path) -> anyhow::Result<Vec<Wanted>> {
    if objects.objects.is_empty() {
        anyhow::bail!("no objects at {uri}");
    }
    if let [only] = &objects.objects[..]
        && only.uri == uri
    {
        let dest = if local.is_dir() { super::outputs::destination(local, only)? } else { local.to_path_buf() };
        return Ok(vec![Wanted { dest, object: only.clone() }]);
    }
    objects
        .objects
        .into_iter()
        .map(|object| Ok(Wanted { dest: super::outputs::destination(local, &object)?, object }))
        .collect()
}

/// The files to upload and each one's URI: a file to `uri` (or `uri<name>` when `uri` ends with
/// `/`), a directory's files (recursively, in name order) under `uri/`.
fn upload_list(local: &Path, uri: &str) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let meta = std::fs::metadata(local).with_context(|| format!("cannot read {}", local.display()))?;
    if meta.is_file() {
        let name = local.file_name().and_then(|n| n.to_str()).context("the file's name is not UTF-8")?;
        let uri = if uri.ends_with('/') { format!("{uri}{name}") } else { uri.to_string() };
        return Ok(vec![(local.to_path_buf(), uri)]);
    }
    let mut files = Vec::new();
    walk(local, "", &mut files)?;
    if files.is_empty() {
        anyhow::bail!("{} holds no files", local.display());
    }
    let base = uri.trim_end_matches('/');
    Ok(files.into_iter().map(|(path, rel)| (path, format!("{base}/{rel}"))).collect())
}

fn walk(dir: &Path, rel: &str, files: &mut Vec<(PathBuf, String)>) -> anyhow::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("cannot read {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name = name.to_str().with_context(|| format!("{}: a name that is not UTF-8", entry.path().display()))?;
        let rel = if rel.is_empty() { name.to_string() } else { format!("{rel}/{name}") };
        let kind = entry.file_type()?;
        if kind.is_dir() {
            walk(&entry.path(), &rel, files)?;
        } else if kind.is_file() {
            files.push((entry.path(), rel));
        }
    }
    Ok(())
}

/// Uploads one file as the gateway's plan says: one PUT (to the store or the gateway), or the
/// parts of a multipart upload, each with `Content-MD5` so the store checks what it got.
async fn upload(gw: &Gateway, file: &Path, uri: &str) -> anyhow::Result<Uploaded> {
    let size = std::fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?.len();
    let md5 = download::md5_range(file, 0, size).await?;
    let request = UploadRequest { uri: uri.to_string(), size };
    let plan: UploadPlan =
        typed(gw.json(gw.request(Method::POST, &["v1", "data", "uploads"], false).json(&request)).await?)?;
    match plan.kind.as_str() {
        "single" | "gateway" => {
            let put = plan.put.as_ref().context("the upload plan has no PUT")?;
            let rb = download::request(gw, put)?
                .header(CONTENT_LENGTH, size)
                .header("content-md5", B64.encode(md5))
                .body(file_body(file, 0, size).await?);
            download::send(rb, put, uri).await?;
        }
        "multipart" => {
            let part_size = plan.part_size.filter(|&p| p > 0).context("the upload plan has no part size")?;
            let mut parts = Vec::with_capacity(plan.parts.len());
            for (i, put) in plan.parts.iter().enumerate() {
                let offset = i as u64 * part_size;
                let len = part_size.min(size.saturating_sub(offset));
                let part_md5 = download::md5_range(file, offset, len).await?;
                let rb = download::request(gw, put)?
                    .header(CONTENT_LENGTH, len)
                    .header("content-md5", B64.encode(part_md5))
                    .body(file_body(file, offset, len).await?);
                let resp = download::send(rb, put, uri).await?;
                let etag = resp.headers().get(ETAG).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                parts.push(UploadedPart { number: i as u32 + 1, etag });
            }
            let upload_id = plan.upload_id.clone().context("the upload plan has no upload id")?;
            let complete = CompleteUpload { uri: uri.to_string(), upload_id, parts };
            let rb = gw.request(Method::POST, &["v1", "data", "uploads", "complete"], false).json(&complete);
            gw.send(rb).await?;
        }
        other => anyhow::bail!("the gateway planned an upload of a kind this CLI does not know: {other}"),
    }
    let md5 = download::hex(&md5);
    Ok(Uploaded { file: file.display().to_string(), uri: uri.to_string(), size, md5 })
}

/// `len` bytes of a file from `offset`, read as they are sent.
async fn file_body(path: &Path, offset: u64, len: u64) -> anyhow::Result<reqwest::Body> {
    let file = download::open_at(path, offset).await?.take(len);
    let chunks = futures::stream::unfold(Some(file), |file| async move {
        let mut file = file?;
        let mut buf = vec![0u8; READ_CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(buf), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    });
    Ok(reqwest::Body::wrap_stream(chunks))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_goes_under_the_uri_and_a_file_to_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("in/sub")).unwrap();
        std::fs::write(dir.path().join("in/a.txt"), "a").unwrap();
        std::fs::write(dir.path().join("in/sub/b.bin"), "b").unwrap();
        let list = upload_list(&dir.path().join("in"), "local://lab/acme/in").unwrap();
        let uris: Vec<&str> = list.iter().map(|(_, u)| u.as_str()).collect();
        assert_eq!(uris, ["local://lab/acme/in/a.txt", "local://lab/acme/in/sub/b.bin"]);
        let file = dir.path().join("in/a.txt");
        assert_eq!(upload_list(&file, "s3://b/x/").unwrap()[0].1, "s3://b/x/a.txt");
        assert_eq!(upload_list(&file, "s3://b/x.txt").unwrap()[0].1, "s3://b/x.txt");
    }
}
