//! From the raw file to typed settings: every value checked, every default applied, every error naming the
//! file and the key. The sections with a list of entries (certificates, plugins, listeners) are in
//! [`super::sections`].

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

/// `section.field` read from `raw.field` by `self.duration` (or `self.deadline`: a duration that must not be zero),
/// or the default.
macro_rules! duration {
    ($v:ident . $read:ident, $section:literal, $raw:ident . $field:ident, $default:expr) => {
        $v.$read(concat!($section, ".", stringify!($field)), $raw.$field.as_ref(), $default)?
    };
}

pub(super) struct Validator<'a> {
    pub(super) file: &'a Path,
    pub(super) base: &'a Path,
}

impl Validator<'_> {
    pub(super) fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError { file: self.file.to_path_buf(), key: key.into(), message: message.into() }
    }

    pub(super) fn duration(&self, key: &str, raw: Option<&String>, default: Duration) -> Result<Duration, ConfigError> {
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

    pub(super) fn size(&self, key: &str, raw: Option<&raw::Size>, default: u64) -> Result<u64, ConfigError> {
        match raw {
            None => Ok(default),
            Some(raw::Size::Bytes(n)) => Ok(*n),
            Some(raw::Size::Text(text)) => parse_size(text).map_err(|message| self.err(key, message)),
        }
    }

    /// A size (`default` when unset) that must lie in `allowed`; outside it, `message` names what does.
    pub(super) fn size_within(
        &self,
        key: &str,
        raw: Option<&raw::Size>,
        default: u64,
        allowed: std::ops::RangeInclusive<u64>,
        message: &str,
    ) -> Result<u64, ConfigError> {
        let size = self.size(key, raw, default)?;
        if allowed.contains(&size) { Ok(size) } else { Err(self.err(key, message)) }
    }

    /// A count between 1 and `ceiling`: what the runtime can allocate (a semaphore holds at most `usize::MAX >> 3`
    /// permits, for one) is far above any ceiling, so an accepted value never fails at start-up.
    pub(super) fn count(&self, key: &str, value: usize, ceiling: usize) -> Result<usize, ConfigError> {
        if (1..=ceiling).contains(&value) {
            Ok(value)
        } else {
            Err(self.err(key, format!("must be between 1 and {ceiling}")))
        }
    }

    pub(super) fn client_limits(&self, raw: &raw::Server) -> Result<ClientLimits, ConfigError> {
        let fallback = ClientLimits::default();
        let streams = raw.h2_max_concurrent_streams.unwrap_or(fallback.h2_max_concurrent_streams);
        if !(1..=10_000).contains(&streams) {
            return Err(self.err("server.h2_max_concurrent_streams", "must be between 1 and 10000"));
        }
        // Below 8 KiB common browsers' heads (cookies) no longer fit; above 1 MiB a head is an attack.
        let header_bytes = self.size_within(
            "server.max_request_header_bytes",
            raw.max_request_header_bytes.as_ref(),
            u64::from(fallback.max_request_header_bytes),
            8 << 10..=1 << 20,
            "must be between 8KiB and 1MiB",
        )?;
        Ok(ClientLimits {
            request_head_timeout: duration!(
                self.deadline,
                "server",
                raw.request_head_timeout,
                fallback.request_head_timeout
            ),
            keepalive_timeout: duration!(self.deadline, "server", raw.keepalive_timeout, fallback.keepalive_timeout),
            request_body_timeout: duration!(
                self.deadline,
                "server",
                raw.request_body_timeout,
                fallback.request_body_timeout
            ),
            send_timeout: duration!(self.deadline, "server", raw.send_timeout, fallback.send_timeout),
            tunnel_idle_timeout: duration!(
                self.deadline,
                "server",
                raw.tunnel_idle_timeout,
                fallback.tunnel_idle_timeout
            ),
            h2_max_concurrent_streams: streams,
            h2_keepalive_interval: duration!(
                self.deadline,
                "server",
                raw.h2_keepalive_interval,
                fallback.h2_keepalive_interval
            ),
            h2_keepalive_timeout: duration!(
                self.deadline,
                "server",
                raw.h2_keepalive_timeout,
                fallback.h2_keepalive_timeout
            ),
            max_request_header_bytes: u32::try_from(header_bytes).unwrap_or(u32::MAX),
        })
    }

    /// Two sockets on one address cannot both bind; a wildcard address (`0.0.0.0`, `[::]`) overlaps every
    /// address of the same port. Port 0 (any free port) never clashes.
    pub(super) fn distinct_addresses(
        &self,
        listeners: &[ListenerSettings],
        http_listeners: &[HttpListenerSettings],
        admin: Option<&AdminSettings>,
    ) -> Result<(), ConfigError> {
        let mut seen: Vec<(String, SocketAddr)> = Vec::new();
        let named = listeners
            .iter()
            .map(|l| (format!("listener {:?}.bind", l.name), l.bind))
            .chain(http_listeners.iter().map(|l| (format!("http_listener {:?}.bind", l.name), l.bind)))
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

    /// A duration that must not be zero (a deadline or an interval).
    pub(super) fn deadline(&self, key: &str, raw: Option<&String>, default: Duration) -> Result<Duration, ConfigError> {
        let value = self.duration(key, raw, default)?;
        self.positive(key, value)
    }

    /// Validates the entries of a listed section (`[[redis]]`, `[[plugin]]`...) one by one, refusing a name used
    /// twice; `each` gets the entry's error key (`redis "main"`).
    pub(super) fn entries<T, U>(
        &self,
        what: &str,
        raw: Vec<T>,
        name: impl Fn(&T) -> &str,
        mut each: impl FnMut(String, T) -> Result<U, ConfigError>,
    ) -> Result<Vec<U>, ConfigError> {
        let mut seen = HashSet::new();
        raw.into_iter()
            .map(|entry| {
                let name = name(&entry).to_string();
                let key = format!("{what} {name:?}");
                if !seen.insert(name) {
                    return Err(self.err(key, "defined twice"));
                }
                each(key, entry)
            })
            .collect()
    }

    pub(super) fn positive<T: PartialOrd + Default + Copy>(&self, key: &str, value: T) -> Result<T, ConfigError> {
        if value > T::default() { Ok(value) } else { Err(self.err(key, "must be greater than zero")) }
    }

    /// A string, number or boolean as text, or `{ env = "NAME" }`: the value of tern's environment variable
    /// (for secrets such as tokens, which then live in neither the file nor any log).
    pub(super) fn value(&self, key: &str, value: toml::Value) -> Result<String, ConfigError> {
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

    /// A secret (`value` rules), at least [`defaults::SECRET_MIN_LEN`] bytes long.
    pub(super) fn secret(&self, key: &str, value: toml::Value) -> Result<Secret, ConfigError> {
        let text = self.value(key, value)?;
        if text.len() < defaults::SECRET_MIN_LEN {
            return Err(self.err(
                key,
                format!("too short: at least {} bytes (e.g. `openssl rand -hex 32`)", defaults::SECRET_MIN_LEN),
            ));
        }
        Ok(Secret(std::sync::Arc::new(zeroize::Zeroizing::new(text.into_bytes()))))
    }

    pub(super) fn path(&self, raw: &str) -> PathBuf {
        self.base.join(raw)
    }

    pub(super) fn validate(&self, raw: raw::File) -> Result<Config, ConfigError> {
        let server = self.server(&raw.server)?;
        let cache = self.cache(&raw.cache)?;
        let proxy = self.proxy(&raw.proxy)?;
        let certificates = self.certificates(raw.certificate)?;
        let redis = self.redis(raw.redis)?;
        let upstreams = self.upstreams(raw.upstream, &proxy)?;
        let plugins = self.plugins(raw.plugin, &redis, &upstreams)?;
        let listeners = self.listeners(raw.listener, &certificates, &plugins)?;
        let invalidation = self.invalidation(raw.invalidation, &redis)?;
        let acme = raw.acme.map(|a| self.acme(a, &redis, server.handshake_timeout)).transpose()?;
        let http_listeners = self.http_listeners(raw.http_listener, server.max_connections)?;
        if acme.as_ref().is_some_and(|a| a.challenge == ChallengeKind::Http01) && http_listeners.is_empty() {
            return Err(self.err("acme.challenge", "\"http-01\" needs an [[http_listener]] on port 80 to answer it"));
        }
        let resumption = match raw.resumption {
            None => ResumptionSettings::default(),
            Some(r) => self.resumption(r, &redis)?,
        };
        let admin = raw.admin.map(|a| self.admin(a)).transpose()?;
        let reload = self.reload(&raw.reload)?;
        self.distinct_addresses(&listeners, &http_listeners, admin.as_ref())?;
        let log = self.log(raw.log)?;
        Ok(Config {
            log,
            server,
            cache,
            proxy,
            listeners,
            certificates,
            plugins,
            redis,
            upstreams,
            acme,
            http_listeners,
            invalidation,
            resumption,
            admin,
            reload,
            source: self.file.to_path_buf(),
        })
    }

    fn server(&self, raw: &raw::Server) -> Result<ServerSettings, ConfigError> {
        let max_connections = self.count(
            "server.max_connections",
            raw.max_connections.unwrap_or(defaults::MAX_CONNECTIONS),
            defaults::MAX_CONNECTIONS_CEILING,
        )?;
        let server = ServerSettings {
            handshake_timeout: duration!(self.deadline, "server", raw.handshake_timeout, defaults::HANDSHAKE_TIMEOUT),
            max_connections,
            session_cache_entries: raw.session_cache_entries.unwrap_or(defaults::SESSION_CACHE_ENTRIES),
            shutdown_grace: duration!(self.duration, "server", raw.shutdown_grace, defaults::SHUTDOWN_GRACE),
            upgrade_timeout: duration!(self.deadline, "server", raw.upgrade_timeout, defaults::UPGRADE_TIMEOUT),
            client: self.client_limits(raw)?,
            plugin_memory_total: usize::try_from(self.size_within(
                "server.plugin_memory_total",
                raw.plugin_memory_total.as_ref(),
                defaults::PLUGIN_MEMORY_TOTAL as u64,
                1 << 20..=1 << 40,
                "must be between 1MiB and 1TiB",
            )?)
            .unwrap_or(usize::MAX),
            plugin_keep_resident: usize::try_from(self.size_within(
                "server.plugin_keep_resident",
                raw.plugin_keep_resident.as_ref(),
                defaults::PLUGIN_KEEP_RESIDENT as u64,
                0..=defaults::PLUGIN_KEEP_RESIDENT_CEILING,
                "must be at most 1GiB (0 keeps nothing)",
            )?)
            .unwrap_or(usize::MAX),
            certificate_compression: self.certificate_compression(raw)?,
            ciphers: self.ciphers(raw)?,
        };
        Ok(server)
    }

    /// `server.cipher_suites` (suites tern implements, each once, at least one for TLS 1.3) and
    /// `server.cipher_order`.
    fn ciphers(&self, raw: &raw::Server) -> Result<CipherSettings, ConfigError> {
        let key = "server.cipher_suites";
        let suites = match &raw.cipher_suites {
            None => None,
            Some(names) => {
                let mut suites: Vec<rustls::SupportedCipherSuite> = Vec::with_capacity(names.len());
                for name in names {
                    let Some(suite) = crate::crypto::suite_named(name) else {
                        let known: Vec<&str> =
                            crate::crypto::provider().cipher_suites.iter().filter_map(|s| s.suite().as_str()).collect();
                        return Err(self.err(
                            key,
                            format!("{name:?} is not a suite tern offers; give some of {}", known.join(", ")),
                        ));
                    };
                    if suites.iter().any(|s| s.suite() == suite.suite()) {
                        return Err(self.err(key, format!("{name:?} is listed twice")));
                    }
                    suites.push(suite);
                }
                if !suites.iter().any(|s| matches!(s, rustls::SupportedCipherSuite::Tls13(_))) {
                    return Err(self.err(key, "lists no TLS 1.3 suite: TLS 1.3 clients could not connect"));
                }
                Some(suites.iter().map(|s| s.suite()).collect())
            }
        };
        let order = match raw.cipher_order.as_deref() {
            None | Some("server") => CipherOrder::Server,
            Some("client") => CipherOrder::Client,
            Some(other) => {
                return Err(self.err("server.cipher_order", format!("{other:?}: give \"server\" or \"client\"")));
            }
        };
        Ok(CipherSettings { suites, order })
    }

    /// `server.certificate_compression` (known algorithms, each once) and the bounds of its memo.
    fn certificate_compression(&self, raw: &raw::Server) -> Result<CompressionSettings, ConfigError> {
        let key = "server.certificate_compression";
        let algorithms = match &raw.certificate_compression {
            None => defaults::CERTIFICATE_COMPRESSION.to_vec(),
            Some(names) => {
                let mut algorithms = Vec::with_capacity(names.len());
                for name in names {
                    let algorithm = match name.as_str() {
                        "brotli" => CertCompression::Brotli,
                        "zlib" => CertCompression::Zlib,
                        other => return Err(self.err(key, format!("{other:?}: give \"brotli\" or \"zlib\""))),
                    };
                    if algorithms.contains(&algorithm) {
                        return Err(self.err(key, format!("{name:?} is listed twice")));
                    }
                    algorithms.push(algorithm);
                }
                algorithms
            }
        };
        let entries_key = "server.certificate_compression_cache_entries";
        let entries =
            raw.certificate_compression_cache_entries.unwrap_or(defaults::CERTIFICATE_COMPRESSION_CACHE_ENTRIES);
        if !(1..=defaults::MAX_CONNECTIONS_CEILING as u64).contains(&entries) {
            return Err(self.err(entries_key, format!("must be between 1 and {}", defaults::MAX_CONNECTIONS_CEILING)));
        }
        let bytes_key = "server.certificate_compression_cache_bytes";
        let bytes = self.size_within(
            bytes_key,
            raw.certificate_compression_cache_bytes.as_ref(),
            defaults::CERTIFICATE_COMPRESSION_CACHE_BYTES,
            64 << 10..=1 << 40,
            "must be between 64KiB and 1TiB",
        )?;
        if bytes / entries > u64::from(u32::MAX) {
            return Err(self.err(bytes_key, format!("more than 4 GiB per entry on average; raise {entries_key}")));
        }
        Ok(CompressionSettings { algorithms, cache_entries: entries, cache_bytes: bytes })
    }

    fn cache(&self, raw: &raw::Cache) -> Result<CacheSettings, ConfigError> {
        let cache = CacheSettings {
            max_entries: self.positive("cache.max_entries", raw.max_entries.unwrap_or(defaults::CACHE_MAX_ENTRIES))?,
            max_bytes: self.positive(
                "cache.max_bytes",
                self.size("cache.max_bytes", raw.max_bytes.as_ref(), defaults::CACHE_MAX_BYTES)?,
            )?,
            max_negative_entries: self.positive(
                "cache.max_negative_entries",
                raw.max_negative_entries.unwrap_or(defaults::CACHE_MAX_NEGATIVE_ENTRIES),
            )?,
            ttl: duration!(self.duration, "cache", raw.ttl, defaults::CACHE_TTL),
            max_ttl: duration!(self.duration, "cache", raw.max_ttl, defaults::CACHE_MAX_TTL),
            negative_ttl: duration!(self.duration, "cache", raw.negative_ttl, defaults::CACHE_NEGATIVE_TTL),
            max_stale: duration!(self.duration, "cache", raw.max_stale, defaults::CACHE_MAX_STALE),
            invalid_ttl: duration!(self.duration, "cache", raw.invalid_ttl, defaults::CACHE_INVALID_TTL),
        };
        if cache.ttl > cache.max_ttl {
            return Err(self.err("cache.ttl", "is longer than cache.max_ttl"));
        }
        if cache.max_bytes / cache.max_entries > u64::from(u32::MAX) {
            return Err(self.err("cache.max_bytes", "more than 4 GiB per entry on average; raise cache.max_entries"));
        }
        Ok(cache)
    }

    fn proxy(&self, raw: &raw::Proxy) -> Result<ProxySettings, ConfigError> {
        let proxy = ProxySettings {
            connect_timeout: duration!(self.deadline, "proxy", raw.connect_timeout, defaults::CONNECT_TIMEOUT),
            response_timeout: duration!(self.deadline, "proxy", raw.response_timeout, defaults::RESPONSE_TIMEOUT),
            pool_idle_timeout: duration!(self.duration, "proxy", raw.pool_idle_timeout, defaults::POOL_IDLE_TIMEOUT),
            max_connections_per_backend: self.count(
                "proxy.max_connections_per_backend",
                raw.max_connections_per_backend.unwrap_or(defaults::MAX_CONNECTIONS_PER_BACKEND),
                defaults::MAX_CONNECTIONS_CEILING,
            )?,
            max_backend_connections: self.count(
                "proxy.max_backend_connections",
                raw.max_backend_connections.unwrap_or(defaults::MAX_BACKEND_CONNECTIONS),
                defaults::MAX_CONNECTIONS_CEILING,
            )?,
            max_idle_per_client: self.count(
                "proxy.max_idle_per_client",
                raw.max_idle_per_client.unwrap_or(defaults::MAX_IDLE_PER_CLIENT),
                defaults::MAX_IDLE_PER_CLIENT_CEILING,
            )?,
            max_idle_per_backend: {
                let key = "proxy.max_idle_per_backend";
                let idle = raw.max_idle_per_backend.unwrap_or(defaults::MAX_IDLE_PER_BACKEND);
                if idle > defaults::MAX_CONNECTIONS_CEILING {
                    return Err(self.err(key, format!("must be at most {}", defaults::MAX_CONNECTIONS_CEILING)));
                }
                idle
            },
        };
        Ok(proxy)
    }

    fn invalidation(
        &self,
        raw: Option<raw::Invalidation>,
        redis: &[RedisSettings],
    ) -> Result<Option<InvalidationSettings>, ConfigError> {
        let invalidation = match raw {
            None => None,
            Some(i) => {
                if !redis.iter().any(|r| r.name == i.redis) {
                    return Err(self.err("invalidation.redis", format!("no [[redis]] named {:?}", i.redis)));
                }
                let channel = i.channel.unwrap_or_else(|| defaults::INVALIDATION_CHANNEL.to_string());
                Some(InvalidationSettings { store: i.redis, channel })
            }
        };
        Ok(invalidation)
    }

    fn admin(&self, a: raw::Admin) -> Result<AdminSettings, ConfigError> {
        let raw_bind = a.bind.unwrap_or_else(|| defaults::ADMIN_BIND.to_string());
        let bind =
            raw_bind.parse().map_err(|_| self.err("admin.bind", format!("{raw_bind:?} is not an address:port")))?;
        let token = a.token.map(|t| self.value("admin.token", t)).transpose()?;
        if token.as_deref() == Some("") {
            return Err(self.err("admin.token", "is empty: remove it, or give a long random token"));
        }
        let max_connections = self.count(
            "admin.max_connections",
            a.max_connections.unwrap_or(defaults::ADMIN_MAX_CONNECTIONS),
            defaults::MAX_CONNECTIONS_CEILING,
        )?;
        let request_head_timeout =
            duration!(self.deadline, "admin", a.request_head_timeout, defaults::ADMIN_REQUEST_HEAD_TIMEOUT);
        let connection_timeout =
            duration!(self.deadline, "admin", a.connection_timeout, defaults::ADMIN_CONNECTION_TIMEOUT);
        Ok(AdminSettings { bind, token, max_connections, request_head_timeout, connection_timeout })
    }

    fn reload(&self, raw: &raw::Reload) -> Result<ReloadSettings, ConfigError> {
        let watch_interval = duration!(self.deadline, "reload", raw.watch_interval, defaults::WATCH_INTERVAL);
        Ok(ReloadSettings { watch: raw.watch, watch_interval })
    }

    pub(super) fn resumption(
        &self,
        r: raw::Resumption,
        redis: &[RedisSettings],
    ) -> Result<ResumptionSettings, ConfigError> {
        let fallback = ResumptionSettings::default();
        if let Some(store) = &r.redis
            && !redis.iter().any(|s| &s.name == store)
        {
            return Err(self.err("resumption.redis", format!("no [[redis]] named {store:?}")));
        }
        let secret = r.secret.map(|value| self.secret("resumption.secret", value)).transpose()?;
        if r.redis.is_some() && secret.is_none() {
            return Err(self.err(
                "resumption.secret",
                "missing: sessions and ticket keys are sealed in Redis with it; \
                 e.g. secret = { env = \"TERN_RESUMPTION_SECRET\" }",
            ));
        }
        let rotation = duration!(self.deadline, "resumption", r.ticket_rotation, fallback.ticket_rotation);
        let lifetime = duration!(self.duration, "resumption", r.ticket_lifetime, fallback.ticket_lifetime);
        if lifetime < rotation {
            return Err(self.err("resumption.ticket_lifetime", "is shorter than resumption.ticket_rotation"));
        }
        if lifetime > Duration::from_secs(7 * 24 * 3600) {
            return Err(self.err("resumption.ticket_lifetime", "TLS allows at most 7 days"));
        }
        let session_lifetime = duration!(self.deadline, "resumption", r.session_lifetime, fallback.session_lifetime);
        let tls13_tickets = r.tls13_tickets.unwrap_or(fallback.tls13_tickets);
        if tls13_tickets > defaults::TLS13_TICKETS_MAX {
            return Err(self.err(
                "resumption.tls13_tickets",
                format!("{tls13_tickets}: at most {} tickets per handshake", defaults::TLS13_TICKETS_MAX),
            ));
        }
        let prefix = r.prefix.unwrap_or(fallback.prefix);
        if prefix.is_empty() || prefix.contains(char::is_whitespace) {
            return Err(self.err("resumption.prefix", "must be non-empty, without spaces"));
        }
        Ok(ResumptionSettings {
            store: r.redis,
            secret,
            prefix,
            tickets: r.tickets.unwrap_or(true),
            tls13_tickets,
            ticket_rotation: rotation,
            ticket_lifetime: lifetime,
            session_lifetime,
            node: r.node.unwrap_or(fallback.node),
        })
    }

    pub(super) fn redis(&self, raw: Vec<raw::Redis>) -> Result<Vec<RedisSettings>, ConfigError> {
        self.entries(
            "redis",
            raw,
            |r| &r.name,
            |key, r| {
                if r.urls.is_empty() || (!r.cluster && r.urls.len() > 1) {
                    return Err(self.err(format!("{key}.urls"), "one URL, or several with cluster = true"));
                }
                for url in &r.urls {
                    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                        return Err(self.err(format!("{key}.urls"), format!("{url:?}: expected redis://host:port")));
                    }
                }
                let timeout = self.deadline(&format!("{key}.timeout"), r.timeout.as_ref(), defaults::REDIS_TIMEOUT)?;
                Ok(RedisSettings { name: r.name, urls: r.urls, cluster: r.cluster, timeout })
            },
        )
    }
}
