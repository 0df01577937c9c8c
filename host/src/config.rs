//! The config file, in two stages: [`raw`] mirrors the TOML (serde, unknown keys refused), [`Config`] holds
//! validated, typed values. Every error names the file and the key.
//!
//! Relative paths in the file are resolved against the folder that holds the file.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::sni::ServerName;

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
        Self { format: LogFormat::Text, level: "info".into(), access: true }
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
            ticket_rotation: defaults::TICKET_ROTATION,
            ticket_lifetime: defaults::TICKET_LIFETIME,
            session_lifetime: defaults::SESSION_LIFETIME,
            node: default_node_name(),
        }
    }
}

/// A secret from the config or the environment; never printed.
#[derive(Clone)]
pub struct Secret(std::sync::Arc<zeroize::Zeroizing<Vec<u8>>>);

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
    /// Limits on what one client connection may hold after its handshake.
    pub client: ClientLimits,
    /// Linear memory of all plugin instances running at once, summed over every plugin.
    pub plugin_memory_total: usize,
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
    /// At most this many names cached (certificates and "not found" answers together).
    pub max_entries: u64,
    /// At most this many bytes of certificates and keys cached (estimated).
    pub max_bytes: u64,
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

/// Defaults, documented in the README's config reference.
pub mod defaults {
    use std::time::Duration;
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
    /// `server.shutdown_grace`
    pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
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
    /// `grants.http.max_response_bytes`: 1 MiB
    pub const HTTP_MAX_RESPONSE_BYTES: u64 = 1 << 20;
    /// `invalidation.channel`
    pub const INVALIDATION_CHANNEL: &str = "tern:invalidate";
    /// `listener.alpn`
    pub const ALPN: [&str; 2] = ["h2", "http/1.1"];
    /// `resumption.prefix`
    pub const RESUMPTION_PREFIX: &str = "tern:resumption:";
    /// `resumption.ticket_rotation`
    pub const TICKET_ROTATION: Duration = Duration::from_secs(3600);
    /// `resumption.ticket_lifetime`
    pub const TICKET_LIFETIME: Duration = Duration::from_secs(6 * 3600);
    /// `resumption.session_lifetime`
    pub const SESSION_LIFETIME: Duration = Duration::from_secs(600);
    /// Shortest `resumption.secret` accepted, in bytes.
    pub const SECRET_MIN_LEN: usize = 32;
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

/// The file's shape, exactly as written. Defaults are applied during validation.
pub(crate) mod raw {
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
}

struct Validator<'a> {
    file: &'a Path,
    base: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError { file: self.file.to_path_buf(), key: key.into(), message: message.into() }
    }

    fn duration(&self, key: &str, raw: Option<&String>, default: Duration) -> Result<Duration, ConfigError> {
        match raw {
            None => Ok(default),
            Some(text) => {
                let duration = parse_duration(text).map_err(|message| self.err(key, message))?;
                // Deadlines are added to the clock; a duration of millions of years would overflow it.
                if duration > defaults::MAX_DURATION {
                    return Err(self.err(key, format!("{text:?}: at most 3650d")));
                }
                Ok(duration)
            }
        }
    }

    fn size(&self, key: &str, raw: Option<&raw::Size>, default: u64) -> Result<u64, ConfigError> {
        match raw {
            None => Ok(default),
            Some(raw::Size::Bytes(n)) => Ok(*n),
            Some(raw::Size::Text(text)) => parse_size(text).map_err(|message| self.err(key, message)),
        }
    }

    /// A count between 1 and `ceiling`: what the runtime can allocate (a semaphore holds at most `usize::MAX >> 3`
    /// permits, for one) is far above any ceiling, so an accepted value never fails at start-up.
    fn count(&self, key: &str, value: usize, ceiling: usize) -> Result<usize, ConfigError> {
        if (1..=ceiling).contains(&value) {
            Ok(value)
        } else {
            Err(self.err(key, format!("must be between 1 and {ceiling}")))
        }
    }

    fn client_limits(&self, raw: &raw::Server) -> Result<ClientLimits, ConfigError> {
        let fallback = ClientLimits::default();
        let timeout = |key: &str, value: Option<&String>, default: Duration| {
            let key = format!("server.{key}");
            let d = self.duration(&key, value, default)?;
            self.positive(&key, d)
        };
        let streams = raw.h2_max_concurrent_streams.unwrap_or(fallback.h2_max_concurrent_streams);
        if !(1..=10_000).contains(&streams) {
            return Err(self.err("server.h2_max_concurrent_streams", "must be between 1 and 10000"));
        }
        let header_bytes = self.size(
            "server.max_request_header_bytes",
            raw.max_request_header_bytes.as_ref(),
            u64::from(fallback.max_request_header_bytes),
        )?;
        // Below 8 KiB common browsers' heads (cookies) no longer fit; above 1 MiB a head is an attack.
        if !(8 << 10..=1 << 20).contains(&header_bytes) {
            return Err(self.err("server.max_request_header_bytes", "must be between 8KiB and 1MiB"));
        }
        Ok(ClientLimits {
            request_head_timeout: timeout(
                "request_head_timeout",
                raw.request_head_timeout.as_ref(),
                fallback.request_head_timeout,
            )?,
            keepalive_timeout: timeout(
                "keepalive_timeout",
                raw.keepalive_timeout.as_ref(),
                fallback.keepalive_timeout,
            )?,
            request_body_timeout: timeout(
                "request_body_timeout",
                raw.request_body_timeout.as_ref(),
                fallback.request_body_timeout,
            )?,
            send_timeout: timeout("send_timeout", raw.send_timeout.as_ref(), fallback.send_timeout)?,
            tunnel_idle_timeout: timeout(
                "tunnel_idle_timeout",
                raw.tunnel_idle_timeout.as_ref(),
                fallback.tunnel_idle_timeout,
            )?,
            h2_max_concurrent_streams: streams,
            h2_keepalive_interval: timeout(
                "h2_keepalive_interval",
                raw.h2_keepalive_interval.as_ref(),
                fallback.h2_keepalive_interval,
            )?,
            h2_keepalive_timeout: timeout(
                "h2_keepalive_timeout",
                raw.h2_keepalive_timeout.as_ref(),
                fallback.h2_keepalive_timeout,
            )?,
            max_request_header_bytes: u32::try_from(header_bytes).unwrap_or(u32::MAX),
        })
    }

    /// Two sockets on one address cannot both bind; a wildcard address (`0.0.0.0`, `[::]`) overlaps every
    /// address of the same port. Port 0 (any free port) never clashes.
    fn distinct_addresses(
        &self,
        listeners: &[ListenerSettings],
        admin: Option<&AdminSettings>,
    ) -> Result<(), ConfigError> {
        let mut seen: Vec<(String, SocketAddr)> = Vec::new();
        let named = listeners
            .iter()
            .map(|l| (format!("listener {:?}.bind", l.name), l.bind))
            .chain(admin.map(|a| ("admin.bind".to_string(), a.bind)));
        for (key, addr) in named {
            if addr.port() != 0
                && let Some((other, _)) = seen.iter().find(|(_, b)| {
                    b.port() == addr.port()
                        && (b.ip() == addr.ip() || b.ip().is_unspecified() || addr.ip().is_unspecified())
                })
            {
                return Err(self.err(key, format!("{addr} is already used by {other}")));
            }
            seen.push((key, addr));
        }
        Ok(())
    }

    fn positive<T: PartialOrd + Default + Copy>(&self, key: &str, value: T) -> Result<T, ConfigError> {
        if value > T::default() { Ok(value) } else { Err(self.err(key, "must be greater than zero")) }
    }

    /// A string, number or boolean as text, or `{ env = "NAME" }`: the value of tern's environment variable
    /// (for secrets such as tokens, which then live in neither the file nor any log).
    fn value(&self, key: &str, value: toml::Value) -> Result<String, ConfigError> {
        match value {
            toml::Value::String(s) => Ok(s),
            toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => Ok(value.to_string()),
            toml::Value::Table(t) if t.len() == 1 && t.get("env").is_some_and(toml::Value::is_str) => {
                let var = t.get("env").and_then(toml::Value::as_str).unwrap_or_default();
                std::env::var(var).map_err(|_| self.err(key, format!("environment variable {var} is not set")))
            }
            _ => Err(self.err(key, "must be a string, number, boolean or { env = \"VARIABLE\" }")),
        }
    }

    fn path(&self, raw: &str) -> PathBuf {
        self.base.join(raw)
    }

    fn validate(&self, raw: raw::File) -> Result<Config, ConfigError> {
        let max_connections = self.count(
            "server.max_connections",
            raw.server.max_connections.unwrap_or(defaults::MAX_CONNECTIONS),
            defaults::MAX_CONNECTIONS_CEILING,
        )?;
        let server = ServerSettings {
            handshake_timeout: self.duration(
                "server.handshake_timeout",
                raw.server.handshake_timeout.as_ref(),
                defaults::HANDSHAKE_TIMEOUT,
            )?,
            max_connections,
            session_cache_entries: raw.server.session_cache_entries.unwrap_or(defaults::SESSION_CACHE_ENTRIES),
            shutdown_grace: self.duration(
                "server.shutdown_grace",
                raw.server.shutdown_grace.as_ref(),
                defaults::SHUTDOWN_GRACE,
            )?,
            client: self.client_limits(&raw.server)?,
            plugin_memory_total: {
                let total = self.size(
                    "server.plugin_memory_total",
                    raw.server.plugin_memory_total.as_ref(),
                    defaults::PLUGIN_MEMORY_TOTAL as u64,
                )?;
                if !(1 << 20..=1 << 40).contains(&total) {
                    return Err(self.err("server.plugin_memory_total", "must be between 1MiB and 1TiB"));
                }
                usize::try_from(total).unwrap_or(usize::MAX)
            },
        };
        self.positive("server.handshake_timeout", server.handshake_timeout)?;
        let cache = CacheSettings {
            max_entries: self
                .positive("cache.max_entries", raw.cache.max_entries.unwrap_or(defaults::CACHE_MAX_ENTRIES))?,
            max_bytes: self.positive(
                "cache.max_bytes",
                self.size("cache.max_bytes", raw.cache.max_bytes.as_ref(), defaults::CACHE_MAX_BYTES)?,
            )?,
            ttl: self.duration("cache.ttl", raw.cache.ttl.as_ref(), defaults::CACHE_TTL)?,
            max_ttl: self.duration("cache.max_ttl", raw.cache.max_ttl.as_ref(), defaults::CACHE_MAX_TTL)?,
            negative_ttl: self.duration(
                "cache.negative_ttl",
                raw.cache.negative_ttl.as_ref(),
                defaults::CACHE_NEGATIVE_TTL,
            )?,
            max_stale: self.duration("cache.max_stale", raw.cache.max_stale.as_ref(), defaults::CACHE_MAX_STALE)?,
            invalid_ttl: self.duration(
                "cache.invalid_ttl",
                raw.cache.invalid_ttl.as_ref(),
                defaults::CACHE_INVALID_TTL,
            )?,
        };
        if cache.ttl > cache.max_ttl {
            return Err(self.err("cache.ttl", "is longer than cache.max_ttl"));
        }
        if cache.max_bytes / cache.max_entries > u64::from(u32::MAX) {
            return Err(self.err("cache.max_bytes", "more than 4 GiB per entry on average; raise cache.max_entries"));
        }
        let proxy = ProxySettings {
            connect_timeout: self.duration(
                "proxy.connect_timeout",
                raw.proxy.connect_timeout.as_ref(),
                defaults::CONNECT_TIMEOUT,
            )?,
            response_timeout: self.duration(
                "proxy.response_timeout",
                raw.proxy.response_timeout.as_ref(),
                defaults::RESPONSE_TIMEOUT,
            )?,
            pool_idle_timeout: self.duration(
                "proxy.pool_idle_timeout",
                raw.proxy.pool_idle_timeout.as_ref(),
                defaults::POOL_IDLE_TIMEOUT,
            )?,
            max_connections_per_backend: self.count(
                "proxy.max_connections_per_backend",
                raw.proxy.max_connections_per_backend.unwrap_or(defaults::MAX_CONNECTIONS_PER_BACKEND),
                defaults::MAX_CONNECTIONS_CEILING,
            )?,
            max_backend_connections: self.count(
                "proxy.max_backend_connections",
                raw.proxy.max_backend_connections.unwrap_or(defaults::MAX_BACKEND_CONNECTIONS),
                defaults::MAX_CONNECTIONS_CEILING,
            )?,
        };
        self.positive("proxy.connect_timeout", proxy.connect_timeout)?;
        self.positive("proxy.response_timeout", proxy.response_timeout)?;

        let certificates = self.certificates(raw.certificate)?;
        let redis = self.redis(raw.redis)?;
        let plugins = self.plugins(raw.plugin, &redis)?;
        let listeners = self.listeners(raw.listener, &certificates, &plugins)?;
        let invalidation = match raw.invalidation {
            None => None,
            Some(i) => {
                if !redis.iter().any(|r| r.name == i.redis) {
                    return Err(self.err("invalidation.redis", format!("no [[redis]] named {:?}", i.redis)));
                }
                let channel = i.channel.unwrap_or_else(|| defaults::INVALIDATION_CHANNEL.to_string());
                Some(InvalidationSettings { store: i.redis, channel })
            }
        };
        let resumption = match raw.resumption {
            None => ResumptionSettings::default(),
            Some(r) => self.resumption(r, &redis)?,
        };
        let admin = match raw.admin {
            None => None,
            Some(a) => {
                let raw_bind = a.bind.unwrap_or_else(|| defaults::ADMIN_BIND.to_string());
                let bind = raw_bind
                    .parse()
                    .map_err(|_| self.err("admin.bind", format!("{raw_bind:?} is not an address:port")))?;
                let token = a.token.map(|t| self.value("admin.token", t)).transpose()?;
                if token.as_deref() == Some("") {
                    return Err(self.err("admin.token", "is empty: remove it, or give a long random token"));
                }
                let max_connections = self.count(
                    "admin.max_connections",
                    a.max_connections.unwrap_or(defaults::ADMIN_MAX_CONNECTIONS),
                    defaults::MAX_CONNECTIONS_CEILING,
                )?;
                let request_head_timeout = self.duration(
                    "admin.request_head_timeout",
                    a.request_head_timeout.as_ref(),
                    defaults::ADMIN_REQUEST_HEAD_TIMEOUT,
                )?;
                self.positive("admin.request_head_timeout", request_head_timeout)?;
                let connection_timeout = self.duration(
                    "admin.connection_timeout",
                    a.connection_timeout.as_ref(),
                    defaults::ADMIN_CONNECTION_TIMEOUT,
                )?;
                self.positive("admin.connection_timeout", connection_timeout)?;
                Some(AdminSettings { bind, token, max_connections, request_head_timeout, connection_timeout })
            }
        };
        let reload = ReloadSettings {
            watch: raw.reload.watch,
            watch_interval: self.duration(
                "reload.watch_interval",
                raw.reload.watch_interval.as_ref(),
                defaults::WATCH_INTERVAL,
            )?,
        };
        self.positive("reload.watch_interval", reload.watch_interval)?;
        self.distinct_addresses(&listeners, admin.as_ref())?;
        let log = LogSettings {
            format: raw.log.format,
            level: raw.log.level.unwrap_or_else(|| "info".into()),
            access: raw.log.access.unwrap_or(true),
        };
        Ok(Config {
            log,
            server,
            cache,
            proxy,
            listeners,
            certificates,
            plugins,
            redis,
            invalidation,
            resumption,
            admin,
            reload,
            source: self.file.to_path_buf(),
        })
    }

    fn resumption(&self, r: raw::Resumption, redis: &[RedisSettings]) -> Result<ResumptionSettings, ConfigError> {
        let fallback = ResumptionSettings::default();
        if let Some(store) = &r.redis
            && !redis.iter().any(|s| &s.name == store)
        {
            return Err(self.err("resumption.redis", format!("no [[redis]] named {store:?}")));
        }
        let secret = match r.secret {
            None => None,
            Some(value) => {
                let text = self.value("resumption.secret", value)?;
                if text.len() < defaults::SECRET_MIN_LEN {
                    return Err(self.err(
                        "resumption.secret",
                        format!("too short: at least {} bytes (e.g. `openssl rand -hex 32`)", defaults::SECRET_MIN_LEN),
                    ));
                }
                Some(Secret(std::sync::Arc::new(zeroize::Zeroizing::new(text.into_bytes()))))
            }
        };
        if r.redis.is_some() && secret.is_none() {
            return Err(self.err(
                "resumption.secret",
                "missing: sessions and ticket keys are sealed in Redis with it; \
                 e.g. secret = { env = \"TERN_RESUMPTION_SECRET\" }",
            ));
        }
        let rotation =
            self.duration("resumption.ticket_rotation", r.ticket_rotation.as_ref(), fallback.ticket_rotation)?;
        self.positive("resumption.ticket_rotation", rotation)?;
        let lifetime =
            self.duration("resumption.ticket_lifetime", r.ticket_lifetime.as_ref(), fallback.ticket_lifetime)?;
        if lifetime < rotation {
            return Err(self.err("resumption.ticket_lifetime", "is shorter than resumption.ticket_rotation"));
        }
        if lifetime > Duration::from_secs(7 * 24 * 3600) {
            return Err(self.err("resumption.ticket_lifetime", "TLS allows at most 7 days"));
        }
        let session_lifetime =
            self.duration("resumption.session_lifetime", r.session_lifetime.as_ref(), fallback.session_lifetime)?;
        self.positive("resumption.session_lifetime", session_lifetime)?;
        let prefix = r.prefix.unwrap_or(fallback.prefix);
        if prefix.is_empty() || prefix.contains(char::is_whitespace) {
            return Err(self.err("resumption.prefix", "must be non-empty, without spaces"));
        }
        Ok(ResumptionSettings {
            store: r.redis,
            secret,
            prefix,
            tickets: r.tickets.unwrap_or(true),
            ticket_rotation: rotation,
            ticket_lifetime: lifetime,
            session_lifetime,
            node: r.node.unwrap_or(fallback.node),
        })
    }

    fn redis(&self, raw: Vec<raw::Redis>) -> Result<Vec<RedisSettings>, ConfigError> {
        let mut seen = HashSet::new();
        raw.into_iter()
            .map(|r| {
                let key = format!("redis {:?}", r.name);
                if !seen.insert(r.name.clone()) {
                    return Err(self.err(key, "defined twice"));
                }
                if r.urls.is_empty() || (!r.cluster && r.urls.len() > 1) {
                    return Err(self.err(format!("{key}.urls"), "one URL, or several with cluster = true"));
                }
                for url in &r.urls {
                    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                        return Err(self.err(format!("{key}.urls"), format!("{url:?}: expected redis://host:port")));
                    }
                }
                let timeout = self.duration(&format!("{key}.timeout"), r.timeout.as_ref(), defaults::REDIS_TIMEOUT)?;
                self.positive(&format!("{key}.timeout"), timeout)?;
                Ok(RedisSettings { name: r.name, urls: r.urls, cluster: r.cluster, timeout })
            })
            .collect()
    }

    fn certificates(&self, raw: Vec<raw::Certificate>) -> Result<Vec<StaticCertSettings>, ConfigError> {
        let mut seen = HashSet::new();
        raw.into_iter()
            .map(|c| {
                let key = format!("certificate {:?}", c.name);
                if !seen.insert(c.name.clone()) {
                    return Err(self.err(key, "defined twice"));
                }
                let serve_names = match c.names {
                    None => None,
                    Some(names) => Some(
                        names
                            .iter()
                            .map(|n| normalise_pattern(n).map_err(|m| self.err(format!("{key}.names"), m)))
                            .collect::<Result<_, _>>()?,
                    ),
                };
                Ok(StaticCertSettings { name: c.name, cert: self.path(&c.cert), key: self.path(&c.key), serve_names })
            })
            .collect()
    }

    fn plugins(&self, raw: Vec<raw::Plugin>, redis: &[RedisSettings]) -> Result<Vec<PluginSettings>, ConfigError> {
        let mut seen = HashSet::new();
        raw.into_iter()
            .map(|p| {
                let key = format!("plugin {:?}", p.name);
                if !seen.insert(p.name.clone()) {
                    return Err(self.err(key, "defined twice"));
                }
                let timeout = self.duration(&format!("{key}.timeout"), p.timeout.as_ref(), defaults::PLUGIN_TIMEOUT)?;
                self.positive(&format!("{key}.timeout"), timeout)?;
                let memory_limit = self.size(
                    &format!("{key}.memory_limit"),
                    p.memory_limit.as_ref(),
                    defaults::PLUGIN_MEMORY_LIMIT as u64,
                )?;
                // Below one Wasm page nothing can run; above 4 GiB is beyond 32-bit linear memory.
                if !(64 << 10..=4 << 30).contains(&memory_limit) {
                    return Err(self.err(format!("{key}.memory_limit"), "must be between 64KiB and 4GiB"));
                }
                let max_concurrency = self.positive(
                    &format!("{key}.max_concurrency"),
                    p.max_concurrency.unwrap_or(defaults::PLUGIN_MAX_CONCURRENCY),
                )?;
                let settings = p
                    .settings
                    .into_iter()
                    .map(|(k, v)| Ok((k.clone(), self.value(&format!("{key}.settings.{k}"), v)?)))
                    .collect::<Result<_, _>>()?;
                let files = p.grants.files.map(|dir| self.path(&dir));
                let kv = match p.grants.kv {
                    None => None,
                    Some(grant) => {
                        if !redis.iter().any(|r| r.name == grant.redis) {
                            return Err(self.err(
                                format!("{key}.grants.kv.redis"),
                                format!("no [[redis]] named {:?}", grant.redis),
                            ));
                        }
                        if grant.prefixes.is_empty() {
                            return Err(self.err(
                                format!("{key}.grants.kv.prefixes"),
                                "list the key prefixes the plugin may read ([\"\"] for every key)",
                            ));
                        }
                        Some(KvGrant { store: grant.redis, prefixes: grant.prefixes })
                    }
                };
                let http = match p.grants.http {
                    None => None,
                    Some(grant) => {
                        let allow = grant
                            .allow
                            .iter()
                            .map(|a| {
                                normalise_authority(a).map_err(|m| self.err(format!("{key}.grants.http.allow"), m))
                            })
                            .collect::<Result<_, _>>()?;
                        let timeout_key = format!("{key}.grants.http.timeout");
                        let timeout = self.duration(&timeout_key, grant.timeout.as_ref(), defaults::HTTP_TIMEOUT)?;
                        self.positive(&timeout_key, timeout)?;
                        let max_response_bytes = self.size(
                            &format!("{key}.grants.http.max_response_bytes"),
                            grant.max_response_bytes.as_ref(),
                            defaults::HTTP_MAX_RESPONSE_BYTES,
                        )?;
                        Some(HttpGrant { allow, timeout, max_response_bytes })
                    }
                };
                Ok(PluginSettings {
                    name: p.name,
                    path: self.path(&p.path),
                    timeout,
                    memory_limit: usize::try_from(memory_limit).unwrap_or(usize::MAX),
                    max_concurrency,
                    max_calls_per_second: match p.max_calls_per_second {
                        Some(0) => {
                            return Err(self.err(
                                format!("{key}.max_calls_per_second"),
                                "must be greater than zero (omit it for no cap)",
                            ));
                        }
                        other => other,
                    },
                    max_calls_per_second_per_client: match (p.max_calls_per_second, p.max_calls_per_second_per_client) {
                        (_, Some(0)) => {
                            return Err(
                                self.err(format!("{key}.max_calls_per_second_per_client"), "must be greater than zero")
                            );
                        }
                        (None, Some(_)) => {
                            return Err(self.err(
                                format!("{key}.max_calls_per_second_per_client"),
                                "is a share of max_calls_per_second: set that too",
                            ));
                        }
                        (Some(cap), None) => Some((cap / 4).max(1)),
                        (_, share) => share,
                    },
                    breaker_threshold: p.breaker_threshold.unwrap_or(defaults::BREAKER_THRESHOLD),
                    breaker_cooldown: self.duration(
                        &format!("{key}.breaker_cooldown"),
                        p.breaker_cooldown.as_ref(),
                        defaults::BREAKER_COOLDOWN,
                    )?,
                    settings,
                    grants: Grants { files, kv, http },
                    probe_names: p.probe_names,
                    on_swap: p.on_swap,
                })
            })
            .collect()
    }

    fn listeners(
        &self,
        raw: Vec<raw::Listener>,
        certificates: &[StaticCertSettings],
        plugins: &[PluginSettings],
    ) -> Result<Vec<ListenerSettings>, ConfigError> {
        if raw.is_empty() {
            return Err(self.err("listener", "at least one [[listener]] is required"));
        }
        let mut names = HashSet::new();
        raw.into_iter()
            .enumerate()
            .map(|(i, l)| {
                let name = l.name.unwrap_or_else(|| format!("listener-{i}"));
                let key = format!("listener {name:?}");
                if !names.insert(name.clone()) {
                    return Err(self.err(key, "defined twice"));
                }
                let bind = l
                    .bind
                    .parse()
                    .map_err(|_| self.err(format!("{key}.bind"), format!("{:?} is not an address:port", l.bind)))?;
                if let Some(plugin) = &l.plugin
                    && !plugins.iter().any(|p| &p.name == plugin)
                {
                    return Err(self.err(format!("{key}.plugin"), format!("no [[plugin]] named {plugin:?}")));
                }
                let fallback = match (l.default_certificate, l.strict) {
                    (Some(_), true) => {
                        return Err(self.err(
                            format!("{key}.strict"),
                            "strict listeners refuse unknown names: remove default_certificate or strict",
                        ));
                    }
                    (Some(cert), false) => {
                        if !certificates.iter().any(|c| c.name == cert) {
                            return Err(self.err(
                                format!("{key}.default_certificate"),
                                format!("no [[certificate]] named {cert:?}"),
                            ));
                        }
                        Fallback::DefaultCertificate(cert)
                    }
                    (None, true) => Fallback::Strict,
                    (None, false) => {
                        return Err(self.err(
                            format!("{key}.default_certificate"),
                            "missing: name a [[certificate]] to serve unknown names, or set strict = true",
                        ));
                    }
                };
                let alpn = l
                    .alpn
                    .unwrap_or_else(|| defaults::ALPN.iter().map(|s| s.to_string()).collect())
                    .into_iter()
                    .map(|p| match p.as_str() {
                        "h2" | "http/1.1" => Ok(p.into_bytes()),
                        _ => Err(self.err(format!("{key}.alpn"), format!("{p:?}: only \"h2\" and \"http/1.1\""))),
                    })
                    .collect::<Result<_, _>>()?;
                let backend = parse_backend(&l.backend).map_err(|m| self.err(format!("{key}.backend"), m))?;
                let required = match l.client_auth.as_deref() {
                    None | Some("required") => true,
                    Some("optional") => false,
                    Some(other) => {
                        return Err(self.err(
                            format!("{key}.client_auth"),
                            format!("{other:?}: expected \"required\" or \"optional\""),
                        ));
                    }
                };
                let client_auth = match l.client_ca {
                    Some(ca) => Some(ClientAuth { ca: self.path(&ca), required }),
                    None if l.client_auth.is_some() => {
                        return Err(self.err(format!("{key}.client_auth"), "needs client_ca (the CAs to trust)"));
                    }
                    None => None,
                };
                Ok(ListenerSettings { name, bind, plugin: l.plugin, fallback, alpn, backend, client_auth })
            })
            .collect()
    }
}

/// A server name or a `*.` wildcard pattern from the config, normalised.
fn normalise_pattern(raw: &str) -> Result<String, String> {
    let (prefix, rest) = match raw.strip_prefix("*.") {
        Some(rest) => ("*.", rest),
        None => ("", raw),
    };
    ServerName::parse(rest).map(|n| format!("{prefix}{n}")).map_err(|e| format!("{raw:?}: {e}"))
}

/// `host:port` as written in an allow-list, lowercased; the port is required so that the grant is exact.
fn normalise_authority(raw: &str) -> Result<String, String> {
    let authority: http::uri::Authority = raw.parse().map_err(|e| format!("{raw:?}: {e}"))?;
    if authority.port_u16().is_none() {
        return Err(format!("{raw:?}: give host:port (e.g. \"api.example.com:443\")"));
    }
    Ok(authority.as_str().to_ascii_lowercase())
}

fn parse_backend(raw: &str) -> Result<http::Uri, String> {
    let uri: http::Uri = raw.parse().map_err(|e| format!("{raw:?}: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{raw:?}: only http:// backends are supported"));
    }
    if uri.authority().is_none() {
        return Err(format!("{raw:?}: needs a host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("{raw:?}: give an origin only (no path or query)"));
    }
    Ok(uri)
}

/// Parses `"250ms"`, `"10s"`, `"5m"`, `"1h"`, `"1d"` (whole numbers).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{text:?}: expected a duration such as \"500ms\" or \"10s\""))?;
    let unit_ms = match unit.trim() {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return Err(format!("{text:?}: unit must be ms, s, m, h or d")),
    };
    n.checked_mul(unit_ms).map(Duration::from_millis).ok_or_else(|| format!("{text:?}: too long"))
}

/// Parses `"512"`, `"64KiB"`, `"64MiB"`, `"1GiB"` (also `KB`/`MB`/`GB` as powers of 1000).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().map_err(|_| format!("{text:?}: expected a size such as \"64MiB\""))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => {
            return Err(format!("{text:?}: unit must be B, KiB, MiB, GiB, KB, MB or GB"));
        }
    };
    n.checked_mul(factor).ok_or_else(|| format!("{text:?}: too large"))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/tern/tern.toml"))
    }

    /// The smallest useful config (also seeds the config fuzz target).
    pub(crate) const MINIMAL: &str = r#"
        [[certificate]]
        name = "fallback"
        cert = "certs/fallback.crt"
        key = "certs/fallback.key"

        [[plugin]]
        name = "files"
        path = "plugins/file_path.wasm"
        grants.files = "/srv/certs"
        settings = { cert_template = "{name}.pem", ttl_seconds = 30 }

        [[listener]]
        bind = "127.0.0.1:8443"
        plugin = "files"
        default_certificate = "fallback"
        backend = "http://127.0.0.1:8080"
    "#;

    #[test]
    fn minimal_file_gets_defaults_and_resolved_paths() {
        let config = load(MINIMAL).unwrap();
        assert_eq!(config.server.handshake_timeout, defaults::HANDSHAKE_TIMEOUT);
        assert_eq!(config.cache.max_entries, defaults::CACHE_MAX_ENTRIES);
        let plugin = &config.plugins[0];
        assert_eq!(plugin.path, Path::new("/etc/tern/plugins/file_path.wasm"));
        assert_eq!(plugin.grants.files.as_deref(), Some(Path::new("/srv/certs")));
        assert_eq!(plugin.settings["ttl_seconds"], "30");
        assert_eq!(plugin.timeout, defaults::PLUGIN_TIMEOUT);
        let listener = &config.listeners[0];
        assert_eq!(listener.name, "listener-0");
        assert_eq!(listener.fallback, Fallback::DefaultCertificate("fallback".into()));
        assert_eq!(listener.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(config.certificates[0].cert, Path::new("/etc/tern/certs/fallback.crt"));
    }

    fn error_of(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn resumption_through_redis_needs_a_long_secret_that_debug_never_prints() {
        let with = |section: &str| {
            format!("{MINIMAL}\n[[redis]]\nname = \"r\"\nurls = [\"redis://127.0.0.1:6379\"]\n{section}")
        };
        let err = error_of(&with("[resumption]\nredis = \"r\""));
        assert!(err.contains("resumption.secret: missing"), "{err}");
        let err = error_of(&with("[resumption]\nredis = \"r\"\nsecret = \"short\""));
        assert!(err.contains("resumption.secret: too short"), "{err}");
        let err = error_of(&with("[resumption]\nredis = \"nope\"\nsecret = \"0123456789abcdef0123456789abcdef\""));
        assert!(err.contains("resumption.redis: no [[redis]] named \"nope\""), "{err}");
        let err = error_of(&with("[resumption]\nticket_rotation = \"2h\"\nticket_lifetime = \"1h\""));
        assert!(err.contains("resumption.ticket_lifetime: is shorter"), "{err}");
        let secret = "0123456789abcdef0123456789abcdef-secret";
        let config = load(&with(&format!("[resumption]\nredis = \"r\"\nsecret = \"{secret}\""))).unwrap();
        assert_eq!(config.resumption.secret.as_ref().unwrap().bytes(), secret.as_bytes());
        assert!(!format!("{config:?}").contains(secret), "Debug must not print the secret");
        assert_eq!(load(MINIMAL).unwrap().resumption.store, None, "local resumption by default");
    }

    #[test]
    fn unknown_key_names_file_and_line() {
        let err = error_of(&MINIMAL.replace("bind =", "bnid ="));
        assert!(err.starts_with("/etc/tern/tern.toml: "), "{err}");
        assert!(err.contains("unknown field `bnid`"), "{err}");
        assert!(err.contains("line 14 `bnid = \"127.0.0.1:8443\"`"), "{err}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let cases = [
            (MINIMAL.replace("127.0.0.1:8443", "localhost"), "listener \"listener-0\".bind"),
            (MINIMAL.replace("[[plugin]]", "[[plugin]]\ntimeout = \"soon\""), "plugin \"files\".timeout"),
            (MINIMAL.replace("[[plugin]]", "[[plugin]]\nmemory_limit = \"1TiB\""), "plugin \"files\".memory_limit"),
            (MINIMAL.replace("plugin = \"files\"", "plugin = \"nope\""), "listener \"listener-0\".plugin"),
            (
                MINIMAL.replace("default_certificate = \"fallback\"", "default_certificate = \"x\""),
                "listener \"listener-0\".default_certificate",
            ),
            (MINIMAL.replace("default_certificate = \"fallback\"", ""), "listener \"listener-0\".default_certificate"),
            (MINIMAL.replace("http://127.0.0.1:8080", "https://b:1"), "listener \"listener-0\".backend"),
            (MINIMAL.replace("http://127.0.0.1:8080", "http://b:1/api"), "listener \"listener-0\".backend"),
            (format!("{MINIMAL}\n[cache]\nttl = \"0x\""), "cache.ttl"),
            (format!("{MINIMAL}\n[cache]\nmax_entries = 0"), "cache.max_entries"),
            (format!("{MINIMAL}\n[server]\nhandshake_timeout = \"0s\""), "server.handshake_timeout"),
            (
                MINIMAL.replace("key = \"certs/fallback.key\"", "key = \"k\"\nnames = [\"a/b\"]"),
                "certificate \"fallback\".names",
            ),
        ];
        for (text, key) in cases {
            let err = error_of(&text);
            assert!(err.contains(&format!(": {key}: ")), "expected key {key} in: {err}");
        }
    }

    #[test]
    fn strict_and_default_certificate_exclude_each_other() {
        let err = error_of(&MINIMAL.replace("plugin = \"files\"", "plugin = \"files\"\nstrict = true"));
        assert!(err.contains(".strict: "), "{err}");
        let config = load(&MINIMAL.replace("default_certificate = \"fallback\"", "strict = true")).unwrap();
        assert_eq!(config.listeners[0].fallback, Fallback::Strict);
    }

    #[test]
    fn kv_grant_names_an_existing_store_and_prefixes() {
        let with_store = format!("{MINIMAL}\n[[redis]]\nname = \"certs\"\nurls = [\"redis://127.0.0.1:6379\"]\n");
        let grant = |g: &str| with_store.replace("grants.files = \"/srv/certs\"", g);
        let config = load(&grant("grants.kv = { redis = \"certs\", prefixes = [\"cert:\"] }")).unwrap();
        let kv = config.plugins[0].grants.kv.as_ref().unwrap();
        assert_eq!((kv.store.as_str(), kv.prefixes.as_slice()), ("certs", &["cert:".to_string()][..]));
        assert_eq!(config.redis[0].timeout, defaults::REDIS_TIMEOUT);
        let err = load(&grant("grants.kv = { redis = \"nope\", prefixes = [\"\"] }")).unwrap_err().to_string();
        assert!(err.contains("plugin \"files\".grants.kv.redis: no [[redis]] named \"nope\""), "{err}");
        let err = load(&grant("grants.kv = { redis = \"certs\", prefixes = [] }")).unwrap_err().to_string();
        assert!(err.contains(".grants.kv.prefixes"), "{err}");
        let err = load(&with_store.replace("redis://127.0.0.1:6379", "127.0.0.1:6379")).unwrap_err().to_string();
        assert!(err.contains("redis \"certs\".urls"), "{err}");
    }

    #[test]
    fn settings_can_come_from_the_environment_and_http_grants_need_ports() {
        // PATH is set in every environment tests run in; the variable below in none.
        let with = |settings: &str| {
            MINIMAL.replace("settings = { cert_template = \"{name}.pem\", ttl_seconds = 30 }", settings)
        };
        let config = load(&with("settings = { token = { env = \"PATH\" } }")).unwrap();
        assert_eq!(config.plugins[0].settings["token"], std::env::var("PATH").unwrap());
        let err = load(&with("settings = { token = { env = \"TERN_TEST_SURELY_UNSET_VARIABLE\" } }")).unwrap_err();
        assert!(
            err.to_string().contains(".settings.token: environment variable TERN_TEST_SURELY_UNSET_VARIABLE"),
            "{err}"
        );
        let grant = |g: &str| MINIMAL.replace("grants.files = \"/srv/certs\"", g);
        let config = load(&grant("grants.http = { allow = [\"API.example.com:443\"] }")).unwrap();
        let http = config.plugins[0].grants.http.as_ref().unwrap();
        assert_eq!(http.allow, ["api.example.com:443"]);
        assert_eq!(
            (http.timeout, http.max_response_bytes),
            (defaults::HTTP_TIMEOUT, defaults::HTTP_MAX_RESPONSE_BYTES)
        );
        let err = load(&grant("grants.http = { allow = [\"api.example.com\"] }")).unwrap_err().to_string();
        assert!(err.contains(".grants.http.allow: \"api.example.com\": give host:port"), "{err}");
    }

    #[test]
    fn no_listener_is_an_error() {
        assert!(error_of("").contains(": listener: "));
    }

    #[test]
    fn two_sockets_on_one_address_are_refused() {
        let second = "[[listener]]\nname = \"b\"\nbind = \"BIND\"\nstrict = true\nbackend = \"http://127.0.0.1:1\"\n";
        for (bind, clash) in [("127.0.0.1:8443", true), ("0.0.0.0:8443", true), ("127.0.0.2:8443", false)] {
            let result = load(&format!("{MINIMAL}\n{}", second.replace("BIND", bind)));
            assert_eq!(result.is_err(), clash, "{bind}: {result:?}");
            if clash {
                let err = result.unwrap_err().to_string();
                assert!(
                    err.contains("listener \"b\".bind: ") && err.contains("already used by listener \"listener-0\""),
                    "{err}"
                );
            }
        }
        let err = error_of(&format!("{MINIMAL}\n[admin]\nbind = \"127.0.0.1:8443\"\n"));
        assert!(err.contains("admin.bind: 127.0.0.1:8443 is already used"), "{err}");
        let ephemeral = MINIMAL.replace("127.0.0.1:8443", "127.0.0.1:0");
        assert!(
            load(&format!("{ephemeral}\n{}", second.replace("BIND", "127.0.0.1:0"))).is_ok(),
            "port 0 never clashes"
        );
    }

    /// Random values for every numeric, duration and size key: validation never panics, and every value it
    /// accepts can be used by what consumes it (semaphores, budgets, the clock), so no config value can panic
    /// the server later.
    #[test]
    fn no_accepted_value_can_panic_the_runtime() {
        const NUMBERS: [&str; 10] = [
            "1",
            "7",
            "1000",
            "10000000",
            "0",
            "10000001",
            "4294967296",
            "9223372036854775807",
            "-1",
            "18446744073709551615",
        ];
        const DURATIONS: [&str; 11] = [
            "\"1ms\"",
            "\"10s\"",
            "\"3650d\"",
            "\"2h\"",
            "\"0s\"",
            "\"3651d\"",
            "\"18446744073709551615ms\"",
            "\"99999999999999d\"",
            "\"1.5s\"",
            "\"\"",
            "5",
        ];
        const SIZES: [&str; 9] = [
            "\"64KiB\"",
            "\"1MiB\"",
            "\"16MiB\"",
            "\"1TiB\"",
            "0",
            "1",
            "\"18446744073709551615GiB\"",
            "\"-1B\"",
            "4294967296",
        ];
        let keys: [(&str, &str, &[&str]); 24] = [
            ("server", "max_connections", &NUMBERS),
            ("server", "session_cache_entries", &NUMBERS),
            ("server", "h2_max_concurrent_streams", &NUMBERS),
            ("server", "handshake_timeout", &DURATIONS),
            ("server", "request_head_timeout", &DURATIONS),
            ("server", "keepalive_timeout", &DURATIONS),
            ("server", "request_body_timeout", &DURATIONS),
            ("server", "send_timeout", &DURATIONS),
            ("server", "tunnel_idle_timeout", &DURATIONS),
            ("server", "h2_keepalive_interval", &DURATIONS),
            ("server", "shutdown_grace", &DURATIONS),
            ("server", "max_request_header_bytes", &SIZES),
            ("server", "plugin_memory_total", &SIZES),
            ("cache", "max_entries", &NUMBERS),
            ("cache", "max_bytes", &SIZES),
            ("cache", "ttl", &DURATIONS),
            ("cache", "negative_ttl", &DURATIONS),
            ("cache", "max_stale", &DURATIONS),
            ("cache", "invalid_ttl", &DURATIONS),
            ("proxy", "connect_timeout", &DURATIONS),
            ("proxy", "response_timeout", &DURATIONS),
            ("proxy", "pool_idle_timeout", &DURATIONS),
            ("proxy", "max_connections_per_backend", &NUMBERS),
            ("proxy", "max_backend_connections", &NUMBERS),
        ];
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut accepted = 0;
        for _ in 0..3000 {
            let mut sections: BTreeMap<&str, String> = BTreeMap::new();
            for (section, key, values) in keys {
                if next() % 4 == 0 {
                    // Mostly plausible values (the first four of each list), sometimes anything.
                    let pool = if next() % 4 == 0 { values.len() } else { 4 };
                    let value = values[(next() % pool as u64) as usize];
                    sections.entry(section).or_default().push_str(&format!("{key} = {value}\n"));
                }
            }
            let mut text = MINIMAL.to_string();
            for (section, body) in &sections {
                text.push_str(&format!("\n[{section}]\n{body}"));
            }
            let Ok(config) =
                std::panic::catch_unwind(|| load(&text)).unwrap_or_else(|_| panic!("panicked on:\n{text}"))
            else {
                continue;
            };
            accepted += 1;
            let now = std::time::Instant::now();
            let c = &config.server.client;
            for d in [
                config.server.handshake_timeout,
                config.server.shutdown_grace,
                c.request_head_timeout,
                c.keepalive_timeout,
                c.request_body_timeout,
                c.send_timeout,
                c.tunnel_idle_timeout,
                c.h2_keepalive_interval,
                config.cache.ttl,
                config.cache.negative_ttl,
                config.cache.max_ttl + config.cache.max_stale,
                config.cache.invalid_ttl,
                config.proxy.connect_timeout,
                config.proxy.response_timeout,
            ] {
                assert!(now.checked_add(d).is_some(), "{d:?} overflows the clock:\n{text}");
            }
            for n in [config.server.max_connections, config.proxy.max_connections_per_backend] {
                assert!(n <= tokio::sync::Semaphore::MAX_PERMITS, "{n}:\n{text}");
            }
            let budget = crate::fdlimit::budget(&config, 1 << 20);
            assert!(
                budget.clients <= tokio::sync::Semaphore::MAX_PERMITS
                    && budget.backends <= tokio::sync::Semaphore::MAX_PERMITS
            );
            // The cache turns TTLs into expiry times (moka keeps nanoseconds in a u64): fill and read an entry.
            let cache = crate::cache::CertCache::new(&config.cache, std::sync::Arc::default());
            let key = crate::cache::CacheKey { plugin: "p".into(), name: ServerName::parse("a.test").unwrap() };
            let filled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                runtime.block_on(async {
                    let load = async { Ok::<_, ()>(crate::cache::Answer::NotFound) };
                    let first = cache.get_or_load(key.clone(), load).await.is_ok();
                    cache.run_pending_tasks().await;
                    let _ = cache.get_or_load(key, async { Err::<crate::cache::Answer, ()>(()) }).await;
                    first
                })
            }));
            assert!(filled.unwrap_or_else(|_| panic!("the cache panicked under:\n{text}")), "{text}");
        }
        assert!(accepted > 100, "only {accepted} random configs were accepted: the test explores too little");
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("1.5s").is_err());
        assert!(parse_duration("10").is_err());
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("12XB").is_err());
    }
}
