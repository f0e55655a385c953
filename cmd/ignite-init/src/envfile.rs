//! The two pieces of systemd syntax the kubelet's unit relies on, so `ignite-init` can start the
//! kubelet the way kubeadm's drop-in (`10-kubeadm.conf`) does without systemd:
//!
//! - [`parse`]: an `EnvironmentFile=` (`/var/lib/kubelet/kubeadm-flags.env`, `/etc/default/kubelet`):
//!   `NAME=VALUE` lines, `#` and `;` comment lines; a value may be double-quoted (backslash escapes
//!   `"`, `\`, `$` and `` ` ``), single-quoted (literal) or bare (a backslash escapes the next character).
//! - [`split_words`]: `$NAME` as a word of `ExecStart=`, which becomes the value split at whitespace,
//!   quotes respected and then removed (`--a="x y" b` is `--a=x y` and `b`).
//!
//! Continuation lines (a value ending in a backslash, or a quote left open at the end of a line) are
//! rejected rather than guessed at: kubeadm writes one line per variable.

/// A quoting mistake in a value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QuoteError {
    /// A quote is opened and never closed.
    #[error("unterminated {0} quote")]
    Unterminated(&'static str),
    /// The text ends with a backslash that escapes nothing.
    #[error("a backslash ends the value (continuation lines are not supported)")]
    TrailingBackslash,
}

/// A line of an environment file that is not valid.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvFileError {
    /// A line that is neither empty, a comment nor `NAME=VALUE`.
    #[error("line {line}: expected NAME=VALUE")]
    NotAssignment {
        /// 1-based line number.
        line: usize,
    },
    /// The part before `=` is not a variable name (letters, digits, `_`, not starting with a digit).
    #[error("line {line}: {name:?} is not a variable name")]
    BadName {
        /// 1-based line number.
        line: usize,
        /// The text before `=`.
        name: String,
    },
    /// The value's quoting is broken.
    #[error("line {line}")]
    Value {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        #[source]
        source: QuoteError,
    },
}

/// The assignments of an environment file, in order (a later one for the same name wins when they
/// are collected into a map, as in systemd).
pub fn parse(text: &str) -> Result<Vec<(String, String)>, EnvFileError> {
    let mut vars = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with(';') {
            continue;
        }
        let Some((name, value)) = trimmed.split_once('=') else {
            return Err(EnvFileError::NotAssignment { line });
        };
        let name = name.trim();
        if !is_name(name) {
            return Err(EnvFileError::BadName { line, name: name.to_string() });
        }
        let value = scan(value.trim(), false).map_err(|source| EnvFileError::Value { line, source })?;
        vars.push((name.to_string(), value.concat()));
    }
    Ok(vars)
}

/// `value` split into words at unquoted whitespace, quotes removed (systemd's `$NAME` expansion).
pub fn split_words(value: &str) -> Result<Vec<String>, QuoteError> {
    scan(value, true)
}

fn is_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c == '_' || c.is_ascii_alphabetic())
        && chars.all(|c| c == '_' || c.is_ascii_alphanumeric())
}

/// Removes quotes and escapes from `text`; with `split`, unquoted whitespace separates words (none are
/// empty unless quoted, like `""`), otherwise it is kept and the result is one word.
fn scan(text: &str, split: bool) -> Result<Vec<String>, QuoteError> {
    let mut words = Vec::new();
    let mut word = String::new();
    // A word exists once any character or quote was seen (so `""` is one empty word).
    let mut started = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            c if split && c.is_whitespace() => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
                continue;
            }
            '\\' => word.push(chars.next().ok_or(QuoteError::TrailingBackslash)?),
            '\'' => loop {
                match chars.next() {
                    Some('\'') => break,
                    Some(c) => word.push(c),
                    None => return Err(QuoteError::Unterminated("single")),
                }
            },
            '"' => loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c @ ('"' | '\\' | '$' | '`')) => word.push(c),
                        Some(c) => {
                            word.push('\\');
                            word.push(c);
                        }
                        None => return Err(QuoteError::Unterminated("double")),
                    },
                    Some(c) => word.push(c),
                    None => return Err(QuoteError::Unterminated("double")),
                }
            },
            c => word.push(c),
        }
        started = true;
    }
    if started || !split {
        words.push(word);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(text: &str) -> Vec<(String, String)> {
        parse(text).unwrap()
    }

    fn words(text: &str) -> Vec<String> {
        split_words(text).unwrap()
    }

    #[test]
    fn kubeadm_flags_file_is_a_double_quoted_value() {
        let text = "KUBELET_KUBEADM_ARGS=\"--container-runtime-endpoint=unix:///var/run/containerd/containerd.sock \
                    --pod-infra-container-image=registry.k8s.io/pause:3.9 --provider-id=ignite://h/vm\"\n";
        let got = vars(text);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "KUBELET_KUBEADM_ARGS");
        assert_eq!(
            words(&got[0].1),
            [
                "--container-runtime-endpoint=unix:///var/run/containerd/containerd.sock",
                "--pod-infra-container-image=registry.k8s.io/pause:3.9",
                "--provider-id=ignite://h/vm",
            ]
        );
    }

    #[test]
    fn comments_blank_lines_bare_single_quoted_and_escaped_values() {
        let text = "# kubelet defaults\n\n; also a comment\n  A = bare value  \nB='lit \\ \"x\"'\nC=\"q \\\" \\\\ \\$ \\n\"\nD=\nE=a\\ b\n";
        assert_eq!(
            vars(text),
            [
                ("A".into(), "bare value".into()),
                ("B".into(), "lit \\ \"x\"".into()),
                ("C".into(), "q \" \\ $ \\n".into()),
                ("D".into(), "".into()),
                ("E".into(), "a b".into()),
            ]
        );
    }

    #[test]
    fn words_respect_quotes_then_drop_them() {
        assert_eq!(
            words("  --a=1\t--node-labels='x=1,y=2'  --b=\"two words\" \"\" c\\ d "),
            ["--a=1", "--node-labels=x=1,y=2", "--b=two words", "", "c d"]
        );
        assert!(words("   ").is_empty());
        assert!(words("").is_empty());
    }

    #[test]
    fn bad_input_names_the_line_and_the_mistake() {
        assert_eq!(parse("A=1\njust words\n"), Err(EnvFileError::NotAssignment { line: 2 }));
        assert_eq!(parse("9X=1"), Err(EnvFileError::BadName { line: 1, name: "9X".into() }));
        assert_eq!(parse("export A=1"), Err(EnvFileError::BadName { line: 1, name: "export A".into() }));
        assert_eq!(parse("=1"), Err(EnvFileError::BadName { line: 1, name: "".into() }));
        assert_eq!(
            parse("A=1\nKUBELET_KUBEADM_ARGS=\"--a=b\n"),
            Err(EnvFileError::Value { line: 2, source: QuoteError::Unterminated("double") })
        );
        assert_eq!(parse("A='x"), Err(EnvFileError::Value { line: 1, source: QuoteError::Unterminated("single") }));
        assert_eq!(parse("A=x\\"), Err(EnvFileError::Value { line: 1, source: QuoteError::TrailingBackslash }));
        assert_eq!(split_words("--a='b"), Err(QuoteError::Unterminated("single")));
        let err = parse("A=\"x").unwrap_err();
        let source = std::error::Error::source(&err).map(|s| s.to_string());
        assert_eq!((err.to_string(), source.as_deref()), ("line 1".into(), Some("unterminated double quote")));
    }
}
