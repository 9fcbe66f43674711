//! Generates the gRPC code from `proto/` with a vendored `protoc`, so no system package is needed,
//! and names the commit the binary is built from (`HYBROKER_COMMIT`, unless the builder set it):
//! `hybroker --version` and the `hybroker_build_info` metric show it.

use std::path::Path;
use std::process::Command;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; prost-build reads PROTOC from the environment.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/hybroker/v1/hybroker.proto"], &["proto"])?;
    commit();
    Ok(())
}

/// `HYBROKER_COMMIT` (the builder's, else `git rev-parse`, with `-dirty` for local changes) and
/// `HYBROKER_VERSION` (`0.1.0 (commit 1a2b3c4d5e6f)`, or `(commit unknown)` outside a checkout).
fn commit() {
    println!("cargo:rerun-if-env-changed=HYBROKER_COMMIT");
    // Rebuilt when the checkout moves to another commit (only paths that exist: a missing one
    // would rerun this script on every build).
    for path in [".git/HEAD", ".git/index", ".git/packed-refs"] {
        if Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).output().ok().filter(|o| o.status.success())?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    let commit = std::env::var("HYBROKER_COMMIT").ok().filter(|c| !c.is_empty()).or_else(|| {
        let head = git(&["rev-parse", "--short=12", "HEAD"])?;
        let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
        Some(if dirty { format!("{head}-dirty") } else { head })
    });
    if let Some(commit) = &commit {
        println!("cargo:rustc-env=HYBROKER_COMMIT={commit}");
    }
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let commit = commit.as_deref().unwrap_or("unknown");
    println!("cargo:rustc-env=HYBROKER_VERSION={version} (commit {commit})");
}
