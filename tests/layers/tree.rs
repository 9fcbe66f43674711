//! The module tree, followed from `src/lib.rs` through `mod` declarations, and the paths each
//! file names, resolved to modules.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::tokens::{Tok, tokenize};

pub type ModPath = Vec<String>;

/// One reference to a crate path: the absolute module path named, and where.
#[derive(Debug)]
pub struct Reference {
    pub path: ModPath,
    pub line: usize,
}

#[derive(Debug, Default)]
pub struct SourceFile {
    pub module: ModPath,
    /// Declared under `#[cfg(test)]` (itself or an ancestor).
    pub test: bool,
    pub references: Vec<Reference>,
    /// Other paths written in the file (crates, `std::…`), with the line and whether in test code.
    pub external: Vec<(String, usize, bool)>,
}

pub struct SourceTree {
    /// Module path → the file that defines it (inline modules: their file).
    pub modules: BTreeMap<ModPath, String>,
    pub files: BTreeMap<String, SourceFile>,
}

impl SourceTree {
    /// Follows `mod` declarations from `src/lib.rs` (and reads `src/main.rs` as the binary on top).
    pub fn parse(texts: &BTreeMap<String, String>) -> SourceTree {
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
    pub fn resolve(&self, path: &[String]) -> Option<&String> {
        (1..=path.len()).rev().find_map(|n| self.modules.get(&path[..n]))
    }
}

pub struct Scanned {
    pub children: Vec<(ModPath, String, bool)>,
    pub inline_modules: Vec<ModPath>,
    pub references: Vec<Reference>,
    pub external: Vec<(String, usize, bool)>,
}

/// The child modules `file` declares, the inline modules in it, and the paths it names.
pub fn scan(file: &str, text: &str, module: &[String], test: bool) -> Scanned {
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
pub fn path_start(toks: &[(Tok, usize)], i: usize) -> bool {
    let followed = matches!(toks.get(i + 1), Some((Tok::Punct("::"), _)));
    let preceded = i > 0 && matches!(toks[i - 1].0, Tok::Punct("::") | Tok::Punct("$"));
    followed && !preceded
}

/// The path(s) starting at `i`, a use tree expanded: (segment lists, index after).
pub fn path_at(toks: &[(Tok, usize)], mut i: usize) -> (Vec<Vec<String>>, usize) {
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
pub fn use_group(toks: &[(Tok, usize)], mut i: usize) -> (Vec<Vec<String>>, usize) {
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

pub fn join(prefix: &[String], tail: Vec<String>) -> Vec<String> {
    prefix.iter().cloned().chain(tail.into_iter().filter(|s| s != "self")).collect()
}

/// `crate::`, `super::` and `self::` paths as absolute module paths (`hybroker::` in `main.rs`);
/// `None` for anything else (a crate, `std`, a local module or type).
pub fn resolve_relative(segments: &[String], here: &ModPath, main: bool) -> Option<ModPath> {
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
pub fn attributes_before(toks: &[(Tok, usize)], mut i: usize) -> (bool, Option<String>) {
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
