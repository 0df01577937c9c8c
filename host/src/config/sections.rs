//! Validation of the sections that list entries: static certificates, plugins and listeners.

use super::validate::Validator;
use super::*;
use crate::sni::ServerName;

impl Validator<'_> {
    pub(super) fn certificates(&self, raw: Vec<raw::Certificate>) -> Result<Vec<StaticCertSettings>, ConfigError> {
        self.entries(
            "certificate",
            raw,
            |c| &c.name,
            |key, c| {
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
            },
        )
    }

    pub(super) fn plugins(
        &self,
        raw: Vec<raw::Plugin>,
        redis: &[RedisSettings],
        upstreams: &[UpstreamSettings],
    ) -> Result<Vec<PluginSettings>, ConfigError> {
        self.entries("plugin", raw, |p| &p.name, |_, p| self.plugin(p, redis, upstreams))
    }

    fn plugin(
        &self,
        p: raw::Plugin,
        redis: &[RedisSettings],
        upstreams: &[UpstreamSettings],
    ) -> Result<PluginSettings, ConfigError> {
        let key = format!("plugin {:?}", p.name);
        let timeout = self.deadline(&format!("{key}.timeout"), p.timeout.as_ref(), defaults::PLUGIN_TIMEOUT)?;
        // Below one Wasm page nothing can run; above 4 GiB is beyond 32-bit linear memory.
        let memory_limit = self.size_within(
            &format!("{key}.memory_limit"),
            p.memory_limit.as_ref(),
            defaults::PLUGIN_MEMORY_LIMIT as u64,
            64 << 10..=4 << 30,
            "must be between 64KiB and 4GiB",
        )?;
        let max_concurrency = self.positive(
            &format!("{key}.max_concurrency"),
            p.max_concurrency.unwrap_or(defaults::PLUGIN_MAX_CONCURRENCY),
        )?;
        // Each spare holds a pool slot and its memory: more than the calls that can run at once is waste. A plugin
        // granted a directory gets none by default: a spare opens the directory when it is made, so a directory
        // swapped in place (a symlink flipped to a new release) would reach a later call through a spare made
        // before the swap; every call opens it afresh instead.
        let default_spares = if p.grants.files.is_some() { 0 } else { defaults::PLUGIN_SPARE_INSTANCES };
        let spare_instances = p.spare_instances.unwrap_or(default_spares.min(max_concurrency));
        if spare_instances > max_concurrency {
            return Err(self.err(
                format!("{key}.spare_instances"),
                format!("must be at most max_concurrency ({max_concurrency}); 0 makes none"),
            ));
        }
        let settings = p
            .settings
            .into_iter()
            .map(|(k, v)| Ok((k.clone(), self.value(&format!("{key}.settings.{k}"), v)?)))
            .collect::<Result<_, _>>()?;
        let files = p.grants.files.map(|dir| self.path(&dir));
        let kv = p.grants.kv.map(|grant| self.kv_grant(&key, grant, redis)).transpose()?;
        let http = p.grants.http.map(|grant| self.http_grant(&key, grant)).transpose()?;
        let origin_ca = p.grants.routes.as_ref().and_then(|r| r.origin_ca.as_deref()).map(|ca| self.path(ca));
        let origin_h2 = p.grants.routes.as_ref().and_then(|r| r.origin_h2).unwrap_or(false);
        let routes = self.route_grant(&key, p.grants.routes.unwrap_or_default(), upstreams)?;
        let (max_calls_per_second, max_calls_per_second_per_client) =
            self.call_rates(&key, p.max_calls_per_second, p.max_calls_per_second_per_client)?;
        Ok(PluginSettings {
            name: p.name,
            path: self.path(&p.path),
            timeout,
            memory_limit: usize::try_from(memory_limit).unwrap_or(usize::MAX),
            max_concurrency,
            spare_instances,
            max_calls_per_second,
            max_calls_per_second_per_client,
            breaker_threshold: p.breaker_threshold.unwrap_or(defaults::BREAKER_THRESHOLD),
            breaker_cooldown: self.duration(
                &format!("{key}.breaker_cooldown"),
                p.breaker_cooldown.as_ref(),
                defaults::BREAKER_COOLDOWN,
            )?,
            settings,
            grants: Grants { files, kv, http, routes, origin_ca, origin_h2 },
            probe_names: p.probe_names,
            on_swap: p.on_swap,
        })
    }

    /// The call-rate cap and its per-client share (by default a quarter of the cap).
    fn call_rates(
        &self,
        key: &str,
        cap: Option<u32>,
        share: Option<u32>,
    ) -> Result<(Option<u32>, Option<u32>), ConfigError> {
        if cap == Some(0) {
            return Err(
                self.err(format!("{key}.max_calls_per_second"), "must be greater than zero (omit it for no cap)")
            );
        }
        let share = match (cap, share) {
            (_, Some(0)) => {
                return Err(self.err(format!("{key}.max_calls_per_second_per_client"), "must be greater than zero"));
            }
            (None, Some(_)) => {
                return Err(self.err(
                    format!("{key}.max_calls_per_second_per_client"),
                    "is a share of max_calls_per_second: set that too",
                ));
            }
            (Some(cap), None) => Some((cap / 4).max(1)),
            (_, share) => share,
        };
        Ok((cap, share))
    }

    /// `client_ca` and `client_auth`: mutual TLS, required unless `client_auth = "optional"`.
    fn client_auth(
        &self,
        key: &str,
        ca: Option<String>,
        mode: Option<&str>,
    ) -> Result<Option<ClientAuth>, ConfigError> {
        let required = match mode {
            None | Some("required") => true,
            Some("optional") => false,
            Some(other) => {
                return Err(
                    self.err(format!("{key}.client_auth"), format!("{other:?}: expected \"required\" or \"optional\""))
                );
            }
        };
        match ca {
            Some(ca) => Ok(Some(ClientAuth { ca: self.path(&ca), required })),
            None if mode.is_some() => Err(self.err(format!("{key}.client_auth"), "needs client_ca (the CAs to trust)")),
            None => Ok(None),
        }
    }

    fn proxy_protocol(&self, key: &str, raw: raw::ProxyProtocol) -> Result<ProxyProtocolSettings, ConfigError> {
        let key = format!("{key}.proxy_protocol.trusted");
        if raw.trusted.is_empty() {
            return Err(self.err(key, "list the load balancers' addresses or networks that may send the header"));
        }
        let trusted = raw.trusted.iter().map(|t| t.parse().map_err(|m| self.err(&key, m))).collect::<Result<_, _>>()?;
        Ok(ProxyProtocolSettings { trusted, required: raw.required.unwrap_or(true) })
    }

    /// `listener.admission`: every limit on by default; a burst defaults to two seconds of its rate.
    fn admission(&self, key: &str, raw: raw::Admission) -> Result<AdmissionSettings, ConfigError> {
        let key = format!("{key}.admission");
        let ceiling = defaults::ADMISSION_RATE_CEILING as usize;
        let limits =
            |kind: &str, rate: Option<u32>, burst: Option<u32>, concurrent: Option<u32>, default: (u32, u32)| {
                let field = |name: &str| format!("{key}.{kind}_{name}");
                let new_per_second =
                    self.count(&field("new_per_second"), rate.unwrap_or(default.0) as usize, ceiling)?;
                let two_seconds =
                    new_per_second.saturating_mul(defaults::ADMISSION_BURST_SECONDS as usize).min(ceiling);
                let burst = self.count(&field("burst"), burst.map_or(two_seconds, |b| b as usize), ceiling)?;
                let concurrent = self.count(
                    &field("concurrent"),
                    concurrent.unwrap_or(default.1) as usize,
                    defaults::MAX_CONNECTIONS_CEILING,
                )?;
                // Each is at most its ceiling (10,000,000), which fits a u32.
                let [new_per_second, burst, concurrent] = [new_per_second, burst, concurrent].map(|n| n as u32);
                Ok::<_, ConfigError>(KeyLimits { new_per_second, burst, concurrent })
            };
        let address = limits(
            "address",
            raw.address_new_per_second,
            raw.address_burst,
            raw.address_concurrent,
            (defaults::ADMISSION_ADDRESS_NEW_PER_SECOND, defaults::ADMISSION_ADDRESS_CONCURRENT),
        )?;
        let prefix = limits(
            "prefix",
            raw.prefix_new_per_second,
            raw.prefix_burst,
            raw.prefix_concurrent,
            (defaults::ADMISSION_PREFIX_NEW_PER_SECOND, defaults::ADMISSION_PREFIX_CONCURRENT),
        )?;
        let exempt_key = format!("{key}.exempt");
        let exempt = match raw.exempt {
            None => defaults::ADMISSION_EXEMPT.iter().map(|net| net.to_string()).collect(),
            Some(list) => list,
        };
        let exempt =
            exempt.iter().map(|net| net.parse().map_err(|m| self.err(&exempt_key, m))).collect::<Result<_, _>>()?;
        let max_tracked = raw.max_tracked.unwrap_or(defaults::ADMISSION_MAX_TRACKED);
        if !(crate::admission::SHARDS..=defaults::ADMISSION_MAX_TRACKED_CEILING).contains(&max_tracked) {
            return Err(self.err(
                format!("{key}.max_tracked"),
                format!("must be between {} and {}", crate::admission::SHARDS, defaults::ADMISSION_MAX_TRACKED_CEILING),
            ));
        }
        Ok(AdmissionSettings { address, prefix, exempt, max_tracked })
    }

    fn kv_grant(&self, key: &str, grant: raw::KvGrant, redis: &[RedisSettings]) -> Result<KvGrant, ConfigError> {
        if !redis.iter().any(|r| r.name == grant.redis) {
            return Err(self.err(format!("{key}.grants.kv.redis"), format!("no [[redis]] named {:?}", grant.redis)));
        }
        if grant.prefixes.is_empty() {
            return Err(self.err(
                format!("{key}.grants.kv.prefixes"),
                "list the key prefixes the plugin may read ([\"\"] for every key)",
            ));
        }
        Ok(KvGrant { store: grant.redis, prefixes: grant.prefixes })
    }

    fn route_grant(
        &self,
        key: &str,
        grant: raw::RouteGrant,
        upstreams: &[UpstreamSettings],
    ) -> Result<crate::route::RouteGrants, ConfigError> {
        use crate::route::Pattern;
        if let Some(pool) = grant.pools.iter().find(|p| !upstreams.iter().any(|u| &u.name == *p)) {
            return Err(self.err(format!("{key}.grants.routes.pools"), format!("no [[upstream]] named {pool:?}")));
        }
        let patterns = |what: &str, list: &[String], parse: fn(&str) -> Result<Pattern, String>| {
            list.iter()
                .map(|p| parse(p).map_err(|m| self.err(format!("{key}.grants.routes.{what}"), m)))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(crate::route::RouteGrants {
            pools: grant.pools.clone(),
            origins: patterns("origins", &grant.origins, Pattern::origin)?,
            passthrough: patterns("passthrough", &grant.passthrough, Pattern::target)?,
        })
    }

    pub(super) fn upstreams(
        &self,
        raw: Vec<raw::Upstream>,
        proxy: &ProxySettings,
    ) -> Result<Vec<UpstreamSettings>, ConfigError> {
        self.entries("upstream", raw, |u| &u.name, |key, u| self.upstream(&key, u, proxy))
    }

    fn upstream(&self, key: &str, u: raw::Upstream, proxy: &ProxySettings) -> Result<UpstreamSettings, ConfigError> {
        if u.servers.is_empty() {
            return Err(self.err(format!("{key}.servers"), "list at least one host:port"));
        }
        for server in &u.servers {
            crate::route::parse_origin(&format!("http://{server}"))
                .ok()
                .filter(|o| server.ends_with(&format!(":{}", o.port)))
                .ok_or_else(|| self.err(format!("{key}.servers"), format!("{server:?} is not host:port")))?;
        }
        let health_check = u.health_check.map(|h| self.health_check(key, h)).transpose()?;
        let tls = match (u.tls.unwrap_or(false), u.ca) {
            (true, ca) => Some(PoolTls { ca: ca.map(|ca| self.path(&ca)) }),
            (false, None) => None,
            (false, Some(_)) => return Err(self.err(format!("{key}.ca"), "verifies TLS servers: set tls = true")),
        };
        Ok(UpstreamSettings {
            tls,
            name: u.name,
            servers: u.servers,
            balance: u.balance.unwrap_or_default(),
            connect_timeout: self.deadline(
                &format!("{key}.connect_timeout"),
                u.connect_timeout.as_ref(),
                proxy.connect_timeout,
            )?,
            response_timeout: self.deadline(
                &format!("{key}.response_timeout"),
                u.response_timeout.as_ref(),
                proxy.response_timeout,
            )?,
            max_connections_per_server: self.positive(
                &format!("{key}.max_connections_per_server"),
                u.max_connections_per_server.unwrap_or(proxy.max_connections_per_backend),
            )?,
            max_fails: u.max_fails.unwrap_or(defaults::UPSTREAM_MAX_FAILS),
            fail_timeout: self.duration(
                &format!("{key}.fail_timeout"),
                u.fail_timeout.as_ref(),
                defaults::UPSTREAM_FAIL_TIMEOUT,
            )?,
            retries: u.retries.unwrap_or(defaults::UPSTREAM_RETRIES),
            protocol: u.protocol.unwrap_or_default(),
            health_check,
            proxy_protocol: u.proxy_protocol,
        })
    }

    fn health_check(&self, key: &str, h: raw::HealthCheck) -> Result<HealthCheckSettings, ConfigError> {
        let key = format!("{key}.health_check");
        let path = h.path.unwrap_or_else(|| defaults::HEALTH_PATH.into());
        if !path.starts_with('/') || path.parse::<http::uri::PathAndQuery>().is_err() {
            return Err(self.err(format!("{key}.path"), format!("{path:?} is not a request path")));
        }
        let expected_status = h.expected_status.unwrap_or(200);
        if !(100..=599).contains(&expected_status) {
            return Err(self.err(format!("{key}.expected_status"), "must be an HTTP status (100-599)"));
        }
        Ok(HealthCheckSettings {
            path,
            interval: self.deadline(&format!("{key}.interval"), h.interval.as_ref(), defaults::HEALTH_INTERVAL)?,
            timeout: self.deadline(&format!("{key}.timeout"), h.timeout.as_ref(), defaults::HEALTH_TIMEOUT)?,
            expected_status,
            rise: self.positive(&format!("{key}.rise"), h.rise.unwrap_or(defaults::HEALTH_RISE))?,
            fall: self.positive(&format!("{key}.fall"), h.fall.unwrap_or(defaults::HEALTH_FALL))?,
        })
    }

    fn http_grant(&self, key: &str, grant: raw::HttpGrant) -> Result<HttpGrant, ConfigError> {
        let allow = grant
            .allow
            .iter()
            .map(|a| normalise_authority(a).map_err(|m| self.err(format!("{key}.grants.http.allow"), m)))
            .collect::<Result<_, _>>()?;
        let timeout_key = format!("{key}.grants.http.timeout");
        let timeout = self.deadline(&timeout_key, grant.timeout.as_ref(), defaults::HTTP_TIMEOUT)?;
        let max_response_bytes = self.size(
            &format!("{key}.grants.http.max_response_bytes"),
            grant.max_response_bytes.as_ref(),
            defaults::HTTP_MAX_RESPONSE_BYTES,
        )?;
        Ok(HttpGrant { allow, timeout, max_response_bytes })
    }

    pub(super) fn listeners(
        &self,
        raw: Vec<raw::Listener>,
        certificates: &[StaticCertSettings],
        plugins: &[PluginSettings],
    ) -> Result<Vec<ListenerSettings>, ConfigError> {
        if raw.is_empty() {
            return Err(self.err("listener", "at least one [[listener]] is required"));
        }
        let named =
            raw.into_iter().enumerate().map(|(i, l)| (l.name.clone().unwrap_or_else(|| format!("listener-{i}")), l));
        self.entries(
            "listener",
            named.collect(),
            |(name, _)| name,
            |key, (name, l)| {
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
                let client_auth = self.client_auth(&key, l.client_ca, l.client_auth.as_deref())?;
                let proxy_protocol = l.proxy_protocol.map(|pp| self.proxy_protocol(&key, pp)).transpose()?;
                let admission = self.admission(&key, l.admission.unwrap_or_default())?;
                let ja4_header = self.ja4_header(&key, l.ja4_header)?;
                Ok(ListenerSettings {
                    name,
                    bind,
                    plugin: l.plugin,
                    fallback,
                    alpn,
                    backend,
                    client_auth,
                    proxy_protocol,
                    admission,
                    ja4_header,
                    backend_proxy_protocol: l.backend_proxy_protocol,
                })
            },
        )
    }
}

/// A server name or a `*.` wildcard pattern from the config, normalised.
pub(super) fn normalise_pattern(raw: &str) -> Result<String, String> {
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

pub(super) fn parse_backend(raw: &str) -> Result<http::Uri, String> {
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
