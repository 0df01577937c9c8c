//! Server names from the ClientHello: normalised and validated before anything (cache, plugin) sees them.
//!
//! The SNI is attacker-controlled. Only plain DNS host names pass: that keeps plugins from ever seeing path
//! separators, `..`, control bytes or names too long for a cache key, and makes `Example.COM.` and `example.com`
//! the same cache entry.

use std::fmt;

/// A normalised server name: ASCII lowercase, no trailing dot, 1..=253 bytes, labels of 1..=63 bytes of
/// `a-z 0-9 - _`, no label starting or ending with `-`, and not an IP address.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerName(Box<str>);

/// Why a server name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MalformedName {
    /// Empty, or only a dot.
    #[error("empty name")]
    Empty,
    /// Longer than 253 bytes.
    #[error("name longer than 253 bytes")]
    TooLong,
    /// A label is empty (`a..b`) or longer than 63 bytes.
    #[error("empty label or label longer than 63 bytes")]
    BadLabelLength,
    /// A byte outside `a-z A-Z 0-9 - _ .`.
    #[error("character not allowed in a host name")]
    BadCharacter,
    /// A label starts or ends with `-`.
    #[error("label starts or ends with a hyphen")]
    BadHyphen,
    /// The name is an IPv4 address (clients must not send those as SNI).
    #[error("IP address instead of a host name")]
    IpAddress,
}

impl ServerName {
    /// Normalises and validates a name as sent by a client (or written in a config file).
    pub fn parse(raw: &str) -> Result<Self, MalformedName> {
        let trimmed = raw.strip_suffix('.').unwrap_or(raw);
        if trimmed.is_empty() {
            return Err(MalformedName::Empty);
        }
        if trimmed.len() > 253 {
            return Err(MalformedName::TooLong);
        }
        for label in trimmed.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(MalformedName::BadLabelLength);
            }
            if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                return Err(MalformedName::BadCharacter);
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(MalformedName::BadHyphen);
            }
        }
        if trimmed.parse::<std::net::Ipv4Addr>().is_ok() {
            return Err(MalformedName::IpAddress);
        }
        Ok(Self(trimmed.to_ascii_lowercase().into_boxed_str()))
    }

    /// A name that `pattern` (a server name or a `*.parent` wildcard) must cover: the name itself, or a probe
    /// label under the wildcard's parent. A certificate listed for a pattern is checked through it.
    pub fn probe_for_pattern(pattern: &str) -> Result<Self, MalformedName> {
        Self::parse(&pattern.replacen("*.", "tern-wildcard-probe.", 1))
    }

    /// The normalised name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The wildcard name one label up (`a.example.com` → `*.example.com`); `None` when fewer than two labels
    /// would remain under the `*` (a wildcard never covers a top-level domain).
    pub fn wildcard(&self) -> Option<String> {
        let (_, parent) = self.0.split_once('.')?;
        parent.contains('.').then(|| format!("*.{parent}"))
    }
}

impl fmt::Display for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", &*self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_case_and_trailing_dot() {
        assert_eq!(ServerName::parse("WWW.Example.COM.").map(|n| n.to_string()), Ok("www.example.com".into()));
        assert_eq!(ServerName::parse("_acme.example.com").map(|n| n.to_string()), Ok("_acme.example.com".into()));
        assert_eq!(ServerName::parse("localhost").map(|n| n.to_string()), Ok("localhost".into()));
    }

    #[test]
    fn rejects_malformed_names() {
        let cases = [
            ("", MalformedName::Empty),
            (".", MalformedName::Empty),
            ("a..b", MalformedName::BadLabelLength),
            (".example.com", MalformedName::BadLabelLength),
            ("a/b.example.com", MalformedName::BadCharacter),
            ("..", MalformedName::BadLabelLength),
            ("../../etc/passwd", MalformedName::BadLabelLength),
            ("exa mple.com", MalformedName::BadCharacter),
            ("*.example.com", MalformedName::BadCharacter),
            ("ex\u{e4}mple.com", MalformedName::BadCharacter),
            ("-a.example.com", MalformedName::BadHyphen),
            ("a-.example.com", MalformedName::BadHyphen),
            ("127.0.0.1", MalformedName::IpAddress),
        ];
        for (raw, want) in cases {
            assert_eq!(ServerName::parse(raw), Err(want), "{raw:?}");
        }
        assert_eq!(ServerName::parse(&"a".repeat(64)), Err(MalformedName::BadLabelLength));
        let long = vec!["a".repeat(63); 5].join(".");
        assert_eq!(ServerName::parse(&long), Err(MalformedName::TooLong));
    }

    #[test]
    fn wildcard_goes_one_label_up_and_never_to_a_tld() {
        let name = |s| ServerName::parse(s).unwrap();
        assert_eq!(name("a.example.com").wildcard().as_deref(), Some("*.example.com"));
        assert_eq!(name("example.com").wildcard(), None);
        assert_eq!(name("localhost").wildcard(), None);
    }
}
