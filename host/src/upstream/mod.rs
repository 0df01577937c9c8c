//! Where requests go: the HTTP clients of the listener backends, of `[[upstream]]` pools (load balancing,
//! passive and active health) and of origins that plugins route names to (`http://` or verified `https://`).
//!
//! Every client counts its connections against the process-wide backend budget ([`crate::backend`]); a pool
//! server has its own per-server budget as well. Idle connections are bounded per host and closed after
//! `proxy.pool_idle_timeout`, so a million routed names cannot grow memory without bound.
//!
//! Routes that send PROXY protocol headers ([`proxy_header`]) use a client per client connection instead
//! ([`Private`]), made from the same [`Recipe`] and counted against the same budgets.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Builder, Client};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::Semaphore;

use crate::backend::{BoundedConnector, Budget};
use crate::body::Upload;
use crate::config::{ProxySettings, UpstreamSettings};
use crate::metrics::{Exposition, label_value};

mod direct;
mod origins;
mod pool;
mod private;
pub(crate) mod proxy_header;

pub(crate) use direct::{Direct, DirectBody, DirectError};
use origins::{OriginClients, Trust};
pub(crate) use pool::{Failure, Pool};
pub use private::Private;
pub(crate) use private::Slot;

/// Request bodies sent upstream: the client's upload, or nothing (health checks, retried bodiless requests).
pub(crate) type UpBody = Either<Upload<Incoming>, Empty<Bytes>>;
/// The connector of every upstream client: counted connections, TLS for `https` URIs.
pub(crate) type Connector = hyper_rustls::HttpsConnector<BoundedConnector>;
/// An HTTP client to upstreams.
pub(crate) type HttpClient = Client<Connector, UpBody>;

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
    Recipe::new(settings, connect_timeout, budget, tls, versions).shared(None)
}

/// How the clients to one backend are made: the connector's parts (TCP settings, budget, TLS) and hyper-util's
/// settings. Cloning it shares the budget.
#[derive(Debug, Clone)]
pub(crate) struct Recipe {
    tcp: HttpConnector,
    budget: Budget,
    wait: Duration,
    tls: Arc<rustls::ClientConfig>,
    /// A shared client's pool: `proxy.max_idle_per_backend` idle connections per server.
    shared: Builder,
    /// A [`Private`] client's pool: `proxy.max_idle_per_client` idle connections.
    private: Builder,
    /// `proxy.max_idle_per_backend` and `proxy.pool_idle_timeout`, for [`Recipe::direct`].
    max_idle: usize,
    idle_timeout: Duration,
}

impl Recipe {
    /// Clients connecting within `connect_timeout` (and waiting as long for a permit of `budget`), speaking
    /// `versions`, with TLS by `tls` for `https` URIs.
    pub(crate) fn new(
        settings: &ProxySettings,
        connect_timeout: Duration,
        budget: Budget,
        mut tls: rustls::ClientConfig,
        versions: Versions,
    ) -> Self {
        let mut tcp = HttpConnector::new();
        // A backend that is down must give a fast 502, not hang the client.
        tcp.set_connect_timeout(Some(connect_timeout));
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        // Over TLS, HTTP/2 is offered by ALPN (for cleartext URIs ALPN plays no part); what hyper-rustls's builder
        // would set.
        tls.alpn_protocols = match versions {
            Versions::Http1 => Vec::new(),
            Versions::H2 | Versions::Alpn => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        };
        let mut shared = Client::builder(TokioExecutor::new());
        shared
            .pool_idle_timeout(settings.pool_idle_timeout)
            .pool_max_idle_per_host(settings.max_idle_per_backend)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(versions == Versions::H2);
        let mut private = shared.clone();
        private.pool_max_idle_per_host(settings.max_idle_per_client);
        Self {
            tcp,
            budget,
            wait: connect_timeout,
            tls: Arc::new(tls),
            shared,
            private,
            max_idle: settings.max_idle_per_backend,
            idle_timeout: settings.pool_idle_timeout,
        }
    }

    /// Connections to the cleartext HTTP/1.1 `backend` driven by their requests ([`Direct`]), with the shared
    /// client's budget and idle bounds.
    pub(crate) fn direct(&self, backend: http::Uri) -> Arc<Direct> {
        Direct::new(self.bounded(None), backend, self.max_idle, self.idle_timeout)
    }

    /// A client for everyone (`header`: written first on each connection, such as a health check's `LOCAL`).
    pub(crate) fn shared(&self, header: Option<Arc<[u8]>>) -> HttpClient {
        self.shared.build(self.connector(header))
    }

    /// A client for one client connection, whose connections all start with that client's `header`.
    pub(crate) fn private(&self, header: Arc<[u8]>) -> HttpClient {
        self.private.build(self.connector(Some(header)))
    }

    fn bounded(&self, header: Option<Arc<[u8]>>) -> BoundedConnector {
        BoundedConnector::new(self.tcp.clone(), self.budget.clone(), self.wait).with_header(header)
    }

    fn connector(&self, header: Option<Arc<[u8]>>) -> Connector {
        let bounded = self.bounded(header);
        // What `HttpsConnectorBuilder::https_or_http` makes, sharing one TLS config.
        hyper_rustls::HttpsConnector::from((bounded, self.tls.clone()))
    }
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

/// Reads CA certificates from a PEM file. Blocking: call it off the async workers. The error does not repeat the
/// path: callers name it with the key it came from.
pub fn load_roots(path: &Path) -> Result<rustls::RootCertStore, String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("not PEM certificates: {e}"))?;
        roots.add(cert).map_err(|e| format!("unusable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no CA certificate in the file".into());
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
                        checks.spawn(pool::health_check(Arc::downgrade(&pool), index, check.clone()));
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
