//! SPIFFE IDs and trust domains, valid once constructed.
//!
//! The rules are those of the SPIFFE ID standard as Lanyard applies them (spec §1), with one
//! deliberate narrowing: the standard calls the scheme and trust domain case-insensitive, but
//! go-spiffe accepts only lowercase and py-spiffe needs a lowercase scheme in URI SANs. So
//! uppercase is *rejected* rather than folded, and nothing uppercase can ever be issued.
//!
//! Every rule has its own [`IdError`] variant, so a caller (or an operator reading a log) learns
//! exactly which rule an ID broke.

use std::fmt;
use std::str::FromStr;

/// The only accepted scheme prefix, lowercase.
const SCHEME_PREFIX: &str = "spiffe://";

/// Longest SPIFFE ID, in bytes, that Lanyard accepts or creates (spec §1: implementations must
/// accept 2048 bytes and should not create longer IDs).
pub const MAX_ID_LEN: usize = 2048;

/// Longest trust domain name, in bytes (the URI host limit).
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Why a string is not a valid SPIFFE ID or trust domain: one variant per rule.
///
/// Messages name the problem without repeating the input; callers wrap them, e.g.
/// `invalid SPIFFE ID "x": <message>`.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The input is the empty string.
    #[error("SPIFFE ID is empty")]
    Empty,

    /// The whole ID is longer than [`MAX_ID_LEN`] bytes.
    #[error("SPIFFE ID is {len} bytes long; the limit is 2048 bytes")]
    TooLong {
        /// Length of the rejected input, in bytes.
        len: usize,
    },

    /// The input contains a byte outside ASCII.
    #[error("SPIFFE ID contains a non-ASCII character; only ASCII is allowed")]
    NonAscii,

    /// The input does not start with `spiffe://`.
    #[error("SPIFFE ID must start with \"spiffe://\"")]
    WrongScheme,

    /// The scheme is `spiffe` in some other case, e.g. `SPIFFE://`.
    #[error("the scheme must be written in lowercase, as \"spiffe://\"")]
    SchemeUppercase,

    /// Nothing between `spiffe://` and the path.
    #[error("trust domain is missing; write the ID as spiffe://example.org/path")]
    TrustDomainMissing,

    /// The trust domain is longer than [`MAX_TRUST_DOMAIN_LEN`] bytes.
    #[error("trust domain is longer than 255 bytes")]
    TrustDomainTooLong,

    /// The trust domain contains an uppercase letter.
    #[error("trust domain contains uppercase letters; write it in lowercase")]
    TrustDomainUppercase,

    /// The trust domain contains a character outside `[a-z0-9._-]`.
    #[error("trust domain contains {ch:?}; only a-z, 0-9, '.', '-' and '_' are allowed")]
    TrustDomainChar {
        /// The first offending character.
        ch: char,
    },

    /// A trust domain was expected but the input has a path.
    #[error("a trust domain has no path; write it as example.org or spiffe://example.org")]
    TrustDomainHasPath,

    /// The authority has a port (`:`).
    #[error("trust domain must not have a port (\":\")")]
    Port,

    /// The authority has user info (`@`).
    #[error("trust domain must not have user info (\"@\")")]
    UserInfo,

    /// The authority is a bracketed IPv6 literal.
    #[error("trust domain must not be a bracketed IPv6 address")]
    IpLiteral,

    /// The input has a query (`?`).
    #[error("SPIFFE ID must not have a query (\"?\")")]
    Query,

    /// The input has a fragment (`#`).
    #[error("SPIFFE ID must not have a fragment (\"#\")")]
    Fragment,

    /// The input contains percent-encoding (`%`).
    #[error("SPIFFE ID must not contain percent-encoding (\"%\")")]
    PercentEncoded,

    /// A path given on its own is neither empty nor starts with `/`.
    #[error("path must be empty or start with '/'")]
    PathNotAbsolute,

    /// The path contains `//`.
    #[error("path contains an empty segment (\"//\")")]
    EmptySegment,

    /// The path contains a `.` or `..` segment.
    #[error("path must not contain \".\" or \"..\" segments")]
    DotSegment,

    /// The path ends with `/`.
    #[error("path must not end with '/'")]
    TrailingSlash,

    /// A path segment contains a character outside `[A-Za-z0-9._-]`.
    #[error("path contains {ch:?}; only A-Z, a-z, 0-9, '.', '-' and '_' are allowed")]
    PathChar {
        /// The first offending character.
        ch: char,
    },
}

/// A SPIFFE trust domain name such as `example.org`, always lowercase.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain {
    /// The bare name, already validated.
    name: String,
}

impl TrustDomain {
    /// Parses a trust domain written either bare (`example.org`) or as the ID of the trust
    /// domain itself (`spiffe://example.org`, no path).
    ///
    /// # Errors
    /// The [`IdError`] of the first rule the input breaks.
    pub fn new(input: &str) -> Result<Self, IdError> {
        if input.is_empty() {
            return Err(IdError::TrustDomainMissing);
        }
        let name = match input.split_once("://") {
            Some((scheme, rest)) => {
                check_scheme(scheme)?;
                rest
            }
            None => input,
        };
        // Checked before the character rules so `spiffe://td/x` gets a message about the
        // path rather than one about '/'.
        if let Some(at) = name.find('/') {
            // A query or fragment after the TD is reported as such, not as a path.
            validate_trust_domain(&name[..at])?;
            return Err(IdError::TrustDomainHasPath);
        }
        validate_trust_domain(name)?;
        Ok(Self {
            name: name.to_owned(),
        })
    }

    /// The bare name, e.g. `example.org`.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The ID of the trust domain itself, e.g. `spiffe://example.org`: the key form of bundle
    /// maps in the Workload API.
    pub fn id_string(&self) -> String {
        format!("{SCHEME_PREFIX}{}", self.name)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// A SPIFFE ID such as `spiffe://example.org/ns/prod/sa/web`.
///
/// The empty path (`spiffe://example.org`) is legal and names the trust domain itself; see
/// [`SpiffeId::is_root`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The full ID, already validated.
    id: String,
    /// Byte offset of the path in `id`, equal to `id.len()` when the path is empty. Ordering
    /// is decided by `id` alone because this field is a function of it.
    path_start: usize,
}

impl SpiffeId {
    /// Parses and validates a full SPIFFE ID.
    ///
    /// # Errors
    /// The [`IdError`] of the first rule the input breaks.
    pub fn parse(input: &str) -> Result<Self, IdError> {
        if input.is_empty() {
            return Err(IdError::Empty);
        }
        if input.len() > MAX_ID_LEN {
            return Err(IdError::TooLong { len: input.len() });
        }
        if !input.is_ascii() {
            return Err(IdError::NonAscii);
        }
        let rest = strip_scheme(input)?;
        // The authority ends at the first '/'; anything after is the path. A '?' or '#' in the
        // authority is caught by the trust domain rules.
        let (td, path) = match rest.find('/') {
            Some(at) => rest.split_at(at),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self {
            id: input.to_owned(),
            path_start: SCHEME_PREFIX.len() + td.len(),
        })
    }

    /// Builds the ID of `path` in `td`. `path` is empty (the trust domain's own ID) or starts
    /// with `/`.
    ///
    /// # Errors
    /// The [`IdError`] of the first path rule `path` breaks, or [`IdError::TooLong`] if the
    /// result would be longer than [`MAX_ID_LEN`].
    pub fn new(td: &TrustDomain, path: &str) -> Result<Self, IdError> {
        validate_path(path)?;
        let id = format!("{SCHEME_PREFIX}{}{path}", td.as_str());
        if id.len() > MAX_ID_LEN {
            return Err(IdError::TooLong { len: id.len() });
        }
        Ok(Self {
            path_start: SCHEME_PREFIX.len() + td.as_str().len(),
            id,
        })
    }

    /// The full ID, e.g. `spiffe://example.org/web`.
    pub fn as_str(&self) -> &str {
        &self.id
    }

    /// The trust domain this ID belongs to.
    pub fn trust_domain(&self) -> TrustDomain {
        // Validated when `self` was built, so no need to parse again.
        TrustDomain {
            name: self.trust_domain_name().to_owned(),
        }
    }

    /// The bare trust domain name, e.g. `example.org`.
    pub fn trust_domain_name(&self) -> &str {
        // In bounds and on char boundaries by construction: the ID is ASCII and `path_start`
        // lies between the scheme and the end. `get` keeps even a broken invariant from
        // panicking.
        self.id
            .get(SCHEME_PREFIX.len()..self.path_start)
            .unwrap_or_default()
    }

    /// The path, e.g. `/web`, or the empty string for a trust domain's own ID.
    pub fn path(&self) -> &str {
        self.id.get(self.path_start..).unwrap_or_default()
    }

    /// Whether the path is empty, i.e. this is the ID of the trust domain itself. Such an ID
    /// is legal but must never be the ID of a leaf X509-SVID.
    pub fn is_root(&self) -> bool {
        self.path_start == self.id.len()
    }

    /// Whether this ID belongs to `td`.
    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_name() == td.as_str()
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

/// Returns what follows `spiffe://`, or the scheme error.
fn strip_scheme(input: &str) -> Result<&str, IdError> {
    if let Some(rest) = input.strip_prefix(SCHEME_PREFIX) {
        return Ok(rest);
    }
    match input.get(..SCHEME_PREFIX.len()) {
        Some(head) if head.eq_ignore_ascii_case(SCHEME_PREFIX) => Err(IdError::SchemeUppercase),
        _ => Err(IdError::WrongScheme),
    }
}

/// Checks the part before `://` in a trust domain written as an ID.
fn check_scheme(scheme: &str) -> Result<(), IdError> {
    if scheme == "spiffe" {
        Ok(())
    } else if scheme.eq_ignore_ascii_case("spiffe") {
        Err(IdError::SchemeUppercase)
    } else {
        Err(IdError::WrongScheme)
    }
}

/// Checks a bare trust domain name (the URI host of an ID).
fn validate_trust_domain(name: &str) -> Result<(), IdError> {
    if name.is_empty() {
        return Err(IdError::TrustDomainMissing);
    }
    if name.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong);
    }
    // Whole-name checks first, so `u:p@td` is reported as user info rather than a port and
    // `[::1]` as an IPv6 literal rather than a port.
    if name.contains('@') {
        return Err(IdError::UserInfo);
    }
    if name.contains(['[', ']']) {
        return Err(IdError::IpLiteral);
    }
    for ch in name.chars() {
        match ch {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            ':' => return Err(IdError::Port),
            '?' => return Err(IdError::Query),
            '#' => return Err(IdError::Fragment),
            '%' => return Err(IdError::PercentEncoded),
            'A'..='Z' => return Err(IdError::TrustDomainUppercase),
            ch if !ch.is_ascii() => return Err(IdError::NonAscii),
            ch => return Err(IdError::TrustDomainChar { ch }),
        }
    }
    Ok(())
}

/// Checks a path: empty, or one or more `/segment`.
fn validate_path(path: &str) -> Result<(), IdError> {
    let Some(segments) = path.strip_prefix('/') else {
        return if path.is_empty() {
            Ok(())
        } else {
            Err(IdError::PathNotAbsolute)
        };
    };
    // URI structure before segment rules: `/x/?q` is a query, not a trailing slash.
    if let Some(at) = path.find(['?', '#']) {
        return Err(if path.as_bytes().get(at) == Some(&b'?') {
            IdError::Query
        } else {
            IdError::Fragment
        });
    }
    if path.contains('%') {
        return Err(IdError::PercentEncoded);
    }
    if !path.is_ascii() {
        return Err(IdError::NonAscii);
    }
    let mut segments = segments.split('/').peekable();
    while let Some(segment) = segments.next() {
        if segment.is_empty() {
            return Err(if segments.peek().is_none() {
                IdError::TrailingSlash
            } else {
                IdError::EmptySegment
            });
        }
        if segment == "." || segment == ".." {
            return Err(IdError::DotSegment);
        }
        if let Some(ch) = segment
            .chars()
            .find(|ch| !(ch.is_ascii_alphanumeric() || matches!(ch, '.' | '-' | '_')))
        {
            return Err(IdError::PathChar { ch });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Spec §1 valid vectors, plus a few more that exercise each allowed character.
    const VALID: &[(&str, &str, &str)] = &[
        // (id, trust domain, path)
        ("spiffe://example.org", "example.org", ""),
        (
            "spiffe://example.org/a/b-c_d.e",
            "example.org",
            "/a/b-c_d.e",
        ),
        ("spiffe://1.2.3.4/svc", "1.2.3.4", "/svc"),
        ("spiffe://a_b.example/X", "a_b.example", "/X"),
        ("spiffe://td/...", "td", "/..."),
        ("spiffe://td/.a", "td", "/.a"),
        ("spiffe://td/a..", "td", "/a.."),
        ("spiffe://a-b_c.0-9/AZaz09._-", "a-b_c.0-9", "/AZaz09._-"),
        ("spiffe://td/ns/prod/sa/web", "td", "/ns/prod/sa/web"),
    ];

    #[test]
    fn valid_ids_round_trip_unchanged() {
        for &(input, td, path) in VALID {
            let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(id.to_string(), input, "Display of {input:?}");
            assert_eq!(id.as_str(), input);
            assert_eq!(id.trust_domain_name(), td, "trust domain of {input:?}");
            assert_eq!(id.trust_domain().as_str(), td);
            assert_eq!(id.path(), path, "path of {input:?}");
            assert_eq!(id.is_root(), path.is_empty(), "is_root of {input:?}");
            let via_from_str: SpiffeId = input.parse().expect("FromStr");
            assert_eq!(via_from_str, id);
            let rebuilt = SpiffeId::new(&id.trust_domain(), path).expect("new");
            assert_eq!(rebuilt, id, "SpiffeId::new for {input:?}");
        }
    }

    #[test]
    fn invalid_ids_are_rejected_with_the_rule_they_break() {
        let long_td = format!("spiffe://{}/x", "a".repeat(256));
        let cases: &[(&str, IdError)] = &[
            // Spec §1 invalid vectors.
            ("", IdError::Empty),
            ("http://td/x", IdError::WrongScheme),
            ("spiffe:/x", IdError::WrongScheme),
            ("spiffe:td/x", IdError::WrongScheme),
            ("spiffe:///x", IdError::TrustDomainMissing),
            ("spiffe://td:80/x", IdError::Port),
            ("spiffe://u:p@td/x", IdError::UserInfo),
            ("spiffe://td/x?q=1", IdError::Query),
            ("spiffe://td/x#f", IdError::Fragment),
            ("spiffe://td/", IdError::TrailingSlash),
            ("spiffe://td/x/", IdError::TrailingSlash),
            ("spiffe://td//x", IdError::EmptySegment),
            ("spiffe://td/./x", IdError::DotSegment),
            ("spiffe://td/../x", IdError::DotSegment),
            ("spiffe://td/a%20b", IdError::PercentEncoded),
            ("spiffe://td/a b", IdError::PathChar { ch: ' ' }),
            ("spiffe://[::1]/x", IdError::IpLiteral),
            ("spiffe://td/caf\u{e9}", IdError::NonAscii),
            ("spiffe://t\u{e9}d/x", IdError::NonAscii),
            (&long_td, IdError::TrustDomainTooLong),
            ("spiffe://TD/x", IdError::TrustDomainUppercase),
            // Further cases, one per remaining rule or corner.
            ("SPIFFE://td/x", IdError::SchemeUppercase),
            ("Spiffe://td/x", IdError::SchemeUppercase),
            ("spiffe", IdError::WrongScheme),
            ("td/x", IdError::WrongScheme),
            (" spiffe://td/x", IdError::WrongScheme),
            ("spiffe://", IdError::TrustDomainMissing),
            ("spiffe://td:/x", IdError::Port),
            ("spiffe://@td/x", IdError::UserInfo),
            ("spiffe://td?q", IdError::Query),
            ("spiffe://td#f", IdError::Fragment),
            ("spiffe://t%64/x", IdError::PercentEncoded),
            ("spiffe://td/x/?q", IdError::Query),
            ("spiffe://td/x#f?q", IdError::Fragment),
            ("spiffe://td/.", IdError::DotSegment),
            ("spiffe://td/x/..", IdError::DotSegment),
            ("spiffe://td//", IdError::EmptySegment),
            ("spiffe://t d/x", IdError::TrustDomainChar { ch: ' ' }),
            ("spiffe://t*d/x", IdError::TrustDomainChar { ch: '*' }),
            ("spiffe://td\n/x", IdError::TrustDomainChar { ch: '\n' }),
            ("spiffe://td/a:b", IdError::PathChar { ch: ':' }),
            ("spiffe://td/a@b", IdError::PathChar { ch: '@' }),
            ("spiffe://td/a\tb", IdError::PathChar { ch: '\t' }),
            ("spiffe://td/a+b", IdError::PathChar { ch: '+' }),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).as_ref(), Err(want), "{input:?}");
            assert!(input.parse::<SpiffeId>().is_err(), "FromStr {input:?}");
        }
    }

    #[test]
    fn id_length_limit_is_2048_bytes() {
        let prefix = "spiffe://td/";
        let at_limit = format!("{prefix}{}", "a".repeat(MAX_ID_LEN - prefix.len()));
        assert_eq!(at_limit.len(), 2048);
        let id = SpiffeId::parse(&at_limit).expect("2048 bytes is accepted");
        assert_eq!(id.as_str(), at_limit);

        let over = format!("{at_limit}a");
        assert_eq!(SpiffeId::parse(&over), Err(IdError::TooLong { len: 2049 }));

        // `new` enforces the same limit on what it builds.
        let td = TrustDomain::new("td").expect("td");
        let path = &at_limit["spiffe://td".len()..];
        assert!(SpiffeId::new(&td, path).is_ok());
        assert_eq!(
            SpiffeId::new(&td, &format!("{path}a")),
            Err(IdError::TooLong { len: 2049 })
        );
    }

    #[test]
    fn trust_domain_length_limit_is_255_bytes() {
        let at_limit = "a".repeat(MAX_TRUST_DOMAIN_LEN);
        let over = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);

        let id = SpiffeId::parse(&format!("spiffe://{at_limit}/x")).expect("255-byte TD");
        assert_eq!(id.trust_domain_name(), at_limit);
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://{over}/x")),
            Err(IdError::TrustDomainTooLong)
        );

        assert_eq!(
            TrustDomain::new(&at_limit).map(|td| td.as_str().len()),
            Ok(255)
        );
        assert_eq!(TrustDomain::new(&over), Err(IdError::TrustDomainTooLong));
        assert_eq!(
            TrustDomain::new(&format!("spiffe://{over}")),
            Err(IdError::TrustDomainTooLong)
        );
    }

    #[test]
    fn trust_domain_accepts_bare_and_id_forms() {
        for (input, name) in [
            ("example.org", "example.org"),
            ("spiffe://example.org", "example.org"),
            ("1.2.3.4", "1.2.3.4"),
            ("a_b-c.d", "a_b-c.d"),
        ] {
            let td = TrustDomain::new(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(td.as_str(), name);
            assert_eq!(td.to_string(), name, "Display is the bare name");
            assert_eq!(td.id_string(), format!("spiffe://{name}"));
            assert_eq!(input.parse::<TrustDomain>().as_ref(), Ok(&td));
        }
    }

    #[test]
    fn trust_domain_rejects_bad_forms() {
        let cases: &[(&str, IdError)] = &[
            ("", IdError::TrustDomainMissing),
            ("spiffe://", IdError::TrustDomainMissing),
            ("Example.org", IdError::TrustDomainUppercase),
            ("spiffe://EXAMPLE.org", IdError::TrustDomainUppercase),
            ("SPIFFE://example.org", IdError::SchemeUppercase),
            ("http://example.org", IdError::WrongScheme),
            ("spiffe://example.org/x", IdError::TrustDomainHasPath),
            ("spiffe://example.org/", IdError::TrustDomainHasPath),
            ("example.org/x", IdError::TrustDomainHasPath),
            ("spiffe:///x", IdError::TrustDomainMissing),
            ("example.org:443", IdError::Port),
            ("user@example.org", IdError::UserInfo),
            ("[::1]", IdError::IpLiteral),
            ("example.org?q", IdError::Query),
            ("example.org#f", IdError::Fragment),
            ("ex%61mple.org", IdError::PercentEncoded),
            ("ex ample.org", IdError::TrustDomainChar { ch: ' ' }),
            ("b\u{fc}cher.de", IdError::NonAscii),
        ];
        for (input, want) in cases {
            assert_eq!(TrustDomain::new(input).as_ref(), Err(want), "{input:?}");
        }
    }

    #[test]
    fn new_validates_the_path() {
        let td = TrustDomain::new("example.org").expect("td");
        let root = SpiffeId::new(&td, "").expect("empty path");
        assert_eq!(root.as_str(), "spiffe://example.org");
        assert!(root.is_root());

        let web = SpiffeId::new(&td, "/ns/web").expect("path");
        assert_eq!(web.as_str(), "spiffe://example.org/ns/web");
        assert_eq!(web.path(), "/ns/web");
        assert!(!web.is_root());

        let cases: &[(&str, IdError)] = &[
            ("web", IdError::PathNotAbsolute),
            ("/", IdError::TrailingSlash),
            ("/a//b", IdError::EmptySegment),
            ("/a/..", IdError::DotSegment),
            ("/a?b", IdError::Query),
            ("/a#b", IdError::Fragment),
            ("/a%2f", IdError::PercentEncoded),
            ("/\u{e9}", IdError::NonAscii),
            ("/a b", IdError::PathChar { ch: ' ' }),
        ];
        for (path, want) in cases {
            assert_eq!(SpiffeId::new(&td, path).as_ref(), Err(want), "{path:?}");
        }
    }

    #[test]
    fn membership_compares_whole_trust_domain_names() {
        let id = SpiffeId::parse("spiffe://example.org/web").expect("id");
        let own = TrustDomain::new("example.org").expect("td");
        let suffix = TrustDomain::new("ample.org").expect("td");
        let longer = TrustDomain::new("example.org.evil").expect("td");
        assert!(id.is_member_of(&own));
        assert!(!id.is_member_of(&suffix));
        assert!(!id.is_member_of(&longer));
        assert_eq!(id.trust_domain(), own);
    }

    #[test]
    fn error_messages_read_well_when_wrapped() {
        let cases: &[(IdError, &str)] = &[
            (IdError::Empty, "SPIFFE ID is empty"),
            (
                IdError::WrongScheme,
                "SPIFFE ID must start with \"spiffe://\"",
            ),
            (
                IdError::TrustDomainChar { ch: '*' },
                "trust domain contains '*'; only a-z, 0-9, '.', '-' and '_' are allowed",
            ),
            (
                IdError::PathChar { ch: '\n' },
                "path contains '\\n'; only A-Z, a-z, 0-9, '.', '-' and '_' are allowed",
            ),
            (
                IdError::TooLong { len: 2049 },
                "SPIFFE ID is 2049 bytes long; the limit is 2048 bytes",
            ),
        ];
        for (err, want) in cases {
            assert_eq!(err.to_string(), *want);
        }
        // No message ends with a period: they are embedded in longer sentences.
        let all = [
            IdError::Empty,
            IdError::TooLong { len: 1 },
            IdError::NonAscii,
            IdError::WrongScheme,
            IdError::SchemeUppercase,
            IdError::TrustDomainMissing,
            IdError::TrustDomainTooLong,
            IdError::TrustDomainUppercase,
            IdError::TrustDomainChar { ch: '*' },
            IdError::TrustDomainHasPath,
            IdError::Port,
            IdError::UserInfo,
            IdError::IpLiteral,
            IdError::Query,
            IdError::Fragment,
            IdError::PercentEncoded,
            IdError::PathNotAbsolute,
            IdError::EmptySegment,
            IdError::DotSegment,
            IdError::TrailingSlash,
            IdError::PathChar { ch: '*' },
        ];
        for err in all {
            let msg = err.to_string();
            assert!(!msg.ends_with('.'), "{msg:?}");
        }
    }

    #[test]
    fn ordering_and_hashing_follow_the_string() {
        use std::collections::BTreeSet;
        let set: BTreeSet<SpiffeId> = ["spiffe://b/x", "spiffe://a/y", "spiffe://a"]
            .into_iter()
            .map(|s| SpiffeId::parse(s).expect("id"))
            .collect();
        let order: Vec<&str> = set.iter().map(SpiffeId::as_str).collect();
        assert_eq!(order, ["spiffe://a", "spiffe://a/y", "spiffe://b/x"]);
    }
}
