//! A configured plugin's place: the build serving now, swapped atomically by reloads, with the counters and
//! status that survive swaps.

use std::path::PathBuf;
use std::sync::Arc;

use super::{Plugin, PluginStats};

/// A configured plugin's place: the build currently serving, swapped atomically on reload, with counters and
/// status that survive swaps. Listeners hold slots, never plugins, so a swap reaches them all at once; calls
/// already running keep the `Arc<Plugin>` they started with and finish on the old build.
pub struct PluginSlot {
    current: arc_swap::ArcSwap<Plugin>,
    stats: Arc<PluginStats>,
    status: std::sync::Mutex<SlotStatus>,
}

/// What operators see about a slot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotStatus {
    /// Plugin name.
    pub name: String,
    /// Component file.
    pub path: PathBuf,
    /// SHA-256 of the build serving now.
    pub sha256: String,
    /// When that build was loaded (seconds since the Unix epoch).
    pub loaded_at: u64,
    /// Builds swapped in since start.
    pub swaps: u64,
    /// The last rejected reload of this plugin, if any: (when, why).
    pub last_error: Option<(u64, String)>,
}

impl std::fmt::Debug for PluginSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginSlot").field("current", self.current.load().name()).finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl PluginSlot {
    /// A slot serving `plugin`.
    pub fn new(plugin: Plugin) -> Self {
        let status = SlotStatus {
            name: plugin.name().to_string(),
            path: plugin.source.path.clone(),
            sha256: plugin.sha256.clone(),
            loaded_at: unix_now(),
            swaps: 0,
            last_error: None,
        };
        let stats = plugin.stats.clone();
        Self { current: arc_swap::ArcSwap::from_pointee(plugin), stats, status: std::sync::Mutex::new(status) }
    }

    /// The build serving now.
    pub fn current(&self) -> Arc<Plugin> {
        self.current.load_full()
    }

    /// Counters of every build that served in this slot.
    pub fn stats(&self) -> &Arc<PluginStats> {
        &self.stats
    }

    /// Puts `plugin` in service; calls in flight finish on the previous build.
    ///
    /// With `fresh_cache`, the new build caches under a new scope: answers of the old build, including those of
    /// calls still running that land in the cache after the swap, are never served by it. Returns the scope the
    /// old build cached under (for the caller to drop).
    pub fn swap(&self, mut plugin: Plugin, fresh_cache: bool) -> Arc<str> {
        plugin.share_stats(self.stats.clone());
        let old_scope = self.current.load().cache_scope.clone();
        let mut status = self.lock_status();
        status.sha256 = plugin.sha256.clone();
        status.path = plugin.source.path.clone();
        status.loaded_at = unix_now();
        status.swaps += 1;
        plugin.cache_scope =
            if fresh_cache { Arc::from(format!("{}#{}", plugin.name(), status.swaps)) } else { old_scope.clone() };
        self.current.store(Arc::new(plugin));
        old_scope
    }

    /// Records why a reload of this plugin was rejected.
    pub fn record_error(&self, message: String) {
        self.lock_status().last_error = Some((unix_now(), message));
    }

    /// A snapshot of the status.
    pub fn status(&self) -> SlotStatus {
        self.lock_status().clone()
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, SlotStatus> {
        // A panic while holding this lock cannot leave the status inconsistent (plain field writes): recover it.
        self.status.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
