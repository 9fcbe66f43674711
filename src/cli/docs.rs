//! `hybroker completions SHELL` and `hybroker manpages DIR`: shell completions and man pages made
//! from the command line's own definition (`clap_complete`, `clap_mangen`), so they never drift
//! from it. The release archive ships both (`scripts/release.sh`).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// A completions or man page write that failed.
#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    #[error("cannot create the man page directory {path}: {source}")]
    Directory { path: PathBuf, source: std::io::Error },
    #[error("cannot write the man pages into {path}: {source}")]
    ManPages { path: PathBuf, source: std::io::Error },
    #[error("cannot write the completions: {0}")]
    Completions(std::io::Error),
}

/// The completion script for `shell`, for the command `name`, written to `out`.
pub fn write_completions(mut command: clap::Command, shell: Shell, out: &mut dyn Write) -> Result<(), DocsError> {
    let name = command.get_name().to_owned();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, name, &mut script);
    out.write_all(&script).and_then(|()| out.flush()).map_err(DocsError::Completions)
}

/// One man page per command in `dir` (made if missing): `hybroker.1`, `hybroker-jobs.1`,
/// `hybroker-admin-agents-drain.1`, … (hidden commands have none). Returns the files written,
/// sorted.
pub fn write_man_pages(command: clap::Command, dir: &Path) -> Result<Vec<PathBuf>, DocsError> {
    std::fs::create_dir_all(dir).map_err(|source| DocsError::Directory { path: dir.to_owned(), source })?;
    // Built, so that subcommands carry their full names (`hybroker-jobs`); `help` is no command.
    let mut command = command.disable_help_subcommand(true);
    command.build();
    let mut written = Vec::new();
    write_pages(&command, dir, &mut written).map_err(|source| DocsError::ManPages { path: dir.to_owned(), source })?;
    written.sort();
    Ok(written)
}

/// The page of `command` and of each of its visible subcommands, depth first.
fn write_pages(command: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        write_pages(sub, dir, written)?;
    }
    let man = clap_mangen::Man::new(command.clone());
    let mut page = Vec::new();
    man.render(&mut page)?;
    let path = dir.join(man.get_filename());
    std::fs::write(&path, ascii_roff(&String::from_utf8_lossy(&page)))?;
    written.push(path);
    Ok(())
}

/// The page with every non-ASCII character as a roff escape (`—` → `\[u2014]`): troff reads its
/// input as Latin-1 unless a `preconv` runs first (man-db's does, plain `groff` and others do
/// not), and the help texts have dashes, arrows and ellipses.
fn ascii_roff(page: &str) -> String {
    let mut out = String::with_capacity(page.len());
    for c in page.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            out.push_str(&format!("\\[u{:04X}]", u32::from(c)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command() -> clap::Command {
        clap::Command::new("tool")
            .version("1.0")
            .about("a tool")
            .subcommand(clap::Command::new("jobs").about("jobs").subcommand(clap::Command::new("list").about("list")))
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn bash_completions_name_the_subcommands() {
        let mut out = Vec::new();
        write_completions(command(), Shell::Bash, &mut out).unwrap();
        let script = String::from_utf8(out).unwrap();
        assert!(script.contains("complete -F _tool"), "{script}");
        assert!(script.contains("jobs"), "{script}");
        assert!(script.contains("list"), "{script}");
    }

    #[test]
    fn one_man_page_per_visible_command() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_man_pages(command(), dir.path()).unwrap();
        let names: Vec<_> = written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["tool-jobs-list.1", "tool-jobs.1", "tool.1"]);
        let page = std::fs::read_to_string(dir.path().join("tool-jobs.1")).unwrap();
        assert!(page.starts_with(".ie \\n(.g .ds Aq"), "{page}");
        assert!(page.contains(".TH tool-jobs 1"), "{page}");
    }

    #[test]
    fn non_ascii_characters_become_roff_escapes() {
        assert_eq!(ascii_roff("a \u{2014} b\u{2026} \u{1F600}"), "a \\[u2014] b\\[u2026] \\[u1F600]");
    }
}
