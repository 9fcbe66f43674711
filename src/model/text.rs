//! Text a tenant chooses and others read (job names, labels, reasons): which characters may not
//! appear in it, and how a terminal shows it safely.
//!
//! A name such as `report\u{202e}fdp.exe` reads as `reportexe.pdf` on a terminal: the bidirectional
//! controls reorder what follows them (CVE-2021-42574, "Trojan Source"), and C0/C1 controls can
//! move the cursor or rewrite earlier output. The model refuses them in names and labels
//! ([`first_display_control`]); the CLI shows any that reach it escaped ([`escape`]).

use std::borrow::Cow;

/// Whether `c` changes how the text around it is shown: a C0 or C1 control (and DEL), a Unicode
/// bidirectional control (the `Bidi_Control` property: U+061C, U+200E, U+200F, U+202A–U+202E,
/// U+2066–U+2069), or the line and paragraph separators U+2028 and U+2029.
pub fn is_display_control(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        || matches!(c, '\u{2028}' | '\u{2029}')
}

/// The first display control in `text` and its character index, for an error that names it.
pub fn first_display_control(text: &str) -> Option<(usize, char)> {
    text.chars().enumerate().find(|(_, c)| is_display_control(*c))
}

/// A refusal naming the character: `must not contain control or bidirectional formatting
/// characters (found \u{202e} at character 7)`.
pub fn display_control_problem(text: &str) -> Option<String> {
    let (at, c) = first_display_control(text)?;
    Some(format!(
        "must not contain control or bidirectional formatting characters (found {} at character {at})",
        c.escape_unicode()
    ))
}

/// `text` with every display control written as `\u{…}` (Rust's escape: `\u{202e}`, `\u{a}`), so
/// a terminal shows exactly what is there and nothing reorders or rewrites the line. Borrowed when
/// there is nothing to escape.
pub fn escape(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_display_control) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if is_display_control(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Like [`escape`], but keeps line breaks: for multi-line text printed as lines.
pub fn escape_keeping_lines(text: &str) -> String {
    text.split('\n').map(escape).collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bidi_and_c0_c1_controls_are_display_controls_and_plain_text_is_not() {
        for c in ['\u{202a}', '\u{202e}', '\u{2066}', '\u{2069}', '\u{200e}', '\u{200f}', '\u{061c}', '\u{2028}'] {
            assert!(is_display_control(c), "{}", c.escape_unicode());
        }
        for c in ['\0', '\n', '\t', '\u{1b}', '\u{7f}', '\u{85}', '\u{9b}'] {
            assert!(is_display_control(c), "{}", c.escape_unicode());
        }
        for c in ['a', 'é', 'ж', 'ع', '中', '🙂', '\u{200d}', ' ', '-', '\u{a0}'] {
            assert!(!is_display_control(c), "{}", c.escape_unicode());
        }
    }

    #[test]
    fn escaping_shows_each_control_as_a_rust_escape_and_leaves_the_rest() {
        assert!(matches!(escape("train-é"), Cow::Borrowed("train-é")));
        assert_eq!(escape("report\u{202e}fdp.exe"), "report\\u{202e}fdp.exe");
        assert_eq!(escape("a\u{1b}[2Jb\n"), "a\\u{1b}[2Jb\\u{a}");
        assert_eq!(escape_keeping_lines("x\u{2066}\ny"), "x\\u{2066}\ny");
        assert_eq!(first_display_control("ab\u{202e}c"), Some((2, '\u{202e}')));
        assert_eq!(
            display_control_problem("ab\u{202e}c").unwrap(),
            "must not contain control or bidirectional formatting characters (found \\u{202e} at character 2)"
        );
        assert_eq!(display_control_problem("plain"), None);
    }
}
