//! Every selector form Lanyard's attestors produce, in one table, so registration can
//! refuse a selector no attestor would ever emit (`uid:1002`, `unix:uuid:1`,
//! `unix:uid:abc`): such an entry would silently match nothing.
//!
//! A form is a type, an optional key and a rule for the rest: `unix:uid:<u32>` is type
//! `unix`, key `uid`, value a canonical decimal u32. Node forms are what node attestation
//! gives an agent (they go into node entries, parented to the server); workload forms are
//! what workload attestation gives a process. A new attestor adds its forms to [`FORMS`]
//! and, if it needs one, a [`Value`] rule; nothing else changes.

use std::fmt;

use lanyard_proto::Selector;

/// Which kind of entry a selector belongs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Node entries (node aliases): selectors from node attestation.
    Node,
    /// Workload entries: selectors from workload attestation.
    Workload,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Node => "node",
            Scope::Workload => "workload",
        })
    }
}

/// What the part after type (and key) must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value {
    /// A decimal u32 as the kernel reports ids: no sign, no leading zeros.
    U32,
    /// A user or group name: 1 to 256 bytes, no whitespace, ':' or '/'.
    Name,
    /// An absolute, normalized path: no empty, `.` or `..` components, no trailing '/'.
    AbsolutePath,
    /// 64 lowercase hex digits (a SHA-256 digest).
    Sha256Hex,
    /// 32 lowercase hex digits (a join token's ID).
    TokenId,
}

impl Value {
    fn placeholder(self) -> &'static str {
        match self {
            Value::U32 => "<u32>",
            Value::Name => "<name>",
            Value::AbsolutePath => "<absolute path>",
            Value::Sha256Hex => "<64 lowercase hex>",
            Value::TokenId => "<token id: 32 lowercase hex>",
        }
    }

    /// Why `raw` does not fit, or `None` when it does.
    fn problem(self, raw: &str) -> Option<&'static str> {
        let hex = |len: usize| {
            raw.len() == len && raw.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        };
        match self {
            Value::U32 => match raw.parse::<u32>() {
                Ok(n) if n.to_string() == raw => None,
                Ok(_) => Some("a number without sign or leading zeros"),
                Err(_) => Some("a decimal number from 0 to 4294967295"),
            },
            Value::Name => {
                if raw.is_empty() || raw.len() > 256 {
                    Some("1 to 256 bytes")
                } else if raw
                    .chars()
                    .any(|c| c.is_whitespace() || c == ':' || c == '/')
                {
                    Some("a name without whitespace, ':' or '/'")
                } else {
                    None
                }
            }
            Value::AbsolutePath => {
                let Some(rest) = raw.strip_prefix('/') else {
                    return Some("an absolute path starting with '/'");
                };
                let normalized = !rest.is_empty()
                    && rest
                        .split('/')
                        .all(|part| !part.is_empty() && part != "." && part != "..");
                (!normalized).then_some(
                    "a normalized absolute path (no empty, '.' or '..' components, no trailing '/')",
                )
            }
            Value::Sha256Hex => (!hex(64)).then_some("64 lowercase hex digits"),
            Value::TokenId => (!hex(32)).then_some("32 lowercase hex digits"),
        }
    }
}

/// One selector form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Form {
    pub scope: Scope,
    /// The selector type, e.g. `unix`.
    pub kind: &'static str,
    /// The key that starts the value (`uid` in `unix:uid:1001`), if the type has keys.
    pub key: Option<&'static str>,
    pub value: Value,
}

impl fmt::Display for Form {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.key {
            Some(key) => write!(f, "{}:{key}:{}", self.kind, self.value.placeholder()),
            None => write!(f, "{}:{}", self.kind, self.value.placeholder()),
        }
    }
}

const fn workload(kind: &'static str, key: &'static str, value: Value) -> Form {
    Form {
        scope: Scope::Workload,
        kind,
        key: Some(key),
        value,
    }
}

/// Every form Lanyard produces. Attestors added later (container:, systemd:, host:,
/// github:, x509pop:) add their lines here.
pub const FORMS: &[Form] = &[
    // The unix workload attestor (workload/unix.rs).
    workload("unix", "uid", Value::U32),
    workload("unix", "user", Value::Name),
    workload("unix", "gid", Value::U32),
    workload("unix", "group", Value::Name),
    workload("unix", "supplementary_gid", Value::U32),
    workload("unix", "supplementary_group", Value::Name),
    workload("unix", "path", Value::AbsolutePath),
    workload("unix", "sha256", Value::Sha256Hex),
    // The join token node attestor (node/join_token.rs).
    Form {
        scope: Scope::Node,
        kind: "join_token",
        key: None,
        value: Value::TokenId,
    },
];

/// The forms of `scope`, comma-separated, for messages.
pub fn known(scope: Scope) -> String {
    FORMS
        .iter()
        .filter(|f| f.scope == scope)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a selector is not one Lanyard produces. Every message lists the known forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormError {
    #[error(
        "selector \"{selector}\" is not a known {scope} selector; {scope} selectors are: {known}"
    )]
    Unknown {
        selector: String,
        scope: Scope,
        known: String,
    },
    #[error(
        "selector \"{selector}\" is a {other} selector, but this is a {scope} entry; {scope} selectors are: {known}"
    )]
    WrongScope {
        selector: String,
        scope: Scope,
        other: Scope,
        known: String,
    },
    #[error(
        "selector \"{selector}\" does not fit {form}: the value must be {rule}; {scope} selectors are: {known}"
    )]
    BadValue {
        selector: String,
        form: String,
        rule: &'static str,
        scope: Scope,
        known: String,
    },
}

/// The form `selector` has, if any, split into the form and the value after the key.
fn find(selector: &Selector) -> Option<(&'static Form, &str)> {
    FORMS.iter().find_map(|form| {
        if form.kind != selector.kind() {
            return None;
        }
        match form.key {
            None => Some((form, selector.value())),
            Some(key) => {
                let (k, rest) = selector.value().split_once(':')?;
                (k == key).then_some((form, rest))
            }
        }
    })
}

/// Checks that `selector` has one of the forms of `scope` and that its value fits.
pub fn check(scope: Scope, selector: &Selector) -> Result<&'static Form, FormError> {
    let text = selector.to_string();
    let Some((form, rest)) = find(selector) else {
        return Err(FormError::Unknown {
            selector: text,
            scope,
            known: known(scope),
        });
    };
    if form.scope != scope {
        return Err(FormError::WrongScope {
            selector: text,
            scope,
            other: form.scope,
            known: known(scope),
        });
    }
    if let Some(rule) = form.value.problem(rest) {
        return Err(FormError::BadValue {
            selector: text,
            form: form.to_string(),
            rule,
            scope,
            known: known(scope),
        });
    }
    Ok(form)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(s: &str) -> Selector {
        Selector::parse(s).expect("selector syntax")
    }

    #[test]
    fn every_form_lanyard_produces_is_accepted() {
        let digest = "a".repeat(64);
        let token = "0123456789abcdef0123456789abcdef";
        for good in [
            "unix:uid:0".to_string(),
            "unix:uid:4294967295".into(),
            "unix:user:runner".into(),
            "unix:gid:1002".into(),
            "unix:group:docker".into(),
            "unix:supplementary_gid:27".into(),
            "unix:supplementary_group:sudo".into(),
            "unix:path:/usr/bin/python3.11".into(),
            format!("unix:sha256:{digest}"),
        ] {
            check(Scope::Workload, &sel(&good)).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        check(Scope::Node, &sel(&format!("join_token:{token}"))).expect("token id");
    }

    #[test]
    fn unknown_and_malformed_selectors_name_the_known_forms() {
        for (bad, why) in [
            ("uid:1002", "unknown type"),
            ("unix:uuid:1", "unknown key"),
            ("unix:uid", "no key separator"),
            ("docker:label:x", "unknown type"),
        ] {
            let err = check(Scope::Workload, &sel(bad)).expect_err(why);
            assert!(matches!(err, FormError::Unknown { .. }), "{bad}: {err}");
            let text = err.to_string();
            assert!(text.contains(bad), "{text}");
            assert!(
                text.contains("unix:uid:<u32>") && text.contains("unix:sha256:<64 lowercase hex>"),
                "{text}"
            );
        }
        for bad in [
            "unix:uid:abc",
            "unix:uid:-1",
            "unix:uid:01",
            "unix:uid:4294967296",
            "unix:user:two words",
            "unix:path:bin/sh",
            "unix:path:/usr/../bin/sh",
            "unix:path:/usr//bin",
            "unix:path:/usr/bin/",
            "unix:path:/",
            "unix:sha256:ABCD",
            "unix:sha256:abcd",
        ] {
            let err = check(Scope::Workload, &sel(bad)).expect_err(bad);
            assert!(matches!(err, FormError::BadValue { .. }), "{bad}: {err}");
            assert!(err.to_string().contains("unix:uid:<u32>"), "{err}");
        }
        let err = check(Scope::Node, &sel("join_token:not-an-id")).expect_err("token id");
        assert!(err.to_string().contains("join_token:<token id"), "{err}");
    }

    #[test]
    fn node_and_workload_forms_stay_apart() {
        let err = check(
            Scope::Workload,
            &sel("join_token:0123456789abcdef0123456789abcdef"),
        )
        .expect_err("node selector in a workload entry");
        assert!(matches!(err, FormError::WrongScope { .. }), "{err}");
        let err = check(Scope::Node, &sel("unix:uid:1")).expect_err("workload selector");
        assert!(
            err.to_string().contains("node selectors are: join_token:"),
            "{err}"
        );
    }
}
