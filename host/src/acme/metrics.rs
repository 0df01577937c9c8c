//! ACME counters and gauges (`tern_acme_*`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use crate::metrics::{Exposition, get, inc};

/// What the ACME subsystem of a node did.
#[derive(Debug, Default)]
pub struct AcmeMetrics {
    /// First orders that produced a stored certificate.
    pub orders_issued: AtomicU64,
    /// First orders that failed.
    pub orders_failed: AtomicU64,
    /// Renewals that produced a stored certificate.
    pub renewals_ok: AtomicU64,
    /// Renewals that failed (the old certificate keeps serving).
    pub renewals_failed: AtomicU64,
    /// Orders not started because a budget was spent.
    pub refused_budget: AtomicU64,
    /// Orders not started because the name's last order failed recently.
    pub refused_backoff: AtomicU64,
    /// Names refused because `acme.max_pending` were pending.
    pub refused_busy: AtomicU64,
    /// Times this node waited for another node's (or task's) order instead of ordering.
    pub waited_for_other: AtomicU64,
    /// Handshakes that got their certificate by waiting for an order or storage.
    pub served_after_wait: AtomicU64,
    /// Handshakes whose wait (`acme.handshake_wait`) ran out: the fallback applied.
    pub wait_expired: AtomicU64,
    /// TLS-ALPN-01 validation handshakes answered.
    pub challenges_tls_alpn: AtomicU64,
    /// HTTP-01 validation requests answered.
    pub challenges_http: AtomicU64,
    /// Certificates in storage (the fleet's, on Redis).
    pub managed: AtomicU64,
    /// The soonest notAfter of the certificates this node serves, unix seconds (0: none).
    pub soonest_expiry: AtomicI64,
}

impl AcmeMetrics {
    pub(super) fn count_order(&self, renewal: bool, ok: bool) {
        inc(match (renewal, ok) {
            (false, true) => &self.orders_issued,
            (false, false) => &self.orders_failed,
            (true, true) => &self.renewals_ok,
            (true, false) => &self.renewals_failed,
        });
    }

    /// Prometheus families.
    pub(crate) fn render(&self, x: &mut Exposition) {
        x.family("tern_acme_orders_total", "counter", "First ACME orders, by outcome.")
            .sample("tern_acme_orders_total", "outcome=\"issued\"", get(&self.orders_issued))
            .sample("tern_acme_orders_total", "outcome=\"failed\"", get(&self.orders_failed));
        x.family(
            "tern_acme_renewals_total",
            "counter",
            "ACME renewals, by outcome (a failed one keeps the old certificate).",
        )
        .sample("tern_acme_renewals_total", "outcome=\"renewed\"", get(&self.renewals_ok))
        .sample("tern_acme_renewals_total", "outcome=\"failed\"", get(&self.renewals_failed));
        x.family("tern_acme_orders_refused_total", "counter", "Orders not started, by reason.")
            .sample("tern_acme_orders_refused_total", "reason=\"budget\"", get(&self.refused_budget))
            .sample("tern_acme_orders_refused_total", "reason=\"backoff\"", get(&self.refused_backoff))
            .sample("tern_acme_orders_refused_total", "reason=\"busy\"", get(&self.refused_busy));
        x.family(
            "tern_acme_waited_for_other_total",
            "counter",
            "Orders left to the node (or task) holding the name's lock.",
        )
        .sample("tern_acme_waited_for_other_total", "", get(&self.waited_for_other));
        x.family("tern_acme_handshake_waits_total", "counter", "Handshakes that waited for an issuance, by outcome.")
            .sample("tern_acme_handshake_waits_total", "outcome=\"served\"", get(&self.served_after_wait))
            .sample("tern_acme_handshake_waits_total", "outcome=\"fallback\"", get(&self.wait_expired));
        x.family("tern_acme_challenges_total", "counter", "Validation requests of the CA answered, by challenge.")
            .sample("tern_acme_challenges_total", "challenge=\"tls-alpn-01\"", get(&self.challenges_tls_alpn))
            .sample("tern_acme_challenges_total", "challenge=\"http-01\"", get(&self.challenges_http));
        x.family("tern_acme_managed_certificates", "gauge", "Certificates in ACME storage.").sample(
            "tern_acme_managed_certificates",
            "",
            get(&self.managed),
        );
        let soonest = u64::try_from(self.soonest_expiry.load(Ordering::Relaxed)).unwrap_or(0);
        x.family(
            "tern_acme_soonest_expiry_seconds",
            "gauge",
            "Soonest notAfter (unix seconds) of the certificates this node serves.",
        )
        .sample("tern_acme_soonest_expiry_seconds", "", soonest);
    }
}
