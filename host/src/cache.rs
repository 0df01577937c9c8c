//! The certificate cache: parsed answers of plugins, keyed by plugin and normalised server name.
//!
//! Bounded three ways, because the key is attacker-chosen (SNI): by entry count, by estimated bytes, and by
//! time (the plugin's TTL hint capped by `cache.max_ttl` and by the leaf's expiry; "not found" answers live for
//! `cache.negative_ttl`). Eviction is moka's TinyLFU, which keeps a flood of one-off names from pushing out the
//! names that are really used. Concurrent misses for one key share a single load. An entry past its TTL is served
//! at once while one background refresh per key replaces it (stale-while-revalidate), and keeps serving, within
//! `cache.max_stale`, while refreshing fails (stale-if-error).

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
    inner: moka::future::Cache<CacheKey, Cached>,
    settings: CacheSettings,
    /// Keys whose stale entry is being refreshed in the background (one refresh per key at a time; bounded by
    /// the entries, which the cache bounds).
    refreshing: Arc<std::sync::Mutex<std::collections::HashSet<CacheKey>>>,
}

impl std::fmt::Debug for CertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertCache").field("entries", &self.inner.entry_count()).finish()
    }
}

/// Bytes counted per entry beyond its answer's estimate and its name (the key). `scale-bench` (1M ECDSA names,
/// 2026-12-01) measured 2,076 bytes of RSS per cached certificate against 1,296 estimated: the real overhead is
/// nearer 800, but weighing a certificate above the slot made a flood of junk names evict a hot legitimate entry
/// (`a_flood_of_random_names_keeps_cache_and_plugin_calls_bounded` failed), so `max_entries` stays the bound that
/// binds at the defaults and the docs state the real size.
const ENTRY_OVERHEAD: usize = 48;

impl CertCache {
    /// An empty cache with these bounds.
    pub fn new(settings: &CacheSettings, metrics: Arc<crate::metrics::Metrics>) -> Self {
        // Every entry weighs at least one "slot" of max_bytes / max_entries, so a weighted capacity of max_bytes
        // bounds the bytes and the entry count at once. Rounded up: rounded down, 256 MiB over 100,000 entries
        // let 100,013 in. Config validation keeps the slot within u32.
        let slot = u32::try_from(settings.max_bytes.div_ceil(settings.max_entries).max(1)).unwrap_or(u32::MAX);
        let inner = moka::future::Cache::builder()
            .max_capacity(settings.max_bytes)
            .weigher(move |key: &CacheKey, value: &Cached| {
                let bytes = value.bytes().saturating_add(key.name.as_str().len() + ENTRY_OVERHEAD);
                u32::try_from(bytes).unwrap_or(u32::MAX).max(slot)
            })
            .expire_after(KeepUntilStaleLimit { max_stale: settings.max_stale })
            .support_invalidation_closures()
            .eviction_listener(move |_key, _value, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    crate::metrics::inc(&metrics.cache_evictions);
                }
            })
            .build();
        Self { inner, settings: settings.clone(), refreshing: Arc::default() }
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
        match self.inner.get(&key).await {
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
            None => self.get_or_load(key, load).await,
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
        match self.inner.get(&key).await {
            Some(value) if value.is_fresh() => {
                return Ok(Loaded { lookup: Lookup::Hit, value, refresh_error: None, refresh_invalid: None });
            }
            Some(_stale) => return self.refresh(key, load).await,
            None => {}
        }
        let settings = &self.settings;
        let value = self.inner.try_get_with(key, async move { load.await.map(|a| a.into_cached(settings)) }).await?;
        Ok(Loaded { lookup: Lookup::Miss, value, refresh_error: None, refresh_invalid: None })
    }

    /// Refreshes a stale entry under moka's per-key lock: concurrent callers queue, and those behind the first
    /// find the entry fresh again (or find that the refresh failed only after trying it themselves).
    async fn refresh<E, F>(&self, key: CacheKey, load: F) -> Result<Loaded<Arc<E>>, Arc<E>>
    where
        E: Send + Sync + 'static,
        F: Future<Output = Result<Answer, E>>,
    {
        let mut outcome = None;
        let slot = &mut outcome;
        let settings = &self.settings;
        self.inner
            .entry(key)
            .and_compute_with(move |entry| async move {
                let current = entry.map(|e| e.into_value());
                if let Some(value) = current.as_ref().filter(|v| v.is_fresh()) {
                    let value = value.clone();
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
                        moka::ops::compute::Op::Put(value)
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
        let result = match name.strip_prefix("*.") {
            Some(parent) => {
                let parent = parent.to_string();
                self.inner.invalidate_entries_if(move |key, _| {
                    key.name.as_str().split_once('.').is_some_and(|(_, rest)| rest == parent)
                })
            }
            None => self.inner.invalidate_entries_if(move |key, _| key.name.as_str() == name),
        };
        if let Err(err) = result {
            // Only possible without support_invalidation_closures, which the builder always sets.
            tracing::error!(error = %err, "cache invalidation refused");
        }
    }

    /// The entry for `key`, fresh or stale, without loading anything.
    pub(crate) async fn peek(&self, key: &CacheKey) -> Option<Cached> {
        self.inner.get(key).await
    }

    /// Drops every cached answer.
    pub(crate) fn invalidate_all(&self) {
        self.inner.invalidate_all();
    }

    /// Drops every answer of one plugin (a swap with `on_swap = "flush"`).
    pub(crate) fn invalidate_plugin(&self, plugin: &str) {
        let plugin: Arc<str> = Arc::from(plugin);
        if let Err(err) = self.inner.invalidate_entries_if(move |key, _| key.plugin == plugin) {
            tracing::error!(error = %err, "cache invalidation refused");
        }
    }

    /// Appends the cache's gauges.
    pub(crate) fn render(&self, x: &mut crate::metrics::Exposition) {
        x.family("tern_cache_entries", "gauge", "Names in the certificate cache.");
        x.sample("tern_cache_entries", "", self.entry_count());
        x.family("tern_cache_weighted_bytes", "gauge", "Estimated bytes in the cache (each entry at least its slot).");
        x.sample("tern_cache_weighted_bytes", "", self.weighted_size());
    }

    /// Cached names (approximate until pending maintenance has run).
    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }

    /// Weighted size: estimated bytes, with each entry counted at least at its slot size.
    pub(crate) fn weighted_size(&self) -> u64 {
        self.inner.weighted_size()
    }

    /// Runs pending evictions and expirations now (they otherwise run as the cache is used).
    pub async fn run_pending_tasks(&self) {
        self.inner.run_pending_tasks().await;
    }
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
            ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(120),
            negative_ttl: Duration::from_millis(50),
            max_stale: Duration::from_secs(60),
            invalid_ttl: Duration::from_secs(10),
        }
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

    #[tokio::test]
    async fn the_entry_bound_holds_when_max_bytes_is_not_a_multiple_of_it() {
        // A slot of 999 bytes rounded down to 998 would let 1,001 entries of the slot's weight in.
        let cache = CertCache::new(&settings(1000, 999 * 1000 - 1), Arc::default());
        for i in 0..5_000 {
            cache.get_or_load(key(&format!("n{i}.example")), async { Ok::<_, ()>(Answer::NotFound) }).await.unwrap();
        }
        cache.run_pending_tasks().await;
        assert!(cache.entry_count() <= 1000, "{} entries", cache.entry_count());
    }
}
