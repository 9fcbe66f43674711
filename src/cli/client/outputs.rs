//! `hybroker jobs outputs ID [--download DIR]`: a succeeded job's output objects, listed, or
//! downloaded to `DIR/<output path>/<key>` (resumed, checked, skipped when already there).

use std::path::{Path, PathBuf};

use reqwest::Method;
use serde::Serialize;

use super::download::{self, Wanted};
use super::gateway::Gateway;
use super::output::table;
use super::typed;
use crate::cli::report::{Output, print_json};
use crate::gateway::api::{DataObject, JobOutputs};

/// What `--download --output json` prints: each object and its file.
#[derive(Serialize)]
struct Downloaded<'a> {
    uri: &'a str,
    file: String,
    size: u64,
    md5: Option<&'a str>,
}

pub async fn outputs(gw: &Gateway, id: &str, download_to: Option<PathBuf>, out: Output) -> anyhow::Result<()> {
    let value = gw.json(gw.request(Method::GET, &["v1", "jobs", id, "outputs"], false)).await?;
    let outputs: JobOutputs = typed(value.clone())?;
    let Some(dir) = download_to else {
        match out {
            Output::Json => print_json(&value),
            Output::Table => print!("{}", outputs_table(&outputs)),
        }
        return Ok(());
    };
    let mut wanted = Vec::new();
    for output in &outputs.outputs {
        let mut base = dir.clone();
        for segment in output_dir(&output.path, output.index).iter() {
            base.push(segment);
            download::refuse_link(&base)?;
        }
        for object in &output.objects {
            wanted.push(Wanted { dest: destination(&base, object)?, object: object.clone() });
        }
    }
    download::download_all(gw, &wanted).await?;
    let files: Vec<Downloaded> = wanted
        .iter()
        .map(|w| Downloaded {
            uri: &w.object.uri,
            file: w.dest.display().to_string(),
            size: w.object.size,
            md5: w.object.md5.as_deref(),
        })
        .collect();
    match out {
        Output::Json => print_json(&serde_json::json!({ "job_id": outputs.job_id, "files": files })),
        Output::Table => {
            let rows: Vec<Vec<String>> = files.iter().map(|f| vec![f.size.to_string(), f.file.clone()]).collect();
            print!("{}", table(&["SIZE", "FILE"], &rows));
        }
    }
    Ok(())
}

/// The directory of one output under `DIR`: its work-directory path (`out/` → `out`), or
/// `output-<index>` when that path is not a plain relative one.
pub fn output_dir(path: &str, index: u32) -> PathBuf {
    let trimmed = path.trim_matches('/');
    if is_relative_path(trimmed) { PathBuf::from(trimmed) } else { PathBuf::from(format!("output-{index}")) }
}

/// Where an object's key lands under `base`; a key that would leave it, or a path under `base`
/// that is a symbolic link (a directory on the way or the file), is refused.
pub fn destination(base: &Path, object: &DataObject) -> anyhow::Result<PathBuf> {
    if !is_relative_path(&object.key) {
        anyhow::bail!("{}: its key {:?} cannot be written safely under {}", object.uri, object.key, base.display());
    }
    let mut path = base.to_path_buf();
    for segment in object.key.split('/') {
        path.push(segment);
        download::refuse_link(&path)?;
    }
    Ok(path)
}

/// `a/b/c` with no empty, `.` or `..` segment and no control character.
fn is_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.split('/').any(|s| s.is_empty() || s == "." || s == "..")
        && !path.chars().any(char::is_control)
}

fn outputs_table(outputs: &JobOutputs) -> String {
    let mut rows = Vec::new();
    for output in &outputs.outputs {
        for o in &output.objects {
            rows.push(vec![
                output.path.clone(),
                o.key.clone(),
                o.size.to_string(),
                o.md5.clone().unwrap_or_else(|| "-".into()),
                o.download.via.clone(),
            ]);
        }
    }
    let mut text = table(&["OUTPUT", "KEY", "SIZE", "MD5", "VIA"], &rows);
    if rows.is_empty() {
        text.push_str("(no output objects)\n");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_land_in_their_own_directory_and_keys_cannot_leave_it() {
        assert_eq!(output_dir("out/", 0), PathBuf::from("out"));
        assert_eq!(output_dir("results/model", 1), PathBuf::from("results/model"));
        assert_eq!(output_dir("../x", 2), PathBuf::from("output-2"));
        let object = |key: &str| DataObject {
            key: key.into(),
            uri: "local://lab/x".into(),
            size: 0,
            md5: None,
            etag: None,
            download: crate::gateway::api::HttpRequest {
                method: "GET".into(),
                url: "/".into(),
                via: "gateway".into(),
                headers: Default::default(),
                expires_at: None,
            },
        };
        assert_eq!(destination(Path::new("d/out"), &object("a/b.bin")).unwrap(), Path::new("d/out/a/b.bin"));
        for bad in ["../x", "/etc/passwd", "a//b", ""] {
            assert!(destination(Path::new("d"), &object(bad)).is_err(), "{bad:?}");
        }
    }
}
