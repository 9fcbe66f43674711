//! What every client command shares, the tenants' (`submit`, `jobs`, `agents`, …) and the
//! operators' (`tenants`, `admin`, `pki`) alike: `--output table|json`, the exit statuses, and how
//! a failure is printed — `error: …` on stderr, then `hint: …` where the person can act on it.
//!
//! | exit status | meaning |
//! |---|---|
//! | 0 | done; with `--follow`/`--wait`, the job succeeded |
//! | 1..=125 | with `--follow`/`--wait`: the job failed (its own exit code, clamped; 1 when it has none) or was cancelled (1) |
//! | 2 | the command itself failed: bad arguments (as clap's usage errors), a bad file, an error answer, no connection |

use clap::ValueEnum;
use serde::Serialize;

use super::client::gateway::ClientError;
use crate::model::text::escape;

/// The command did what was asked; with `--follow`/`--wait`, the job succeeded.
pub const EXIT_OK: i32 = 0;
/// With `--follow`/`--wait`: the job was cancelled, or failed without an exit code of its own (a
/// failed job that has one ends the command with it, clamped to 1..=125).
pub const EXIT_JOB_FAILED: i32 = 1;
/// The command itself failed: bad arguments (clap's usage errors exit 2 too), a bad file, an error
/// answer, no connection.
pub const EXIT_ERROR: i32 = 2;

/// How a command prints what it got.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// One JSON document per command (pretty), for programs: the HTTP API's shapes where there is one.
    Json,
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json(value: &impl Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("cli documents serialise"));
}

/// An error and its hint as printed: `error: …` and, where the error carries one, `hint: …`, each
/// escaped (messages may quote what a tenant wrote).
pub fn error_lines(e: &anyhow::Error) -> String {
    let mut text = format!("error: {}\n", escape(&format!("{e:#}")));
    if let Some(hint) = e.downcast_ref::<ClientError>().and_then(|c| c.hint.as_deref()) {
        text.push_str(&format!("hint: {}\n", escape(hint)));
    }
    text
}

/// Prints a failed command's error (and hint) on stderr; returns [`EXIT_ERROR`].
pub fn print_error(e: &anyhow::Error) -> i32 {
    eprint!("{}", error_lines(e));
    EXIT_ERROR
}

/// The exit status of a command: its own on success, [`EXIT_ERROR`] (printed) on failure.
pub fn finish(result: anyhow::Result<i32>) -> i32 {
    result.unwrap_or_else(|e| print_error(&e))
}

/// An error with a hint, for [`print_error`].
pub fn hinted(message: impl Into<String>, hint: impl Into<String>) -> anyhow::Error {
    ClientError::new(message, Some(hint.into())).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_prints_its_causes_then_its_hint() {
        let e = hinted("could not reach the broker", "set --broker").context("listing keys");
        assert_eq!(error_lines(&e), "error: listing keys: could not reach the broker\nhint: set --broker\n");
        let plain = anyhow::anyhow!("no such file");
        assert_eq!(error_lines(&plain), "error: no such file\n");
    }

    #[test]
    fn what_is_printed_is_escaped() {
        let e = hinted("job \u{202e}fdp.exe", "line\nbreak");
        assert_eq!(error_lines(&e), "error: job \\u{202e}fdp.exe\nhint: line\\u{a}break\n");
    }

    #[test]
    fn the_exit_statuses_do_not_collide() {
        assert_eq!(finish(Ok(EXIT_OK)), 0);
        assert_eq!(finish(Err(anyhow::anyhow!("x"))), EXIT_ERROR);
        assert_ne!(EXIT_JOB_FAILED, EXIT_ERROR);
    }
}
