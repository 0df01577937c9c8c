//! What is stored per name: the issued certificate (chain in clear, private key sealed under `acme.secret`) and
//! the name's failure state. JSON, so operators can read the chain and the dates with ordinary tools.

use std::time::{Duration, SystemTime};

use zeroize::Zeroizing;

use crate::certs::{self, CertError, ParsedCert};
use crate::resumption::crypto::SealingKey;
use crate::sni::ServerName;

/// An issued certificate as stored.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) struct Record {
    /// PEM chain, leaf first.
    pub chain: String,
    /// The PEM private key, sealed (AES-256-GCM, bound to the name), hex.
    pub key: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// The leaf's notAfter, unix seconds.
    pub not_after: i64,
    /// When renewal is due, unix seconds.
    pub renew_at: i64,
    /// The leaf's issuer.
    pub issuer: String,
}

/// A name's failed orders, as stored: every node backs off the same way.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct State {
    /// Consecutive failed orders.
    pub failures: u32,
    /// No new order before this (unix seconds).
    pub retry_at: i64,
    /// The last failure, for `tern acme list` (never key material).
    pub last_error: String,
}

/// Unix seconds of `t`.
pub(crate) fn unix(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Now, in unix seconds.
pub(crate) fn now() -> i64 {
    unix(SystemTime::now())
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

fn aad(name: &str) -> Vec<u8> {
    format!("tern acme key {name}").into_bytes()
}

impl Record {
    /// A record of a freshly issued certificate: checks it first (it must cover `name`, match its key, be valid
    /// now), then seals the key. `window` is the fraction of the lifetime left when renewal is due.
    pub(crate) fn seal(
        seal: &SealingKey,
        name: &ServerName,
        chain: String,
        key_pem: &Zeroizing<String>,
        window: f64,
    ) -> Result<(Self, ParsedCert), CertError> {
        let parsed = certs::validate_answer(chain.as_bytes(), key_pem.as_bytes(), name)?;
        let sealed =
            seal.seal(key_pem.as_bytes(), &aad(name.as_str())).ok_or(CertError::KeyPem("sealing failed".into()))?;
        // The lifetime from now, not from notBefore: CAs backdate notBefore (by an hour, say), which would make a
        // short-lived certificate due at once.
        let lifetime = parsed.not_after.duration_since(SystemTime::now()).unwrap_or_default();
        let renew_at = parsed.not_after - lifetime.mul_f64(window);
        let record = Record {
            chain,
            key: hex(&sealed),
            issued_at: now(),
            not_after: unix(parsed.not_after),
            renew_at: unix(renew_at),
            issuer: parsed.issuer.clone(),
        };
        Ok((record, parsed))
    }

    /// Moves the renewal to a random point of a window the CA suggested (ACME Renewal Information).
    pub(crate) fn renew_within(&mut self, start: i64, end: i64) {
        let span = u64::try_from(end.saturating_sub(start)).unwrap_or(0);
        let offset = if span == 0 { 0 } else { random_below(span) };
        self.renew_at = start.saturating_add(i64::try_from(offset).unwrap_or(0));
    }

    /// The certificate, its key unsealed and checked again (a record altered at rest, or sealed under another
    /// secret, is refused).
    pub(crate) fn open(&self, seal: &SealingKey, name: &ServerName) -> Result<ParsedCert, CertError> {
        let sealed = unhex(&self.key).ok_or(CertError::KeyPem("stored key is not hex".into()))?;
        let key = seal
            .open(&sealed, &aad(name.as_str()))
            .ok_or(CertError::KeyPem("stored key does not open with acme.secret".into()))?;
        certs::validate_answer(self.chain.as_bytes(), &key, name)
    }

    /// Whether renewal is due.
    pub(crate) fn due(&self) -> bool {
        self.renew_at <= now()
    }
}

impl State {
    /// The state after one more failure: back off `base`, doubled per failure, at most `max`.
    pub(crate) fn failed(mut self, error: String, base: Duration, max: Duration) -> Self {
        self.failures = self.failures.saturating_add(1);
        let factor = 1u32 << self.failures.saturating_sub(1).min(20);
        let wait = base.saturating_mul(factor).min(max);
        self.retry_at = now().saturating_add(i64::try_from(wait.as_secs()).unwrap_or(i64::MAX));
        self.last_error = crate::clip::prefix(&error, 512).to_string();
        self
    }
}

/// A uniformly random number below `n` (jitter; not for secrets).
pub(crate) fn random_below(n: u64) -> u64 {
    let bytes = crate::resumption::crypto::random_bytes::<8>();
    if n == 0 { 0 } else { u64::from_le_bytes(bytes) % n }
}

/// Seals the account credentials (JSON) for storage.
pub(crate) fn seal_account(seal: &SealingKey, credentials: &[u8]) -> Option<String> {
    Some(hex(&seal.seal(credentials, b"tern acme account")?))
}

/// Opens stored account credentials.
pub(crate) fn open_account(seal: &SealingKey, stored: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let text = std::str::from_utf8(stored).ok()?;
    seal.open(&unhex(text.trim())?, b"tern acme account")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_record_opens_only_with_its_secret_and_name_and_never_holds_the_key_in_clear() {
        let ca = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["shop.example.com".to_string()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2040, 1, 1);
        let cert = params.self_signed(&ca).unwrap();
        let name = ServerName::parse("shop.example.com").unwrap();
        let key_pem = Zeroizing::new(ca.serialize_pem());
        let seal = SealingKey::new(&[7; 32]);
        let (record, parsed) = Record::seal(&seal, &name, cert.pem(), &key_pem, 1.0 / 3.0).unwrap();
        let json = serde_json::to_string(&record).unwrap();
        assert!(!json.contains("PRIVATE KEY") && json.contains("BEGIN CERTIFICATE"), "{json}");
        assert!(record.renew_at > now() && record.renew_at < record.not_after, "renewal inside the lifetime");
        assert_eq!(record.open(&seal, &name).unwrap().dns_names, parsed.dns_names);
        assert!(record.open(&SealingKey::new(&[8; 32]), &name).is_err(), "another secret");
        let other = ServerName::parse("other.example.com").unwrap();
        assert!(record.open(&seal, &other).is_err(), "the key is bound to its name");
    }

    #[test]
    fn backoff_doubles_up_to_its_ceiling() {
        let (base, max) = (Duration::from_secs(60), Duration::from_secs(300));
        let once = State::default().failed("e".into(), base, max);
        assert_eq!(once.failures, 1);
        assert!((once.retry_at - now() - 60).abs() <= 1);
        let many = (0..10).fold(State::default(), |s, _| s.failed("e".into(), base, max));
        assert!((many.retry_at - now() - 300).abs() <= 1);
    }
}
