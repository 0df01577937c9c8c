//! The crypto provider, in one place below everything that needs it (TLS acceptance, client-certificate
//! verification, certificate parsing), so that certificate parsing does not reach up into the TLS module for it;
//! and the order in which the listeners prefer cipher suites (`server.cipher_order`, `server.cipher_suites`).

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::{CipherSuite, SupportedCipherSuite};

use crate::config::{CipherOrder, CipherSettings};

/// The crypto provider used everywhere in tern (aws-lc-rs). The first call also makes it the process default:
/// a dependency (wasmtime-wasi-http's outgoing HTTPS) compiles rustls's ring feature in and calls
/// `ClientConfig::builder()`, which panics when two providers are compiled in and none is installed.
pub fn provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        // Err only if something installed a default first; that one then stays.
        let _ = CryptoProvider::install_default(provider.as_ref().clone());
        provider
    })
}

/// The suite `name` names: rustls's name (`TLS13_AES_128_GCM_SHA256`) or the IANA one (`TLS_AES_128_GCM_SHA256`,
/// as OpenSSL's `-ciphersuites` spells TLS 1.3 suites), in any case. `None` for a suite tern does not implement.
pub fn suite_named(name: &str) -> Option<SupportedCipherSuite> {
    provider().cipher_suites.iter().copied().find(|suite| {
        let ours = suite.suite().as_str().unwrap_or_default();
        ours.eq_ignore_ascii_case(name) || ours.replacen("TLS13_", "TLS_", 1).eq_ignore_ascii_case(name)
    })
}

/// Whether this CPU has AES and carry-less multiplication instructions, which make AES-GCM cheaper than
/// ChaCha20-Poly1305; without them ChaCha20 is the cheaper and constant-time choice.
pub fn aes_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes") && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes") && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The bulk cipher family of a suite, which is what the preference is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Bulk {
    Aes128,
    Aes256,
    ChaCha20,
}

fn bulk(suite: SupportedCipherSuite) -> Bulk {
    let name = suite.suite().as_str().unwrap_or_default();
    if name.contains("CHACHA20") {
        Bulk::ChaCha20
    } else if name.contains("AES_256") {
        Bulk::Aes256
    } else {
        Bulk::Aes128
    }
}

/// tern's default preference: TLS 1.3 suites before TLS 1.2 ones; within each, AES-128-GCM, AES-256-GCM, then
/// ChaCha20-Poly1305 on a CPU with AES instructions (AES-256 with SHA-384 costs ~12 % more server CPU per
/// handshake where SHA-512 runs in software), and ChaCha20 first on one without.
pub fn default_suites() -> Vec<SupportedCipherSuite> {
    let rank = |b: Bulk| match (aes_hardware(), b) {
        (true, Bulk::Aes128) | (false, Bulk::ChaCha20) => 0,
        (true, Bulk::Aes256) | (false, Bulk::Aes128) => 1,
        (true, Bulk::ChaCha20) | (false, Bulk::Aes256) => 2,
    };
    let mut suites = provider().cipher_suites.clone();
    // Stable: within a rank the provider's order (ECDSA before RSA) stays.
    suites.sort_by_key(|s| (matches!(s, SupportedCipherSuite::Tls12(_)), rank(bulk(*s))));
    suites
}

/// The providers a listener's handshakes are built with: one per preference it can apply.
#[derive(Debug, Clone)]
pub struct SuitePreference {
    /// The configured (or default) order.
    pub preferred: Arc<CryptoProvider>,
    /// The same suites with ChaCha20-Poly1305 first, for a client that lists ChaCha20 first (a phone without AES
    /// instructions says so by its order): `None` when the client's order decides anyway or ChaCha20 is not
    /// enabled.
    pub chacha_first: Option<Arc<CryptoProvider>>,
    /// Whether tern's order decides (`ServerConfig::ignore_client_order`).
    pub server_decides: bool,
}

impl SuitePreference {
    /// From `server.cipher_order` and `server.cipher_suites`.
    pub fn new(settings: &CipherSettings) -> Self {
        let suites = match &settings.suites {
            // Validated in config: every one is a suite of the provider.
            Some(chosen) => chosen
                .iter()
                .filter_map(|c| provider().cipher_suites.iter().copied().find(|s| s.suite() == *c))
                .collect(),
            None => default_suites(),
        };
        let with = |suites: Vec<SupportedCipherSuite>| {
            Arc::new(CryptoProvider { cipher_suites: suites, ..provider().as_ref().clone() })
        };
        let server_decides = settings.order == CipherOrder::Server;
        let chacha_first = (server_decides && suites.iter().any(|s| bulk(*s) == Bulk::ChaCha20)).then(|| {
            let mut reordered = suites.clone();
            reordered.sort_by_key(|s| (matches!(s, SupportedCipherSuite::Tls12(_)), bulk(*s) != Bulk::ChaCha20));
            with(reordered)
        });
        Self { preferred: with(suites), chacha_first, server_decides }
    }

    /// Whether a client offering `offered` (its order) gets the ChaCha20-first provider: the first suite it lists
    /// that tern implements (GREASE and unknown values skipped) is a ChaCha20 one.
    pub fn client_prefers_chacha(offered: &[CipherSuite]) -> bool {
        offered
            .iter()
            .find_map(|c| provider().cipher_suites.iter().find(|s| s.suite() == *c))
            .is_some_and(|s| bulk(*s) == Bulk::ChaCha20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(provider: &CryptoProvider) -> Vec<&'static str> {
        provider.cipher_suites.iter().map(|s| s.suite().as_str().unwrap()).collect()
    }

    #[test]
    fn the_default_prefers_aes_128_with_aes_instructions_and_tls13_first() {
        let order = SuitePreference::new(&CipherSettings::default());
        let names = names(&order.preferred);
        let first = if aes_hardware() { "TLS13_AES_128_GCM_SHA256" } else { "TLS13_CHACHA20_POLY1305_SHA256" };
        assert_eq!(names[0], first, "{names:?}");
        assert_eq!(names.len(), provider().cipher_suites.len());
        let tls12 = names.iter().position(|n| !n.starts_with("TLS13_")).unwrap();
        assert!(names[tls12..].iter().all(|n| !n.starts_with("TLS13_")), "{names:?}");
        assert!(order.server_decides);
        let chacha = names_of(order.chacha_first.as_deref());
        assert_eq!(chacha[0], "TLS13_CHACHA20_POLY1305_SHA256");
        assert!(chacha[tls12].contains("CHACHA20"), "{chacha:?}");
    }

    fn names_of(provider: Option<&CryptoProvider>) -> Vec<&'static str> {
        names(provider.expect("a ChaCha20-first provider"))
    }

    #[test]
    fn a_client_order_or_no_chacha_needs_no_second_provider() {
        let client = CipherSettings { order: CipherOrder::Client, ..CipherSettings::default() };
        let order = SuitePreference::new(&client);
        assert!(!order.server_decides && order.chacha_first.is_none());
        let aes_only = CipherSettings { suites: Some(vec![CipherSuite::TLS13_AES_128_GCM_SHA256]), ..client };
        let order = SuitePreference::new(&CipherSettings { order: CipherOrder::Server, ..aes_only });
        assert!(order.chacha_first.is_none());
        assert_eq!(names(&order.preferred), ["TLS13_AES_128_GCM_SHA256"]);
    }

    #[test]
    fn chacha_is_for_clients_that_list_it_first_among_known_suites() {
        let grease = CipherSuite::from(0x0a0a);
        let chacha = CipherSuite::TLS13_CHACHA20_POLY1305_SHA256;
        let aes = CipherSuite::TLS13_AES_256_GCM_SHA384;
        assert!(SuitePreference::client_prefers_chacha(&[grease, chacha, aes]));
        assert!(!SuitePreference::client_prefers_chacha(&[grease, aes, chacha]));
        assert!(!SuitePreference::client_prefers_chacha(&[grease]));
    }

    #[test]
    fn suites_are_named_as_rustls_or_iana_does() {
        for name in ["TLS13_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384", "tls_aes_256_gcm_sha384"] {
            assert_eq!(suite_named(name).map(|s| s.suite()), Some(CipherSuite::TLS13_AES_256_GCM_SHA384), "{name}");
        }
        let tls12 = "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256";
        assert_eq!(
            suite_named(tls12).map(|s| s.suite()),
            Some(CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256)
        );
        assert!(suite_named("TLS_RSA_WITH_AES_128_CBC_SHA").is_none());
    }
}
