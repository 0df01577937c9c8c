//! What completed handshakes negotiated: one counter per cipher suite and per key-exchange group that tern's crypto
//! provider offers (a fixed, small set, so the labels are bounded), so that operators can see, for example, how
//! many clients use the post-quantum hybrid `X25519MLKEM768`.

use std::sync::atomic::{AtomicU64, Ordering};

use rustls::{CipherSuite, NamedGroup};

use crate::metrics::Exposition;

/// See the module documentation.
#[derive(Debug)]
pub struct Negotiated {
    suites: Vec<(CipherSuite, AtomicU64)>,
    groups: Vec<(NamedGroup, AtomicU64)>,
}

impl Default for Negotiated {
    fn default() -> Self {
        let provider = crate::crypto::provider();
        Self {
            suites: provider.cipher_suites.iter().map(|s| (s.suite(), AtomicU64::new(0))).collect(),
            groups: provider.kx_groups.iter().map(|g| (g.name(), AtomicU64::new(0))).collect(),
        }
    }
}

impl Negotiated {
    /// Counts one completed handshake (a resumed TLS 1.2 one has no key exchange).
    pub(crate) fn record(&self, suite: Option<CipherSuite>, group: Option<NamedGroup>) {
        if let Some(counter) = suite.and_then(|s| counter_of(&self.suites, s)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(counter) = group.and_then(|g| counter_of(&self.groups, g)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Handshakes that negotiated `suite`.
    pub fn suite(&self, suite: CipherSuite) -> u64 {
        counter_of(&self.suites, suite).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Handshakes that negotiated `group`.
    pub fn group(&self, group: NamedGroup) -> u64 {
        counter_of(&self.groups, group).map_or(0, |c| c.load(Ordering::Relaxed))
    }

    /// Appends `tern_tls_cipher_suites_total{suite}` and `tern_tls_key_exchange_groups_total{group}`.
    pub(crate) fn render(&self, x: &mut Exposition) {
        let named = |name: Option<&'static str>| name.unwrap_or("unknown");
        x.family("tern_tls_cipher_suites_total", "counter", "Completed handshakes by cipher suite.");
        x.counters("tern_tls_cipher_suites_total", "suite", self.suites.iter().map(|(s, c)| (named(s.as_str()), c)));
        x.family("tern_tls_key_exchange_groups_total", "counter", "Completed handshakes by key-exchange group.");
        x.counters(
            "tern_tls_key_exchange_groups_total",
            "group",
            self.groups.iter().map(|(g, c)| (named(g.as_str()), c)),
        );
    }
}

/// The counter of `key` in a provider's list.
fn counter_of<K: PartialEq>(list: &[(K, AtomicU64)], key: K) -> Option<&AtomicU64> {
    list.iter().find(|(k, _)| *k == key).map(|(_, counter)| counter)
}
