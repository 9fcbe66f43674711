//! The shape of `src/`, checked on every test run: which top-level module may import which (the
//! layers below), no import circles between files, and who may read the process environment and
//! import I/O crates (README invariants 1, 2 and 5).
//!
//! It reads the sources as text: a small tokenizer drops comments and literals, the module tree is
//! followed from `src/lib.rs` through `mod` declarations (`#[path]` included), and every
//! `crate::…`, `super::…` and `self::…` path (use trees expanded, in code as well as in `use`
//! lines) is resolved to the file that defines the module it names (`tree.rs`, `tokens.rs`); the
//! rules are applied in `check.rs`; `made_up.rs` feeds the checker small made-up trees, so each rule
//! is seen to fail.

use std::collections::BTreeMap;
use std::path::Path;

use tree::SourceTree;

mod check;
mod made_up;
mod tokens;
mod tree;

/// Top-level modules from the bottom up: a module may import modules of lower layers only (and
/// itself). `src/main.rs` sits above them all; a new module must be given a layer here.
const LAYERS: &[&[&str]] = &[
    &["model"],
    &["placement", "private_files", "telemetry"],
    &["metrics", "pki", "store"],
    &["tls"],
    &["storage", "pricing", "error"],
    &["capacity"],
    &["config", "proto"],
    &["broker", "agent", "gateway"],
    &["bench", "cli"],
];

/// Imports the layers alone would allow but the roles forbid: (module, modules it never imports).
const NEVER: &[(&str, &[&str])] =
    &[("agent", &["broker", "gateway", "store", "storage"]), ("gateway", &["store", "agent"])];

/// Services that may read only their own part of `config` (`crate::config::<part>::…`).
const OWN_CONFIG: &[(&str, &str)] = &[("agent", "agent"), ("gateway", "gateway")];

/// Layer exceptions a change in progress may leave for a while; empty on main, and kept empty.
/// (importing file, imported module).
const PENDING_LAYER_EXCEPTIONS: &[(&str, &str)] = &[];

/// Import circles a change in progress may leave for a while: all of a circle's files in one
/// entry. Empty on main, and kept empty: the test also fails on an entry no longer needed.
const PENDING_CIRCLES: &[&[&str]] = &[];

/// Who may read the process environment (`std::env::var`, `var_os`, `vars`, `vars_os`), outside
/// test code: a path prefix and why (README invariant 5).
const ENV_READERS: &[(&str, &str)] = &[
    ("src/config/", "the configuration and its HYBROKER_<SECTION>__<KEY> overrides"),
    ("src/main.rs", "the command line"),
    ("src/telemetry/", "the standard OTEL_* variables"),
    ("src/agent/executor.rs", "PATH, HOME, LANG and TZ passed through to jobs"),
];

/// Modules that do no I/O (README invariant 1): the dependencies they may use (any other crate of
/// `Cargo.toml` is refused: tonic, prost, axum, sqlx, tokio, the cloud SDKs …), and the parts of
/// `std` they must not.
const PURE: &[&str] = &["model", "placement"];
const PURE_CRATES: &[&str] = &[
    "serde",
    "serde_json",
    "serde_yaml_ng",
    "serde_path_to_error",
    "toml",
    "thiserror",
    "humantime",
    "fastrand",
    "time",
    "proptest",
    // Schemas of the model's types for the OpenAPI document and job.schema.json: descriptions, no I/O.
    "utoipa",
];
const IO_STD: &[&str] = &[
    "std::fs",
    "std::process",
    "std::net::TcpStream",
    "std::net::TcpListener",
    "std::net::UdpSocket",
    "std::net::ToSocketAddrs",
];

pub struct Rules<'a> {
    pub layers: &'a [&'a [&'a str]],
    pub never: &'a [(&'a str, &'a [&'a str])],
    pub own_config: &'a [(&'a str, &'a str)],
    pub layer_exceptions: &'a [(&'a str, &'a str)],
    pub circles: &'a [&'a [&'a str]],
    pub env_readers: &'a [(&'a str, &'a str)],
    pub pure: &'a [&'a str],
    pub pure_crates: &'a [&'a str],
    pub io_std: &'a [&'a str],
    /// The crates `Cargo.toml` depends on, as code names them (`aws-sdk-s3` → `aws_sdk_s3`).
    pub crates: &'a [&'a str],
}

const RULES: Rules<'static> = Rules {
    layers: LAYERS,
    never: NEVER,
    own_config: OWN_CONFIG,
    layer_exceptions: PENDING_LAYER_EXCEPTIONS,
    circles: PENDING_CIRCLES,
    env_readers: ENV_READERS,
    pure: PURE,
    pure_crates: PURE_CRATES,
    io_std: IO_STD,
    crates: &[],
};

#[test]
fn src_keeps_its_layers_has_no_import_circles_and_reads_the_environment_only_in_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = BTreeMap::new();
    read_tree(root, &root.join("src"), &mut files);
    let tree = SourceTree::parse(&files);
    let crates = dependencies(&std::fs::read_to_string(root.join("Cargo.toml")).unwrap());
    assert!(["tokio", "aws_sdk_s3", "md5"].iter().all(|c| crates.iter().any(|d| d == c)), "{crates:?}");
    let crates: Vec<&str> = crates.iter().map(String::as_str).collect();
    let rules = Rules { crates: &crates, ..RULES };
    assert!(tree.modules.len() > 100, "the module tree was not followed: {:?}", tree.modules.keys());
    let problems = tree.check(&rules);
    assert!(problems.is_empty(), "{} problems:\n  {}", problems.len(), problems.join("\n  "));
    // Each pending entry is still needed: without the lists, its problem shows.
    let strict = tree.check(&Rules { layer_exceptions: &[], circles: &[], ..rules });
    for (file, module) in PENDING_LAYER_EXCEPTIONS {
        let needed = strict.iter().any(|p| p.starts_with(&format!("{file}:")) && p.contains(&format!("`{module}`")));
        assert!(needed, "PENDING_LAYER_EXCEPTIONS: {file} no longer imports {module}: drop the entry");
    }
    for circle in PENDING_CIRCLES {
        let in_circle =
            |p: &String| p.starts_with("import circle") && circle.iter().filter(|f| p.contains(*f)).count() >= 2;
        let needed = strict.iter().any(in_circle);
        assert!(needed, "PENDING_CIRCLES: {circle:?} is no longer a circle: drop the entry");
    }
}

fn read_tree(root: &Path, dir: &Path, files: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            read_tree(root, &path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let name = path.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            files.insert(name, std::fs::read_to_string(&path).unwrap());
        }
    }
}

/// The names of the crates in `Cargo.toml`'s dependency sections, as code writes them.
fn dependencies(cargo_toml: &str) -> Vec<String> {
    // Packages whose library has another name.
    const LIBRARY_NAMES: &[(&str, &str)] = &[("md-5", "md5"), ("rustls-webpki", "webpki")];
    let mut section = "";
    let mut crates = Vec::new();
    for line in cargo_toml.lines().map(str::trim) {
        if line.starts_with('[') {
            section = line;
        } else if section.ends_with("dependencies]")
            && let Some((name, _)) = line.split_once('=')
        {
            let name = name.trim();
            let library = LIBRARY_NAMES.iter().find(|(package, _)| *package == name).map_or(name, |(_, lib)| lib);
            crates.push(library.replace('-', "_"));
        }
    }
    crates
}
