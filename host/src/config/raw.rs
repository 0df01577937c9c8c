//! The file's shape, exactly as written, and what a key means when the file leaves it out ([`defaults`], applied
//! during validation).

use serde::Deserialize;
use std::collections::BTreeMap;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct File {
    #[serde(default)]
    pub server: Server,
    #[serde(default)]
    pub cache: Cache,
    #[serde(default)]
    pub proxy: Proxy,
    #[serde(default)]
    pub listener: Vec<Listener>,
    #[serde(default)]
    pub certificate: Vec<Certificate>,
    #[serde(default)]
    pub plugin: Vec<Plugin>,
    #[serde(default)]
    pub redis: Vec<Redis>,
    #[serde(default)]
    pub upstream: Vec<Upstream>,
    pub acme: Option<super::acme::RawAcme>,
    #[serde(default)]
    pub http_listener: Vec<super::acme::RawHttpListener>,
    pub invalidation: Option<Invalidation>,
    pub resumption: Option<Resumption>,
    pub admin: Option<Admin>,
    #[serde(default)]
    pub reload: Reload,
    #[serde(default)]
    pub log: Log,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Invalidation {
    pub redis: String,
    pub channel: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resumption {
    pub redis: Option<String>,
    pub secret: Option<toml::Value>,
    pub prefix: Option<String>,
    pub tickets: Option<bool>,
    pub tls13_tickets: Option<usize>,
    pub ticket_rotation: Option<String>,
    pub ticket_lifetime: Option<String>,
    pub session_lifetime: Option<String>,
    pub node: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redis {
    pub name: String,
    pub urls: Vec<String>,
    #[serde(default)]
    pub cluster: bool,
    pub timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    pub handshake_timeout: Option<String>,
    pub max_connections: Option<usize>,
    pub session_cache_entries: Option<usize>,
    pub shutdown_grace: Option<String>,
    pub upgrade_timeout: Option<String>,
    pub request_head_timeout: Option<String>,
    pub keepalive_timeout: Option<String>,
    pub request_body_timeout: Option<String>,
    pub send_timeout: Option<String>,
    pub tunnel_idle_timeout: Option<String>,
    pub h2_max_concurrent_streams: Option<u32>,
    pub h2_keepalive_interval: Option<String>,
    pub h2_keepalive_timeout: Option<String>,
    pub max_request_header_bytes: Option<Size>,
    pub plugin_memory_total: Option<Size>,
    pub plugin_keep_resident: Option<Size>,
    pub certificate_compression: Option<Vec<String>>,
    pub certificate_compression_cache_entries: Option<u64>,
    pub certificate_compression_cache_bytes: Option<Size>,
    pub cipher_suites: Option<Vec<String>>,
    pub cipher_order: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub bind: Option<String>,
    pub token: Option<toml::Value>,
    pub max_connections: Option<usize>,
    pub request_head_timeout: Option<String>,
    pub connection_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Log {
    #[serde(default)]
    pub format: super::LogFormat,
    pub level: Option<String>,
    pub access: Option<bool>,
    pub access_format: Option<super::LogFormat>,
    pub access_fields: Option<Vec<String>>,
    pub access_queue: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reload {
    #[serde(default)]
    pub watch: bool,
    pub watch_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cache {
    pub max_entries: Option<u64>,
    pub max_bytes: Option<Size>,
    pub max_negative_entries: Option<u64>,
    pub ttl: Option<String>,
    pub max_ttl: Option<String>,
    pub negative_ttl: Option<String>,
    pub max_stale: Option<String>,
    pub invalid_ttl: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Proxy {
    pub connect_timeout: Option<String>,
    pub response_timeout: Option<String>,
    pub pool_idle_timeout: Option<String>,
    pub max_connections_per_backend: Option<usize>,
    pub max_backend_connections: Option<usize>,
    pub max_idle_per_client: Option<usize>,
    pub max_idle_per_backend: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: Option<String>,
    pub bind: String,
    pub plugin: Option<String>,
    pub default_certificate: Option<String>,
    #[serde(default)]
    pub strict: bool,
    pub alpn: Option<Vec<String>>,
    pub backend: String,
    pub client_ca: Option<String>,
    pub client_auth: Option<String>,
    pub proxy_protocol: Option<ProxyProtocol>,
    pub admission: Option<Admission>,
    pub ja4_header: Option<String>,
    pub backend_proxy_protocol: Option<super::SendProxyProtocol>,
}

/// `listener.admission`: per-client limits right after accept.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admission {
    pub address_new_per_second: Option<u32>,
    pub address_burst: Option<u32>,
    pub address_concurrent: Option<u32>,
    pub prefix_new_per_second: Option<u32>,
    pub prefix_burst: Option<u32>,
    pub prefix_concurrent: Option<u32>,
    pub exempt: Option<Vec<String>>,
    pub max_tracked: Option<usize>,
}

/// `listener.proxy_protocol`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyProtocol {
    pub trusted: Vec<String>,
    pub required: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    pub name: String,
    pub cert: String,
    pub key: String,
    pub names: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plugin {
    pub name: String,
    pub path: String,
    pub timeout: Option<String>,
    pub memory_limit: Option<Size>,
    pub max_concurrency: Option<usize>,
    pub spare_instances: Option<usize>,
    pub max_calls_per_second: Option<u32>,
    pub max_calls_per_second_per_client: Option<u32>,
    pub breaker_threshold: Option<u32>,
    pub breaker_cooldown: Option<String>,
    #[serde(default)]
    pub settings: BTreeMap<String, toml::Value>,
    #[serde(default)]
    pub grants: Grants,
    #[serde(default)]
    pub probe_names: Vec<String>,
    #[serde(default)]
    pub on_swap: super::OnSwap,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    pub files: Option<String>,
    pub kv: Option<KvGrant>,
    pub http: Option<HttpGrant>,
    pub routes: Option<RouteGrant>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteGrant {
    #[serde(default)]
    pub pools: Vec<String>,
    #[serde(default)]
    pub origins: Vec<String>,
    #[serde(default)]
    pub passthrough: Vec<String>,
    pub origin_ca: Option<String>,
    pub origin_h2: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upstream {
    pub name: String,
    pub servers: Vec<String>,
    pub balance: Option<super::Balance>,
    pub connect_timeout: Option<String>,
    pub response_timeout: Option<String>,
    pub max_connections_per_server: Option<usize>,
    pub max_fails: Option<u32>,
    pub fail_timeout: Option<String>,
    pub retries: Option<u32>,
    pub protocol: Option<super::UpstreamProtocol>,
    pub tls: Option<bool>,
    pub ca: Option<String>,
    pub health_check: Option<HealthCheck>,
    pub proxy_protocol: Option<super::SendProxyProtocol>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub expected_status: Option<u16>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpGrant {
    pub allow: Vec<String>,
    pub timeout: Option<String>,
    pub max_response_bytes: Option<Size>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvGrant {
    pub redis: String,
    pub prefixes: Vec<String>,
}

/// A size: a number of bytes, or a string such as `"64MiB"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(u64),
    Text(String),
}

/// Defaults, documented in the README's config reference.
pub mod defaults {
    use std::time::Duration;
    /// `log.access_queue`: access lines waiting for the writer thread (a few MB at most).
    pub const ACCESS_QUEUE: usize = 8192;
    /// The largest `log.access_queue` accepted.
    pub const ACCESS_QUEUE_CEILING: usize = 1 << 20;
    /// `server.handshake_timeout`
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// `server.max_connections`
    pub const MAX_CONNECTIONS: usize = 10_000;
    /// `server.session_cache_entries`
    pub const SESSION_CACHE_ENTRIES: usize = 10_000;
    /// `cache.max_entries`
    pub const CACHE_MAX_ENTRIES: u64 = 100_000;
    /// `cache.max_bytes`: 256 MiB
    pub const CACHE_MAX_BYTES: u64 = 256 << 20;
    /// `cache.max_negative_entries`: "not found" and refused answers, ~0.6 KiB of memory each (measured)
    pub const CACHE_MAX_NEGATIVE_ENTRIES: u64 = 100_000;
    /// `cache.ttl`
    pub const CACHE_TTL: Duration = Duration::from_secs(3600);
    /// `cache.max_ttl`
    pub const CACHE_MAX_TTL: Duration = Duration::from_secs(24 * 3600);
    /// `cache.negative_ttl`
    pub const CACHE_NEGATIVE_TTL: Duration = Duration::from_secs(60);
    /// `cache.max_stale`
    pub const CACHE_MAX_STALE: Duration = Duration::from_secs(3600);
    /// `proxy.connect_timeout`
    pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
    /// `proxy.response_timeout`
    pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
    /// `proxy.pool_idle_timeout`
    pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
    /// `proxy.max_connections_per_backend`
    pub const MAX_CONNECTIONS_PER_BACKEND: usize = 1024;
    /// `proxy.max_backend_connections`
    pub const MAX_BACKEND_CONNECTIONS: usize = 4096;
    /// `proxy.max_idle_per_client`: idle upstream connections kept for one client connection on routes that send
    /// PROXY protocol headers (HAProxy's `max-session-srv-conns` is 5 too)
    pub const MAX_IDLE_PER_CLIENT: usize = 5;
    /// `proxy.max_idle_per_backend`: idle pooled connections per upstream server (32 made a load of 64 concurrent
    /// requests open a new backend connection every 15 requests; HAProxy and Envoy keep every idle one)
    pub const MAX_IDLE_PER_BACKEND: usize = 256;
    /// The largest `proxy.max_idle_per_client` accepted.
    pub const MAX_IDLE_PER_CLIENT_CEILING: usize = 1024;
    /// `server.request_head_timeout` (HAProxy's `timeout http-request` is commonly 10 s)
    pub const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
    /// `server.keepalive_timeout` (nginx `keepalive_timeout` 75 s, HAProxy `timeout http-keep-alive`)
    pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
    /// `server.request_body_timeout` (nginx `client_body_timeout`)
    pub const REQUEST_BODY_TIMEOUT: Duration = Duration::from_secs(60);
    /// `server.send_timeout` (nginx `send_timeout`)
    pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
    /// `server.tunnel_idle_timeout` (HAProxy `timeout tunnel`)
    pub const TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
    /// `server.h2_max_concurrent_streams` (Envoy and Go default to 100-250; nginx 128)
    pub const H2_MAX_CONCURRENT_STREAMS: u32 = 100;
    /// `server.h2_keepalive_interval`
    pub const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
    /// `server.h2_keepalive_timeout`
    pub const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
    /// `server.max_request_header_bytes`: 64 KiB
    pub const MAX_REQUEST_HEADER_BYTES: u32 = 64 << 10;
    /// `server.plugin_memory_total`: 512 MiB
    pub const PLUGIN_MEMORY_TOTAL: usize = 512 << 20;
    /// `server.plugin_keep_resident`: 8 MiB of each plugin memory slot (a JavaScript or Python call writes 4–8)
    pub const PLUGIN_KEEP_RESIDENT: usize = 8 << 20;
    /// Largest `server.plugin_keep_resident` accepted: 1 GiB.
    pub const PLUGIN_KEEP_RESIDENT_CEILING: u64 = 1 << 30;
    /// `server.certificate_compression`: both, brotli first (Chromium offers brotli alone)
    pub const CERTIFICATE_COMPRESSION: [crate::config::CertCompression; 2] =
        [crate::config::CertCompression::Brotli, crate::config::CertCompression::Zlib];
    /// `server.certificate_compression_cache_entries`: compressed chains (one per chain and algorithm)
    pub const CERTIFICATE_COMPRESSION_CACHE_ENTRIES: u64 = 100_000;
    /// `server.certificate_compression_cache_bytes`: 64 MiB, some 30,000 compressed chains of 2 KB
    pub const CERTIFICATE_COMPRESSION_CACHE_BYTES: u64 = 64 << 20;
    /// Largest `server.max_connections` (and admin's) accepted: far beyond any file-descriptor limit.
    pub const MAX_CONNECTIONS_CEILING: usize = 10_000_000;
    /// `admin.max_connections`
    pub const ADMIN_MAX_CONNECTIONS: usize = 64;
    /// `admin.request_head_timeout`
    pub const ADMIN_REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(10);
    /// `admin.connection_timeout`
    pub const ADMIN_CONNECTION_TIMEOUT: Duration = Duration::from_secs(300);
    /// The longest duration any setting accepts (ten years).
    pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 24 * 3600);
    /// `cache.invalid_ttl`
    pub const CACHE_INVALID_TTL: Duration = Duration::from_secs(10);
    /// `plugin.timeout`
    pub const PLUGIN_TIMEOUT: Duration = Duration::from_secs(1);
    /// `plugin.memory_limit`: 64 MiB
    pub const PLUGIN_MEMORY_LIMIT: usize = 64 << 20;
    /// `plugin.max_concurrency`
    pub const PLUGIN_MAX_CONCURRENCY: usize = 64;
    /// `plugin.spare_instances`: one instance made ahead of the next miss
    pub const PLUGIN_SPARE_INSTANCES: usize = 1;
    /// `server.shutdown_grace`
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
    /// `server.upgrade_timeout`
    pub const UPGRADE_TIMEOUT: Duration = Duration::from_secs(60);
    /// `admin.bind`
    pub const ADMIN_BIND: &str = "127.0.0.1:9901";
    /// `reload.watch_interval`
    pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);
    /// `plugin.breaker_threshold`
    pub const BREAKER_THRESHOLD: u32 = 20;
    /// `plugin.breaker_cooldown`
    pub const BREAKER_COOLDOWN: Duration = Duration::from_secs(5);
    /// `redis.timeout`
    pub const REDIS_TIMEOUT: Duration = Duration::from_millis(250);
    /// `grants.http.timeout`
    pub const HTTP_TIMEOUT: Duration = Duration::from_millis(500);
    /// `upstream.max_fails`: consecutive failures that eject a server (nginx's `max_fails` is 1; HAProxy's
    /// `fall` 3)
    pub const UPSTREAM_MAX_FAILS: u32 = 3;
    /// `upstream.fail_timeout`: how long an ejected server sits out (nginx's `fail_timeout` 10 s)
    pub const UPSTREAM_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
    /// `upstream.retries`: further servers tried after a connect failure or reset of an idempotent request
    pub const UPSTREAM_RETRIES: u32 = 1;
    /// `upstream.health_check.path`
    pub const HEALTH_PATH: &str = "/";
    /// `upstream.health_check.interval` (HAProxy's `inter` 2 s)
    pub const HEALTH_INTERVAL: Duration = Duration::from_secs(5);
    /// `upstream.health_check.timeout`
    pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
    /// `upstream.health_check.rise`: passing checks that bring a server back (HAProxy's `rise` 2)
    pub const HEALTH_RISE: u32 = 2;
    /// `upstream.health_check.fall`: failing checks that take a server out (HAProxy's `fall` 3)
    pub const HEALTH_FALL: u32 = 3;
    /// `grants.http.max_response_bytes`: 1 MiB
    pub const HTTP_MAX_RESPONSE_BYTES: u64 = 1 << 20;
    /// `invalidation.channel`
    pub const INVALIDATION_CHANNEL: &str = "tern:invalidate";
    /// `listener.alpn`
    pub const ALPN: [&str; 2] = ["h2", "http/1.1"];
    /// `resumption.prefix`
    pub const RESUMPTION_PREFIX: &str = "tern:resumption:";
    /// `resumption.tls13_tickets`
    pub const TLS13_TICKETS: usize = 1;
    /// The most `resumption.tls13_tickets` accepted.
    pub const TLS13_TICKETS_MAX: usize = 8;
    /// `resumption.ticket_rotation`
    pub const TICKET_ROTATION: Duration = Duration::from_secs(3600);
    /// `resumption.ticket_lifetime`
    pub const TICKET_LIFETIME: Duration = Duration::from_secs(6 * 3600);
    /// `resumption.session_lifetime`
    pub const SESSION_LIFETIME: Duration = Duration::from_secs(600);
    /// `acme.renewal_window`: renew with a third of the lifetime left (Let's Encrypt's advice; 30 of 90 days)
    pub const ACME_RENEWAL_WINDOW: f64 = 1.0 / 3.0;
    /// `acme.renew_check_interval`
    pub const ACME_RENEW_CHECK_INTERVAL: Duration = Duration::from_secs(600);
    /// `acme.handshake_wait`: a first issuance usually takes seconds
    pub const ACME_HANDSHAKE_WAIT: Duration = Duration::from_secs(7);
    /// `acme.order_timeout`
    pub const ACME_ORDER_TIMEOUT: Duration = Duration::from_secs(120);
    /// `acme.orders_per_hour` (Let's Encrypt allows 300 new orders per account per 3 hours)
    pub const ACME_ORDERS_PER_HOUR: u32 = 90;
    /// `acme.orders_per_hour_per_domain` (Let's Encrypt allows 50 certificates per registered domain per week)
    pub const ACME_ORDERS_PER_HOUR_PER_DOMAIN: u32 = 5;
    /// `acme.failure_backoff`
    pub const ACME_FAILURE_BACKOFF: Duration = Duration::from_secs(60);
    /// `acme.failure_backoff_max`
    pub const ACME_FAILURE_BACKOFF_MAX: Duration = Duration::from_secs(6 * 3600);
    /// `acme.max_concurrent_orders`
    pub const ACME_MAX_CONCURRENT_ORDERS: usize = 8;
    /// `acme.max_pending`
    pub const ACME_MAX_PENDING: usize = 1000;
    /// `acme.lock_lease`
    pub const ACME_LOCK_LEASE: Duration = Duration::from_secs(30);
    /// `acme.prefix`
    pub const ACME_PREFIX: &str = "tern:acme:";
    /// Shortest `resumption.secret` accepted, in bytes.
    pub const SECRET_MIN_LEN: usize = 32;
    /// `listener.admission.address_new_per_second`: far above what one browser (a handful of connections per
    /// page) or a NAT of a few hundred users opens, far below what one flooding host can
    pub const ADMISSION_ADDRESS_NEW_PER_SECOND: u32 = 200;
    /// `listener.admission.address_concurrent`: HTTP/2 needs one connection per browser, HTTP/1.1 about six; 256
    /// leaves room for a NAT of dozens of browsers, while 40 addresses cannot fill `server.max_connections`
    pub const ADMISSION_ADDRESS_CONCURRENT: u32 = 256;
    /// `listener.admission.prefix_new_per_second` (a /24 or /64: many hosts, or one IPv6 host's many addresses)
    pub const ADMISSION_PREFIX_NEW_PER_SECOND: u32 = 1_000;
    /// `listener.admission.prefix_concurrent`: a tenth of `server.max_connections`
    pub const ADMISSION_PREFIX_CONCURRENT: u32 = 1_024;
    /// `listener.admission.*_burst`, as a multiple of the rate: two seconds' worth
    pub const ADMISSION_BURST_SECONDS: u32 = 2;
    /// `listener.admission.exempt`: local health checks, and a local proxy without PROXY protocol (every client
    /// would share its address)
    pub const ADMISSION_EXEMPT: [&str; 2] = ["127.0.0.0/8", "::1"];
    /// `listener.admission.max_tracked`: keys per table (addresses, prefixes), 32 bytes each plus the hash
    /// table's slack: at most about 4.5 MiB per table
    pub const ADMISSION_MAX_TRACKED: usize = 65_536;
    /// Largest `listener.admission` rate or burst accepted (a token bucket of `f32` stays exact to a token).
    pub const ADMISSION_RATE_CEILING: u32 = 1_000_000;
    /// Largest `listener.admission.max_tracked` accepted (about 1 GiB per table).
    pub const ADMISSION_MAX_TRACKED_CEILING: usize = 1 << 24;
}
