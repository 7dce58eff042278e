//! Selectors: the `type:value` facts attestors observe about a workload or node, written as
//! SPIRE writes them (`unix:uid:1001` is type `unix`, value `uid:1001`).
//!
//! A registration entry lists the selectors a caller must present to earn its SPIFFE ID; see
//! [`matches_all`].

use std::fmt;
use std::str::FromStr;

/// Longest selector type, in characters (all ASCII, so also bytes).
pub const MAX_TYPE_LEN: usize = 64;

/// Longest selector value, in bytes.
pub const MAX_VALUE_LEN: usize = 1024;

/// Why a string or a pair of strings is not a valid selector.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// The text has no `:` separating type from value.
    #[error("selector {selector:?} has no type; write it as type:value, e.g. unix:uid:1001")]
    NoType {
        /// The text as given.
        selector: String,
    },

    /// The type (before the first `:`) is empty.
    #[error("selector type is empty; write it as type:value, e.g. unix:uid:1001")]
    EmptyType,

    /// The type is longer than [`MAX_TYPE_LEN`].
    #[error("selector type is {len} bytes long; the limit is 64")]
    TypeTooLong {
        /// Length of the rejected type, in bytes.
        len: usize,
    },

    /// The type contains a character outside `[a-z0-9_-]`.
    #[error("selector type contains {ch:?}; only a-z, 0-9, '_' and '-' are allowed")]
    TypeChar {
        /// The first offending character.
        ch: char,
    },

    /// The value (after the first `:`) is empty.
    #[error("selector value is empty; write it as type:value, e.g. unix:uid:1001")]
    EmptyValue,

    /// The value is longer than [`MAX_VALUE_LEN`] bytes.
    #[error("selector value is {len} bytes long; the limit is 1024 bytes")]
    ValueTooLong {
        /// Length of the rejected value, in bytes.
        len: usize,
    },

    /// The value contains a control character.
    #[error("selector value contains the control character {ch:?}")]
    ValueControlChar {
        /// The first offending character.
        ch: char,
    },
}

/// One validated selector: a type such as `unix` and a value such as `uid:1001`.
///
/// Ordering and equality compare the type, then the value, exactly (selectors are matched
/// byte for byte, never case-folded).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// Parses `type:value`, splitting on the first `:` only, so the value may itself contain
    /// colons (`unix:uid:1001`).
    ///
    /// # Errors
    /// [`SelectorError::NoType`] without a `:`, otherwise the error of the first rule the type
    /// or value breaks.
    pub fn parse(text: &str) -> Result<Self, SelectorError> {
        let (kind, value) = text.split_once(':').ok_or_else(|| SelectorError::NoType {
            selector: text.to_owned(),
        })?;
        Self::new(kind, value)
    }

    /// Builds a selector from its two parts, e.g. `Selector::new("unix", "uid:1001")`.
    ///
    /// # Errors
    /// The error of the first rule the type or value breaks.
    pub fn new(kind: impl Into<String>, value: impl Into<String>) -> Result<Self, SelectorError> {
        let kind = kind.into();
        let value = value.into();
        validate_kind(&kind)?;
        validate_value(&value)?;
        Ok(Self { kind, value })
    }

    /// The type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The value, e.g. `uid:1001`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl From<&Selector> for crate::types::Selector {
    fn from(selector: &Selector) -> Self {
        Self {
            r#type: selector.kind.clone(),
            value: selector.value.clone(),
        }
    }
}

impl From<Selector> for crate::types::Selector {
    fn from(selector: Selector) -> Self {
        Self {
            r#type: selector.kind,
            value: selector.value,
        }
    }
}

impl TryFrom<&crate::types::Selector> for Selector {
    type Error = SelectorError;

    /// Validates a selector received on the wire; the protobuf type accepts any strings.
    fn try_from(selector: &crate::types::Selector) -> Result<Self, Self::Error> {
        Self::new(selector.r#type.as_str(), selector.value.as_str())
    }
}

impl TryFrom<crate::types::Selector> for Selector {
    type Error = SelectorError;

    /// Validates a selector received on the wire, reusing its strings.
    fn try_from(selector: crate::types::Selector) -> Result<Self, Self::Error> {
        Self::new(selector.r#type, selector.value)
    }
}

/// Whether every selector in `required` is among `present`.
///
/// An empty `required` never matches: a registration entry without selectors would otherwise
/// match every caller, which must never happen.
pub fn matches_all(required: &[Selector], present: &[Selector]) -> bool {
    !required.is_empty() && required.iter().all(|wanted| present.contains(wanted))
}

fn validate_kind(kind: &str) -> Result<(), SelectorError> {
    if kind.is_empty() {
        return Err(SelectorError::EmptyType);
    }
    if let Some(ch) = kind
        .chars()
        .find(|ch| !matches!(ch, 'a'..='z' | '0'..='9' | '_' | '-'))
    {
        return Err(SelectorError::TypeChar { ch });
    }
    // After the character check, so the length is in ASCII characters and bytes alike.
    if kind.len() > MAX_TYPE_LEN {
        return Err(SelectorError::TypeTooLong { len: kind.len() });
    }
    Ok(())
}

fn validate_value(value: &str) -> Result<(), SelectorError> {
    if value.is_empty() {
        return Err(SelectorError::EmptyValue);
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(SelectorError::ValueTooLong { len: value.len() });
    }
    // Control characters (newlines, escapes, NUL) would let a value forge log lines or
    // terminal output; everything printable, including spaces and non-ASCII, is allowed.
    if let Some(ch) = value.chars().find(|ch| ch.is_control()) {
        return Err(SelectorError::ValueControlChar { ch });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(text: &str) -> Selector {
        Selector::parse(text).unwrap_or_else(|e| panic!("{text:?}: {e}"))
    }

    #[test]
    fn valid_selectors_split_on_the_first_colon_and_round_trip() {
        let long_kind = "k".repeat(MAX_TYPE_LEN);
        let long_value = "v".repeat(MAX_VALUE_LEN);
        let at_limits = format!("{long_kind}:{long_value}");
        let cases: &[(&str, &str, &str)] = &[
            ("unix:uid:1001", "unix", "uid:1001"),
            ("unix:gid:0", "unix", "gid:0"),
            ("unix:path:/usr/bin/my app", "unix", "path:/usr/bin/my app"),
            ("k8s:pod-label:app:web", "k8s", "pod-label:app:web"),
            ("join_token:abc", "join_token", "abc"),
            (
                "x509pop:subject:cn:caf\u{e9}",
                "x509pop",
                "subject:cn:caf\u{e9}",
            ),
            ("a-b:x", "a-b", "x"),
            ("t::", "t", ":"),
            ("t: ", "t", " "),
            (&at_limits, &long_kind, &long_value),
        ];
        for &(text, kind, value) in cases {
            let parsed = sel(text);
            assert_eq!(parsed.kind(), kind, "{text:?}");
            assert_eq!(parsed.value(), value, "{text:?}");
            assert_eq!(parsed.to_string(), text, "Display of {text:?}");
            assert_eq!(text.parse::<Selector>().as_ref(), Ok(&parsed));
            assert_eq!(Selector::new(kind, value).as_ref(), Ok(&parsed));
        }
    }

    #[test]
    fn invalid_selectors_are_rejected_with_the_rule_they_break() {
        let long_kind = format!("{}:v", "k".repeat(MAX_TYPE_LEN + 1));
        let long_value = format!("t:{}", "v".repeat(MAX_VALUE_LEN + 1));
        let long_utf8_value = format!("t:{}", "\u{e9}".repeat(513));
        let cases: &[(&str, SelectorError)] = &[
            (
                "uid1001",
                SelectorError::NoType {
                    selector: "uid1001".into(),
                },
            ),
            (
                "",
                SelectorError::NoType {
                    selector: String::new(),
                },
            ),
            (":uid:1001", SelectorError::EmptyType),
            ("unix:", SelectorError::EmptyValue),
            (":", SelectorError::EmptyType),
            ("Unix:uid:1", SelectorError::TypeChar { ch: 'U' }),
            ("un ix:uid:1", SelectorError::TypeChar { ch: ' ' }),
            ("un.ix:uid:1", SelectorError::TypeChar { ch: '.' }),
            ("\u{e9}:x", SelectorError::TypeChar { ch: '\u{e9}' }),
            (&long_kind, SelectorError::TypeTooLong { len: 65 }),
            (&long_value, SelectorError::ValueTooLong { len: 1025 }),
            (&long_utf8_value, SelectorError::ValueTooLong { len: 1026 }),
            ("unix:uid:1\n", SelectorError::ValueControlChar { ch: '\n' }),
            ("unix:uid\0", SelectorError::ValueControlChar { ch: '\0' }),
            (
                "unix:a\u{1b}[0m",
                SelectorError::ValueControlChar { ch: '\u{1b}' },
            ),
            (
                "unix:a\u{7f}",
                SelectorError::ValueControlChar { ch: '\u{7f}' },
            ),
            (
                "unix:a\u{85}",
                SelectorError::ValueControlChar { ch: '\u{85}' },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(Selector::parse(text).as_ref(), Err(want), "{text:?}");
        }
    }

    #[test]
    fn error_messages_name_the_problem() {
        let err = Selector::parse("uid1001").expect_err("no colon");
        assert_eq!(
            err.to_string(),
            "selector \"uid1001\" has no type; write it as type:value, e.g. unix:uid:1001"
        );
        assert_eq!(
            SelectorError::TypeChar { ch: 'U' }.to_string(),
            "selector type contains 'U'; only a-z, 0-9, '_' and '-' are allowed"
        );
        assert_eq!(
            SelectorError::ValueControlChar { ch: '\n' }.to_string(),
            "selector value contains the control character '\\n'"
        );
        let all = [
            SelectorError::NoType {
                selector: "x".into(),
            },
            SelectorError::EmptyType,
            SelectorError::TypeTooLong { len: 65 },
            SelectorError::TypeChar { ch: 'U' },
            SelectorError::EmptyValue,
            SelectorError::ValueTooLong { len: 1025 },
            SelectorError::ValueControlChar { ch: '\0' },
        ];
        for err in all {
            let msg = err.to_string();
            assert!(!msg.ends_with('.'), "{msg:?}");
        }
    }

    #[test]
    fn converts_to_and_from_protobuf() {
        let selector = sel("unix:uid:1001");
        let wire = crate::types::Selector::from(&selector);
        assert_eq!(wire.r#type, "unix");
        assert_eq!(wire.value, "uid:1001");
        assert_eq!(Selector::try_from(&wire).as_ref(), Ok(&selector));
        assert_eq!(
            crate::types::Selector::from(selector.clone()),
            wire,
            "owned conversion matches"
        );
        assert_eq!(Selector::try_from(wire).as_ref(), Ok(&selector));

        // The wire type carries any strings; they are validated on the way in.
        let cases: &[(&str, &str, SelectorError)] = &[
            ("", "uid:1", SelectorError::EmptyType),
            ("unix", "", SelectorError::EmptyValue),
            ("UNIX", "uid:1", SelectorError::TypeChar { ch: 'U' }),
            ("unix:uid", "1", SelectorError::TypeChar { ch: ':' }),
            (
                "unix",
                "uid\r1",
                SelectorError::ValueControlChar { ch: '\r' },
            ),
        ];
        for (kind, value, want) in cases {
            let wire = crate::types::Selector {
                r#type: (*kind).into(),
                value: (*value).into(),
            };
            assert_eq!(Selector::try_from(&wire).as_ref(), Err(want), "{wire:?}");
        }
    }

    #[test]
    fn matches_all_requires_every_selector_and_at_least_one() {
        let uid = sel("unix:uid:1001");
        let gid = sel("unix:gid:1001");
        let path = sel("unix:path:/usr/bin/app");
        let other_uid = sel("unix:uid:0");
        let cases: &[(&[&Selector], &[&Selector], bool)] = &[
            (&[&uid], &[&uid], true),
            (&[&uid], &[&uid, &gid, &path], true),
            (&[&uid, &gid], &[&path, &gid, &uid], true),
            (&[&uid, &gid], &[&uid], false),
            (&[&uid], &[&other_uid], false),
            (&[&uid], &[], false),
            // An entry without selectors must never match anything.
            (&[], &[], false),
            (&[], &[&uid], false),
        ];
        for (required, present, want) in cases {
            let required: Vec<Selector> = required.iter().map(|s| (*s).clone()).collect();
            let present: Vec<Selector> = present.iter().map(|s| (*s).clone()).collect();
            assert_eq!(
                matches_all(&required, &present),
                *want,
                "required {required:?}, present {present:?}"
            );
        }
    }

    #[test]
    fn comparison_is_exact() {
        // Values are compared byte for byte: no numeric or whitespace normalisation.
        assert_ne!(sel("unix:uid:1001"), sel("unix:uid:01001"));
        assert_ne!(sel("unix:path:/a"), sel("unix:path:/a "));
        assert!(sel("a:z") < sel("b:a"), "ordered by type first");
        assert!(sel("a:a") < sel("a:b"));
    }
}
