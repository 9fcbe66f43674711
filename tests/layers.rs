//! The shape of `src/`, checked on every test run: which top-level module may import which (the
//! layers below), no import circles between files, and who may read the process environment and
//! import I/O crates (README invariants 1, 2 and 5).
//!
//! It reads the sources as text: a small tokenizer drops comments and literals, the module tree is
//! followed from `src/lib.rs` through `mod` declarations (`#[path]` included), and every
//! `crate::…`, `super::…` and `self::…` path (use trees expanded, in code as well as in `use`
//! lines) is resolved to the file that defines the module it names. The unit tests at the end feed
//! it small made-up trees, so each rule is seen to fail.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Top-level modules from the bottom up: a module may import modules of lower layers only (and
/// itself). `src/main.rs` sits above them all; a new module must be given a layer here.
const LAYERS: &[&[&str]] = &[
    &["model"],
    &["placement", "private_files", "telemetry"],
    &["metrics", "pki", "store"],
    &["tls"],
    &["storage", "pricing", "error"],
    &["config", "proto"],
    &["broker", "agent", "gateway"],
    &["bench", "cli"],
];

/// Imports the layers alone would allow but the roles forbid: (module, modules it never imports).
const NEVER: &[(&str, &[&str])] =
    &[("agent", &["broker", "gateway", "store", "storage"]), ("gateway", &["store", "agent"])];

/// Services that may read only their own part of `config` (`crate::config::<part>::…`).
const OWN_CONFIG: &[(&str, &str)] = &[("agent", "agent"), ("gateway", "gateway")];

/// Layer exceptions other branches of issue 13 remove; the lead empties this list when merging.
/// (importing file, imported module).
const PENDING_LAYER_EXCEPTIONS: &[(&str, &str)] = &[
    // `metrics` writes its address file with `cli::write_atomically`: the `metrics` helper's branch.
    ("src/metrics.rs", "cli"),
];

/// Import circles other branches of issue 13 remove; the lead empties this list when merging.
/// A circle is tolerated only while all of its files are in one entry.
const PENDING_CIRCLES: &[&[&str]] = &[
    // The broker core, its agent streams and its staging calls: the `core` helper's branch.
    &["src/broker/core.rs", "src/broker/agents.rs", "src/broker/staging.rs"],
    // The AWS feed and its price list parser: the `pricing` helper's branch.
    &["src/pricing/aws.rs", "src/pricing/price_list.rs"],
];

/// Who may read the process environment (`std::env::var`, `var_os`, `vars`, `vars_os`), outside
/// test code: a path prefix and why (README invariant 5).
const ENV_READERS: &[(&str, &str)] = &[
    ("src/config/", "the configuration and its HYBROKER_<SECTION>__<KEY> overrides"),
    ("src/main.rs", "the command line"),
    ("src/telemetry/", "the standard OTEL_* variables"),
    ("src/agent/executor.rs", "PATH, HOME, LANG and TZ passed through to jobs"),
];

/// Modules that do no I/O (README invariant 1), and the paths they must not use.
const PURE: &[&str] = &["model", "placement"];
const IO_PATHS: &[&str] = &[
    "tonic",
    "prost",
    "axum",
    "hyper",
    "sqlx",
    "reqwest",
    "tokio",
    "aws_config",
    "aws_sdk_s3",
    "aws_smithy",
    "azure_core",
    "azure_storage",
    "azure_storage_blobs",
    "std::fs",
    "std::process",
    "std::net::TcpStream",
    "std::net::TcpListener",
    "std::net::UdpSocket",
    "std::net::ToSocketAddrs",
];

struct Rules<'a> {
    layers: &'a [&'a [&'a str]],
    never: &'a [(&'a str, &'a [&'a str])],
    own_config: &'a [(&'a str, &'a str)],
    layer_exceptions: &'a [(&'a str, &'a str)],
    circles: &'a [&'a [&'a str]],
    env_readers: &'a [(&'a str, &'a str)],
    pure: &'a [&'a str],
    io_paths: &'a [&'a str],
}

const RULES: Rules<'static> = Rules {
    layers: LAYERS,
    never: NEVER,
    own_config: OWN_CONFIG,
    layer_exceptions: PENDING_LAYER_EXCEPTIONS,
    circles: PENDING_CIRCLES,
    env_readers: ENV_READERS,
    pure: PURE,
    io_paths: IO_PATHS,
};

#[test]
fn src_keeps_its_layers_has_no_import_circles_and_reads_the_environment_only_in_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = BTreeMap::new();
    read_tree(root, &root.join("src"), &mut files);
    let tree = SourceTree::parse(&files);
    assert!(tree.modules.len() > 100, "the module tree was not followed: {:?}", tree.modules.keys());
    let problems = tree.check(&RULES);
    assert!(problems.is_empty(), "{} problems:\n  {}", problems.len(), problems.join("\n  "));
    // Each pending entry is still needed: without the lists, its problem shows.
    let strict = tree.check(&Rules { layer_exceptions: &[], circles: &[], ..RULES });
    for (file, module) in RULES.layer_exceptions {
        let needed = strict.iter().any(|p| p.starts_with(&format!("{file}:")) && p.contains(&format!("`{module}`")));
        assert!(needed, "PENDING_LAYER_EXCEPTIONS: {file} no longer imports {module}: drop the entry");
    }
    for circle in RULES.circles {
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

// ---------------------------------------------------------------------------------------------
// Tokens: identifiers, punctuation (`::` as one) and string literals; comments, chars, numbers
// and lifetimes dropped.

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Ident(String),
    Punct(&'static str),
    Str(String),
}

fn tokenize(text: &str) -> Vec<(Tok, usize)> {
    let chars: Vec<char> = text.chars().collect();
    let (mut i, mut line, mut out) = (0, 1, Vec::new());
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        match c {
            '\n' => {
                line += 1;
                i += 1;
            }
            '/' if at(i + 1) == '/' => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if at(i + 1) == '*' => {
                let mut depth = 0;
                loop {
                    if i >= chars.len() {
                        break;
                    }
                    if chars[i] == '/' && at(i + 1) == '*' {
                        depth += 1;
                        i += 2;
                    } else if chars[i] == '*' && at(i + 1) == '/' {
                        depth -= 1;
                        i += 2;
                        if depth == 0 {
                            break;
                        }
                    } else {
                        line += usize::from(chars[i] == '\n');
                        i += 1;
                    }
                }
            }
            '"' => {
                let (s, next, lines) = string_at(&chars, i + 1, 0);
                out.push((Tok::Str(s), line));
                line += lines;
                i = next;
            }
            '\'' => {
                // A char literal ('a', '\n', '\u{1F600}') or a lifetime ('a, 'static).
                if at(i + 1) == '\\' {
                    i += 3;
                    while i < chars.len() && chars[i] != '\'' {
                        i += 1;
                    }
                    i += 1;
                } else if at(i + 2) == '\'' {
                    i += 3;
                } else {
                    i += 1;
                }
            }
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let raw = matches!(word.as_str(), "r" | "br" | "cr");
                if raw && (at(i) == '"' || (at(i) == '#' && matches!(at(i + 1), '"' | '#'))) {
                    let mut hashes = 0;
                    while at(i) == '#' {
                        hashes += 1;
                        i += 1;
                    }
                    let (s, next, lines) = string_at(&chars, i + 1, hashes);
                    out.push((Tok::Str(s), line));
                    line += lines;
                    i = next;
                } else if matches!(word.as_str(), "b" | "c") && at(i) == '"' {
                    let (s, next, lines) = string_at(&chars, i + 1, 0);
                    out.push((Tok::Str(s), line));
                    line += lines;
                    i = next;
                } else if word == "b" && at(i) == '\'' {
                    i += 1;
                    while i < chars.len() && chars[i] != '\'' {
                        i += if chars[i] == '\\' { 2 } else { 1 };
                    }
                    i += 1;
                } else {
                    out.push((Tok::Ident(word), line));
                }
            }
            c if c.is_ascii_digit() => {
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            ':' if at(i + 1) == ':' => {
                out.push((Tok::Punct("::"), line));
                i += 2;
            }
            c if c.is_whitespace() => i += 1,
            c => {
                const PUNCT: &[&str] = &["{", "}", "(", ")", "[", "]", ",", ";", "*", "#", "=", "$", "!"];
                let punct = PUNCT.iter().find(|p| p.starts_with(c)).copied().unwrap_or("other");
                out.push((Tok::Punct(punct), line));
                i += 1;
            }
        }
    }
    out
}

/// A string literal's content from `i` (after the opening quote) to its closing quote followed by
/// `hashes` `#`s (a raw string; escapes count only in plain strings): (content, next index, newlines).
fn string_at(chars: &[char], mut i: usize, hashes: usize) -> (String, usize, usize) {
    let (start, mut lines) = (i, 0);
    while i < chars.len() {
        match chars[i] {
            '\\' if hashes == 0 => {
                lines += usize::from(chars.get(i + 1) == Some(&'\n'));
                i += 2;
            }
            '"' if chars[i + 1..].iter().take(hashes).filter(|c| **c == '#').count() == hashes => {
                return (chars[start..i].iter().collect(), i + 1 + hashes, lines);
            }
            c => {
                lines += usize::from(c == '\n');
                i += 1;
            }
        }
    }
    (chars[start..].iter().collect(), i, lines)
}

// ---------------------------------------------------------------------------------------------
// The module tree and each file's references.

type ModPath = Vec<String>;

/// One reference to a crate path: the absolute module path named, and where.
#[derive(Debug)]
struct Reference {
    path: ModPath,
    line: usize,
}

#[derive(Debug, Default)]
struct SourceFile {
    module: ModPath,
    /// Declared under `#[cfg(test)]` (itself or an ancestor).
    test: bool,
    references: Vec<Reference>,
    /// Other paths written in the file (crates, `std::…`), with the line and whether in test code.
    external: Vec<(String, usize, bool)>,
}

struct SourceTree {
    /// Module path → the file that defines it (inline modules: their file).
    modules: BTreeMap<ModPath, String>,
    files: BTreeMap<String, SourceFile>,
}

impl SourceTree {
    /// Follows `mod` declarations from `src/lib.rs` (and reads `src/main.rs` as the binary on top).
    fn parse(texts: &BTreeMap<String, String>) -> SourceTree {
        let mut tree = SourceTree { modules: BTreeMap::new(), files: BTreeMap::new() };
        let mut queue = vec![("src/lib.rs".to_string(), Vec::new(), false)];
        while let Some((file, module, test)) = queue.pop() {
            let Some(text) = texts.get(&file) else { continue };
            tree.modules.insert(module.clone(), file.clone());
            let scanned = scan(&file, text, &module, test);
            for (child, child_file, child_test) in scanned.children {
                queue.push((child_file, child, child_test));
            }
            for inline in scanned.inline_modules {
                tree.modules.entry(inline).or_insert_with(|| file.clone());
            }
            tree.files
                .insert(file, SourceFile { module, test, references: scanned.references, external: scanned.external });
        }
        if let Some(text) = texts.get("src/main.rs") {
            let scanned = scan("src/main.rs", text, &["<main>".to_string()], false);
            let file = SourceFile {
                module: vec!["<main>".to_string()],
                test: false,
                references: scanned.references,
                external: scanned.external,
            };
            tree.files.insert("src/main.rs".into(), file);
        }
        tree
    }

    /// The file defining the deepest module `path` names (`None`: only the crate root).
    fn resolve(&self, path: &[String]) -> Option<&String> {
        (1..=path.len()).rev().find_map(|n| self.modules.get(&path[..n]))
    }

    /// Every broken rule, as `file:line: what`.
    fn check(&self, rules: &Rules) -> Vec<String> {
        let mut problems = Vec::new();
        let layer_of = |module: &str| rules.layers.iter().position(|l| l.contains(&module));
        let mut graph: BTreeMap<&str, BTreeMap<&str, usize>> = BTreeMap::new();
        for (name, file) in &self.files {
            let from_top = file.module.first().map(String::as_str);
            let env_allowed = rules.env_readers.iter().any(|(prefix, _)| name.starts_with(prefix));
            if let Some(top) = from_top
                && top != "<main>"
                && layer_of(top).is_none()
            {
                problems.push(format!("{name}: module `{top}` is in no layer: add it to LAYERS"));
            }
            for (path, line, test) in &file.external {
                let segments: Vec<&str> = path.split("::").collect();
                let env_read = matches!(segments.as_slice(), [.., "env", "var" | "var_os" | "vars" | "vars_os"]);
                if env_read && !env_allowed && !test && !file.test {
                    problems
                        .push(format!("{name}:{line}: reads the environment ({path}); only config/ and main.rs may"));
                }
                if from_top.is_some_and(|t| rules.pure.contains(&t))
                    && rules.io_paths.iter().any(|io| path == io || path.starts_with(&format!("{io}::")))
                {
                    problems.push(format!("{name}:{line}: a pure module uses {path}"));
                }
            }
            for r in &file.references {
                let Some(to) = self.resolve(&r.path) else { continue };
                let to_top = r.path[0].as_str();
                if let Some(from) = from_top
                    && from != to_top
                {
                    problems.extend(self.layer_problem(rules, name, from, r, &layer_of));
                }
                let to_module = &self.files[to].module;
                // A module's own submodules are its to use; every other edge counts for circles.
                if to != name && !to_module.starts_with(&file.module) {
                    graph.entry(name.as_str()).or_default().entry(to.as_str()).or_insert(r.line);
                }
            }
        }
        for (group, circle) in circles(&graph) {
            let tolerated = rules.circles.iter().any(|allowed| group.iter().all(|f| allowed.contains(f)));
            if !tolerated {
                let mut text: Vec<String> = circle.iter().map(|(f, line)| format!("{f}:{line}")).collect();
                text.push(circle[0].0.to_string());
                let others = group.len() - circle.len();
                let more = if others > 0 {
                    format!(" (and {others} more files in circles with these)")
                } else {
                    String::new()
                };
                problems.push(format!("import circle: {}{more}", text.join(" → ")));
            }
        }
        problems
    }

    fn layer_problem(
        &self,
        rules: &Rules,
        name: &str,
        from: &str,
        r: &Reference,
        layer_of: &dyn Fn(&str) -> Option<usize>,
    ) -> Option<String> {
        let to = r.path[0].as_str();
        let at = format!("{name}:{}", r.line);
        let shown = r.path.join("::");
        if from == "<main>" {
            return None;
        }
        if rules.layer_exceptions.contains(&(name, to)) {
            return None;
        }
        if let Some((_, never)) = rules.never.iter().find(|(m, _)| *m == from)
            && never.contains(&to)
        {
            return Some(format!("{at}: `{from}` never imports `{to}` ({shown})"));
        }
        if let Some((_, own)) = rules.own_config.iter().find(|(m, _)| *m == from)
            && to == "config"
            && r.path.get(1).map(String::as_str) != Some(own)
        {
            return Some(format!("{at}: `{from}` reads only its own config, `config::{own}` (not {shown})"));
        }
        match (layer_of(from), layer_of(to)) {
            (Some(a), Some(b)) if b < a => None,
            (Some(a), Some(b)) => {
                Some(format!("{at}: `{from}` (layer {a}) imports `{to}` (layer {b}): only lower layers ({shown})"))
            }
            (_, None) => Some(format!("{at}: `{to}` is in no layer: add it to LAYERS ({shown})")),
            (None, _) => None,
        }
    }
}

struct Scanned {
    children: Vec<(ModPath, String, bool)>,
    inline_modules: Vec<ModPath>,
    references: Vec<Reference>,
    external: Vec<(String, usize, bool)>,
}

/// The child modules `file` declares, the inline modules in it, and the paths it names.
fn scan(file: &str, text: &str, module: &[String], test: bool) -> Scanned {
    let toks = tokenize(text);
    let mut out =
        Scanned { children: Vec::new(), inline_modules: Vec::new(), references: Vec::new(), external: Vec::new() };
    let dir = Path::new(file).parent().unwrap_or(Path::new(""));
    let stem = Path::new(file).file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let child_dir: PathBuf = if matches!(stem, "lib" | "main" | "mod") { dir.into() } else { dir.join(stem) };
    // Inline modules open: (name, brace depth inside, test).
    let mut inline: Vec<(String, usize, bool)> = Vec::new();
    let mut depth = 0;
    let main = module.first().is_some_and(|m| m == "<main>");
    let mut i = 0;
    while i < toks.len() {
        let in_test = test || inline.last().is_some_and(|m| m.2);
        let here: ModPath = module.iter().cloned().chain(inline.iter().map(|m| m.0.clone())).collect();
        match &toks[i].0 {
            Tok::Punct("{") => depth += 1,
            Tok::Punct("}") => {
                depth -= 1;
                while inline.last().is_some_and(|m| m.1 > depth) {
                    inline.pop();
                }
            }
            Tok::Ident(kw) if kw == "mod" => {
                if let (Some((Tok::Ident(name), _)), Some((next, _))) = (toks.get(i + 1), toks.get(i + 2)) {
                    let (cfg_test, path_attr) = attributes_before(&toks, i);
                    let path_attr = path_attr.as_deref();
                    let mut child = here.clone();
                    child.push(name.clone());
                    if *next == Tok::Punct(";") {
                        let child_file = match path_attr {
                            Some(p) => dir.join(p),
                            None => child_dir.join(format!("{name}.rs")),
                        };
                        let child_file = child_file.to_string_lossy().into_owned();
                        let mod_rs = child_dir.join(name).join("mod.rs").to_string_lossy().into_owned();
                        out.children.push((child.clone(), child_file, in_test || cfg_test));
                        if path_attr.is_none() {
                            out.children.push((child, mod_rs, in_test || cfg_test));
                        }
                    } else if *next == Tok::Punct("{") {
                        out.inline_modules.push(child);
                        inline.push((name.clone(), depth + 1, in_test || cfg_test));
                        depth += 1;
                        i += 3;
                        continue;
                    }
                }
            }
            Tok::Ident(first) if path_start(&toks, i) => {
                let (paths, next) = path_at(&toks, i);
                let line = toks[i].1;
                for segments in paths {
                    match resolve_relative(&segments, &here, main) {
                        Some(path) if !path.is_empty() => out.references.push(Reference { path, line }),
                        Some(_) => {}
                        None if !matches!(first.as_str(), "crate" | "super" | "self" | "Self") => {
                            out.external.push((segments.join("::"), line, in_test))
                        }
                        None => {}
                    }
                }
                i = next;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// Whether a path starts at `i`: an identifier followed by `::`, not itself after `::` or `$`.
fn path_start(toks: &[(Tok, usize)], i: usize) -> bool {
    let followed = matches!(toks.get(i + 1), Some((Tok::Punct("::"), _)));
    let preceded = i > 0 && matches!(toks[i - 1].0, Tok::Punct("::") | Tok::Punct("$"));
    followed && !preceded
}

/// The path(s) starting at `i`, a use tree expanded: (segment lists, index after).
fn path_at(toks: &[(Tok, usize)], mut i: usize) -> (Vec<Vec<String>>, usize) {
    let mut prefix = Vec::new();
    loop {
        match toks.get(i).map(|t| &t.0) {
            Some(Tok::Ident(s)) => {
                prefix.push(s.clone());
                i += 1;
            }
            Some(Tok::Punct("{")) => {
                let (items, next) = use_group(toks, i);
                return (items.into_iter().map(|tail| join(&prefix, tail)).collect(), next);
            }
            _ => return (vec![prefix], i),
        }
        if matches!(toks.get(i), Some((Tok::Punct("::"), _))) {
            i += 1;
        } else {
            return (vec![prefix], i);
        }
    }
}

/// `{a::b, c::{d, self}, e as f, *}` at `i`: each item's segments, and the index after `}`.
fn use_group(toks: &[(Tok, usize)], mut i: usize) -> (Vec<Vec<String>>, usize) {
    let mut items = Vec::new();
    i += 1;
    while i < toks.len() {
        match &toks[i].0 {
            Tok::Punct("}") => return (items, i + 1),
            Tok::Punct(",") | Tok::Punct("*") => i += 1,
            Tok::Ident(s) if s == "as" => i += 2,
            Tok::Ident(_) | Tok::Punct("{") => {
                let (paths, next) = path_at(toks, i);
                items.extend(paths);
                i = next;
            }
            _ => i += 1,
        }
    }
    (items, i)
}

fn join(prefix: &[String], tail: Vec<String>) -> Vec<String> {
    prefix.iter().cloned().chain(tail.into_iter().filter(|s| s != "self")).collect()
}

/// `crate::`, `super::` and `self::` paths as absolute module paths (`hybroker::` in `main.rs`);
/// `None` for anything else (a crate, `std`, a local module or type).
fn resolve_relative(segments: &[String], here: &ModPath, main: bool) -> Option<ModPath> {
    let first = segments.first()?.as_str();
    let (mut base, rest): (ModPath, &[String]) = match first {
        "crate" if !main => (Vec::new(), &segments[1..]),
        "hybroker" if main => (Vec::new(), &segments[1..]),
        "self" if !main => (here.clone(), &segments[1..]),
        "super" if !main => {
            let ups = segments.iter().take_while(|s| *s == "super").count();
            (here[..here.len().saturating_sub(ups)].to_vec(), &segments[ups..])
        }
        _ => return None,
    };
    base.extend(rest.iter().cloned());
    Some(base)
}

/// The attributes on the item at `i` (skipping back over `pub`, `pub(crate)`): whether one is
/// `#[cfg(test)]`, and a `#[path = "…"]`'s value.
fn attributes_before(toks: &[(Tok, usize)], mut i: usize) -> (bool, Option<String>) {
    let (mut test, mut path) = (false, None);
    while i > 0 {
        match &toks[i - 1].0 {
            Tok::Ident(s) if matches!(s.as_str(), "pub" | "crate" | "super" | "in") => i -= 1,
            Tok::Punct("(") | Tok::Punct(")") => i -= 1,
            Tok::Punct("]") => {
                let Some(open) = (0..i - 1).rev().find(|&j| toks[j].0 == Tok::Punct("#")) else { break };
                let attr: Vec<&Tok> = toks[open + 2..i - 1].iter().map(|t| &t.0).collect();
                if attr == [&Tok::Ident("cfg".into()), &Tok::Punct("("), &Tok::Ident("test".into()), &Tok::Punct(")")] {
                    test = true;
                }
                if let [Tok::Ident(p), Tok::Punct("="), Tok::Str(value)] = attr.as_slice()
                    && p == "path"
                {
                    path = Some(value.clone());
                }
                i = open;
            }
            _ => break,
        }
    }
    (test, path)
}

/// Each strongly connected group of files (Tarjan) and one circle in it: its files in import order
/// with the line of the import to the next.
type Circle<'a> = (Vec<&'a str>, Vec<(&'a str, usize)>);

fn circles<'a>(graph: &BTreeMap<&'a str, BTreeMap<&'a str, usize>>) -> Vec<Circle<'a>> {
    struct Tarjan<'g, 'a> {
        graph: &'g BTreeMap<&'a str, BTreeMap<&'a str, usize>>,
        index: HashMap<&'a str, usize>,
        low: HashMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        groups: Vec<Vec<&'a str>>,
    }
    impl<'a> Tarjan<'_, 'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for &w in self.graph.get(v).into_iter().flat_map(|e| e.keys()) {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    self.low.insert(v, self.low[v].min(self.low[w]));
                } else if self.on_stack.contains(w) {
                    self.low.insert(v, self.low[v].min(self.index[w]));
                }
            }
            if self.low[v] == self.index[v] {
                let mut group = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    group.push(w);
                    if w == v {
                        break;
                    }
                }
                if group.len() > 1 {
                    self.groups.push(group);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        groups: Vec::new(),
    };
    for &v in graph.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.groups.into_iter().map(|group| (group.clone(), circle_in(graph, &group))).collect()
}

/// A shortest circle through the group's first file, staying in the group (breadth first).
fn circle_in<'a>(graph: &BTreeMap<&'a str, BTreeMap<&'a str, usize>>, group: &[&'a str]) -> Vec<(&'a str, usize)> {
    let start = *group.iter().min().expect("a group has files");
    let mut came_from: HashMap<&str, &str> = HashMap::new();
    let mut frontier = vec![start];
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for v in frontier {
            for &w in graph.get(v).into_iter().flat_map(|e| e.keys()) {
                if !group.contains(&w) || came_from.contains_key(w) {
                    continue;
                }
                came_from.insert(w, v);
                if w == start {
                    let mut files = vec![start];
                    let mut at = v;
                    while at != start {
                        files.push(at);
                        at = came_from[at];
                    }
                    files.reverse();
                    files.rotate_right(1);
                    return files
                        .iter()
                        .enumerate()
                        .map(|(k, f)| (*f, graph[f][files[(k + 1) % files.len()]]))
                        .collect();
                }
                next.push(w);
            }
        }
        frontier = next;
    }
    group.iter().map(|f| (*f, 0)).collect()
}

// ---------------------------------------------------------------------------------------------
// The checker on made-up trees: every rule fails when broken.

mod checker {
    use super::*;

    const LAYERS: &[&[&str]] = &[&["model"], &["store", "config"], &["agent", "broker"]];

    fn rules() -> Rules<'static> {
        Rules {
            layers: LAYERS,
            never: &[("agent", &["store"])],
            own_config: &[("agent", "agent")],
            layer_exceptions: &[],
            circles: &[],
            env_readers: &[("src/config/", "config")],
            pure: &["model"],
            io_paths: &["tokio", "std::fs"],
        }
    }

    fn check(files: &[(&str, &str)], rules: &Rules) -> Vec<String> {
        let texts = files.iter().map(|(n, t)| (n.to_string(), t.to_string())).collect();
        SourceTree::parse(&texts).check(rules)
    }

    const LIB: (&str, &str) =
        ("src/lib.rs", "pub mod agent;\npub mod broker;\npub mod config;\npub mod model;\npub mod store;\n");

    /// A tree that follows the rules, with the patterns that must not count: a module root using
    /// its children, children using `super::`, test code reading the environment, comments and
    /// strings naming other modules.
    fn clean() -> Vec<(&'static str, &'static str)> {
        vec![
            LIB,
            ("src/model.rs", "pub struct Job;\n"),
            (
                "src/store.rs",
                "use crate::model::Job;\n// crate::broker is named only here\nconst S: &str = \"crate::agent::X\";\n",
            ),
            ("src/config/mod.rs", "pub mod agent;\npub use agent::AgentConfig;\nfn f() { std::env::var(\"X\"); }\n"),
            ("src/config/agent.rs", "pub struct AgentConfig;\nuse super::super::model::Job;\n"),
            (
                "src/broker/mod.rs",
                "mod core;\nmod jobs;\nuse self::core::Core;\nuse crate::{model::Job, store, config::AgentConfig};\n",
            ),
            ("src/broker/core.rs", "use super::jobs::Jobs;\n#[cfg(test)]\n#[path = \"core_tests.rs\"]\nmod tests;\n"),
            ("src/broker/core_tests.rs", "use super::*;\nfn t() { let _ = std::env::var(\"CI\"); }\n"),
            (
                "src/broker/jobs.rs",
                "use crate::store;\n#[cfg(test)]\nmod tests {\n    fn t() { std::env::var_os(\"X\"); }\n}\n",
            ),
            ("src/agent/mod.rs", "use crate::config::agent::AgentConfig;\nuse crate::model;\n"),
        ]
    }

    #[test]
    fn a_tree_that_keeps_the_rules_passes() {
        assert_eq!(check(&clean(), &rules()), Vec::<String>::new());
    }

    fn with(file: &'static str, text: &'static str) -> Vec<(&'static str, &'static str)> {
        let mut files: Vec<_> = clean().into_iter().filter(|(n, _)| *n != file).collect();
        files.push((file, text));
        files
    }

    fn fails_with(files: &[(&str, &str)], expected: &str) {
        let problems = check(files, &rules());
        assert!(problems.iter().any(|p| p.contains(expected)), "expected {expected:?} in {problems:#?}");
    }

    #[test]
    fn a_circle_between_files_fails_with_the_circle_printed() {
        let files = with("src/broker/jobs.rs", "use crate::store;\n\nuse super::core::Core;\n");
        fails_with(&files, "import circle: src/broker/core.rs:1 → src/broker/jobs.rs:3 → src/broker/core.rs");
        let through_a_group = with("src/broker/jobs.rs", "use crate::{store, broker::{core::{self, Core}}};\n");
        fails_with(&through_a_group, "import circle:");
        let mut tolerated = rules();
        tolerated.circles = &[&["src/broker/core.rs", "src/broker/jobs.rs"]];
        assert_eq!(check(&files, &tolerated), Vec::<String>::new());
    }

    #[test]
    fn an_import_from_the_same_or_a_higher_layer_fails() {
        fails_with(
            &with("src/model.rs", "fn f() -> crate::store::Row { todo!() }\n"),
            "`model` (layer 0) imports `store` (layer 1)",
        );
        fails_with(
            &with("src/agent/mod.rs", "use crate::broker::Core;\n"),
            "`agent` (layer 2) imports `broker` (layer 2)",
        );
        fails_with(&with("src/agent/mod.rs", "use crate::store::Row;\n"), "`agent` never imports `store`");
        fails_with(&with("src/agent/mod.rs", "use crate::config::AgentConfig;\n"), "reads only its own config");
        let mut unlayered = with(
            "src/lib.rs",
            "pub mod agent;\npub mod broker;\npub mod cli;\npub mod config;\npub mod model;\npub mod store;\n",
        );
        unlayered.push(("src/cli.rs", "pub struct Args;\n"));
        fails_with(&unlayered, "src/cli.rs: module `cli` is in no layer");
        unlayered.push(("src/store.rs", "use crate::cli::Args;\n"));
        fails_with(&unlayered, "src/store.rs:1: `cli` is in no layer");
        let mut excepted = rules();
        excepted.layer_exceptions = &[("src/agent/mod.rs", "broker")];
        let files = with("src/agent/mod.rs", "use crate::broker::Core;\n");
        assert_eq!(check(&files, &excepted), Vec::<String>::new());
    }

    #[test]
    fn reading_the_environment_outside_config_fails() {
        fails_with(
            &with("src/store.rs", "fn f() { let _ = std::env::var(\"HOME\"); }\n"),
            "src/store.rs:1: reads the environment",
        );
        fails_with(
            &with("src/store.rs", "use std::env;\n\nfn f() { env::vars_os(); }\n"),
            "src/store.rs:3: reads the environment",
        );
    }

    #[test]
    fn io_in_a_pure_module_fails() {
        fails_with(&with("src/model.rs", "use tokio::sync::Mutex;\n"), "a pure module uses tokio::sync::Mutex");
        fails_with(&with("src/model.rs", "fn f() { std::fs::read(\"x\"); }\n"), "a pure module uses std::fs::read");
    }

    #[test]
    fn the_tokenizer_skips_comments_strings_chars_and_lifetimes() {
        let text = "/* a /* nested */ crate::x */ let c = '\"'; fn f<'a>(s: &'a str) {}\nr#\"crate::y \"quoted\"\"#; b'\\''; x::y";
        let toks: Vec<Tok> = tokenize(text).into_iter().map(|t| t.0).collect();
        assert!(!toks.contains(&Tok::Ident("crate".into())), "{toks:?}");
        assert!(toks.contains(&Tok::Str("crate::y \"quoted\"".into())), "{toks:?}");
        assert_eq!(tokenize(text).last(), Some(&(Tok::Ident("y".into()), 2)));
    }
}
