//! Process-wide counters and histograms: cheap atomics on the hot path, rendered as Prometheus text by the admin
//! endpoint and read directly by tests.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters of handshakes, certificate selection and proxying.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Handshakes completed.
    pub handshakes_ok: AtomicU64,
    /// Handshakes that failed before a certificate was chosen, by [`crate::failure::FailureKind`].
    pub handshake_failures: crate::counters::Counters<crate::failure::FailureKind>,
    /// Handshakes that failed in TLS itself (protocol error, client gave up) after selection.
    pub handshakes_tls_error: AtomicU64,
    /// Handshakes cut off by the handshake deadline.
    pub handshakes_timeout: AtomicU64,
    /// Completed handshakes that negotiated TLS 1.2.
    pub tls12: AtomicU64,
    /// Completed handshakes that negotiated TLS 1.3.
    pub tls13: AtomicU64,
    /// Completed handshakes that resumed a session.
    pub resumed: AtomicU64,
    /// Completed handshakes by cipher suite and key-exchange group.
    pub negotiated: crate::negotiated::Negotiated,
    /// Certificate compression (RFC 8879): by algorithm, and its memo's hits and misses.
    pub certificate_compression: crate::compression::CompressionStats,
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
    /// Cache entries evicted for size (not expiry or invalidation).
    pub cache_evictions: AtomicU64,
    /// Negative answers ("not found", refused) evicted for size.
    pub cache_negative_evictions: AtomicU64,
    /// Selections answered with the listener's default certificate.
    pub default_served: AtomicU64,
    /// Selection latency of answers from static certificates or the cache.
    pub selection_hit: Histogram,
    /// Selection latency of answers that needed the plugin.
    pub selection_miss: Histogram,
    /// Backend responses by status class (index 1..=5 for 1xx..5xx; 0 for responses tern made: 502, 504).
    pub backend_status: [AtomicU64; 6],
    /// Time to the backend's response headers.
    pub backend_latency: Histogram,
    /// Client connections closed by their watchdog, by reason.
    pub connections_timed_out: crate::counters::Counters<crate::watchdog::Expired>,
    /// Connections closed before their handshake over their PROXY protocol header, by reason.
    pub proxy_protocol_refused: crate::counters::Counters<crate::proxy_protocol::Refused>,
    /// Requests answered 421 because their host is not the connection's.
    pub misdirected_requests: AtomicU64,
    /// Requests answered 408 because the client paused its upload too long.
    pub request_body_timeouts: AtomicU64,
    /// Requests answered 503 because the backend connection budget was spent.
    pub backend_connections_exhausted: AtomicU64,
    /// Plugin answers refused because the certificate's validity period does not include now.
    pub certificates_out_of_validity: AtomicU64,
    /// Connections passed through to a plugin's TCP target.
    pub passthrough: AtomicU64,
    /// Passthrough connections whose target could not be reached.
    pub passthrough_failed: AtomicU64,
    /// Access-log lines dropped because the writer's queue was full.
    pub access_log_dropped: AtomicU64,
}

/// Upper bounds of the latency buckets, in microseconds (Prometheus `le`, plus +Inf).
const BUCKETS_MICROS: [u64; 14] =
    [25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000];

/// A fixed-bucket latency histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts per bucket; the last one is +Inf.
    buckets: [AtomicU64; BUCKETS_MICROS.len() + 1],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, elapsed: Duration) {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let index = BUCKETS_MICROS.iter().position(|&bound| micros <= bound).unwrap_or(BUCKETS_MICROS.len());
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Observations recorded.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// The mean observation (to the microsecond), if any was recorded.
    pub fn mean(&self) -> Option<Duration> {
        let count = self.count();
        (count > 0).then(|| Duration::from_micros(self.sum_micros.load(Ordering::Relaxed) / count))
    }

    /// Appends the histogram in Prometheus text format (seconds), with `labels` (e.g. `cache="hit"`).
    pub(crate) fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in BUCKETS_MICROS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let le = *bound as f64 / 1e6;
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
        }
        cumulative += self.buckets[BUCKETS_MICROS.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let braced = if labels.is_empty() { String::new() } else { format!("{{{labels}}}") };
        let _ = writeln!(out, "{name}_sum{braced} {sum}");
        let _ = writeln!(out, "{name}_count{braced} {cumulative}");
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

/// Builds Prometheus text exposition: `# HELP`/`# TYPE` once per family, then its samples.
#[derive(Debug, Default)]
pub(crate) struct Exposition {
    out: String,
}

impl Exposition {
    /// Starts a metric family.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        self
    }

    /// One sample; `labels` is the text between the braces, or empty.
    pub fn sample(&mut self, name: &str, labels: &str, value: u64) -> &mut Self {
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
        self
    }

    /// One sample per (label value, counter), all under the label `label`.
    pub fn counters<'a>(
        &mut self,
        name: &str,
        label: &str,
        counters: impl IntoIterator<Item = (&'static str, &'a AtomicU64)>,
    ) -> &mut Self {
        for (value, counter) in counters {
            self.sample(name, &format!("{label}=\"{value}\""), get(counter));
        }
        self
    }

    /// A histogram's samples.
    pub fn histogram(&mut self, name: &str, labels: &str, histogram: &Histogram) -> &mut Self {
        histogram.render(&mut self.out, name, labels);
        self
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Escapes a label value for the text format.
pub(crate) fn label_value(raw: &str) -> String {
    raw.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Metrics {
    /// Appends the process-wide families.
    pub(crate) fn render(&self, x: &mut Exposition) {
        x.family("tern_handshakes_total", "counter", "TLS handshakes by outcome.");
        x.sample("tern_handshakes_total", "outcome=\"ok\"", get(&self.handshakes_ok));
        x.counters("tern_handshakes_total", "outcome", self.handshake_failures.all());
        x.sample("tern_handshakes_total", "outcome=\"tls_error\"", get(&self.handshakes_tls_error));
        x.sample("tern_handshakes_total", "outcome=\"timeout\"", get(&self.handshakes_timeout));
        x.family("tern_tls_version_total", "counter", "Completed handshakes by TLS version.");
        x.sample("tern_tls_version_total", "version=\"1.2\"", get(&self.tls12));
        x.sample("tern_tls_version_total", "version=\"1.3\"", get(&self.tls13));
        self.negotiated.render(x);
        self.certificate_compression.render(x);
        x.family("tern_tls_resumed_total", "counter", "Completed handshakes that resumed a session.");
        x.sample("tern_tls_resumed_total", "", get(&self.resumed));
        x.family("tern_tls_handshakes_total", "counter", "Completed handshakes, full or resumed.");
        let resumed = get(&self.resumed);
        x.sample("tern_tls_handshakes_total", "kind=\"full\"", get(&self.handshakes_ok).saturating_sub(resumed));
        x.sample("tern_tls_handshakes_total", "kind=\"resumed\"", resumed);
        x.family("tern_selections_total", "counter", "Certificate selections by how they were answered.");
        x.counters(
            "tern_selections_total",
            "how",
            [
                ("static", &self.static_hits),
                ("cache_hit", &self.cache_hits),
                ("cache_negative_hit", &self.cache_negative_hits),
                ("cache_miss", &self.cache_misses),
                ("stale", &self.stale_serves),
                ("default", &self.default_served),
            ],
        );
        x.family("tern_cache_evictions_total", "counter", "Cache entries evicted for size.");
        x.sample("tern_cache_evictions_total", "", get(&self.cache_evictions));
        x.family("tern_cache_negative_evictions_total", "counter", "Negative answers evicted for size.");
        x.sample("tern_cache_negative_evictions_total", "", get(&self.cache_negative_evictions));
        x.family("tern_selection_seconds", "histogram", "Certificate selection latency, by cache outcome.");
        x.histogram("tern_selection_seconds", "cache=\"hit\"", &self.selection_hit);
        x.histogram("tern_selection_seconds", "cache=\"miss\"", &self.selection_miss);
        x.family("tern_backend_responses_total", "counter", "Responses by status class; tern_made is 502/504.");
        for (class, counter) in ["tern_made", "1xx", "2xx", "3xx", "4xx", "5xx"].iter().zip(&self.backend_status) {
            x.sample("tern_backend_responses_total", &format!("class=\"{class}\""), get(counter));
        }
        x.family("tern_backend_response_seconds", "histogram", "Time to the backend's response headers.");
        x.histogram("tern_backend_response_seconds", "", &self.backend_latency);
        x.family("tern_passthrough_connections_total", "counter", "Connections passed through untouched, by outcome.");
        x.sample("tern_passthrough_connections_total", "outcome=\"forwarded\"", get(&self.passthrough));
        x.sample("tern_passthrough_connections_total", "outcome=\"target_unreachable\"", get(&self.passthrough_failed));
        x.family("tern_client_timeouts_total", "counter", "Client connections closed by a deadline, by reason.");
        x.counters("tern_client_timeouts_total", "reason", self.connections_timed_out.all());
        x.family(
            "tern_proxy_protocol_refused_total",
            "counter",
            "Connections closed over their PROXY header, by reason.",
        );
        x.counters("tern_proxy_protocol_refused_total", "reason", self.proxy_protocol_refused.all());
        x.family("tern_requests_refused_total", "counter", "Requests tern answered itself, by reason.");
        x.counters(
            "tern_requests_refused_total",
            "reason",
            [
                ("misdirected", &self.misdirected_requests),
                ("body_timeout", &self.request_body_timeouts),
                ("backend_busy", &self.backend_connections_exhausted),
            ],
        );
        x.family(
            "tern_certificates_out_of_validity_total",
            "counter",
            "Plugin certificates refused as expired or not yet valid.",
        );
        x.sample("tern_certificates_out_of_validity_total", "", get(&self.certificates_out_of_validity));
        x.family("tern_access_log_dropped_total", "counter", "Access-log lines dropped: the writer's queue was full.");
        x.sample("tern_access_log_dropped_total", "", get(&self.access_log_dropped));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_sum_in_seconds() {
        let h = Histogram::default();
        for micros in [10, 30, 30, 2_000, 5_000_000] {
            h.observe(Duration::from_micros(micros));
        }
        let mut out = String::new();
        h.render(&mut out, "t", "cache=\"hit\"");
        assert!(out.contains("t_bucket{cache=\"hit\",le=\"0.000025\"} 1\n"), "{out}");
        assert!(out.contains("t_bucket{cache=\"hit\",le=\"0.00005\"} 3\n"), "{out}");
        assert!(out.contains("t_bucket{cache=\"hit\",le=\"0.0025\"} 4\n"), "{out}");
        assert!(out.contains("t_bucket{cache=\"hit\",le=\"+Inf\"} 5\n"), "{out}");
        assert!(out.contains("t_count{cache=\"hit\"} 5\n"), "{out}");
        assert!(out.contains("t_sum{cache=\"hit\"} 5.00207\n"), "{out}");
        let mut bare = String::new();
        h.render(&mut bare, "b", "");
        assert!(bare.contains("b_bucket{le=\"+Inf\"} 5\n") && bare.contains("b_count 5\n"), "{bare}");
    }
}
