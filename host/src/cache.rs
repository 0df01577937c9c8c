//! The certificate cache: parsed answers of plugins, keyed by plugin and normalised server name.
//!
//! Bounded three ways, because the key is attacker-chosen (SNI): by entry count, by estimated bytes, and by
//! time (the plugin's TTL hint capped by `cache.max_ttl` and by the leaf's expiry; "not found" answers live for
//! `cache.negative_ttl`). Answers that serve a name (certificates, passthrough targets, issuance grants) and
//! answers that do not ("not found", refused) live in two caches with bounds of their own, so that a flood of
//! made-up names, which the plugin can only answer "not found", evicts other such answers and never a name that is
//! served; within each, eviction is moka's TinyLFU. Concurrent misses for one key share a single load. An entry
//! past its TTL is served at once while one background refresh per key replaces it (stale-while-revalidate), and
//! keeps serving, within `cache.max_stale`, while refreshing fails (stale-if-error).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::answer::Served;
use crate::certs::CertError;
use crate::config::CacheSettings;
use crate::route::{Route, Target};
use crate::sni::ServerName;

/// What the cache holds for a name.
#[derive(Debug, Clone)]
pub(crate) enum Cached {
    /// The plugin's certificates, parsed and validated, and the route it granted.
    Found {
        /// The certificates and route.
        served: Arc<Served>,
        /// Served without asking the plugin until then.
        fresh_until: Instant,
    },
    /// The plugin passes the name's connections through to a granted TCP target.
    Passthrough {
        /// The target.
        target: Arc<Target>,
        /// Answered without asking the plugin until then.
        fresh_until: Instant,
    },
    /// The plugin permits issuance: the certificate comes from ACME (`acme::Acme`), the route from the plugin.
    Obtain {
        /// Where the name's requests go once it is served.
        route: Arc<Route>,
        /// Answered without asking the plugin until then.
        fresh_until: Instant,
    },
    /// The plugin does not know the name.
    NotFound {
        /// Answered without asking the plugin until then.
        fresh_until: Instant,
    },
    /// The plugin's certificate failed validation (expired, wrong name, bad PEM); remembered for
    /// `cache.invalid_ttl` so that handshakes for the name fail at once instead of calling the plugin each time.
    Invalid {
        /// Why it was refused.
        error: CertError,
        /// Refused without asking the plugin until then.
        fresh_until: Instant,
    },
}

impl Cached {
    fn fresh_until(&self) -> Instant {
        match self {
            Cached::Found { fresh_until, .. }
            | Cached::Passthrough { fresh_until, .. }
            | Cached::Obtain { fresh_until, .. }
            | Cached::NotFound { fresh_until }
            | Cached::Invalid { fresh_until, .. } => *fresh_until,
        }
    }

    /// Whether this is a "not found" or refused answer (held in the negative tier).
    pub(crate) fn is_negative(&self) -> bool {
        matches!(self, Cached::NotFound { .. } | Cached::Invalid { .. })
    }

    /// Whether the entry may be served without asking the plugin.
    pub(crate) fn is_fresh(&self) -> bool {
        Instant::now() < self.fresh_until()
    }

    fn bytes(&self) -> usize {
        match self {
            Cached::Found { served, .. } => served.bytes(),
            Cached::Passthrough { target, .. } => target.host.len() + 64,
            Cached::Obtain { route, .. } => route.bytes() + 64,
            Cached::NotFound { .. } => 64,
            Cached::Invalid { .. } => 256,
        }
    }
}

/// Cache key: the plugin that answered, the listener it answered for (0.2 plugins are told the listener, so
/// their answers may differ by listener) and the name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CacheKey {
    /// The plugin's cache scope: its name, or a new one after a swap that flushed the cache.
    pub plugin: Arc<str>,
    /// The listener, for plugins that are told it; `None` for 0.1 plugins, whose answers hold on every listener.
    pub listener: Option<Arc<str>>,
    /// Normalised server name.
    pub name: ServerName,
}

/// How a lookup was answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// A fresh entry, without calling the plugin.
    Hit,
    /// Loaded now (by this caller, or by a concurrent caller whose load this one waited for).
    Miss,
    /// The entry was past its TTL: served stale (bounded by `cache.max_stale`) while a background refresh runs,
    /// or because refreshing it failed.
    Stale,
}

/// A lookup's answer; `refresh_error` says why a stale entry was served.
#[derive(Debug)]
pub(crate) struct Loaded<E> {
    /// How it was answered.
    pub lookup: Lookup,
    /// The entry.
    pub value: Cached,
    /// With [`Lookup::Stale`]: the refresh failure.
    pub refresh_error: Option<E>,
    /// With [`Lookup::Stale`]: the refresh answered with a certificate that failed validation (the stale, valid
    /// one keeps serving).
    pub refresh_invalid: Option<CertError>,
}

/// The bounded, TTL-aware cache of plugin answers.
#[derive(Clone)]
pub struct CertCache {
    /// Answers that serve the name, bounded by `cache.max_entries` and `cache.max_bytes`.
    served: Tier,
    /// "Not found" and refused answers, bounded by `cache.max_negative_entries`. Apart from `served` because moka
    /// alone did not protect a served name from them: under a flood it drops reads it has no room to record (so a
    /// rarely used name loses its place in the LRU order) and its frequency sketch, sized by the entries, forgets
    /// a name read once every few thousand lookups (`a_flood_of_unknown_names_never_evicts_a_served_name`).
    negative: Tier,
    settings: CacheSettings,
    /// Keys whose stale entry is being refreshed in the background (one refresh per key at a time; bounded by
    /// the entries, which the cache bounds).
    refreshing: Arc<std::sync::Mutex<std::collections::HashSet<CacheKey>>>,
}

type Tier = moka::future::Cache<CacheKey, Cached>;

impl std::fmt::Debug for CertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertCache")
            .field("served", &self.served.entry_count())
            .field("negative", &self.negative.entry_count())
            .finish()
    }
}

/// What a load shares with the callers that waited for it, other than a negative answer (which the negative tier
/// holds): a served answer (which the served tier holds) or the failure (which nothing holds).
enum Shared<E> {
    Served(Cached),
    Failed(Arc<E>),
}

/// Bytes counted per served entry beyond its answer's estimate and its name (the key): what `scale-bench` (1M
/// ECDSA names, 2026-12-01) measured, 2,076 bytes of RSS per cached certificate against 1,296 estimated. (Counting
/// it made a flood of junk names evict a hot certificate while both kinds shared one cache; they no longer do.)
const ENTRY_OVERHEAD: usize = 780;

impl CertCache {
    /// An empty cache with these bounds.
    pub fn new(settings: &CacheSettings, metrics: Arc<crate::metrics::Metrics>) -> Self {
        // Every entry weighs at least one "slot" of max_bytes / max_entries, so a weighted capacity of max_bytes
        // bounds the bytes and the entry count at once. Rounded up: rounded down, 256 MiB over 100,000 entries
        // let 100,013 in. Config validation keeps the slot within u32.
        let slot = u32::try_from(settings.max_bytes.div_ceil(settings.max_entries).max(1)).unwrap_or(u32::MAX);
        let served = moka::future::Cache::builder().max_capacity(settings.max_bytes).weigher(
            move |key: &CacheKey, value: &Cached| {
                let bytes = value.bytes().saturating_add(key.name.as_str().len() + ENTRY_OVERHEAD);
                u32::try_from(bytes).unwrap_or(u32::MAX).max(slot)
            },
        );
        let served = build_tier(served, settings, metrics.clone(), |m| &m.cache_evictions);
        // Entries of a bounded size (a name of at most 253 bytes and a short reason), so counted, not weighed.
        let negative = moka::future::Cache::builder().max_capacity(settings.max_negative_entries);
        let negative = build_tier(negative, settings, metrics, |m| &m.cache_negative_evictions);
        Self { served, negative, settings: settings.clone(), refreshing: Arc::default() }
    }

    /// The tier that holds negative answers (`negative`) or served ones, and the other.
    fn tiers(&self, negative: bool) -> (&Tier, &Tier) {
        if negative { (&self.negative, &self.served) } else { (&self.served, &self.negative) }
    }

    /// The entry for `key` in either tier, fresh or stale.
    async fn lookup(&self, key: &CacheKey) -> Option<Cached> {
        match self.served.get(key).await {
            Some(value) => Some(value),
            None => self.negative.get(key).await,
        }
    }

    /// Like [`CertCache::get_or_load`], but a stale entry is served at once (stale-while-revalidate):
    /// `revalidate(key)` makes the future that refreshes it, which runs in the background, one per key at a time
    /// (it is only called then: a fresh hit pays nothing for it). A handshake for
    /// a name past its TTL never waits for the plugin or its store; the refresh's outcome (a new answer, or the
    /// stale one kept within `cache.max_stale`) is the future's to report.
    pub(crate) async fn get_or_load_revalidating<E, F, R, G>(
        &self,
        key: CacheKey,
        load: F,
        revalidate: R,
    ) -> Result<Loaded<Arc<E>>, Arc<E>>
    where
        E: Send + Sync + 'static,
        F: Future<Output = Result<Answer, E>>,
        R: FnOnce(CacheKey) -> G,
        G: Future<Output = ()> + Send + 'static,
    {
        match self.lookup(&key).await {
            Some(value) if value.is_fresh() => {
                Ok(Loaded { lookup: Lookup::Hit, value, refresh_error: None, refresh_invalid: None })
            }
            Some(stale) => {
                if lock(&self.refreshing).insert(key.clone()) {
                    let refresh = revalidate(key.clone());
                    let done = Refreshing { keys: self.refreshing.clone(), key };
                    tokio::spawn(async move {
                        refresh.await;
                        drop(done);
                    });
                }
                Ok(Loaded { lookup: Lookup::Stale, value: stale, refresh_error: None, refresh_invalid: None })
            }
            // Boxed: the miss path (moka's per-key lock, the load) is kilobytes of future that a hit never needs
            // and that would otherwise be part of every handshake's future, copied with it.
            None => Box::pin(self.get_or_load(key, load)).await,
        }
    }

    /// The cached answer for `key`, or the result of `load`.
    ///
    /// A missing entry is loaded once however many callers miss at once; the error of a failed load goes to every
    /// waiting caller and is not cached. A stale entry (past its TTL, within `cache.max_stale`) is refreshed once;
    /// if that refresh fails, the stale entry is served and the error reported alongside.
    pub(crate) async fn get_or_load<E, F>(&self, key: CacheKey, load: F) -> Result<Loaded<Arc<E>>, Arc<E>>
    where
        E: Send + Sync + 'static,
        F: Future<Output = Result<Answer, E>>,
    {
        match self.lookup(&key).await {
            Some(value) if value.is_fresh() => {
                return Ok(Loaded { lookup: Lookup::Hit, value, refresh_error: None, refresh_invalid: None });
            }
            Some(stale) => return self.refresh(key, load, stale.is_negative()).await,
            None => {}
        }
        // Concurrent misses share one load through the negative tier's per-key lock: a negative answer is stored
        // there and handed to every waiter; a served answer goes to the served tier and reaches the waiters as the
        // shared "error", as does a failure (which is not cached).
        let (settings, served, served_key) = (&self.settings, &self.served, key.clone());
        let shared = self.negative.try_get_with(key, async move {
            // Loaded by a caller that found neither tier's entry just before this one did.
            if let Some(value) = served.get(&served_key).await.filter(Cached::is_fresh) {
                return Err(Shared::Served(value));
            }
            let value = load.await.map_err(|err| Shared::Failed(Arc::new(err)))?.into_cached(settings);
            if value.is_negative() {
                return Ok(value);
            }
            served.insert(served_key, value.clone()).await;
            Err(Shared::Served(value))
        });
        let value = match shared.await {
            Ok(value) => value,
            Err(shared) => match &*shared {
                Shared::Served(value) => value.clone(),
                Shared::Failed(err) => return Err(err.clone()),
            },
        };
        Ok(Loaded { lookup: Lookup::Miss, value, refresh_error: None, refresh_invalid: None })
    }

    /// Refreshes a stale entry (a negative answer if `negative`) under its tier's per-key lock: concurrent callers
    /// queue, and those behind the first find the entry fresh again (in this tier, or in the other if the answer
    /// changed kind), or find that the refresh failed only after trying it themselves.
    async fn refresh<E, F>(&self, key: CacheKey, load: F, negative: bool) -> Result<Loaded<Arc<E>>, Arc<E>>
    where
        E: Send + Sync + 'static,
        F: Future<Output = Result<Answer, E>>,
    {
        let mut outcome = None;
        let slot = &mut outcome;
        let settings = &self.settings;
        let (tier, other) = self.tiers(negative);
        let other_key = key.clone();
        tier.entry(key)
            .and_compute_with(move |entry| async move {
                let current = entry.map(|e| e.into_value());
                let fresh = match current.as_ref() {
                    Some(value) => Some(value.clone()).filter(Cached::is_fresh),
                    // Moved to the other tier by the refresh this caller queued behind.
                    None => other.get(&other_key).await.filter(Cached::is_fresh),
                };
                if let Some(value) = fresh {
                    *slot = Some(Ok(Loaded { lookup: Lookup::Hit, value, refresh_error: None, refresh_invalid: None }));
                    return moka::ops::compute::Op::Nop;
                }
                match (load.await, current) {
                    // A valid certificate past its TTL beats a fresh answer that failed validation.
                    (Ok(Answer::Invalid(error)), Some(stale @ Cached::Found { .. })) => {
                        let refresh_invalid = Some(error);
                        *slot = Some(Ok(Loaded {
                            lookup: Lookup::Stale,
                            value: stale,
                            refresh_error: None,
                            refresh_invalid,
                        }));
                        moka::ops::compute::Op::Nop
                    }
                    (Ok(answer), _) => {
                        let value = answer.into_cached(settings);
                        let loaded = Loaded {
                            lookup: Lookup::Miss,
                            value: value.clone(),
                            refresh_error: None,
                            refresh_invalid: None,
                        };
                        *slot = Some(Ok(loaded));
                        if value.is_negative() == negative {
                            moka::ops::compute::Op::Put(value)
                        } else {
                            // A served name now unknown, or the reverse: the answer changes tier.
                            other.insert(other_key, value).await;
                            moka::ops::compute::Op::Remove
                        }
                    }
                    (Err(err), Some(stale)) => {
                        let refresh_error = Some(Arc::new(err));
                        *slot = Some(Ok(Loaded {
                            lookup: Lookup::Stale,
                            value: stale,
                            refresh_error,
                            refresh_invalid: None,
                        }));
                        moka::ops::compute::Op::Nop
                    }
                    (Err(err), None) => {
                        *slot = Some(Err(Arc::new(err)));
                        moka::ops::compute::Op::Nop
                    }
                }
            })
            .await;
        // The closure above sets the outcome on every path; moka always runs it.
        outcome.unwrap_or_else(unreachable_outcome)
    }

    /// Drops every plugin's answer for `name`; a `*.parent` pattern drops every name one label below `parent`.
    pub(crate) fn invalidate_name(&self, name: &str) {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match name.strip_prefix("*.") {
            Some(parent) => {
                let parent = parent.to_string();
                self.invalidate_if(move |key| key.name.as_str().split_once('.').is_some_and(|(_, rest)| rest == parent))
            }
            None => self.invalidate_if(move |key| key.name.as_str() == name),
        }
    }

    /// The entry for `key`, fresh or stale, without loading anything.
    pub(crate) async fn peek(&self, key: &CacheKey) -> Option<Cached> {
        self.lookup(key).await
    }

    /// Drops every cached answer.
    pub(crate) fn invalidate_all(&self) {
        self.served.invalidate_all();
        self.negative.invalidate_all();
    }

    /// Drops every answer of one plugin (a swap with `on_swap = "flush"`).
    pub(crate) fn invalidate_plugin(&self, plugin: &str) {
        let plugin: Arc<str> = Arc::from(plugin);
        self.invalidate_if(move |key| key.plugin == plugin);
    }

    /// Drops the entries of both tiers whose key matches.
    fn invalidate_if(&self, matches: impl Fn(&CacheKey) -> bool + Clone + Send + Sync + 'static) {
        for tier in [&self.served, &self.negative] {
            let matches = matches.clone();
            if let Err(err) = tier.invalidate_entries_if(move |key, _| matches(key)) {
                // Only possible without support_invalidation_closures, which the builders always set.
                tracing::error!(error = %err, "cache invalidation refused");
            }
        }
    }

    /// Appends the cache's gauges.
    pub(crate) fn render(&self, x: &mut crate::metrics::Exposition) {
        x.family("tern_cache_entries", "gauge", "Names in the certificate cache, served and negative.");
        x.sample("tern_cache_entries", "", self.entry_count());
        x.family("tern_cache_negative_entries", "gauge", "Names cached as not found or refused.");
        x.sample("tern_cache_negative_entries", "", self.negative_entry_count());
        x.family("tern_cache_weighted_bytes", "gauge", "Estimated bytes of served names (each at least its slot).");
        x.sample("tern_cache_weighted_bytes", "", self.weighted_size());
    }

    /// Cached names of both tiers (approximate until pending maintenance has run).
    pub fn entry_count(&self) -> u64 {
        self.served.entry_count() + self.negative.entry_count()
    }

    /// Names cached as "not found" or refused (approximate until pending maintenance has run).
    pub fn negative_entry_count(&self) -> u64 {
        self.negative.entry_count()
    }

    /// Weighted size of the served tier: estimated bytes, with each entry counted at least at its slot size.
    pub(crate) fn weighted_size(&self) -> u64 {
        self.served.weighted_size()
    }

    /// Runs pending evictions and expirations now (they otherwise run as the cache is used).
    pub async fn run_pending_tasks(&self) {
        self.served.run_pending_tasks().await;
        self.negative.run_pending_tasks().await;
    }
}

/// A tier from its bounds: entries kept until their TTL plus `cache.max_stale`, invalidation by predicate, and
/// evictions for size counted by `evictions`.
fn build_tier(
    builder: moka::future::CacheBuilder<CacheKey, Cached, Tier>,
    settings: &CacheSettings,
    metrics: Arc<crate::metrics::Metrics>,
    evictions: fn(&crate::metrics::Metrics) -> &std::sync::atomic::AtomicU64,
) -> Tier {
    builder
        .expire_after(KeepUntilStaleLimit { max_stale: settings.max_stale })
        .support_invalidation_closures()
        .eviction_listener(move |_key, _value, cause| {
            if cause == moka::notification::RemovalCause::Size {
                crate::metrics::inc(evictions(&metrics));
            }
        })
        .build()
}

/// A background refresh of `key` in progress; ends it when dropped (also if the refresh panicked).
struct Refreshing {
    keys: Arc<std::sync::Mutex<std::collections::HashSet<CacheKey>>>,
    key: CacheKey,
}

impl Drop for Refreshing {
    fn drop(&mut self) {
        lock(&self.keys).remove(&self.key);
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A set of keys stays consistent across a panic elsewhere: recover the lock.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cold]
fn unreachable_outcome<T, E>() -> Result<T, E> {
    panic!("cache refresh closure did not run")
}

/// A plugin's answer before the cache applies its bounds.
#[derive(Debug)]
pub(crate) enum Answer {
    /// Validated certificates with their granted route, and the plugin's TTL hint.
    Found(Arc<Served>, Option<Duration>),
    /// A granted passthrough target and the plugin's TTL hint.
    Passthrough(Arc<Target>, Option<Duration>),
    /// The plugin permits issuance for the name, with this granted route and TTL hint.
    Obtain(Arc<Route>, Option<Duration>),
    /// The plugin does not know the name.
    NotFound,
    /// The plugin answered with a certificate that failed validation.
    Invalid(CertError),
}

impl Answer {
    fn into_cached(self, settings: &CacheSettings) -> Cached {
        let now = Instant::now();
        match self {
            Answer::Found(served, hint) => {
                let ttl = hint.unwrap_or(settings.ttl).min(settings.max_ttl).min(served.remaining_validity());
                Cached::Found { served, fresh_until: now + ttl }
            }
            Answer::Passthrough(target, hint) => {
                Cached::Passthrough { target, fresh_until: now + hint.unwrap_or(settings.ttl).min(settings.max_ttl) }
            }
            Answer::Obtain(route, hint) => {
                Cached::Obtain { route, fresh_until: now + hint.unwrap_or(settings.ttl).min(settings.max_ttl) }
            }
            Answer::NotFound => Cached::NotFound { fresh_until: now + settings.negative_ttl },
            Answer::Invalid(error) => Cached::Invalid { error, fresh_until: now + settings.invalid_ttl },
        }
    }
}

/// Keeps an entry until its TTL plus `max_stale`, so it can be served stale while the plugin's store is down.
struct KeepUntilStaleLimit {
    max_stale: Duration,
}

impl KeepUntilStaleLimit {
    fn lifetime(&self, value: &Cached, now: Instant) -> Duration {
        let fresh = value.fresh_until().saturating_duration_since(now);
        // A refused answer is never worth serving stale.
        match value {
            Cached::Invalid { .. } => fresh,
            // Never past the leaf's notAfter: an expired certificate is refused by every client.
            Cached::Found { served, .. } => (fresh + self.max_stale).min(served.remaining_validity()),
            Cached::Passthrough { .. } | Cached::Obtain { .. } | Cached::NotFound { .. } => fresh + self.max_stale,
        }
    }
}

impl moka::Expiry<CacheKey, Cached> for KeepUntilStaleLimit {
    fn expire_after_create(&self, _key: &CacheKey, value: &Cached, now: Instant) -> Option<Duration> {
        Some(self.lifetime(value, now))
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Cached,
        now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(self.lifetime(value, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn settings(max_entries: u64, max_bytes: u64) -> CacheSettings {
        CacheSettings {
            max_entries,
            max_bytes,
            max_negative_entries: max_entries,
            ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(120),
            negative_ttl: Duration::from_millis(50),
            max_stale: Duration::from_secs(60),
            invalid_ttl: Duration::from_secs(10),
        }
    }

    /// A served answer that needs no certificate.
    fn passthrough(ttl: Option<Duration>) -> Answer {
        Answer::Passthrough(Arc::new(Target { host: "backend.internal".into(), port: 443 }), ttl)
    }

    fn key(name: &str) -> CacheKey {
        CacheKey { plugin: Arc::from("p"), listener: None, name: ServerName::parse(name).unwrap() }
    }

    #[tokio::test]
    async fn hit_does_not_load_again() {
        let cache = CertCache::new(&settings(100, 1 << 20), Arc::default());
        let loads = AtomicUsize::new(0);
        for want in [Lookup::Miss, Lookup::Hit, Lookup::Hit] {
            let loaded = cache
                .get_or_load(key("a.example"), async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, ()>(Answer::NotFound)
                })
                .await
                .unwrap();
            assert_eq!(loaded.lookup, want);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_load() {
        let cache = CertCache::new(&settings(100, 1 << 20), Arc::default());
        let loads = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (cache, loads) = (cache.clone(), loads.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_load(key("b.example"), async {
                            loads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok::<_, ()>(Answer::NotFound)
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn errors_are_shared_but_not_cached() {
        let cache = CertCache::new(&settings(100, 1 << 20), Arc::default());
        let err = cache.get_or_load(key("c.example"), async { Err::<Answer, _>("down") }).await.unwrap_err();
        assert_eq!(*err, "down");
        let loaded = cache.get_or_load(key("c.example"), async { Ok::<_, ()>(Answer::NotFound) }).await.unwrap();
        assert_eq!(loaded.lookup, Lookup::Miss);
    }

    #[tokio::test]
    async fn negative_answers_expire() {
        let cache = CertCache::new(&settings(100, 1 << 20), Arc::default());
        let load = || async { Ok::<_, ()>(Answer::NotFound) };
        cache.get_or_load(key("d.example"), load()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        let loaded = cache.get_or_load(key("d.example"), load()).await.unwrap();
        assert_eq!(loaded.lookup, Lookup::Miss);
    }

    #[tokio::test]
    async fn stale_entry_is_served_when_its_refresh_fails_and_replaced_when_it_succeeds() {
        let cache = CertCache::new(&settings(100, 1 << 20), Arc::default());
        cache.get_or_load(key("e.example"), async { Ok::<_, &str>(Answer::NotFound) }).await.unwrap();
        tokio::time::sleep(Duration::from_millis(80)).await;
        let loaded = cache.get_or_load(key("e.example"), async { Err::<Answer, _>("store down") }).await.unwrap();
        assert_eq!(loaded.lookup, Lookup::Stale);
        assert_eq!(loaded.refresh_error.as_deref(), Some(&"store down"));
        let loaded = cache.get_or_load(key("e.example"), async { Ok::<_, &str>(Answer::NotFound) }).await.unwrap();
        assert_eq!(loaded.lookup, Lookup::Miss, "a successful refresh replaces the stale entry");
        let loaded = cache.get_or_load(key("e.example"), async { Err::<Answer, _>("unused") }).await.unwrap();
        assert_eq!(loaded.lookup, Lookup::Hit);
    }

    #[tokio::test]
    async fn invalidation_by_name_and_by_wildcard_pattern() {
        let cache = CertCache::new(&settings(100, 1 << 20), Arc::default());
        let load = || async { Ok::<_, ()>(Answer::NotFound) };
        for name in ["a.example", "b.shop.example", "c.shop.example", "x.c.shop.example"] {
            cache.get_or_load(key(name), load()).await.unwrap();
        }
        cache.invalidate_name("A.Example.");
        cache.invalidate_name("*.shop.example");
        for (name, want) in [
            ("a.example", Lookup::Miss),
            ("b.shop.example", Lookup::Miss),
            ("c.shop.example", Lookup::Miss),
            ("x.c.shop.example", Lookup::Hit),
        ] {
            assert_eq!(cache.get_or_load(key(name), load()).await.unwrap().lookup, want, "{name}");
        }
    }

    #[tokio::test]
    async fn entry_bound_holds_under_a_flood_of_names() {
        let cache = CertCache::new(&settings(100, 1 << 20), Arc::default());
        for i in 0..5_000 {
            cache.get_or_load(key(&format!("n{i}.example")), async { Ok::<_, ()>(Answer::NotFound) }).await.unwrap();
        }
        cache.run_pending_tasks().await;
        assert!(cache.entry_count() <= 100, "{} entries", cache.entry_count());
        assert!(cache.weighted_size() <= 1 << 20);
    }

    /// A refresh whose answer changes kind moves the name between the tiers: it is then found in the other one,
    /// and counted once.
    #[tokio::test]
    async fn an_answer_that_changes_kind_moves_to_the_other_tier() {
        let cache = CertCache::new(&settings(100, 1 << 20), Arc::default());
        let answer = |negative: bool| async move {
            Ok::<_, ()>(if negative { Answer::NotFound } else { passthrough(Some(Duration::from_millis(50))) })
        };
        cache.get_or_load(key("m.example"), answer(false)).await.unwrap();
        for negative in [true, false, true] {
            tokio::time::sleep(Duration::from_millis(80)).await;
            assert_eq!(cache.get_or_load(key("m.example"), answer(negative)).await.unwrap().lookup, Lookup::Miss);
            let loaded = cache.get_or_load(key("m.example"), async { Err::<Answer, _>(()) }).await.unwrap();
            assert_eq!((loaded.lookup, loaded.value.is_negative()), (Lookup::Hit, negative));
            cache.run_pending_tasks().await;
            assert_eq!((cache.entry_count(), cache.negative_entry_count()), (1, u64::from(negative)));
        }
    }

    /// A flood of names the plugin does not know, many times the cache's size, with a name that is served looked
    /// up only now and then: the flood's answers never evict it (before they were kept apart, moka's LRU order and
    /// frequency sketch protected it only while its rare reads were recorded, and evicted it here).
    #[tokio::test]
    async fn a_flood_of_unknown_names_never_evicts_a_served_name() {
        let cache = CertCache::new(&settings(100, 1 << 20), Arc::default());
        let served = || async { Ok::<_, ()>(passthrough(None)) };
        cache.get_or_load(key("served.example"), served()).await.unwrap();
        for i in 0..20_000 {
            let name = format!("n{i}.flood.example");
            for _ in 0..2 {
                cache.get_or_load(key(&name), async { Ok::<_, ()>(Answer::NotFound) }).await.unwrap();
            }
            if i % 500 == 499 {
                cache.run_pending_tasks().await;
                let lookup = cache.get_or_load(key("served.example"), served()).await.unwrap().lookup;
                assert_eq!(lookup, Lookup::Hit, "the served name was evicted after {} flood names", i + 1);
            }
        }
    }

    #[tokio::test]
    async fn the_entry_bound_holds_when_max_bytes_is_not_a_multiple_of_it() {
        // A slot of 999 bytes rounded down to 998 would let 1,001 served entries of the slot's weight in.
        let cache = CertCache::new(&settings(1000, 999 * 1000 - 1), Arc::default());
        for i in 0..5_000 {
            let served = async { Ok::<_, ()>(passthrough(None)) };
            cache.get_or_load(key(&format!("n{i}.example")), served).await.unwrap();
        }
        cache.run_pending_tasks().await;
        assert_eq!(cache.negative_entry_count(), 0);
        assert!(cache.entry_count() <= 1000, "{} entries", cache.entry_count());
    }
}
