//! Config files and the values in them: TOML read into one error sentence that names the
//! file, line and column, and durations as operators write them.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Why a config file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}, line {line}, column {column}: {message}")]
    Parse {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

/// Reads and parses a TOML config file.
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.into(),
        source,
    })?;
    parse_toml(path, &text)
}

/// Parses TOML `text` read from `path` (named in errors).
pub fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, FileError> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = e
            .span()
            .map_or((1, 1), |span| line_column(text, span.start));
        FileError::Parse {
            path: path.into(),
            line,
            column,
            // toml's message may span several lines with a source excerpt; keep the first.
            message: e
                .message()
                .lines()
                .next()
                .unwrap_or("syntax error")
                .to_string(),
        }
    })
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// A duration in a config file or flag: integer seconds (`3600`) or a number with a unit
/// as humantime reads it (`30s`, `15m`, `1h`, `7d`, `1h 30m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_secs(secs: u64) -> Self {
        Duration(std::time::Duration::from_secs(secs))
    }

    pub fn as_secs(self) -> u64 {
        self.0.as_secs()
    }
}

impl From<Duration> for std::time::Duration {
    fn from(d: Duration) -> Self {
        d.0
    }
}

impl FromStr for Duration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
            return s
                .parse::<u64>()
                .map(Duration::from_secs)
                .map_err(|_| format!("\"{s}\" is too long a duration"));
        }
        humantime::parse_duration(s).map(Duration).map_err(|e| {
            format!("\"{s}\" is not a duration ({e}); write seconds or a number with a unit: 30s, 15m, 1h, 7d")
        })
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        humantime::format_duration(self.0).fmt(f)
    }
}

impl<'de> serde::Deserialize<'de> for Duration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_seconds_or_units() {
        let secs = |s: &str| s.parse::<Duration>().map(Duration::as_secs);
        assert_eq!(secs("90"), Ok(90));
        assert_eq!(secs("90s"), Ok(90));
        assert_eq!(secs("15m"), Ok(900));
        assert_eq!(secs("1h"), Ok(3600));
        assert_eq!(secs("7d"), Ok(604_800));
        assert_eq!(secs("1h 30m"), Ok(5400));
        for bad in ["", "h", "-5", "1 parsec", "99999999999999999999999"] {
            let err = bad.parse::<Duration>().expect_err(bad);
            assert!(err.contains(bad.trim()), "{err}");
        }
        assert_eq!(Duration::from_secs(5400).to_string(), "1h 30m");
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        #[allow(dead_code)]
        ttl: Option<Duration>,
    }

    #[test]
    fn parse_errors_name_line_and_column() {
        let path = Path::new("/etc/x.toml");
        let ok: Sample = parse_toml(path, "ttl = 60\n").expect("int");
        assert_eq!(ok.ttl, Some(Duration::from_secs(60)));
        let ok: Sample = parse_toml(path, "ttl = \"2m\"\n").expect("text");
        assert_eq!(ok.ttl, Some(Duration::from_secs(120)));
        let err = parse_toml::<Sample>(path, "# comment\nttl = 1\n  bogus = 2\n").expect_err("key");
        let text = err.to_string();
        assert!(
            text.starts_with("config file /etc/x.toml, line 3, column 3: "),
            "{text}"
        );
        assert!(text.contains("bogus"), "{text}");
        assert!(!text.contains('\n'), "one line: {text}");
        let err = parse_toml::<Sample>(path, "ttl = \"soon\"").expect_err("duration");
        assert!(err.to_string().contains("line 1"), "{err}");
    }
}
