//! The checker on made-up trees: every rule fails when broken.

use crate::Rules;
use crate::tokens::{Tok, tokenize};
use crate::tree::SourceTree;

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
        pure_crates: &["serde"],
        io_std: &["std::fs"],
        crates: &["tokio", "serde", "time"],
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
    fails_with(&with("src/agent/mod.rs", "use crate::broker::Core;\n"), "`agent` (layer 2) imports `broker` (layer 2)");
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
    fails_with(&with("src/model.rs", "fn f() { tokio::spawn(async {}); }\n"), "a pure module uses tokio::spawn");
    // `time` is a crate the pure modules may not use here, but this `time` is `std::time`.
    let files = with("src/model.rs", "use std::time;\nuse serde::Serialize;\nfn f() -> time::Duration { todo!() }\n");
    assert_eq!(check(&files, &rules()), Vec::<String>::new());
}

#[test]
fn the_tokenizer_skips_comments_strings_chars_and_lifetimes() {
    let text =
        "/* a /* nested */ crate::x */ let c = '\"'; fn f<'a>(s: &'a str) {}\nr#\"crate::y \"quoted\"\"#; b'\\''; x::y";
    let toks: Vec<Tok> = tokenize(text).into_iter().map(|t| t.0).collect();
    assert!(!toks.contains(&Tok::Ident("crate".into())), "{toks:?}");
    assert!(toks.contains(&Tok::Str("crate::y \"quoted\"".into())), "{toks:?}");
    assert_eq!(tokenize(text).last(), Some(&(Tok::Ident("y".into()), 2)));
}
