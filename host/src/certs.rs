//! PEM in, `Arc<CertifiedKey>` out: the one place certificates are parsed and validated.
//!
//! Parsing a key costs tens of microseconds, so it happens once per cache fill, never per handshake. Validation
//! is strict because a plugin's answer is untrusted input: the key must match the leaf and the leaf must cover
//! the name it is served for.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::sni::ServerName;

impl CertError {
    /// Whether the problem is in the private key rather than in the chain.
    pub fn is_about_key(&self) -> bool {
        matches!(self, CertError::KeyPem(_) | CertError::UnsupportedKey(_))
    }
}

/// A parsed certificate with what the cache and operators need to know about it.
#[derive(Debug)]
pub struct ParsedCert {
    /// What rustls serves.
    pub certified: Arc<CertifiedKey>,
    /// DNS names in the leaf's subjectAltName (wildcards as `*.example.com`).
    pub dns_names: Vec<String>,
    /// The leaf's issuer, for logs and operators.
    pub issuer: String,
    /// The leaf's notBefore.
    pub not_before: SystemTime,
    /// The leaf's notAfter.
    pub not_after: SystemTime,
    /// Estimated memory held: certificate DER, key material and bookkeeping.
    pub bytes: usize,
}

/// Why a certificate or key was refused. Messages never contain key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The chain holds no `CERTIFICATE` PEM block.
    #[error("no PEM certificate in the chain")]
    NoCertificate,
    /// The chain's PEM is malformed.
    #[error("malformed certificate PEM: {0}")]
    CertificatePem(String),
    /// No private key PEM block, or a malformed one.
    #[error("no usable PEM private key ({0})")]
    KeyPem(String),
    /// The key is of a type or curve rustls cannot sign with.
    #[error("unsupported private key: {0}")]
    UnsupportedKey(String),
    /// The leaf certificate cannot be parsed as X.509.
    #[error("leaf certificate is not valid X.509: {0}")]
    BadLeaf(String),
    /// The private key does not belong to the leaf certificate.
    #[error("private key does not match the leaf certificate")]
    KeyMismatch,
    /// The leaf's validity period has ended: clients would refuse it.
    #[error("certificate expired {ago_secs} s ago (notAfter {not_after_unix})")]
    Expired {
        /// notAfter, seconds since the Unix epoch.
        not_after_unix: u64,
        /// How long ago.
        ago_secs: u64,
    },
    /// The leaf's validity period has not begun: clients would refuse it.
    #[error("certificate not valid for another {in_secs} s (notBefore {not_before_unix})")]
    NotYetValid {
        /// notBefore, seconds since the Unix epoch.
        not_before_unix: u64,
        /// How long until then.
        in_secs: u64,
    },
    /// The leaf does not cover the requested name.
    #[error("certificate does not cover {servername} (it covers: {covers})")]
    NameMismatch {
        /// The name it was to be served for.
        servername: String,
        /// The names it does cover.
        covers: String,
    },
    /// A certificate set (contract 0.2) is empty or longer than [`MAX_SET`].
    #[error("a certificate set holds 1 to {max} certificates, this one {len}", max = MAX_SET)]
    SetSize {
        /// How many the plugin sent.
        len: usize,
    },
    /// One member of a certificate set is unusable.
    #[error("certificate {} of the set: {error}", index + 1)]
    Member {
        /// Its position, from 0.
        index: usize,
        /// What is wrong with it.
        error: Box<CertError>,
    },
}

/// Most certificates one answer may hold (ECDSA, RSA and room for a migration).
pub const MAX_SET: usize = 8;

impl CertError {
    /// The error itself, out of a set's member wrapper.
    pub fn innermost(&self) -> &CertError {
        match self {
            CertError::Member { error, .. } => error.innermost(),
            other => other,
        }
    }
}

/// Parses a PEM chain (leaf first) and PEM private key, and checks that they belong together.
pub fn parse(chain_pem: &[u8], key_pem: &[u8]) -> Result<ParsedCert, CertError> {
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::CertificatePem(e.to_string()))?;
    let leaf = chain.first().ok_or(CertError::NoCertificate)?;
    // pem errors describe the PEM framing, never the key bytes.
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| CertError::KeyPem(e.to_string()))?;
    let key_len = key.secret_der().len();
    let (dns_names, issuer, not_before, not_after) = describe_leaf(leaf)?;
    let chain_len: usize = chain.iter().map(|c| c.len()).sum();

    let provider = crate::crypto::provider();
    let signing_key =
        provider.key_provider.load_private_key(key).map_err(|e| CertError::UnsupportedKey(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(_)) => return Err(CertError::KeyMismatch),
        Err(other) => return Err(CertError::BadLeaf(other.to_string())),
    }
    Ok(ParsedCert {
        certified: Arc::new(certified),
        // Parsed key schedules and bookkeeping weigh about as much again as the key DER, plus fixed overhead.
        bytes: chain_len + 2 * key_len + dns_names.iter().map(|n| n.len() + 24).sum::<usize>() + 512,
        dns_names,
        issuer,
        not_before,
        not_after,
    })
}

/// Everything a plugin's answer for `name` must pass before it is served: it parses, the key matches the leaf,
/// the leaf covers the name, and the leaf is valid now. The one check used by serving, reload probes and the
/// command-line tools.
pub fn validate_answer(chain_pem: &[u8], key_pem: &[u8], name: &ServerName) -> Result<ParsedCert, CertError> {
    let parsed = parse(chain_pem, key_pem)?;
    parsed.check_covers(name)?;
    parsed.check_validity(SystemTime::now())?;
    Ok(parsed)
}

/// [`validate_answer`] for every member of a certificate set (1 to [`MAX_SET`] `(chain, key)` PEM pairs).
pub fn validate_set<'a>(
    members: impl ExactSizeIterator<Item = (&'a [u8], &'a [u8])>,
    name: &ServerName,
) -> Result<Vec<Arc<ParsedCert>>, CertError> {
    let len = members.len();
    if !(1..=MAX_SET).contains(&len) {
        return Err(CertError::SetSize { len });
    }
    members
        .enumerate()
        .map(|(index, (chain, key))| match validate_answer(chain, key, name) {
            Ok(parsed) => Ok(Arc::new(parsed)),
            Err(error) if len == 1 => Err(error),
            Err(error) => Err(CertError::Member { index, error: Box::new(error) }),
        })
        .collect()
}

impl ParsedCert {
    /// Checks that the leaf covers `name`, following RFC 6125 wildcard rules (webpki's implementation).
    pub fn check_covers(&self, name: &ServerName) -> Result<(), CertError> {
        let mismatch = || CertError::NameMismatch {
            servername: name.to_string(),
            covers: if self.dns_names.is_empty() { "no DNS names".into() } else { self.dns_names.join(", ") },
        };
        let leaf = self.certified.end_entity_cert().map_err(|_| CertError::NoCertificate)?;
        let cert = webpki::EndEntityCert::try_from(leaf).map_err(|e| CertError::BadLeaf(format!("{e:?}")))?;
        let dns = rustls::pki_types::ServerName::try_from(name.as_str()).map_err(|_| mismatch())?;
        cert.verify_is_valid_for_subject_name(&dns).map_err(|_| mismatch())
    }

    /// Checks that `now` lies within the leaf's validity period. A served certificate outside it fails every
    /// client's verification, so tern refuses it like a wrong name.
    pub fn check_validity(&self, now: SystemTime) -> Result<(), CertError> {
        let unix = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if let Ok(ago) = now.duration_since(self.not_after)
            && !ago.is_zero()
        {
            return Err(CertError::Expired { not_after_unix: unix(self.not_after), ago_secs: ago.as_secs() });
        }
        if let Ok(ahead) = self.not_before.duration_since(now)
            && !ahead.is_zero()
        {
            return Err(CertError::NotYetValid { not_before_unix: unix(self.not_before), in_secs: ahead.as_secs() });
        }
        Ok(())
    }

    /// How long the leaf stays valid from now (zero if it already expired).
    pub fn remaining_validity(&self) -> Duration {
        self.not_after.duration_since(SystemTime::now()).unwrap_or_default()
    }
}

/// The key's algorithm as operators name it: `ECDSA`, `RSA`, `Ed25519`.
pub fn key_kind(key: &CertifiedKey) -> &'static str {
    match key.key.algorithm() {
        rustls::SignatureAlgorithm::ECDSA => "ECDSA",
        rustls::SignatureAlgorithm::RSA => "RSA",
        rustls::SignatureAlgorithm::ED25519 => "Ed25519",
        rustls::SignatureAlgorithm::ED448 => "Ed448",
        _ => "other",
    }
}

/// Reads and parses a PEM chain and key from files (static certificates at start-up).
pub fn load_files(cert: &std::path::Path, key: &std::path::Path) -> Result<ParsedCert, CertLoadError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|e| CertLoadError::Read { path: path.to_path_buf(), message: e.to_string() })
    };
    parse(&read(cert)?, &read(key)?).map_err(|source| {
        // Name the file that holds the problem: a corrupt or unsupported key is the key file's, not the chain's.
        let path = if source.is_about_key() { key } else { cert };
        CertLoadError::Invalid { path: path.to_path_buf(), source }
    })
}

/// A certificate and key that could not be loaded from files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertLoadError {
    /// A file could not be read.
    #[error("{}: {message}", path.display())]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The I/O error.
        message: String,
    },
    /// The files do not hold a usable certificate and key.
    #[error("{}: {source}", path.display())]
    Invalid {
        /// The file the problem is in (the key file for key problems, else the certificate file).
        path: std::path::PathBuf,
        /// What is wrong.
        source: CertError,
    },
}

fn describe_leaf(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, String, SystemTime, SystemTime), CertError> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) = X509Certificate::from_der(leaf).map_err(|e| CertError::BadLeaf(e.to_string()))?;
    let dns_names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                GeneralName::DNSName(dns) => Some(dns.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(CertError::BadLeaf(format!("subjectAltName: {e}"))),
    };
    let at = |secs: i64| {
        u64::try_from(secs)
            .map(|secs| SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            .unwrap_or(SystemTime::UNIX_EPOCH)
    };
    let validity = cert.validity();
    Ok((dns_names, cert.issuer().to_string(), at(validity.not_before.timestamp()), at(validity.not_after.timestamp())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(names).unwrap().self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn name(s: &str) -> ServerName {
        ServerName::parse(s).unwrap()
    }

    #[test]
    fn a_bad_key_file_is_blamed_and_not_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (chain, _) = self_signed(&["a.example.com"]);
        let (cert, key) = (dir.path().join("a.crt"), dir.path().join("a.key"));
        std::fs::write(&cert, chain).unwrap();
        std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n").unwrap();
        let err = load_files(&cert, &key).unwrap_err().to_string();
        assert!(err.starts_with(&key.display().to_string()), "{err}");
    }

    #[test]
    fn parses_and_covers_exact_and_wildcard_names() {
        let (chain, key) = self_signed(&["a.example.com", "*.example.net"]);
        let parsed = parse(chain.as_bytes(), key.as_bytes()).unwrap();
        assert_eq!(parsed.dns_names, ["a.example.com", "*.example.net"]);
        assert!(parsed.check_covers(&name("a.example.com")).is_ok());
        assert!(parsed.check_covers(&name("x.example.net")).is_ok());
        assert!(matches!(parsed.check_covers(&name("b.example.com")), Err(CertError::NameMismatch { .. })));
        // A wildcard covers exactly one label.
        assert!(parsed.check_covers(&name("x.y.example.net")).is_err());
        assert!(parsed.check_covers(&name("example.net")).is_err());
        assert!(parsed.remaining_validity() > Duration::from_secs(3600));
        assert!(parsed.bytes > chain.len() / 2);
    }

    #[test]
    fn expired_and_future_certificates_are_refused_by_validate_answer() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.example.com".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let expired = params.self_signed(&key).unwrap().pem();
        let err = validate_answer(expired.as_bytes(), key.serialize_pem().as_bytes(), &name("a.example.com"));
        assert!(matches!(err, Err(CertError::Expired { .. })), "{err:?}");
        params.not_before = rcgen::date_time_ymd(2200, 1, 1);
        params.not_after = rcgen::date_time_ymd(2201, 1, 1);
        let future = params.self_signed(&key).unwrap().pem();
        let err = validate_answer(future.as_bytes(), key.serialize_pem().as_bytes(), &name("a.example.com"));
        assert!(matches!(err, Err(CertError::NotYetValid { .. })), "{err:?}");
        let (chain, key) = self_signed(&["a.example.com"]);
        assert!(validate_answer(chain.as_bytes(), key.as_bytes(), &name("a.example.com")).is_ok());
    }

    #[test]
    fn key_of_another_certificate_is_refused() {
        let (chain, _) = self_signed(&["a.example.com"]);
        let (_, other_key) = self_signed(&["a.example.com"]);
        assert_eq!(parse(chain.as_bytes(), other_key.as_bytes()).unwrap_err(), CertError::KeyMismatch);
    }

    #[test]
    fn garbage_is_refused_without_echoing_it() {
        let (chain, key) = self_signed(&["a.example.com"]);
        assert_eq!(parse(b"not pem", key.as_bytes()).unwrap_err(), CertError::NoCertificate);
        let err = parse(chain.as_bytes(), b"SECRET-NOT-A-KEY").unwrap_err();
        assert!(matches!(err, CertError::KeyPem(_)), "{err:?}");
        assert!(!err.to_string().contains("SECRET"));
        let truncated = &chain[..chain.len() / 2];
        assert!(parse(truncated.as_bytes(), key.as_bytes()).is_err());
    }
}
