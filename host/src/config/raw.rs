//! The file's shape, exactly as written. Defaults are applied during validation.

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
