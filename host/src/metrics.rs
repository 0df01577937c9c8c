//! Process-wide counters. Cheap atomics on the hot path; read by tests, the CLI and (later) the admin endpoint.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters of handshakes and certificate selection.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Handshakes completed.
    pub handshakes_ok: AtomicU64,
    /// Handshakes that failed before a certificate was chosen, by [`crate::select::SelectError::kind`].
    pub handshake_failures: FailureCounters,
    /// Handshakes that failed in TLS itself (protocol error, client gave up) after selection.
    pub handshakes_tls_error: AtomicU64,
    /// Handshakes cut off by the handshake deadline.
    pub handshakes_timeout: AtomicU64,
    /// Selections served by a static certificate.
    pub static_hits: AtomicU64,
    /// Selections served from the cache (positive answers).
    pub cache_hits: AtomicU64,
    /// Selections served from the cache's "not found" answers.
    pub cache_negative_hits: AtomicU64,
    /// Selections that needed the plugin (or waited for a concurrent call to it).
    pub cache_misses: AtomicU64,
    /// Selections served from an entry past its TTL because refreshing it failed (also counted as hits).
    pub stale_serves: AtomicU64,
    /// Selections answered with the listener's default certificate.
    pub default_served: AtomicU64,
}

/// Failure counters by kind; the labels are [`crate::select::SelectError::kind`] values.
#[derive(Debug, Default)]
pub struct FailureCounters {
    /// `no_sni`
    pub no_sni: AtomicU64,
    /// `malformed_sni`
    pub malformed_sni: AtomicU64,
    /// `unknown_name`
    pub unknown_name: AtomicU64,
    /// `plugin`
    pub plugin: AtomicU64,
    /// `store_unavailable`
    pub store_unavailable: AtomicU64,
    /// `bad_certificate`
    pub bad_certificate: AtomicU64,
}

impl FailureCounters {
    /// The counter for a failure kind label.
    pub fn by_kind(&self, kind: &str) -> Option<&AtomicU64> {
        Some(match kind {
            "no_sni" => &self.no_sni,
            "malformed_sni" => &self.malformed_sni,
            "unknown_name" => &self.unknown_name,
            "plugin" => &self.plugin,
            "store_unavailable" => &self.store_unavailable,
            "bad_certificate" => &self.bad_certificate,
            _ => return None,
        })
    }
}

/// Reads a counter.
pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// Adds one to a counter.
pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
