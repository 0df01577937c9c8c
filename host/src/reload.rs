//! Hot swap: re-read the config, rebuild the plugins whose component or section changed, prove each new build
//! on its probe names, then swap it into its slot. Compilation runs on blocking threads, never on the handshake
//! path; a build that fails to compile, link or probe is rejected with a logged reason and the running one keeps
//! serving. Triggers: `SIGHUP`, the admin API, and a file watcher.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::cache::CertCache;
use crate::certs;
use crate::config::{Config, OnSwap, PluginSettings};
use crate::plugin::{Plugin, PluginRuntime, PluginSlot, Selection, Stores};
use crate::sni::ServerName;

/// Rebuilds and swaps plugins from the config file.
#[derive(Debug)]
pub struct Reloader {
    config_path: PathBuf,
    runtime: PluginRuntime,
    stores: Stores,
    slots: HashMap<String, Arc<PluginSlot>>,
    cache: CertCache,
    /// One reload at a time: triggers that arrive meanwhile wait, then find nothing left to do.
    running: tokio::sync::Mutex<()>,
}

/// What a reload did, per plugin.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReloadReport {
    /// Plugins whose new build is now serving.
    pub swapped: Vec<String>,
    /// Plugins whose component and settings did not change.
    pub unchanged: Vec<String>,
    /// Plugins (or the config itself) whose reload was refused, with the reason; the old build keeps serving.
    pub rejected: Vec<(String, String)>,
    /// Changes a reload cannot apply (added or removed plugins); they take effect on restart.
    pub needs_restart: Vec<String>,
}

impl Reloader {
    /// A reloader over a running server's slots.
    pub fn new(
        config_path: PathBuf,
        runtime: PluginRuntime,
        stores: Stores,
        slots: HashMap<String, Arc<PluginSlot>>,
        cache: CertCache,
    ) -> Self {
        Self { config_path, runtime, stores, slots, cache, running: tokio::sync::Mutex::new(()) }
    }

    /// Re-reads the config and swaps every plugin whose build or section changed and whose new build passes.
    pub async fn reload(&self) -> ReloadReport {
        let _running = self.running.lock().await;
        let mut report = ReloadReport::default();
        let path = self.config_path.clone();
        let config = match tokio::task::spawn_blocking(move || Config::load(&path)).await {
            Ok(Ok(config)) => config,
            Ok(Err(err)) => {
                tracing::error!(error = %err, "reload refused: config invalid, everything keeps running as it was");
                report.rejected.push(("config".into(), err.to_string()));
                return report;
            }
            Err(err) => {
                report.rejected.push(("config".into(), err.to_string()));
                return report;
            }
        };
        for settings in &config.plugins {
            let Some(slot) = self.slots.get(&settings.name) else {
                report.needs_restart.push(format!("plugin {:?} added", settings.name));
                continue;
            };
            match self.rebuild(slot, settings).await {
                Ok(None) => report.unchanged.push(settings.name.clone()),
                Ok(Some(plugin)) => {
                    let flush = settings.on_swap == OnSwap::Flush;
                    let old_scope = slot.swap(plugin, flush);
                    if flush {
                        // Frees the memory now; correctness comes from the new scope.
                        self.cache.invalidate_plugin(&old_scope);
                    }
                    tracing::info!(plugin = %settings.name, sha256 = %slot.status().sha256, "plugin swapped in");
                    report.swapped.push(settings.name.clone());
                }
                Err(reason) => {
                    tracing::error!(plugin = %settings.name, reason = %reason, "plugin reload rejected, the running build keeps serving");
                    slot.record_error(reason.clone());
                    report.rejected.push((settings.name.clone(), reason));
                }
            }
        }
        for name in self.slots.keys() {
            if !config.plugins.iter().any(|p| &p.name == name) {
                report.needs_restart.push(format!("plugin {name:?} removed"));
            }
        }
        report
    }

    /// A new build for `slot` if its component or settings changed and the build passes; `None` if unchanged.
    async fn rebuild(&self, slot: &PluginSlot, settings: &PluginSettings) -> Result<Option<Plugin>, String> {
        let current = slot.current();
        let path = settings.path.clone();
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(&path))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("{}: {e}", settings.path.display()))?;
        // Same component, same section: nothing to compile (a reload touches every plugin).
        if crate::plugin::sha256_hex(&bytes) == current.sha256() && settings == current.source() {
            return Ok(None);
        }
        let (runtime, stores, new_settings) = (self.runtime.clone(), self.stores.clone(), settings.clone());
        // Compiling is CPU work of tens of milliseconds: a blocking thread, not a worker.
        let plugin = tokio::task::spawn_blocking(move || runtime.load_bytes(&new_settings, &bytes, &stores))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        probe(&plugin, &settings.probe_names).await?;
        Ok(Some(plugin))
    }
}

/// Every probe name must get a valid certificate from the new build.
async fn probe(plugin: &Plugin, names: &[String]) -> Result<(), String> {
    for raw in names {
        let name = ServerName::parse(raw).map_err(|e| format!("probe name {raw:?}: {e}"))?;
        match plugin.select(&name).await.map_err(|e| format!("probe {name}: {e}"))? {
            Selection::NotFound => return Err(format!("probe {name}: the new build has no certificate for it")),
            Selection::Found { chain, key, .. } => {
                certs::validate_answer(chain.as_bytes(), key.as_bytes(), &name)
                    .map_err(|e| format!("probe {name}: {e}"))?;
            }
        }
    }
    Ok(())
}

/// Reloads whenever the config file or a plugin component changes (size or modification time), checking every
/// `interval`. Polling keeps it dependency-free and works on every filesystem, network mounts included.
pub async fn watch(reloader: Arc<Reloader>, interval: Duration) {
    let mut seen = reloader.fingerprint().await;
    loop {
        tokio::time::sleep(interval).await;
        let now = reloader.fingerprint().await;
        if now != seen {
            tracing::info!("config or plugin file changed, reloading");
            let report = reloader.reload().await;
            tracing::info!(swapped = ?report.swapped, rejected = report.rejected.len(), "reload finished");
            seen = now;
        }
    }
}

impl Reloader {
    /// (size, modification time) of the config file and every plugin component it currently names.
    async fn fingerprint(&self) -> Vec<Option<(u64, SystemTime)>> {
        let mut files = vec![self.config_path.clone()];
        files.extend(self.slots.values().map(|slot| slot.current().source().path.clone()));
        tokio::task::spawn_blocking(move || {
            files.iter().map(|f| std::fs::metadata(f).ok().and_then(|m| Some((m.len(), m.modified().ok()?)))).collect()
        })
        .await
        .unwrap_or_default()
    }
}
