//! Defaults, documented in the README's config reference.

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
