//! Tokens of Rust source: identifiers, punctuation (`::` as one) and string literals; comments,
//! chars, numbers and lifetimes dropped.

#[derive(Debug, Clone, PartialEq)]
pub enum Tok {
    Ident(String),
    Punct(&'static str),
    Str(String),
}

pub fn tokenize(text: &str) -> Vec<(Tok, usize)> {
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
pub fn string_at(chars: &[char], mut i: usize, hashes: usize) -> (String, usize, usize) {
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
