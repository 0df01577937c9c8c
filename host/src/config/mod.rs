//! The config file, in two stages: `raw` mirrors the TOML (serde, unknown keys refused), [`Config`] holds
//! validated, typed values. Every error names the file and the key.
//!
//! | concept | file |
//! |---|---|
//! | the typed settings, loading | `mod.rs` |
//! | the TOML shape, and the defaults of what it leaves out | `raw.rs` |
//! | validation of the single sections (server, cache, proxy, admin, resumption, ...) | `validate.rs` |
//! | validation of listed entries (certificates, plugins, listeners) | `sections.rs` |
//! | `[log]`: access-log fields and format, `listener.ja4_header` | `access.rs` |
//! | durations and sizes | `units.rs` |
//!
//! Relative paths in the file are resolved against the folder that holds the file.

mod access;
mod acme;
pub(crate) mod raw;
mod sections;
#[cfg(test)]
pub(crate) mod tests;
mod units;
mod upstream;
mod validate;

pub use crate::admission::{AdmissionSettings, KeyLimits};
pub use crate::proxy_protocol::{Cidr, ProxyProtocolSettings};
pub use access::AccessField;
pub use acme::{AcmeSettings, AcmeStorage, ChallengeKind, ExternalAccount, HttpListenerSettings, KeyType};
pub use raw::defaults;
pub use units::{parse_duration, parse_size};
pub use upstream::{Balance, HealthCheckSettings, PoolTls, SendProxyProtocol, UpstreamProtocol, UpstreamSettings};
use validate::Validator;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Limits that apply to the whole process.
    pub server: ServerSettings,
    /// The certificate cache.
    pub cache: CacheSettings,
    /// Reverse-proxy behaviour.
    pub proxy: ProxySettings,
    /// Listeners, in file order; at least one.
    pub listeners: Vec<ListenerSettings>,
    /// Certificates named in the file: served for their names without a plugin, and usable as a listener's
    /// default certificate.
    pub certificates: Vec<StaticCertSettings>,
    /// Plugins by name.
    pub plugins: Vec<PluginSettings>,
    /// Redis stores plugins may be granted.
    pub redis: Vec<RedisSettings>,
    /// Upstream pools plugins may route names to.
    pub upstreams: Vec<UpstreamSettings>,
    /// Certificates obtained through ACME, if configured.
    pub acme: Option<AcmeSettings>,
    /// Plain-HTTP listeners: ACME HTTP-01 challenges, and redirects to HTTPS.
    pub http_listeners: Vec<HttpListenerSettings>,
    /// Where cache invalidations arrive from, if anywhere.
    pub invalidation: Option<InvalidationSettings>,
    /// Session resumption: tickets and the session cache, local or shared by a fleet through Redis.
    pub resumption: ResumptionSettings,
    /// The admin listener, if enabled.
    pub admin: Option<AdminSettings>,
    /// Automatic reloads.
    pub reload: ReloadSettings,
    /// Logging.
    pub log: LogSettings,
    /// The file this config was read from (reloads read it again).
    pub source: PathBuf,
}

/// `[admin]`: health, metrics, reload, cache and plugin endpoints.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    /// Address to listen on; loopback by default.
    pub bind: SocketAddr,
    /// If set, every endpoint but `/healthz` and `/readyz` requires `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Admin connections open at once; further ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A request head must arrive within this long, and an idle keep-alive connection closes after it.
    pub request_head_timeout: Duration,
    /// The longest an admin connection stays open, whatever it does.
    pub connection_timeout: Duration,
}

/// `[log]`
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// `text` (human-readable) or `json` (one object per line).
    pub format: LogFormat,
    /// A tracing filter such as `info` or `info,tern::plugin=debug`; the `TERN_LOG` environment variable wins.
    pub level: String,
    /// One line per proxied request (target `tern::access`).
    pub access: bool,
    /// How access lines are written (`log.access_format`; by default as `format`).
    pub access_format: LogFormat,
    /// The fields of an access line, in order (`log.access_fields`).
    pub access_fields: Vec<AccessField>,
    /// Access lines waiting for the writer thread at most; more are dropped and counted (`log.access_queue`).
    pub access_queue: usize,
}

/// `log.format`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
            access: true,
            access_format: LogFormat::Text,
            access_fields: AccessField::defaults(),
            access_queue: defaults::ACCESS_QUEUE,
        }
    }
}

/// `[reload]`
#[derive(Debug, Clone)]
pub struct ReloadSettings {
    /// Reload when the config file or a plugin component changes.
    pub watch: bool,
    /// How often the watcher looks.
    pub watch_interval: Duration,
}

/// `[invalidation]`: a Redis pub/sub channel carrying server names (or `*.parent` patterns) whose cached
/// answers every node drops at once.
#[derive(Debug, Clone)]
pub struct InvalidationSettings {
    /// The `[[redis]]` store to subscribe through.
    pub store: String,
    /// The channel.
    pub channel: String,
}

/// `[resumption]`: session tickets and the session cache. With `redis`, every node sharing the store and the
/// secret resumes every other node's sessions and tickets; without it, resumption is per node.
#[derive(Debug, Clone)]
pub struct ResumptionSettings {
    /// The `[[redis]]` store keys and sessions are shared through; `None` = this node only.
    pub store: Option<String>,
    /// Seals ticket keys and session state at rest in Redis; required with `store`.
    pub secret: Option<Secret>,
    /// Prefix of every Redis key and channel resumption uses.
    pub prefix: String,
    /// Issue session tickets (TLS 1.2 and 1.3). Off: TLS 1.3 resumes statefully through the session cache.
    pub tickets: bool,
    /// TLS 1.3 tickets sent after each full handshake (0: TLS 1.3 does not resume). One, as Go and Caddy send; a
    /// client uses a ticket once, and each ticket costs the server its key derivation, sealing and write.
    pub tls13_tickets: usize,
    /// Ticket-key slot length: a new key encrypts every `ticket_rotation`.
    pub ticket_rotation: Duration,
    /// How long a ticket resumes (and the lifetime hint clients get); keys decrypt for this long after their slot.
    pub ticket_lifetime: Duration,
    /// How long a cached session resumes (session IDs, and TLS 1.3 with tickets off); also its Redis lifetime.
    pub session_lifetime: Duration,
    /// This node's name in Redis records (`tern tickets status` shows which node made a key).
    pub node: String,
}

impl Default for ResumptionSettings {
    fn default() -> Self {
        Self {
            store: None,
            secret: None,
            prefix: defaults::RESUMPTION_PREFIX.to_string(),
            tickets: true,
            tls13_tickets: defaults::TLS13_TICKETS,
            ticket_rotation: defaults::TICKET_ROTATION,
            ticket_lifetime: defaults::TICKET_LIFETIME,
            session_lifetime: defaults::SESSION_LIFETIME,
            node: default_node_name(),
        }
    }
}

/// A secret from the config or the environment; never printed.
#[derive(Clone)]
pub struct Secret(pub(crate) std::sync::Arc<zeroize::Zeroizing<Vec<u8>>>);

impl Secret {
    /// The secret's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// `<hostname>-<pid>`.
fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim();
    format!("{}-{}", if host.is_empty() { "tern" } else { host }, std::process::id())
}

/// A listener's client-certificate authentication (mutual TLS).
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// PEM bundle of the CAs client certificates must chain to.
    pub ca: PathBuf,
    /// Refuse clients without a certificate (`client_auth = "required"`, the default) or let them in
    /// (`"optional"`).
    pub required: bool,
}

/// `[[redis]]`: a Redis deployment, standalone or cluster.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// Name grants refer to it by.
    pub name: String,
    /// `redis://` URLs: one for a standalone server, any number of seed nodes for a cluster.
    pub urls: Vec<String>,
    /// Whether the URLs are Redis Cluster nodes.
    pub cluster: bool,
    /// Connect and per-command timeout.
    pub timeout: Duration,
}

/// `[server]`
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// One deadline for reading the ClientHello, selecting the certificate and finishing the handshake.
    pub handshake_timeout: Duration,
    /// Open client connections per listener; further connections wait in the kernel's accept queue.
    pub max_connections: usize,
    /// TLS 1.2 session-ID cache entries per listener.
    pub session_cache_entries: usize,
    /// On SIGTERM, how long in-flight connections may take to finish before tern exits anyway.
    pub shutdown_grace: Duration,
    /// On SIGUSR2 (binary upgrade), how long the new process may take to be ready before it is stopped and this
    /// one goes on serving.
    pub upgrade_timeout: Duration,
    /// Limits on what one client connection may hold after its handshake.
    pub client: ClientLimits,
    /// Linear memory of all plugin instances running at once, summed over every plugin.
    pub plugin_memory_total: usize,
    /// Bytes of each plugin memory slot kept mapped and reset in place between calls (0: decommitted).
    pub plugin_keep_resident: usize,
    /// Certificate compression (RFC 8879) and the memo of compressed chains.
    pub certificate_compression: CompressionSettings,
    /// Which cipher suites are negotiated, and whose order of preference wins.
    pub ciphers: CipherSettings,
}

/// `server.cipher_suites` and `server.cipher_order`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CipherSettings {
    /// The suites enabled, most preferred first; `None`: all of them in tern's default order for this CPU
    /// ([`crate::crypto::default_suites`]).
    pub suites: Option<Vec<rustls::CipherSuite>>,
    /// Whose preference decides.
    pub order: CipherOrder,
}

/// `server.cipher_order`: whose order of cipher suites decides (nginx's `ssl_prefer_server_ciphers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CipherOrder {
    /// tern's order, except that a client listing ChaCha20-Poly1305 first gets it (the default).
    #[default]
    Server,
    /// The client's order.
    Client,
}

/// A certificate compression algorithm (RFC 8879) of `server.certificate_compression`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertCompression {
    /// Brotli (algorithm 2): what Chromium offers.
    Brotli,
    /// zlib (algorithm 1).
    Zlib,
}

impl CertCompression {
    /// Config value and metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Brotli => "brotli",
            Self::Zlib => "zlib",
        }
    }
}

/// `server.certificate_compression*`: which algorithms TLS 1.3 certificates are compressed with, and how many
/// compressed chains are remembered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressionSettings {
    /// Offered in this order of preference (the first one the client also offers is used); empty: off.
    pub algorithms: Vec<CertCompression>,
    /// Compressed chains remembered (one entry per chain and algorithm).
    pub cache_entries: u64,
    /// Bytes of compressed chains remembered (estimated, with the key).
    pub cache_bytes: u64,
}

impl Default for CompressionSettings {
    fn default() -> Self {
        Self {
            algorithms: defaults::CERTIFICATE_COMPRESSION.to_vec(),
            cache_entries: defaults::CERTIFICATE_COMPRESSION_CACHE_ENTRIES,
            cache_bytes: defaults::CERTIFICATE_COMPRESSION_CACHE_BYTES,
        }
    }
}

/// What one client connection may hold after the handshake, in time and in count. Every bound has a default
/// (see [`defaults`]); none can be switched off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLimits {
    /// From the handshake (or the first byte of a further request) until a request head is complete.
    pub request_head_timeout: Duration,
    /// How long a connection with no request in flight stays open (HTTP/1.1 keep-alive, HTTP/2 idle).
    pub keepalive_timeout: Duration,
    /// The longest pause between two pieces of a request body; separate from waiting for the response.
    pub request_body_timeout: Duration,
    /// The longest a response write may wait for the client to take bytes (a client that stops reading).
    pub send_timeout: Duration,
    /// The longest an upgraded connection (WebSocket) may carry no bytes either way.
    pub tunnel_idle_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// How often an HTTP/2 connection is pinged while open.
    pub h2_keepalive_interval: Duration,
    /// An HTTP/2 ping unanswered for this long closes the connection.
    pub h2_keepalive_timeout: Duration,
    /// Largest request head (HTTP/1.1 header block, HTTP/2 header list), bytes.
    pub max_request_header_bytes: u32,
}

impl Default for ClientLimits {
    fn default() -> Self {
        Self {
            request_head_timeout: defaults::REQUEST_HEAD_TIMEOUT,
            keepalive_timeout: defaults::KEEPALIVE_TIMEOUT,
            request_body_timeout: defaults::REQUEST_BODY_TIMEOUT,
            send_timeout: defaults::SEND_TIMEOUT,
            tunnel_idle_timeout: defaults::TUNNEL_IDLE_TIMEOUT,
            h2_max_concurrent_streams: defaults::H2_MAX_CONCURRENT_STREAMS,
            h2_keepalive_interval: defaults::H2_KEEPALIVE_INTERVAL,
            h2_keepalive_timeout: defaults::H2_KEEPALIVE_TIMEOUT,
            max_request_header_bytes: defaults::MAX_REQUEST_HEADER_BYTES,
        }
    }
}

/// `[cache]`
#[derive(Debug, Clone)]
pub struct CacheSettings {
    /// At most this many names cached with an answer that serves them (certificate, passthrough, issuance).
    pub max_entries: u64,
    /// At most this many bytes of those answers cached (estimated).
    pub max_bytes: u64,
    /// At most this many "not found" and refused answers cached, apart from the served names so that a flood of
    /// unknown names cannot evict one.
    pub max_negative_entries: u64,
    /// How long a plugin's certificate is served from cache when the plugin gives no TTL hint.
    pub ttl: Duration,
    /// The longest TTL a plugin hint may ask for.
    pub max_ttl: Duration,
    /// How long a "no certificate for this name" answer is cached.
    pub negative_ttl: Duration,
    /// How long past its TTL an entry may still be served while refreshing it fails (stale-if-error).
    pub max_stale: Duration,
    /// How long a plugin answer that failed validation (bad PEM, wrong name, expired) is remembered, so that
    /// handshakes for that name fail at once instead of calling the plugin again each time.
    pub invalid_ttl: Duration,
}

/// `[proxy]`
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Connecting to a backend gives up after this long (then 502).
    pub connect_timeout: Duration,
    /// Waiting for a backend's response headers gives up after this long (then 504).
    pub response_timeout: Duration,
    /// Idle pooled backend connections are closed after this long.
    pub pool_idle_timeout: Duration,
    /// Open backend connections per listener backend; requests beyond wait (up to `connect_timeout`, then 503).
    pub max_connections_per_backend: usize,
    /// Open backend connections of the whole process.
    pub max_backend_connections: usize,
    /// Idle upstream connections kept for one client connection on routes that send PROXY protocol headers (such
    /// connections carry that client's requests only).
    pub max_idle_per_client: usize,
    /// Idle pooled connections kept per upstream server by the shared clients (the rest are closed when idle).
    pub max_idle_per_backend: usize,
}

/// `[[listener]]`
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    /// Name used in logs and metrics.
    pub name: String,
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Plugin that selects certificates for names no static certificate serves.
    pub plugin: Option<String>,
    /// What to do with names nobody has a certificate for.
    pub fallback: Fallback,
    /// ALPN protocols offered, in preference order.
    pub alpn: Vec<Vec<u8>>,
    /// Where requests go: an `http://host:port` origin.
    pub backend: http::Uri,
    /// Client certificates, if the listener asks for them.
    pub client_auth: Option<ClientAuth>,
    /// PROXY protocol from the listener's trusted peers (load balancers in front of it), if it takes it.
    pub proxy_protocol: Option<ProxyProtocolSettings>,
    /// Per-client limits on new and open connections, applied right after accept (`[listener.admission]`).
    pub admission: AdmissionSettings,
    /// The request header that carries the client's JA4 fingerprint upstream, if any (`listener.ja4_header`).
    pub ja4_header: Option<http::HeaderName>,
    /// The PROXY protocol header sent first on every connection to `backend`, if any
    /// (`listener.backend_proxy_protocol`).
    pub backend_proxy_protocol: Option<SendProxyProtocol>,
}

/// A listener's answer for clients without SNI and for names neither static certificates nor the plugin know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fallback {
    /// Serve the static certificate of this name.
    DefaultCertificate(String),
    /// Refuse the handshake with a TLS alert.
    Strict,
}

/// `[[certificate]]`
#[derive(Debug, Clone)]
pub struct StaticCertSettings {
    /// Name the certificate is referred to by (e.g. from `default_certificate`).
    pub name: String,
    /// PEM chain file, leaf first.
    pub cert: PathBuf,
    /// PEM private key file.
    pub key: PathBuf,
    /// Server names to serve it for without asking a plugin. `None`: every DNS name in the certificate.
    /// `Some(empty)`: none (only usable as a default certificate).
    pub serve_names: Option<Vec<String>>,
}

/// `[[plugin]]`
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSettings {
    /// Name listeners refer to it by.
    pub name: String,
    /// The component (`.wasm`, built for wasm32-wasip2).
    pub path: PathBuf,
    /// Wall-clock deadline of one `select-certificate` call.
    pub timeout: Duration,
    /// Linear-memory cap of one instance.
    pub memory_limit: usize,
    /// Calls in flight at once; more wait for a slot (within the handshake deadline).
    pub max_concurrency: usize,
    /// Instances made ahead of calls, off the handshake, each used by one call (0: every call instantiates).
    pub spare_instances: usize,
    /// Calls started per second at most; misses beyond it get the listener's fallback. `None`: no cap.
    pub max_calls_per_second: Option<u32>,
    /// Of that cap, calls per second one client network (/24 IPv4, /64 IPv6) may start, so that one client's
    /// flood of names does not use up the cap that serves everyone's names. Default: a quarter of the cap.
    pub max_calls_per_second_per_client: Option<u32>,
    /// Consecutive failed calls that open the circuit breaker (0 disables it).
    pub breaker_threshold: u32,
    /// How long an open breaker sheds calls before letting one trial call through.
    pub breaker_cooldown: Duration,
    /// The plugin's own settings, handed to it through the `config` interface.
    pub settings: BTreeMap<String, String>,
    /// Capabilities granted to the plugin; none by default.
    pub grants: Grants,
    /// Names a replacement build must select a valid certificate for before it is swapped in.
    pub probe_names: Vec<String>,
    /// What a swap does to the plugin's cached answers.
    pub on_swap: OnSwap,
}

/// `plugin.on_swap`: what happens to a plugin's cached answers when a new build or config replaces it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnSwap {
    /// Keep serving cached answers until their TTL (default: a swap costs no cache misses).
    #[default]
    Keep,
    /// Drop them, so the new plugin answers every name from its next handshake on.
    Flush,
}

/// Capabilities granted to one plugin.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// A host directory the plugin may read, mounted read-only at `/`.
    pub files: Option<PathBuf>,
    /// Read access to a Redis store, limited to key prefixes.
    pub kv: Option<KvGrant>,
    /// Outgoing HTTP through `wasi:http`, limited to listed authorities.
    pub http: Option<HttpGrant>,
    /// Routes and passthrough targets the plugin's answers may name (contract 0.2); none by default.
    pub routes: crate::route::RouteGrants,
    /// `grants.routes.origin_ca`: CA certificates (PEM) that `https` origins of this plugin's routes are verified
    /// against, instead of the system roots.
    pub origin_ca: Option<PathBuf>,
    /// `grants.routes.origin_h2`: offer HTTP/2 by ALPN to `https` origins (used when the origin picks it).
    pub origin_h2: bool,
}

/// `grants.http`: where a plugin may send HTTP requests, and within which limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpGrant {
    /// Authorities (`host:port`, lowercase) the plugin may reach; a request anywhere else is refused.
    pub allow: Vec<String>,
    /// Connect, first-byte and between-bytes timeout of each request.
    pub timeout: Duration,
    /// Largest response body accepted; a longer one fails the read.
    pub max_response_bytes: u64,
}

/// `grants.kv`: which store a plugin may read, and which keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvGrant {
    /// The `[[redis]]` store's name.
    pub store: String,
    /// Key prefixes the plugin may read; `""` allows every key.
    pub prefixes: Vec<String>,
}

/// A configuration error, naming the file and the key.
#[derive(Debug, thiserror::Error)]
#[error("{}: {key}: {message}", file.display())]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// The key (e.g. `listener[0].bind`, `plugin "files".timeout`), or `(file)` for syntax errors.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl PluginSettings {
    /// A plugin outside any config file (`tern plugin call`, tests, benchmarks): the configured defaults for
    /// deadline and memory, one call at a time, no spare instance, no rate cap, no breaker, no grants.
    pub fn one_off(name: &str, path: &Path) -> Self {
        Self {
            name: name.to_string(),
            path: path.to_path_buf(),
            timeout: defaults::PLUGIN_TIMEOUT,
            memory_limit: defaults::PLUGIN_MEMORY_LIMIT,
            max_concurrency: 1,
            spare_instances: 0,
            max_calls_per_second: None,
            max_calls_per_second_per_client: None,
            breaker_threshold: 0,
            breaker_cooldown: Duration::ZERO,
            settings: BTreeMap::new(),
            grants: Grants::default(),
            probe_names: Vec::new(),
            on_swap: OnSwap::default(),
        }
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
            file: path.to_path_buf(),
            key: "(file)".into(),
            message: format!("cannot read: {err}"),
        })?;
        Self::from_toml(&text, path)
    }

    /// Parses and validates config text; `path` names the file in errors and anchors relative paths.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: raw::File = toml::from_str(text).map_err(|err| ConfigError {
            file: path.to_path_buf(),
            key: err.span().map_or_else(|| "(file)".to_string(), |span| key_at(text, span.start)),
            message: err.message().to_string(),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Validator { file: path, base: &base }.validate(raw)
    }

    /// The static certificate settings of this name.
    pub fn certificate(&self, name: &str) -> Option<&StaticCertSettings> {
        self.certificates.iter().find(|c| c.name == name)
    }
}

/// Names the line of a syntax error by its text, since toml's messages name the field but not its table.
fn key_at(text: &str, offset: usize) -> String {
    // Counted on bytes: an offset inside a multi-byte character cannot split anything.
    let line_no = text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1;
    let line = text.lines().nth(line_no - 1).unwrap_or_default().trim();
    format!("line {line_no} `{line}`")
}
