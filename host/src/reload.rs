//! Hot swap: re-read the config, rebuild the plugins whose component or section changed, prove each new build
//! on its probe names, then swap it into its slot. Compilation runs on blocking threads, never on the handshake
//! path; a build that fails to compile, link or probe is rejected with a logged reason and the running one keeps
//! serving. Triggers: `SIGHUP`, the admin API, and a file watcher.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::cache::CertCache;
use crate::config::{Config, ConfigError, OnSwap, PluginSettings};
use crate::plugin::{Plugin, PluginError, PluginLoadError, PluginRuntime, PluginSlot, Selection};
use crate::sni::{MalformedName, ServerName};
use crate::store::Stores;

/// Why a reload of the config, or of one plugin, was refused. The running build keeps serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The config file no longer loads.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The plugin's component file could not be read.
    #[error("{}: {message}", path.display())]
    Read {
        /// The component file.
        path: PathBuf,
        /// The I/O error.
        message: String,
    },
    /// The new build does not compile or link.
    #[error(transparent)]
    Load(#[from] PluginLoadError),
    /// A probe name in the config is not a server name.
    #[error("probe name {name:?}: {source}")]
    ProbeName {
        /// As written.
        name: String,
        /// Why it is not one.
        source: MalformedName,
    },
    /// The new build failed a probe call.
    #[error("probe {name}: {source}")]
    ProbeFailed {
        /// The probe name.
        name: ServerName,
        /// What the call came to.
        source: PluginError,
    },
    /// The new build has no certificate for a probe name.
    #[error("probe {name}: the new build has no certificate for it")]
    ProbeNotFound {
        /// The probe name.
        name: ServerName,
    },
    /// The new build answered a probe with a certificate serving would refuse.
    #[error("probe {name}: {source}")]
    ProbeRefused {
        /// The probe name.
        name: ServerName,
        /// Why it was refused.
        source: crate::select::AnswerError,
    },
    /// A blocking task of the reload did not finish (it panicked or the runtime is shutting down).
    #[error("reload task did not finish: {0}")]
    Task(String),
}

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
        let loaded = match tokio::task::spawn_blocking(move || Config::load(&path)).await {
            Ok(loaded) => loaded.map_err(ReloadError::from),
            Err(err) => Err(ReloadError::Task(err.to_string())),
        };
        let config = match loaded {
            Ok(config) => config,
            Err(err) => {
                tracing::error!(error = %err, "reload refused: config invalid, everything keeps running as it was");
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
                    slot.record_error(reason.to_string());
                    report.rejected.push((settings.name.clone(), reason.to_string()));
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
    async fn rebuild(&self, slot: &PluginSlot, settings: &PluginSettings) -> Result<Option<Plugin>, ReloadError> {
        let current = slot.current();
        let path = settings.path.clone();
        let bytes = tokio::task::spawn_blocking(move || std::fs::read(&path))
            .await
            .map_err(|e| ReloadError::Task(e.to_string()))?
            .map_err(|e| ReloadError::Read { path: settings.path.clone(), message: e.to_string() })?;
        // Same component, same section: nothing to compile (a reload touches every plugin).
        if crate::plugin::sha256_hex(&bytes) == current.sha256() && settings == current.source() {
            return Ok(None);
        }
        let (runtime, stores, new_settings) = (self.runtime.clone(), self.stores.clone(), settings.clone());
        // Compiling is CPU work of tens of milliseconds: a blocking thread, not a worker.
        let plugin = tokio::task::spawn_blocking(move || runtime.load_bytes(&new_settings, &bytes, &stores))
            .await
            .map_err(|e| ReloadError::Task(e.to_string()))??;
        probe(&plugin, &settings.probe_names).await?;
        Ok(Some(plugin))
    }
}

/// Every probe name must get a valid certificate from the new build.
async fn probe(plugin: &Plugin, names: &[String]) -> Result<(), ReloadError> {
    for raw in names {
        let name = ServerName::parse(raw).map_err(|source| ReloadError::ProbeName { name: raw.clone(), source })?;
        // Probes are not made on any listener's behalf.
        let selection = match plugin.select(&name, "").await {
            Err(source) => return Err(ReloadError::ProbeFailed { name, source }),
            Ok(Selection::NotFound) => return Err(ReloadError::ProbeNotFound { name }),
            Ok(selection) => selection,
        };
        if let Err(source) = crate::select::check_answer(&plugin.source().grants, &name, selection) {
            return Err(ReloadError::ProbeRefused { name, source });
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
