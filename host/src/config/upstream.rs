//! The settings of `[[upstream]]` pools (validated in `sections.rs`).

use std::path::PathBuf;
use std::time::Duration;

/// `[[upstream]]`: a pool of servers that plugin answers may route names to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSettings {
    /// Name routes and grants refer to it by.
    pub name: String,
    /// `host:port` of each server (HTTP/1.1, cleartext).
    pub servers: Vec<String>,
    /// How a server is chosen per request.
    pub balance: Balance,
    /// Connecting to a server gives up after this long (then the next server, or 502).
    pub connect_timeout: Duration,
    /// Waiting for response headers gives up after this long (then 504).
    pub response_timeout: Duration,
    /// Open connections per server; requests beyond wait up to `connect_timeout`, then 503.
    pub max_connections_per_server: usize,
    /// Consecutive failed requests (connect errors, 5xx-free failures: resets and timeouts) that eject a server.
    pub max_fails: u32,
    /// How long an ejected server is skipped before it gets traffic again.
    pub fail_timeout: Duration,
    /// Further servers tried after a connect failure or a connection broken before the response head, for
    /// requests without a body and with an idempotent method.
    pub retries: u32,
    /// HTTP/1.1 (default) or HTTP/2 (prior knowledge in cleartext, by ALPN over TLS): gRPC backends.
    pub protocol: UpstreamProtocol,
    /// `tls = true`: the servers speak TLS, verified with each server's host as the name, against `ca` (PEM file)
    /// or the system roots.
    pub tls: Option<PoolTls>,
    /// Active HTTP checks, if configured.
    pub health_check: Option<HealthCheckSettings>,
    /// `proxy_protocol = "v2"`: every connection to a server starts with a PROXY protocol header (the client's
    /// for requests, `LOCAL` for health checks), and carries one client connection's requests only.
    pub proxy_protocol: Option<SendProxyProtocol>,
}

/// `upstream.proxy_protocol` and `listener.backend_proxy_protocol`: the PROXY protocol header tern sends first on
/// every connection to the backend (HAProxy's `send-proxy-v2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxyProtocol {
    /// Version 2 (binary), with the client's SNI (`PP2_TYPE_AUTHORITY`) and ALPN protocol (`PP2_TYPE_ALPN`).
    V2,
}

/// `upstream.tls` and `upstream.ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolTls {
    /// CA certificates to verify the servers against; `None`: the system roots.
    pub ca: Option<PathBuf>,
}

/// `upstream.protocol`: what a pool's servers speak.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 (the default).
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c): gRPC backends, trailers end to end.
    H2,
}

/// `upstream.balance`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// Each server in turn (the default).
    #[default]
    RoundRobin,
    /// The server with the fewest requests in flight (ties in turn).
    LeastRequests,
}

/// `[upstream.health_check]`: a `GET` of `path` on every server each `interval`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheckSettings {
    /// Request path.
    pub path: String,
    /// Time between checks of one server.
    pub interval: Duration,
    /// A check that has no response head within this long fails.
    pub timeout: Duration,
    /// The status a passing check answers with.
    pub expected_status: u16,
    /// Consecutive passing checks that bring a down server back.
    pub rise: u32,
    /// Consecutive failing checks that take a server out.
    pub fall: u32,
}
