//! `[[upstream]]` pools: choosing a server (round robin, least outstanding requests), passive health (failures in
//! a row take a server out) and active HTTP checks (which bring it back). A pool with `proxy_protocol` sends its
//! requests through each client connection's [`super::Private`] clients and its health checks with a `LOCAL`
//! header (HAProxy's `check-send-proxy`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::Uri;
use http_body_util::{Either, Empty};
use tokio::sync::Semaphore;

use super::{HttpClient, Recipe, Versions, no_tls, proxy_header, tls_config};
use crate::backend::Budget;
use crate::config::{Balance, HealthCheckSettings, ProxySettings, UpstreamSettings};
use crate::metrics::{Histogram, inc, label_value};

/// An `[[upstream]]` pool.
#[derive(Debug)]
pub(crate) struct Pool {
    pub(crate) name: Arc<str>,
    pub(crate) settings: UpstreamSettings,
    pub(crate) servers: Vec<PoolServer>,
    next: AtomicUsize,
    pub(crate) no_server: AtomicU64,
}

/// One server of a pool, its client and its health.
#[derive(Debug)]
pub(crate) struct PoolServer {
    pub(crate) address: String,
    /// `http://address`, the base of request URIs.
    pub(crate) base: Uri,
    /// The shared client: every request, or with `proxy_protocol` only the health checks (`LOCAL` header).
    pub(crate) client: HttpClient,
    /// With `proxy_protocol`: how each client connection's own client to this server is made.
    pub(crate) private: Option<Recipe>,
    /// A cleartext HTTP/1.1 server without `proxy_protocol`: its connections driven by their requests (all
    /// requests but upgrades; see [`super::Direct`]).
    pub(crate) direct: Option<Arc<super::Direct>>,
    in_flight: AtomicUsize,
    /// Consecutive failed requests (passive health).
    fails: AtomicU32,
    /// Ejected until this many milliseconds after `epoch` (0: not ejected).
    ejected_until: AtomicU64,
    epoch: Instant,
    /// The active check's verdict (true until a check says otherwise).
    healthy: AtomicBool,
    pub(super) requests: AtomicU64,
    /// Time to the response head.
    pub(super) latency: Histogram,
    pub(super) connect_errors: AtomicU64,
    pub(super) resets: AtomicU64,
    pub(super) timeouts: AtomicU64,
    pub(super) busy: AtomicU64,
}

/// How a request to a pool server failed (passive health counts connect errors and timeouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No connection could be made.
    Connect,
    /// The connection broke before the response head.
    Reset,
    /// No response head in time.
    Timeout,
    /// The server's connection budget was spent.
    Busy,
}

impl Pool {
    /// `tls`: the roots of a TLS pool (`None`: cleartext).
    pub(super) fn new(
        settings: &UpstreamSettings,
        proxy: &ProxySettings,
        total: Arc<Semaphore>,
        tls: Option<rustls::RootCertStore>,
    ) -> Self {
        let epoch = Instant::now();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let tls = tls.map_or_else(no_tls, tls_config);
        let versions = match settings.protocol {
            crate::config::UpstreamProtocol::Http1 => Versions::Http1,
            crate::config::UpstreamProtocol::H2 => Versions::H2,
        };
        let servers = settings
            .servers
            .iter()
            .map(|address| {
                let budget = Budget::new(settings.max_connections_per_server, total.clone());
                let recipe = Recipe::new(proxy, settings.connect_timeout, budget, tls.clone(), versions);
                let check_header = settings.proxy_protocol.map(|_| proxy_header::local());
                // Validated in config: `host:port` makes a URI.
                let base: Uri =
                    format!("{scheme}://{address}").parse().unwrap_or_else(|_| Uri::from_static("http://invalid"));
                let direct = (scheme == "http" && versions == Versions::Http1 && settings.proxy_protocol.is_none())
                    .then(|| recipe.direct(base.clone()));
                (address, base, recipe.shared(check_header), settings.proxy_protocol.map(|_| recipe), direct)
            })
            .map(|(address, base, client, private, direct)| PoolServer {
                address: address.clone(),
                base,
                client,
                private,
                direct,
                in_flight: AtomicUsize::new(0),
                fails: AtomicU32::new(0),
                ejected_until: AtomicU64::new(0),
                epoch,
                healthy: AtomicBool::new(true),
                requests: AtomicU64::new(0),
                latency: Histogram::default(),
                connect_errors: AtomicU64::new(0),
                resets: AtomicU64::new(0),
                timeouts: AtomicU64::new(0),
                busy: AtomicU64::new(0),
            })
            .collect();
        Self {
            name: Arc::from(settings.name.as_str()),
            settings: settings.clone(),
            servers,
            next: AtomicUsize::new(0),
            no_server: AtomicU64::new(0),
        }
    }

    /// The server for the next request, skipping `tried` (indices already tried for this request) and servers
    /// that are down; `None` if none is up.
    pub(crate) fn pick(&self, tried: &[usize]) -> Option<usize> {
        let now = Instant::now();
        let n = self.servers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let candidates =
            (0..n).map(|i| (start + i) % n).filter(|i| !tried.contains(i) && self.servers[*i].available(now));
        let picked = match self.settings.balance {
            Balance::RoundRobin => candidates.into_iter().next(),
            Balance::LeastRequests => candidates.min_by_key(|i| self.servers[*i].in_flight.load(Ordering::Relaxed)),
        };
        if picked.is_none() && tried.is_empty() {
            inc(&self.no_server);
        }
        picked
    }

    /// Marks a request to server `index` as started; the guard ends it.
    pub(crate) fn start(&self, index: usize) -> InFlight<'_> {
        let server = &self.servers[index];
        server.in_flight.fetch_add(1, Ordering::Relaxed);
        inc(&server.requests);
        InFlight(server)
    }

    /// Passive health: a success resets the server's failure streak.
    pub(crate) fn succeeded(&self, index: usize, latency: Duration) {
        self.servers[index].fails.store(0, Ordering::Relaxed);
        self.servers[index].latency.observe(latency);
    }

    /// Passive health: `max_fails` failures in a row take the server out: until `rise` health checks pass if the
    /// pool has active checks (HAProxy's `observe` with `on-error mark-down`), else for `fail_timeout`.
    pub(crate) fn failed(&self, index: usize, failure: Failure) {
        let server = &self.servers[index];
        inc(match failure {
            Failure::Connect => &server.connect_errors,
            Failure::Reset => &server.resets,
            Failure::Timeout => &server.timeouts,
            Failure::Busy => &server.busy,
        });
        if failure == Failure::Busy || self.settings.max_fails == 0 {
            return; // a full server is not a broken one
        }
        if server.fails.fetch_add(1, Ordering::Relaxed) + 1 >= self.settings.max_fails {
            server.fails.store(0, Ordering::Relaxed);
            if self.settings.health_check.is_some() {
                if server.healthy.swap(false, Ordering::Relaxed) {
                    tracing::warn!(pool = %self.name, server = %server.address, "server down after consecutive failures, until its health checks pass");
                }
                return;
            }
            let until = server.epoch.elapsed() + self.settings.fail_timeout;
            server.ejected_until.store(u64::try_from(until.as_millis()).unwrap_or(u64::MAX).max(1), Ordering::Relaxed);
            tracing::warn!(pool = %self.name, server = %server.address, for_ = ?self.settings.fail_timeout, "server ejected after consecutive failures");
        }
    }
}

/// A request in flight to a pool server (least-requests balancing counts these until the response head).
pub(crate) struct InFlight<'a>(&'a PoolServer);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl PoolServer {
    pub(super) fn available(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let ejected = until != 0 && (now.saturating_duration_since(self.epoch).as_millis() as u64) < until;
        self.healthy.load(Ordering::Relaxed) && !ejected
    }

    pub(super) fn labels(&self, pool: &str) -> String {
        format!("pool=\"{}\",server=\"{}\"", label_value(pool), label_value(&self.address))
    }
}

/// Checks one server every `interval`: `rise` passes in a row bring it back, `fall` failures take it out.
pub(super) async fn health_check(pool: std::sync::Weak<Pool>, index: usize, check: HealthCheckSettings) {
    let (mut passes, mut fails) = (0u32, 0u32);
    // Whether the server was up at the last check: passive health may take it down in between, and then it needs
    // `rise` fresh passes.
    let mut was_healthy = true;
    loop {
        tokio::time::sleep(check.interval).await;
        let Some(pool) = pool.upgrade() else { return };
        let server = &pool.servers[index];
        let uri = format!("{}{}", server.base.to_string().trim_end_matches('/'), check.path);
        let request = http::Request::get(uri)
            .header(http::header::USER_AGENT, "tern-health-check")
            .body(Either::Right(Empty::new()));
        let Ok(request) = request else { return };
        let status = tokio::time::timeout(check.timeout, server.client.request(request)).await;
        let passed = matches!(&status, Ok(Ok(response)) if response.status().as_u16() == check.expected_status);
        let healthy = server.healthy.load(Ordering::Relaxed);
        if was_healthy && !healthy {
            passes = 0;
        }
        if passed {
            (passes, fails) = (passes + 1, 0);
            if !healthy && passes >= check.rise {
                server.healthy.store(true, Ordering::Relaxed);
                // A server the check brings back starts with a clean passive record.
                server.ejected_until.store(0, Ordering::Relaxed);
                tracing::info!(pool = %pool.name, server = %server.address, "health check passed: server back");
            }
        } else {
            (passes, fails) = (0, fails + 1);
            if healthy && fails >= check.fall {
                server.healthy.store(false, Ordering::Relaxed);
                let outcome = match &status {
                    Ok(Ok(response)) => format!("status {}", response.status().as_u16()),
                    Ok(Err(err)) => err.to_string(),
                    Err(_) => format!("no answer within {:?}", check.timeout),
                };
                tracing::warn!(pool = %pool.name, server = %server.address, %outcome, "health check failed: server down");
            }
        }
        was_healthy = server.healthy.load(Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(balance: Balance, health_check: bool) -> Pool {
        let settings = UpstreamSettings {
            name: "p".into(),
            servers: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into(), "127.0.0.1:3".into()],
            balance,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            max_connections_per_server: 4,
            max_fails: 2,
            fail_timeout: Duration::from_secs(60),
            retries: 1,
            protocol: crate::config::UpstreamProtocol::Http1,
            tls: None,
            proxy_protocol: None,
            health_check: health_check.then(|| HealthCheckSettings {
                path: "/".into(),
                interval: Duration::from_secs(1),
                timeout: Duration::from_secs(1),
                expected_status: 200,
                rise: 1,
                fall: 1,
            }),
        };
        let proxy = ProxySettings {
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            pool_idle_timeout: Duration::from_secs(1),
            max_connections_per_backend: 4,
            max_backend_connections: 16,
            max_idle_per_client: 5,
            max_idle_per_backend: 32,
        };
        Pool::new(&settings, &proxy, Arc::new(Semaphore::new(16)), None)
    }

    #[tokio::test]
    async fn round_robin_turns_and_skips_servers_that_are_out() {
        let pool = pool(Balance::RoundRobin, false);
        let picks: Vec<_> = (0..6).filter_map(|_| pool.pick(&[])).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        pool.failed(1, Failure::Connect);
        assert!(pool.servers[1].available(Instant::now()), "one failure of two allowed");
        pool.failed(1, Failure::Busy);
        assert!(pool.servers[1].available(Instant::now()), "a full server is not a broken one");
        pool.failed(1, Failure::Connect);
        assert!(!pool.servers[1].available(Instant::now()), "max_fails in a row eject");
        assert!((0..6).filter_map(|_| pool.pick(&[])).all(|i| i != 1));
        assert_eq!(pool.pick(&[0, 2]), None, "a retry never goes back to a server it tried");
    }

    #[tokio::test]
    async fn least_requests_prefers_the_idle_server_and_health_checks_own_the_return() {
        let pool = pool(Balance::LeastRequests, true);
        let (_a, _b) = (pool.start(0), pool.start(0));
        let _c = pool.start(2);
        assert_eq!(pool.pick(&[]), Some(1));
        pool.failed(1, Failure::Timeout);
        pool.failed(1, Failure::Timeout);
        assert!(!pool.servers[1].healthy.load(Ordering::Relaxed), "with checks, failures mark the server down");
        assert_eq!(pool.pick(&[]), Some(2));
        pool.failed(0, Failure::Connect);
        pool.failed(0, Failure::Connect);
        pool.failed(2, Failure::Connect);
        pool.failed(2, Failure::Connect);
        assert_eq!(pool.pick(&[]), None);
        assert_eq!(pool.no_server.load(Ordering::Relaxed), 1);
    }
}
