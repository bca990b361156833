//! What a config load reports: the file, the key and what is wrong, never a secret.

use std::path::Path;

/// What went wrong while loading a config. The message always names the file and, where
/// there is one, the key; it never contains a secret value.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    file: String,
    message: String,
}

impl ConfigError {
    pub(super) fn new(file: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.display().to_string(),
            message: message.into(),
        }
    }
}

/// A TOML error as line, column, key and what is wrong, never the line itself: toml's own
/// text quotes the offending line, and a typo beside an inline secret would print the
/// secret (on stderr, and in the log line of a refused reload). Values toml quotes in its
/// message (`invalid type: string "..."`) are left out the same way.
pub(super) fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.\"".contains(c))
    });
    let value = line.split_once('=').map_or("", |(_, v)| v);
    // Backtick-quoted fragments of the message that come from the value are dropped.
    let mut message = String::new();
    for (i, part) in e.message().split('`').enumerate() {
        if i % 2 == 1 {
            let from_value = !part.is_empty() && value.contains(part);
            message.push('`');
            message.push_str(if from_value { "…" } else { part });
            message.push('`');
        } else {
            message.push_str(part);
        }
    }
    // serde quotes strings with double quotes: the value itself goes too.
    let bare = value.trim().trim_matches(|c| c == '"' || c == '\'');
    let quoted = format!("{bare:?}");
    if !bare.is_empty() && message.contains(&quoted) {
        message = message.replace(&quoted, "\"…\"");
    }
    // `listen = 127.0.0.1:8088`: toml says only what it expected after `127.0`.
    let unquoted = value.trim();
    let starts_plain = unquoted
        .chars()
        .next()
        .is_some_and(|c| !matches!(c, '"' | '\'' | '[' | '{'));
    let is_plain_value = unquoted.parse::<f64>().is_ok()
        || matches!(unquoted, "true" | "false")
        || unquoted.starts_with('#');
    if let (Some(key), true, false) = (key, starts_plain, is_plain_value) {
        message.push_str(&format!(" (a text value goes in quotes: {key} = \"…\")"));
    }
    if let Some(near) = nearest_expected(e.message()) {
        message.push_str(&format!(" (did you mean `{near}`?)"));
    }
    match key {
        Some(key) => format!("line {line_no}, column {column}, key `{key}`: {message}"),
        None => format!("line {line_no}, column {column}: {message}"),
    }
}

/// For serde's "unknown field `regoin`, expected one of `name`, `region`, …" (and "unknown
/// variant"), the expected name nearest to the unknown one, if one is near.
fn nearest_expected(message: &str) -> Option<&str> {
    let rest = message
        .strip_prefix("unknown field `")
        .or_else(|| message.strip_prefix("unknown variant `"))?;
    let (unknown, expected) = rest.split_once('`')?;
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|name| (strsim::levenshtein(unknown, name), name))
        .filter(|(d, name)| *d <= 2.max(name.len() / 4))
        .min()
        .map(|(_, name)| name)
}
