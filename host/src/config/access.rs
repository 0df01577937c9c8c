//! `[log]`: the process log and the access log (its format, its fields, and the queue in front of its writer).

use super::validate::Validator;
use super::*;

/// One field of an access-log line (`log.access_fields`), named as in the config and the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessField {
    /// The client's `address:port` (from the PROXY protocol header when the listener takes one).
    Client,
    /// The listener's name.
    Listener,
    /// The server name the client sent (normalised), if any.
    Sni,
    /// The protocol ALPN chose (`h2`, `http/1.1`), if any.
    Alpn,
    /// `TLSv1.3` or `TLSv1.2`.
    TlsVersion,
    /// The cipher suite, e.g. `TLS13_AES_128_GCM_SHA256`.
    Cipher,
    /// The key-exchange group, e.g. `X25519MLKEM768` (none on a resumed TLS 1.2 connection).
    Group,
    /// Whether the handshake resumed a session.
    Resumed,
    /// Microseconds from the first ClientHello read to the end of the handshake, certificate selection included.
    HandshakeUs,
    /// Where the certificate came from: `static`, `cache`, `plugin`, `stale`, `default` or `acme`.
    CertSource,
    /// The JA4 fingerprint of the ClientHello ([`crate::ja4`]); computed only when this field is asked for.
    Ja4,
    /// The request method.
    Method,
    /// The request's host (`Host`, or the HTTP/2 authority).
    Host,
    /// The request's path and query.
    Path,
    /// `HTTP/1.1` or `HTTP/2.0`.
    HttpVersion,
    /// The response status sent to the client.
    Status,
    /// Where the request went (the backend's URL, `pool/server`, an origin), `-` when tern answered itself.
    Upstream,
    /// Bytes of request body read from the client.
    RequestBytes,
    /// Bytes of response body written to the client.
    ResponseBytes,
    /// Microseconds from the request head to the end of the response body (or the moment it was abandoned).
    DurationUs,
    /// Microseconds from sending the request upstream to the upstream's response head.
    UpstreamUs,
}

impl AccessField {
    /// Every field, in the order of the default line.
    pub const ALL: [AccessField; 21] = [
        Self::Client,
        Self::Listener,
        Self::Sni,
        Self::Alpn,
        Self::TlsVersion,
        Self::Cipher,
        Self::Group,
        Self::Resumed,
        Self::HandshakeUs,
        Self::CertSource,
        Self::Ja4,
        Self::Method,
        Self::Host,
        Self::Path,
        Self::HttpVersion,
        Self::Status,
        Self::Upstream,
        Self::RequestBytes,
        Self::ResponseBytes,
        Self::DurationUs,
        Self::UpstreamUs,
    ];

    /// The name in the config and in the line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Client => "client",
            Self::Listener => "listener",
            Self::Sni => "sni",
            Self::Alpn => "alpn",
            Self::TlsVersion => "tls_version",
            Self::Cipher => "cipher",
            Self::Group => "group",
            Self::Resumed => "resumed",
            Self::HandshakeUs => "handshake_us",
            Self::CertSource => "cert_source",
            Self::Ja4 => "ja4",
            Self::Method => "method",
            Self::Host => "host",
            Self::Path => "path",
            Self::HttpVersion => "http_version",
            Self::Status => "status",
            Self::Upstream => "upstream",
            Self::RequestBytes => "request_bytes",
            Self::ResponseBytes => "response_bytes",
            Self::DurationUs => "duration_us",
            Self::UpstreamUs => "upstream_us",
        }
    }

    /// The field of that name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.name() == name)
    }

    /// The fields of a line when `log.access_fields` is not given: all but `ja4`, which costs two SHA-256s per
    /// handshake and is asked for by name.
    pub fn defaults() -> Vec<Self> {
        Self::ALL.into_iter().filter(|f| *f != Self::Ja4).collect()
    }
}

impl Validator<'_> {
    /// `[log]`.
    pub(super) fn log(&self, raw: raw::Log) -> Result<LogSettings, ConfigError> {
        let access_fields = match raw.access_fields {
            None => AccessField::defaults(),
            Some(names) => self.access_fields(&names)?,
        };
        let access_queue = self.count(
            "log.access_queue",
            raw.access_queue.unwrap_or(defaults::ACCESS_QUEUE),
            defaults::ACCESS_QUEUE_CEILING,
        )?;
        Ok(LogSettings {
            format: raw.format,
            level: raw.level.unwrap_or_else(|| "info".into()),
            access: raw.access.unwrap_or(true),
            access_format: raw.access_format.unwrap_or(raw.format),
            access_fields,
            access_queue,
        })
    }

    fn access_fields(&self, names: &[String]) -> Result<Vec<AccessField>, ConfigError> {
        const KEY: &str = "log.access_fields";
        if names.is_empty() {
            return Err(self.err(KEY, "list at least one field (or set log.access = false)"));
        }
        let mut fields = Vec::with_capacity(names.len());
        for name in names {
            let Some(field) = AccessField::parse(name) else {
                let valid: Vec<&str> = AccessField::ALL.iter().map(|f| f.name()).collect();
                let shown = crate::clip::Clip(name);
                return Err(self.err(KEY, format!("unknown field \"{shown}\"; valid fields: {}", valid.join(", "))));
            };
            if fields.contains(&field) {
                return Err(self.err(KEY, format!("\"{name}\" is listed twice")));
            }
            fields.push(field);
        }
        Ok(fields)
    }
}

/// Headers tern writes or removes itself: a JA4 header of one of these names would clash.
const RESERVED_HEADERS: [&str; 13] = [
    "host",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];

impl Validator<'_> {
    /// `listener.ja4_header`: a header name, not one tern already writes or strips.
    pub(super) fn ja4_header(&self, key: &str, raw: Option<String>) -> Result<Option<http::HeaderName>, ConfigError> {
        let Some(raw) = raw else { return Ok(None) };
        let key = format!("{key}.ja4_header");
        let name = http::HeaderName::from_bytes(raw.as_bytes())
            .map_err(|_| self.err(&key, format!("{:?} is not a header name", crate::clip::Clip(&raw).to_string())))?;
        if RESERVED_HEADERS.contains(&name.as_str()) {
            return Err(self.err(&key, format!("\"{name}\" is a header tern writes or removes itself")));
        }
        Ok(Some(name))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::MINIMAL;
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/tern/tern.toml"))
    }

    #[test]
    fn the_access_log_follows_log_format_and_shows_everything_but_ja4_by_default() {
        let config = load(&format!("{MINIMAL}\n[log]\nformat = \"json\"\n")).unwrap();
        assert_eq!(config.log.access_format, LogFormat::Json);
        assert_eq!(config.log.access_fields, AccessField::defaults());
        assert!(!config.log.access_fields.contains(&AccessField::Ja4));
        assert_eq!(config.log.access_fields.len(), AccessField::ALL.len() - 1);
        assert_eq!(config.log.access_queue, defaults::ACCESS_QUEUE);
        assert_eq!(config.listeners[0].ja4_header, None);
        for field in AccessField::ALL {
            assert_eq!(AccessField::parse(field.name()), Some(field));
        }
    }

    #[test]
    fn chosen_fields_keep_their_order_and_a_bad_one_is_named_with_the_valid_ones() {
        let text =
            format!("{MINIMAL}\n[log]\naccess_format = \"text\"\naccess_fields = [\"ja4\", \"status\", \"sni\"]\n");
        let config = load(&text).unwrap();
        assert_eq!(config.log.access_format, LogFormat::Text);
        assert_eq!(config.log.access_fields, [AccessField::Ja4, AccessField::Status, AccessField::Sni]);
        let err =
            load(&format!("{MINIMAL}\n[log]\naccess_fields = [\"status\", \"bytes\"]\n")).unwrap_err().to_string();
        assert!(err.contains("/etc/tern/tern.toml") && err.contains("log.access_fields"), "{err}");
        assert!(err.contains("\"bytes\"") && err.contains("response_bytes, duration_us, upstream_us"), "{err}");
        let twice = load(&format!("{MINIMAL}\n[log]\naccess_fields = [\"sni\", \"sni\"]\n")).unwrap_err();
        assert!(twice.to_string().contains("listed twice"), "{twice}");
        let none = load(&format!("{MINIMAL}\n[log]\naccess_fields = []\n")).unwrap_err();
        assert!(none.to_string().contains("at least one field"), "{none}");
        let queue = load(&format!("{MINIMAL}\n[log]\naccess_queue = 0\n")).unwrap_err();
        assert!(queue.to_string().contains("log.access_queue"), "{queue}");
    }

    #[test]
    fn the_ja4_header_is_a_header_name_tern_does_not_write_itself() {
        let listener = |value: &str| load(&format!("{MINIMAL}ja4_header = {value}\n"));
        let config = listener("\"X-JA4\"").unwrap();
        assert_eq!(config.listeners[0].ja4_header.as_ref().map(|h| h.as_str()), Some("x-ja4"));
        let bad = listener("\"x ja4\"").unwrap_err().to_string();
        assert!(bad.contains("listener \"listener-0\".ja4_header") && bad.contains("not a header name"), "{bad}");
        let reserved = listener("\"X-Forwarded-For\"").unwrap_err().to_string();
        assert!(reserved.contains("tern writes or removes itself"), "{reserved}");
    }
}
