//! The certificate cache: parsed answers of plugins, keyed by plugin and normalised server name.
//!
//! Bounded three ways, because the key is attacker-chosen (SNI): by entry count, by estimated bytes, and by
//! time (the plugin's TTL hint capped by `cache.max_ttl` and by the leaf's expiry; "not found" answers live for
//! `cache.negative_ttl`). Eviction is moka's TinyLFU, which keeps a flood of one-off names from pushing out the
//! names that are really used. Concurrent misses for one key share a single load.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::certs::ParsedCert;
use crate::config::CacheSettings;
use crate::sni::ServerName;

/// What the cache holds for a name.
#[derive(Debug, Clone)]
pub enum Cached {
    /// The plugin's certificate, parsed and validated.
    Found {
        /// The certificate.
        cert: Arc<ParsedCert>,
        /// How long it is served from cache.
        ttl: Duration,
    },
    /// The plugin does not know the name.
    NotFound {
        /// How long that answer is kept.
        ttl: Duration,
    },
}

impl Cached {
    fn ttl(&self) -> Duration {
        match self {
            Cached::Found { ttl, .. } | Cached::NotFound { ttl } => *ttl,
        }
    }

    fn bytes(&self) -> usize {
        match self {
            Cached::Found { cert, .. } => cert.bytes,
            Cached::NotFound { .. } => 64,
        }
    }
}

/// Cache key: the plugin that answered and the name it answered for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Plugin name.
    pub plugin: Arc<str>,
    /// Normalised server name.
    pub name: ServerName,
}

/// Whether a lookup was answered from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Served from the cache without calling the plugin.
    Hit,
    /// Loaded (by this caller, or by a concurrent caller whose load this one waited for).
    Miss,
}

/// The bounded, TTL-aware cache of plugin answers.
#[derive(Clone)]
pub struct CertCache {
    inner: moka::future::Cache<CacheKey, Cached>,
    settings: CacheSettings,
}

impl std::fmt::Debug for CertCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertCache").field("entries", &self.inner.entry_count()).finish()
    }
}

impl CertCache {
    /// An empty cache with these bounds.
    pub fn new(settings: &CacheSettings) -> Self {
        // Every entry weighs at least one "slot" of max_bytes / max_entries, so a weighted capacity of max_bytes
        // bounds the bytes and the entry count at once. Config validation keeps the slot within u32.
        let slot = u32::try_from((settings.max_bytes / settings.max_entries).max(1)).unwrap_or(u32::MAX);
        let inner = moka::future::Cache::builder()
            .max_capacity(settings.max_bytes)
            .weigher(move |key: &CacheKey, value: &Cached| {
                let bytes = value.bytes().saturating_add(key.name.as_str().len() + 48);
                u32::try_from(bytes).unwrap_or(u32::MAX).max(slot)
            })
            .expire_after(PerEntryTtl)
            .build();
        Self { inner, settings: settings.clone() }
    }

    /// The cached answer for `key`, or the result of `load` (run once however many callers miss at once).
    ///
    /// `load` returns the plugin's parsed answer with the TTL the plugin asked for (`None` for the default);
    /// this applies the configured bounds. Errors are handed to every waiting caller and are not cached.
    pub async fn get_or_load<E, F>(&self, key: CacheKey, load: F) -> Result<(Lookup, Cached), Arc<E>>
    where
        E: Send + Sync + 'static,
        F: Future<Output = Result<Answer, E>>,
    {
        if let Some(hit) = self.inner.get(&key).await {
            return Ok((Lookup::Hit, hit));
        }
        let settings = &self.settings;
        let value =
            self.inner.try_get_with(key, async move { load.await.map(|answer| answer.into_cached(settings)) }).await?;
        Ok((Lookup::Miss, value))
    }

    /// Drops the cached answer for `key`, if any.
    pub async fn invalidate(&self, key: &CacheKey) {
        self.inner.invalidate(key).await;
    }

    /// Cached names (approximate until pending maintenance has run).
    pub fn entry_count(&self) -> u64 {
        self.inner.entry_count()
    }

    /// Weighted size: estimated bytes, with each entry counted at least at its slot size.
    pub fn weighted_size(&self) -> u64 {
        self.inner.weighted_size()
    }

    /// Runs pending evictions and expirations now (they otherwise run as the cache is used).
    pub async fn run_pending_tasks(&self) {
        self.inner.run_pending_tasks().await;
    }
}

/// A plugin's answer before the cache applies its bounds.
#[derive(Debug)]
pub enum Answer {
    /// A validated certificate and the plugin's TTL hint.
    Found(Arc<ParsedCert>, Option<Duration>),
    /// The plugin does not know the name.
    NotFound,
}

impl Answer {
    fn into_cached(self, settings: &CacheSettings) -> Cached {
        match self {
            Answer::Found(cert, hint) => {
                let ttl = hint.unwrap_or(settings.ttl).min(settings.max_ttl).min(cert.remaining_validity());
                Cached::Found { cert, ttl }
            }
            Answer::NotFound => Cached::NotFound { ttl: settings.negative_ttl },
        }
    }
}

struct PerEntryTtl;

impl moka::Expiry<CacheKey, Cached> for PerEntryTtl {
    fn expire_after_create(&self, _key: &CacheKey, value: &Cached, _now: Instant) -> Option<Duration> {
        Some(value.ttl())
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
        }
    }

    fn key(name: &str) -> CacheKey {
        CacheKey { plugin: Arc::from("p"), name: ServerName::parse(name).unwrap() }
    }

    #[tokio::test]
    async fn hit_does_not_load_again() {
        let cache = CertCache::new(&settings(100, 1 << 20));
        let loads = AtomicUsize::new(0);
        for want in [Lookup::Miss, Lookup::Hit, Lookup::Hit] {
            let (lookup, _) = cache
                .get_or_load(key("a.example"), async {
                    loads.fetch_add(1, Ordering::SeqCst);
                    Ok::<_, ()>(Answer::NotFound)
                })
                .await
                .unwrap();
            assert_eq!(lookup, want);
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_load() {
        let cache = CertCache::new(&settings(100, 1 << 20));
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
        let cache = CertCache::new(&settings(100, 1 << 20));
        let err = cache.get_or_load(key("c.example"), async { Err::<Answer, _>("down") }).await.unwrap_err();
        assert_eq!(*err, "down");
        let (lookup, _) = cache.get_or_load(key("c.example"), async { Ok::<_, ()>(Answer::NotFound) }).await.unwrap();
        assert_eq!(lookup, Lookup::Miss);
    }

    #[tokio::test]
    async fn negative_answers_expire() {
        let cache = CertCache::new(&settings(100, 1 << 20));
        let load = || async { Ok::<_, ()>(Answer::NotFound) };
        cache.get_or_load(key("d.example"), load()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
        let (lookup, _) = cache.get_or_load(key("d.example"), load()).await.unwrap();
        assert_eq!(lookup, Lookup::Miss);
    }

    #[tokio::test]
    async fn entry_bound_holds_under_a_flood_of_names() {
        let cache = CertCache::new(&settings(100, 1 << 20));
        for i in 0..5_000 {
            cache.get_or_load(key(&format!("n{i}.example")), async { Ok::<_, ()>(Answer::NotFound) }).await.unwrap();
        }
        cache.run_pending_tasks().await;
        assert!(cache.entry_count() <= 100, "{} entries", cache.entry_count());
        assert!(cache.weighted_size() <= 1 << 20);
    }
}
