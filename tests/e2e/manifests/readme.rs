//! The commands of `deploy/kubernetes/README.md`, as an operator would run them: the `hybroker pki`
//! and `hybroker admin agents token create` lines, and the Secrets its `kubectl create secret` lines
//! make (name, type, key → file).

use std::collections::BTreeMap;

use super::{kube_dir, read};

/// One Secret as the README makes it.
#[derive(Debug, Default)]
pub struct SecretRecipe {
    pub kind: Option<String>,
    /// Key → the file (relative to the operator's working directory) it is made from.
    pub files: BTreeMap<String, String>,
}

pub struct Readme {
    /// Every command of the README's `sh` blocks, continuation lines joined, split into words.
    pub commands: Vec<Vec<String>>,
}

impl Readme {
    pub fn load() -> Readme {
        let text = read(&kube_dir().join("README.md"));
        let mut commands = Vec::new();
        let mut in_block = false;
        let mut line = String::new();
        for raw in text.lines() {
            if raw.trim_start().starts_with("```") {
                in_block = !in_block && raw.trim() == "```sh";
                continue;
            }
            if !in_block {
                continue;
            }
            let raw = raw.split(" # ").next().unwrap_or("").trim();
            match raw.strip_suffix('\\') {
                Some(part) => line.push_str(part),
                None => {
                    line.push_str(raw);
                    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
                    if !words.is_empty() {
                        commands.push(words);
                    }
                    line.clear();
                }
            }
        }
        assert!(!commands.is_empty(), "deploy/kubernetes/README.md has no sh blocks");
        Readme { commands }
    }

    /// The arguments of every `hybroker WORDS...` command starting with `prefix` (after `hybroker`).
    pub fn hybroker(&self, prefix: &[&str]) -> Vec<Vec<String>> {
        self.commands
            .iter()
            .filter(|c| c[0] == "hybroker" && c[1..].iter().zip(prefix).all(|(a, b)| a == b) && c.len() > prefix.len())
            .map(|c| c[1..].to_vec())
            .collect()
    }

    /// The Secrets the `kubectl -n NS create secret generic NAME ...` lines make.
    pub fn secrets(&self) -> BTreeMap<String, SecretRecipe> {
        let mut secrets = BTreeMap::new();
        for c in self.commands.iter().filter(|c| c[0] == "kubectl") {
            let Some(at) = c.windows(3).position(|w| w == ["create", "secret", "generic"]) else { continue };
            let mut recipe = SecretRecipe::default();
            for word in &c[at + 4..] {
                if let Some(from) = word.strip_prefix("--from-file=") {
                    let (key, file) = from.split_once('=').unwrap_or((from, from));
                    recipe.files.insert(key.to_string(), file.to_string());
                } else if let Some(kind) = word.strip_prefix("--type=") {
                    recipe.kind = Some(kind.to_string());
                }
            }
            secrets.insert(c[at + 3].clone(), recipe);
        }
        secrets
    }
}

/// The values of `--flag VALUE` and `--flag=VALUE` in `args`.
pub fn flag_values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    let mut values = Vec::new();
    for (i, word) in args.iter().enumerate() {
        if word == flag {
            values.extend(args.get(i + 1).map(String::as_str));
        } else if let Some(v) = word.strip_prefix(flag).and_then(|rest| rest.strip_prefix('=')) {
            values.push(v);
        }
    }
    values
}
