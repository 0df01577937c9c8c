//! Choosing the certificate for one handshake: static certificates, then the cache, then the plugin, then the
//! listener's fallback. Runs as async code after the ClientHello was read, never inside rustls's synchronous
//! resolver.

use std::collections::HashMap;
use std::sync::Arc;

use crate::answer::{Choice, Served};
use crate::cache::{Answer, CacheKey, Cached, CertCache, Loaded, Lookup};
use crate::certs::{self, CertError};
use crate::config::StaticCertSettings;
use crate::failure::{Blame, FailureKind, event_at};
use crate::metrics::{Metrics, inc};
use crate::plugin::{Contract, Plugin, PluginError, PluginSlot, RouteRequest, Selection};
use crate::route::RouteError;
use crate::sni::{MalformedName, ServerName};

/// Why no certificate was chosen. The handshake then fails with a TLS alert.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SelectError {
    /// The client sent no SNI and the listener is strict.
    #[error("client sent no server name and the listener is strict")]
    NoServerName,
    /// The SNI is not a valid host name.
    #[error("malformed server name: {0}")]
    Malformed(MalformedName),
    /// Nobody has a certificate for the name and the listener is strict.
    #[error("no certificate for {servername} and the listener is strict")]
    UnknownName {
        /// The name asked for.
        servername: ServerName,
    },
    /// A store the plugin reads from is down, or the plugin's rate cap or circuit breaker shed the call, and the
    /// listener is strict.
    #[error("plugin {plugin} unavailable for {servername}: {source}")]
    Unavailable {
        /// Plugin name.
        plugin: Arc<str>,
        /// The name asked for.
        servername: ServerName,
        /// What happened.
        source: PluginError,
    },
    /// The plugin failed (error, trap, timeout, memory cap).
    #[error("plugin {plugin} failed for {servername}: {source}")]
    Plugin {
        /// Plugin name.
        plugin: Arc<str>,
        /// The name asked for.
        servername: ServerName,
        /// What happened.
        source: PluginError,
    },
    /// The plugin's certificate is unusable (bad PEM, key mismatch, wrong name).
    #[error("plugin {plugin} returned an unusable certificate for {servername}: {source}")]
    BadCertificate {
        /// Plugin name.
        plugin: Arc<str>,
        /// The name asked for.
        servername: ServerName,
        /// What is wrong with it.
        source: CertError,
    },
    /// No ACME certificate for the name (yet), and the listener is strict.
    #[error("no ACME certificate for {servername}: {source}")]
    Acme {
        /// The name asked for.
        servername: ServerName,
        /// Why.
        source: crate::acme::AcmeError,
    },
    /// A TLS-ALPN-01 validation handshake for a name no order is validating.
    #[error("no ACME challenge for {servername}")]
    NoChallenge {
        /// The name asked for.
        servername: String,
    },
    /// The plugin's route or passthrough target is malformed or outside its `grants.routes`.
    #[error("plugin {plugin} returned a route it may not use for {servername}: {source}")]
    BadRoute {
        /// Plugin name.
        plugin: Arc<str>,
        /// The name asked for.
        servername: ServerName,
        /// What is wrong with it.
        source: RouteError,
    },
}

impl SelectError {
    /// Metric and log label; one per variant.
    pub fn kind(&self) -> FailureKind {
        match self {
            SelectError::NoServerName => FailureKind::NoSni,
            SelectError::Malformed(_) => FailureKind::MalformedSni,
            SelectError::UnknownName { .. } => FailureKind::UnknownName,
            SelectError::Unavailable { .. } => FailureKind::PluginUnavailable,
            SelectError::Plugin { .. } => FailureKind::Plugin,
            SelectError::BadCertificate { .. } => FailureKind::BadCertificate,
            SelectError::BadRoute { .. } => FailureKind::BadRoute,
            SelectError::Acme { source, .. } if source.client_provoked() => FailureKind::AcmePending,
            SelectError::Acme { .. } => FailureKind::AcmeFailed,
            SelectError::NoChallenge { .. } => FailureKind::NoChallenge,
        }
    }

    /// Whose fault it was.
    pub fn blame(&self) -> Blame {
        self.kind().blame()
    }

    /// How loudly to log it: client faults at info (routine on the internet), plugin faults and store outages at
    /// warn, calls the rate cap or breaker shed at debug (the breaker logs when it opens, the counters count every
    /// shed call: a flood of them must not flood the log).
    pub(crate) fn level(&self) -> tracing::Level {
        match self {
            SelectError::Unavailable { source, .. } if source.is_shed() => tracing::Level::DEBUG,
            _ if self.blame() == Blame::Client => tracing::Level::INFO,
            _ => tracing::Level::WARN,
        }
    }
}

/// Where a chosen certificate came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A `[[certificate]]` serving the name.
    Static,
    /// The cache, without calling the plugin.
    CacheHit,
    /// The cache, past the entry's TTL, because refreshing it failed.
    Stale,
    /// The plugin, just now (or a concurrent call to it for the same name).
    Plugin,
    /// The listener's default certificate.
    Default,
    /// A certificate obtained through ACME.
    Acme,
}

/// A listener's selection policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The listener's name (0.2 plugins are told it).
    pub listener: Arc<str>,
    /// The plugin asked about names static certificates do not serve (its current build).
    pub plugin: Option<Arc<PluginSlot>>,
    /// The default certificate; `None` is strict mode.
    pub default: Option<Arc<Served>>,
}

/// Static certificates, by the names they serve.
#[derive(Debug, Default)]
pub struct StaticCerts {
    /// By server name or `*.` wildcard pattern.
    by_pattern: HashMap<String, Arc<Served>>,
    /// By the certificate's name in the config.
    by_id: HashMap<String, Arc<Served>>,
}

/// A static certificate that cannot serve.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StaticCertError {
    /// Its files could not be loaded.
    #[error("certificate {name:?}: {source}")]
    Load {
        /// Its name in the config.
        name: String,
        /// What went wrong.
        source: certs::CertLoadError,
    },
    /// It is listed for a name it does not cover.
    #[error("certificate {name:?}: names: {source}")]
    Coverage {
        /// Its name in the config.
        name: String,
        /// The mismatch.
        source: CertError,
    },
}

impl StaticCerts {
    /// Loads and checks static certificates. Reads files: call it off the async workers.
    pub fn load(settings: &[StaticCertSettings]) -> Result<Self, StaticCertError> {
        let mut certs = StaticCerts::default();
        for s in settings {
            let parsed = certs::load_files(&s.cert, &s.key)
                .map_err(|source| StaticCertError::Load { name: s.name.clone(), source })?;
            let served = Arc::new(Served::single(Arc::new(parsed)));
            let parsed = served.primary();
            let patterns = s.serve_names.clone().unwrap_or_else(|| parsed.dns_names.clone());
            for pattern in patterns {
                // A wildcard pattern is checked through a name it must cover.
                let Ok(probe) = ServerName::probe_for_pattern(&pattern) else {
                    continue;
                };
                parsed
                    .check_covers(&probe)
                    .map_err(|source| StaticCertError::Coverage { name: s.name.clone(), source })?;
                certs.by_pattern.insert(pattern, served.clone());
            }
            certs.by_id.insert(s.name.clone(), served);
        }
        Ok(certs)
    }

    /// The static certificate named `id` in the config.
    pub fn by_id(&self, id: &str) -> Option<&Arc<Served>> {
        self.by_id.get(id)
    }

    /// The static certificate serving `name`: an exact entry, else the wildcard one label up.
    pub(crate) fn lookup(&self, name: &ServerName) -> Option<&Arc<Served>> {
        if self.by_pattern.is_empty() {
            return None; // plugin-only listeners: no hashing, no wildcard string per handshake
        }
        self.by_pattern.get(name.as_str()).or_else(|| self.by_pattern.get(&name.wildcard()?))
    }
}

/// Chooses certificates. One per process, shared by all listeners.
#[derive(Debug)]
pub struct Selector {
    statics: StaticCerts,
    cache: CertCache,
    metrics: Arc<Metrics>,
    acme: Option<Arc<crate::acme::Acme>>,
}

/// Why a plugin load failed, before it is tied to a name for reporting.
#[derive(Debug)]
enum LoadFailure {
    Plugin(PluginError),
    Certificate(CertError),
    /// Never cached: a route outside the grants is refused afresh each time.
    Route(RouteError),
}

impl Selector {
    /// A selector over these static certificates and this cache.
    pub fn new(statics: StaticCerts, cache: CertCache, metrics: Arc<Metrics>) -> Self {
        Self { statics, cache, metrics, acme: None }
    }

    /// Serves names plugins answer `obtain` for, and `acme.names`, with certificates from `acme`.
    pub fn with_acme(mut self, acme: Arc<crate::acme::Acme>) -> Self {
        self.acme = Some(acme);
        self
    }

    /// The ACME subsystem, if configured.
    pub fn acme(&self) -> Option<&Arc<crate::acme::Acme>> {
        self.acme.as_ref()
    }

    /// The static certificates.
    pub fn statics(&self) -> &StaticCerts {
        &self.statics
    }

    /// The plugin-answer cache.
    pub fn cache(&self) -> &CertCache {
        &self.cache
    }

    /// Chooses the certificate for a ClientHello's SNI (`None`: the client sent none).
    pub async fn select(&self, policy: &Policy, sni: Option<&str>) -> Result<(Choice, Source), SelectError> {
        self.select_for(policy, sni, None).await
    }

    /// Like [`Selector::select`], for a handshake from `client`.
    pub async fn select_for(
        &self,
        policy: &Policy,
        sni: Option<&str>,
        client: Option<std::net::IpAddr>,
    ) -> Result<(Choice, Source), SelectError> {
        let Some(raw) = sni else {
            return self.fallback(policy, SelectError::NoServerName);
        };
        let name = ServerName::parse(raw).map_err(SelectError::Malformed)?;
        let started = std::time::Instant::now();
        if let Some(cert) = self.statics.lookup(&name) {
            self.metrics.selection_hit.observe(started.elapsed());
            inc(&self.metrics.static_hits);
            return Ok((Choice::Serve(cert.clone()), Source::Static));
        }
        if let Some(acme) = &self.acme
            && acme.is_listed(&name)
        {
            return Box::pin(self.obtained(policy, name, Arc::new(crate::route::Route::Listener))).await;
        }
        let Some(slot) = &policy.plugin else {
            return self.fallback(policy, SelectError::UnknownName { servername: name });
        };
        let plugin = &slot.current();
        let listener = (plugin.contract() != Contract::V0_1).then(|| policy.listener.clone());
        let key = CacheKey { plugin: plugin.cache_scope().clone(), listener, name: name.clone() };
        // Called only for a stale entry: the clones the background refresh owns are not made on a fresh hit.
        let revalidate = |key: CacheKey| {
            let (cache, metrics, plugin) = (self.cache.clone(), self.metrics.clone(), plugin.clone());
            let listener = policy.listener.clone();
            async move {
                let name = key.name.clone();
                let refreshed = cache.get_or_load(key, load(&plugin, &name, &listener, client)).await;
                report_refresh(&metrics, &plugin, &name, refreshed);
            }
        };
        let loading = load(plugin, &name, &policy.listener, client);
        let loaded = match self.cache.get_or_load_revalidating(key, loading, revalidate).await {
            Ok(loaded) => loaded,
            // A store outage is not the name's fault: the listener's fallback applies, as for an unknown name.
            Err(failure) => match describe(plugin, &name, &failure) {
                outage @ SelectError::Unavailable { .. } => {
                    let what = match &outage {
                        SelectError::Unavailable { source, .. } if source.is_shed() => "plugin call shed",
                        _ => "store unavailable",
                    };
                    event_at!(outage.level(), servername = %name, cause = %outage, "{what}, applying the listener's fallback");
                    return self.fallback(policy, outage);
                }
                other => return Err(other),
            },
        };
        let latency =
            if loaded.lookup == Lookup::Miss { &self.metrics.selection_miss } else { &self.metrics.selection_hit };
        latency.observe(started.elapsed());
        if loaded.lookup == Lookup::Stale {
            // Served past its TTL while a refresh runs in the background (stale-while-revalidate).
            inc(&self.metrics.stale_serves);
        }
        if let Cached::Obtain { route, .. } = &loaded.value {
            inc(if loaded.lookup == Lookup::Miss { &self.metrics.cache_misses } else { &self.metrics.cache_hits });
            let route = route.clone();
            return Box::pin(self.obtained(policy, name, route)).await;
        }
        self.answer(policy, plugin, name, loaded)
    }

    /// The selection a cached (or just loaded) answer makes.
    fn answer(
        &self,
        policy: &Policy,
        plugin: &Plugin,
        name: ServerName,
        loaded: Loaded<Arc<LoadFailure>>,
    ) -> Result<(Choice, Source), SelectError> {
        let (lookup, source) = match loaded.lookup {
            Lookup::Hit => (&self.metrics.cache_hits, Source::CacheHit),
            Lookup::Stale => (&self.metrics.cache_hits, Source::Stale),
            Lookup::Miss => (&self.metrics.cache_misses, Source::Plugin),
        };
        match loaded.value {
            Cached::Found { served, .. } => {
                inc(lookup);
                Ok((Choice::Serve(served), source))
            }
            Cached::Passthrough { target, .. } => {
                inc(lookup);
                Ok((Choice::Passthrough(target), source))
            }
            Cached::Invalid { error, .. } => {
                inc(lookup);
                if source == Source::Plugin {
                    count_invalid(&self.metrics, &error);
                }
                Err(describe(plugin, &name, &LoadFailure::Certificate(error)))
            }
            // Handled by `obtained` before: the certificate comes from ACME.
            Cached::Obtain { .. } => self.fallback(policy, SelectError::UnknownName { servername: name }),
            Cached::NotFound { .. } => {
                inc(if source == Source::Plugin {
                    &self.metrics.cache_misses
                } else {
                    &self.metrics.cache_negative_hits
                });
                self.fallback(policy, SelectError::UnknownName { servername: name })
            }
        }
    }

    /// A name whose certificate comes from ACME (the plugin permitted it, or `acme.names` lists it), sent along
    /// `route`. Until it is issued (or while its order fails) the listener's fallback applies.
    async fn obtained(
        &self,
        policy: &Policy,
        name: ServerName,
        route: Arc<crate::route::Route>,
    ) -> Result<(Choice, Source), SelectError> {
        let Some(acme) = &self.acme else {
            let error = SelectError::Acme { servername: name, source: crate::acme::AcmeError::NotConfigured };
            tracing::warn!(cause = %error, "applying the listener's fallback");
            return self.fallback(policy, error);
        };
        match acme.certificate(&name).await {
            Ok(cert) => {
                let served = Served::new(vec![cert], (*route).clone());
                // `new` refuses only an empty set.
                let served = served.map(Arc::new).ok_or(SelectError::UnknownName { servername: name })?;
                Ok((Choice::Serve(served), Source::Acme))
            }
            Err(source) => {
                let error = SelectError::Acme { servername: name, source };
                event_at!(error.level(), cause = %error, "no ACME certificate yet, applying the listener's fallback");
                self.fallback(policy, error)
            }
        }
    }

    fn fallback(&self, policy: &Policy, strict_error: SelectError) -> Result<(Choice, Source), SelectError> {
        match &policy.default {
            Some(cert) => {
                inc(&self.metrics.default_served);
                Ok((Choice::Serve(cert.clone()), Source::Default))
            }
            None => Err(strict_error),
        }
    }
}

fn count_invalid(metrics: &Metrics, error: &CertError) {
    if matches!(error.innermost(), CertError::Expired { .. } | CertError::NotYetValid { .. }) {
        inc(&metrics.certificates_out_of_validity);
    }
}

/// Logs what became of a background refresh of a stale entry: refused or failed, the stale answer stays (within
/// `cache.max_stale`) and the next handshake past its TTL tries again.
fn report_refresh(
    metrics: &Metrics,
    plugin: &Plugin,
    name: &ServerName,
    refreshed: Result<Loaded<Arc<LoadFailure>>, Arc<LoadFailure>>,
) {
    let loaded = match refreshed {
        Ok(loaded) => loaded,
        // No stale entry was left (it expired or was invalidated meanwhile): nothing is served past its TTL.
        Err(failure) => {
            let cause = describe(plugin, name, &failure);
            tracing::debug!(servername = %name, %cause, "background refresh failed");
            return;
        }
    };
    if let Some(failure) = &loaded.refresh_error {
        let cause = describe(plugin, name, failure);
        tracing::warn!(servername = %name, %cause, "refresh failed, serving the cached answer past its TTL");
    }
    if let Some(refused) = &loaded.refresh_invalid {
        count_invalid(metrics, refused);
        let cause = describe(plugin, name, &LoadFailure::Certificate(refused.clone()));
        tracing::warn!(servername = %name, %cause, "refreshed certificate refused, serving the cached one past its TTL");
    }
}

/// The selection error a failed load makes: store outages and shed calls are "unavailable" (the listener's
/// fallback applies), other plugin failures and refused certificates fail the handshake.
fn describe(plugin: &Plugin, name: &ServerName, failure: &LoadFailure) -> SelectError {
    let (plugin, servername) = (plugin.name().clone(), name.clone());
    match failure {
        LoadFailure::Plugin(source @ (PluginError::StoreUnavailable(_) | PluginError::Shed(_))) => {
            SelectError::Unavailable { plugin, servername, source: source.clone() }
        }
        LoadFailure::Plugin(source) => SelectError::Plugin { plugin, servername, source: source.clone() },
        LoadFailure::Certificate(source) => SelectError::BadCertificate { plugin, servername, source: source.clone() },
        LoadFailure::Route(source) => SelectError::BadRoute { plugin, servername, source: source.clone() },
    }
}

/// Why a plugin's answer was refused.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AnswerError {
    /// A certificate of the set is unusable.
    #[error(transparent)]
    Certificate(CertError),
    /// The route or passthrough target is malformed or not granted.
    #[error(transparent)]
    Route(RouteError),
}

/// Everything a plugin's answer for `name` must pass before it is served or cached: every certificate of a set
/// (parses, key matches leaf, covers the name, valid now), and its route or passthrough target against the
/// plugin's grants. The one check used by serving and by reload probes.
pub(crate) fn check_answer(
    grants: &crate::config::Grants,
    name: &ServerName,
    selection: Selection,
) -> Result<Answer, AnswerError> {
    match selection {
        Selection::NotFound => Ok(Answer::NotFound),
        Selection::Passthrough { target, ttl } => {
            let target = grants.routes.passthrough(&target).map_err(AnswerError::Route)?;
            Ok(Answer::Passthrough(Arc::new(target), ttl))
        }
        Selection::Obtain { route, ttl } => Ok(Answer::Obtain(Arc::new(granted_route(grants, route)?), ttl)),
        Selection::Serve { certificates, route, ttl } => {
            let route = granted_route(grants, route)?;
            // Parsing keys and checking chains is CPU work of tens of microseconds each: fine on a worker.
            let members = certificates.iter().map(|c| (c.chain.as_bytes(), c.key.as_bytes()));
            let set = certs::validate_set(members, name).map_err(AnswerError::Certificate)?;
            let served = Served::new(set, route).ok_or(AnswerError::Certificate(CertError::SetSize { len: 0 }))?;
            Ok(Answer::Found(Arc::new(served), ttl))
        }
    }
}

/// The route a plugin asked for, if its grants allow it.
fn granted_route(
    grants: &crate::config::Grants,
    route: Option<RouteRequest>,
) -> Result<crate::route::Route, AnswerError> {
    match route {
        None => Ok(crate::route::Route::Listener),
        Some(RouteRequest::Pool(pool)) => grants.routes.pool(&pool).map_err(AnswerError::Route),
        Some(RouteRequest::Origin(url)) => {
            grants.routes.origin(&url, grants.origin_ca.as_deref(), grants.origin_h2).map_err(AnswerError::Route)
        }
    }
}

/// Calls the plugin and checks its answer for `name`. A certificate that fails validation is an answer too: it
/// is cached briefly (`cache.invalid_ttl`) so that repeated handshakes for the name do not call the plugin again.
/// A route outside the grants is a load failure, never cached.
async fn load(
    plugin: &Plugin,
    name: &ServerName,
    listener: &str,
    client: Option<std::net::IpAddr>,
) -> Result<Answer, LoadFailure> {
    // Boxed: the plugin call's future (wasmtime's instantiation and call) is kilobytes, and inline it would
    // size every handshake's future for a miss (see `Selector::select_for`).
    let selection = Box::pin(plugin.select_for(name, listener, client)).await.map_err(LoadFailure::Plugin)?;
    match check_answer(&plugin.source().grants, name, selection) {
        Ok(answer) => Ok(answer),
        Err(AnswerError::Certificate(error)) => Ok(Answer::Invalid(error)),
        Err(AnswerError::Route(error)) => Err(LoadFailure::Route(error)),
    }
}
