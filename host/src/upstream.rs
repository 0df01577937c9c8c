//! Where requests go: the HTTP clients of the listener backends, of `[[upstream]]` pools (load balancing,
//! passive and active health) and of origins that plugins route names to (`http://` or verified `https://`).
//!
//! Every client counts its connections against the process-wide backend budget ([`crate::backend`]); a pool
//! server has its own per-server budget as well. Idle connections are bounded per host and closed after
//! `proxy.pool_idle_timeout`, so a million routed names cannot grow memory without bound.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Uri;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Semaphore;

use crate::backend::{BoundedConnector, Budget};
use crate::body::Upload;
use crate::config::{Balance, HealthCheckSettings, ProxySettings, UpstreamSettings};
use crate::metrics::{Exposition, Histogram, inc, label_value};

/// Request bodies sent upstream: the client's upload, or nothing (health checks, retried bodiless requests).
pub(crate) type UpBody = Either<Upload<Incoming>, Empty<Bytes>>;
/// The connector of every upstream client: counted connections, TLS for `https` URIs.
pub(crate) type Connector = hyper_rustls::HttpsConnector<BoundedConnector>;
/// An HTTP client to upstreams.
pub(crate) type HttpClient = Client<Connector, UpBody>;

/// Idle pooled connections kept per upstream host (hyper's default is unbounded).
const MAX_IDLE_PER_HOST: usize = 32;

/// Which HTTP versions a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Versions {
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only (pools with `protocol = "h2"`: prior knowledge in cleartext, offered by ALPN over TLS).
    H2,
    /// HTTP/1.1, or HTTP/2 where TLS ALPN picks it (`https` origins granted `origin_h2`).
    Alpn,
}

/// A client whose connections count against `budget`, speaking TLS with `tls` to `https` URIs.
pub(crate) fn client(
    settings: &ProxySettings,
    connect_timeout: Duration,
    budget: Budget,
    tls: rustls::ClientConfig,
    versions: Versions,
) -> HttpClient {
    let mut tcp = HttpConnector::new();
    // A backend that is down must give a fast 502, not hang the client.
    tcp.set_connect_timeout(Some(connect_timeout));
    tcp.set_nodelay(true);
    tcp.enforce_http(false);
    let bounded = BoundedConnector::new(tcp, budget, connect_timeout);
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http();
    // Over TLS, HTTP/2 is offered by ALPN (for cleartext URIs ALPN plays no part).
    let connector = match versions {
        Versions::Http1 => builder.enable_http1().wrap_connector(bounded),
        Versions::H2 | Versions::Alpn => builder.enable_all_versions().wrap_connector(bounded),
    };
    let mut client = Client::builder(TokioExecutor::new());
    client
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_only(versions == Versions::H2);
    client.build(connector)
}

/// TLS to upstreams verified against `roots`.
fn tls_config(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(crate::crypto::provider().clone())
        .with_safe_default_protocol_versions()
        // The provider supports TLS 1.2 and 1.3: the defaults cannot be refused.
        .unwrap_or_else(|_| unreachable_versions())
        .with_root_certificates(roots)
        .with_no_client_auth()
}

#[cold]
fn unreachable_versions() -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier> {
    panic!("the crypto provider refused TLS 1.2 and 1.3")
}

/// TLS for cleartext-only clients (listener backends, pools): never used, since their URIs are `http://`.
pub(crate) fn no_tls() -> rustls::ClientConfig {
    tls_config(rustls::RootCertStore::empty())
}

/// Reads CA certificates from a PEM file. Blocking: call it off the async workers.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("{}: not PEM certificates: {e}", path.display()))?;
        roots.add(cert).map_err(|e| format!("{}: unusable CA certificate: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no CA certificate in the file", path.display()));
    }
    Ok(roots)
}

/// The pools and origin clients of the process.
#[derive(Debug)]
pub struct Upstreams {
    pools: HashMap<Arc<str>, Arc<Pool>>,
    origins: OriginClients,
    /// Active health checks; aborted when this is dropped.
    checks: tokio::task::JoinSet<()>,
}

impl Upstreams {
    /// Pools from the config (health checks started; `roots`: what each TLS pool verifies against), and the
    /// origin clients, built on first use.
    pub fn new(
        pools: &[UpstreamSettings],
        proxy: &ProxySettings,
        total: Arc<Semaphore>,
        mut roots: HashMap<String, rustls::RootCertStore>,
    ) -> Self {
        let mut checks = tokio::task::JoinSet::new();
        let pools = pools
            .iter()
            .map(|settings| {
                let tls = settings
                    .tls
                    .as_ref()
                    .map(|_| roots.remove(&settings.name).unwrap_or_else(rustls::RootCertStore::empty));
                let pool = Arc::new(Pool::new(settings, proxy, total.clone(), tls));
                if let Some(check) = &settings.health_check {
                    for index in 0..pool.servers.len() {
                        checks.spawn(health_check(Arc::downgrade(&pool), index, check.clone()));
                    }
                }
                (Arc::from(settings.name.as_str()), pool)
            })
            .collect();
        Self { pools, origins: OriginClients::new(proxy, total), checks }
    }

    /// A pool by name (grants only name pools that exist).
    pub(crate) fn pool(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(name)
    }

    /// The client for `origin`: verified against its CA (or the system roots), HTTP/2 offered if granted.
    pub(crate) async fn origin_client(&self, origin: &crate::route::Origin) -> Result<Arc<HttpClient>, String> {
        let trust = match (origin.tls, &origin.ca) {
            (false, _) => Trust::Cleartext,
            (true, None) => Trust::System,
            (true, Some(ca)) => Trust::Ca(ca.clone()),
        };
        let versions = if origin.h2 { Versions::Alpn } else { Versions::Http1 };
        self.origins.client(trust, versions).await
    }

    /// Appends the pools' families.
    pub(crate) fn render(&self, x: &mut Exposition) {
        let mut pools: Vec<_> = self.pools.values().collect();
        pools.sort_by(|a, b| a.name.cmp(&b.name));
        x.family("tern_upstream_requests_total", "counter", "Requests sent to a pool server (retries included).");
        for pool in &pools {
            for s in &pool.servers {
                x.sample("tern_upstream_requests_total", &s.labels(&pool.name), s.requests.load(Ordering::Relaxed));
            }
        }
        x.family("tern_upstream_errors_total", "counter", "Failed requests to a pool server, by kind.");
        for pool in &pools {
            for s in &pool.servers {
                let kinds =
                    [("connect", &s.connect_errors), ("reset", &s.resets), ("timeout", &s.timeouts), ("busy", &s.busy)];
                for (kind, counter) in kinds {
                    let labels = format!("{},kind=\"{kind}\"", s.labels(&pool.name));
                    x.sample("tern_upstream_errors_total", &labels, counter.load(Ordering::Relaxed));
                }
            }
        }
        x.family("tern_upstream_up", "gauge", "1 if the pool server gets traffic (healthy and not ejected).");
        for pool in &pools {
            for s in &pool.servers {
                x.sample("tern_upstream_up", &s.labels(&pool.name), u64::from(s.available(Instant::now())));
            }
        }
        x.family("tern_upstream_no_server_total", "counter", "Requests refused because no server of the pool was up.");
        for pool in &pools {
            let labels = format!("pool=\"{}\"", label_value(&pool.name));
            x.sample("tern_upstream_no_server_total", &labels, pool.no_server.load(Ordering::Relaxed));
        }
        x.family("tern_upstream_response_seconds", "histogram", "Time to a pool server's response headers.");
        for pool in &pools {
            for s in &pool.servers {
                x.histogram("tern_upstream_response_seconds", &s.labels(&pool.name), &s.latency);
            }
        }
    }

    /// Active health checks running (one per checked server).
    pub fn checks(&self) -> usize {
        self.checks.len()
    }
}

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
    pub(crate) client: HttpClient,
    in_flight: AtomicUsize,
    /// Consecutive failed requests (passive health).
    fails: AtomicU32,
    /// Ejected until this many milliseconds after `epoch` (0: not ejected).
    ejected_until: AtomicU64,
    epoch: Instant,
    /// The active check's verdict (true until a check says otherwise).
    healthy: AtomicBool,
    requests: AtomicU64,
    /// Time to the response head.
    latency: Histogram,
    connect_errors: AtomicU64,
    resets: AtomicU64,
    timeouts: AtomicU64,
    busy: AtomicU64,
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
    fn new(
        settings: &UpstreamSettings,
        proxy: &ProxySettings,
        total: Arc<Semaphore>,
        tls: Option<rustls::RootCertStore>,
    ) -> Self {
        let epoch = Instant::now();
        let scheme = if tls.is_some() { "https" } else { "http" };
        let tls = tls.map_or_else(no_tls, tls_config);
        let servers = settings
            .servers
            .iter()
            .map(|address| PoolServer {
                address: address.clone(),
                // Validated in config: `host:port` makes a URI.
                base: format!("{scheme}://{address}").parse().unwrap_or_else(|_| Uri::from_static("http://invalid")),
                client: client(
                    proxy,
                    settings.connect_timeout,
                    Budget::new(settings.max_connections_per_server, total.clone()),
                    tls.clone(),
                    match settings.protocol {
                        crate::config::UpstreamProtocol::Http1 => Versions::Http1,
                        crate::config::UpstreamProtocol::H2 => Versions::H2,
                    },
                ),
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
    fn available(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let ejected = until != 0 && (now.saturating_duration_since(self.epoch).as_millis() as u64) < until;
        self.healthy.load(Ordering::Relaxed) && !ejected
    }

    fn labels(&self, pool: &str) -> String {
        format!("pool=\"{}\",server=\"{}\"", label_value(pool), label_value(&self.address))
    }
}

/// Checks one server every `interval`: `rise` passes in a row bring it back, `fall` failures take it out.
async fn health_check(pool: std::sync::Weak<Pool>, index: usize, check: HealthCheckSettings) {
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

/// Clients for origins, one per trust (system roots, or one CA file) and HTTP versions, built on first use. All
/// origins share the process-wide backend budget.
#[derive(Debug)]
struct OriginClients {
    proxy: ProxySettings,
    total: Arc<Semaphore>,
    /// Bounded by the CA files named in the config (one per plugin grant) times the version sets. Read on every
    /// request to an origin: a read lock, held for a lookup and one reference count.
    clients: std::sync::RwLock<HashMap<(Trust, Versions), Arc<HttpClient>>>,
    /// Serialises building clients, so that a burst of first requests reads a CA file once.
    building: tokio::sync::Mutex<()>,
    system_roots: tokio::sync::OnceCell<rustls::RootCertStore>,
}

impl OriginClients {
    fn new(proxy: &ProxySettings, total: Arc<Semaphore>) -> Self {
        Self {
            proxy: proxy.clone(),
            total,
            clients: std::sync::RwLock::new(HashMap::new()),
            building: tokio::sync::Mutex::new(()),
            system_roots: tokio::sync::OnceCell::new(),
        }
    }

    async fn client(&self, trust: Trust, versions: Versions) -> Result<Arc<HttpClient>, String> {
        let key = (trust, versions);
        if let Some(client) = self.cached(&key) {
            return Ok(client);
        }
        let _building = self.building.lock().await;
        if let Some(client) = self.cached(&key) {
            return Ok(client);
        }
        // Reading CA files and the system store is file I/O: off the async workers.
        let roots = match &key.0 {
            Trust::Cleartext => rustls::RootCertStore::empty(),
            Trust::Ca(ca) => {
                let path = ca.to_path_buf();
                tokio::task::spawn_blocking(move || load_roots(&path)).await.map_err(|e| e.to_string())??
            }
            Trust::System => self
                .system_roots
                .get_or_try_init(|| async {
                    tokio::task::spawn_blocking(system_roots).await.map_err(|e| e.to_string())?
                })
                .await?
                .clone(),
        };
        let budget = Budget::new(self.proxy.max_backend_connections, self.total.clone());
        let client = Arc::new(client(&self.proxy, self.proxy.connect_timeout, budget, tls_config(roots), versions));
        self.clients.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key, client.clone());
        Ok(client)
    }

    fn cached(&self, key: &(Trust, Versions)) -> Option<Arc<HttpClient>> {
        // The map stays consistent across a panic elsewhere: recover the lock.
        self.clients.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(key).cloned()
    }
}

/// What an origin's TLS is verified against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Trust {
    /// `http://`: no TLS.
    Cleartext,
    /// The system's CA store.
    System,
    /// A grant's `origin_ca` file.
    Ca(Arc<Path>),
}

/// The system's CA store. Blocking: call it off the async workers.
pub fn system_roots() -> Result<rustls::RootCertStore, String> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(format!("no system CA certificates found ({} errors)", found.errors.len()));
    }
    Ok(roots)
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
