//! The shared engine: compiling and linking components, the pooling allocator, the epoch ticker that interrupts
//! running calls, and the errors of loading a plugin.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use super::bindings::{self, CallState, KvAccess};
use super::call::Pre;
use super::instance::{Recipe, Spares};
use super::{Plugin, PluginStats, guard, limits};
use crate::config::PluginSettings;
use crate::store::Stores;

/// How often the epoch advances. A running plugin yields to the async executor at every tick, so a plugin that
/// spins holds a worker thread for at most this long at a time.
const EPOCH_TICK: Duration = Duration::from_millis(5);

/// A plugin that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginLoadError {
    /// The component file could not be read.
    #[error("plugin {name:?}: cannot read {}: {message}", path.display())]
    Read {
        /// Plugin name.
        name: String,
        /// Component file.
        path: PathBuf,
        /// The I/O error.
        message: String,
    },
    /// The file is not a WebAssembly component tern can compile.
    #[error("plugin {name:?} ({}): cannot compile: {message}", path.display())]
    Compile {
        /// Plugin name.
        name: String,
        /// Component file.
        path: PathBuf,
        /// Compiler message.
        message: String,
    },
    /// The component does not fit the `tern:plugin/cert-selector` world, or imports what the host lacks.
    #[error("plugin {name:?} ({}): not a tern:plugin cert-selector (0.2.0 or 0.1.0): {message}", path.display())]
    Link {
        /// Plugin name.
        name: String,
        /// Component file.
        path: PathBuf,
        /// Linker message.
        message: String,
    },
    /// A granted file or directory is unusable (`grants.files` not a directory, `grants.routes.origin_ca` not
    /// CA certificates).
    #[error("plugin {name:?}: {grant} {}: {message}", path.display())]
    Grant {
        /// Plugin name.
        name: String,
        /// The grant's key.
        grant: &'static str,
        /// The granted file or directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The runtime itself could not be set up.
    #[error("plugin runtime: {0}")]
    Runtime(String),
}

/// The shared engine: compiler, pooling allocator and the epoch ticker.
#[derive(Clone)]
pub struct PluginRuntime {
    pub(super) engine: Engine,
    linker: Arc<Linker<CallState>>,
    pub(super) ticker: Arc<EpochTicker>,
    pub(super) memory: Arc<limits::MemoryBudget>,
    /// Bytes of each memory and table slot kept resident between calls (0: none, or no PAGEMAP_SCAN here).
    keep_resident: usize,
}

impl std::fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRuntime").finish_non_exhaustive()
    }
}

impl PluginRuntime {
    /// A runtime sized for plugins using at most `max_memory` bytes each and `max_instances` instances at once,
    /// keeping the default `server.plugin_keep_resident` of each memory and table slot resident between calls.
    pub fn new(max_memory: usize, max_instances: u32) -> Result<Self, PluginLoadError> {
        Self::keeping(max_memory, max_instances, crate::config::defaults::PLUGIN_KEEP_RESIDENT)
    }

    /// Like [`PluginRuntime::new`], keeping up to `keep_resident` bytes of each memory and table slot mapped
    /// between calls (`server.plugin_keep_resident`; 0: every slot is decommitted after its call). Where the kernel lacks the
    /// PAGEMAP_SCAN ioctl (Linux before 6.7) nothing is kept: without it every reset would copy the whole
    /// `keep_resident`, written or not.
    pub fn keeping(max_memory: usize, max_instances: u32, keep_resident: usize) -> Result<Self, PluginLoadError> {
        let mut keep_resident = if keep_resident > 0 && !wasmtime::PoolingAllocationConfig::is_pagemap_scan_available()
        {
            tracing::info!("PAGEMAP_SCAN unavailable: plugin memory slots are decommitted after each call");
            0
        } else {
            keep_resident
        };
        let engine = match Engine::new(&engine_config(Some((max_memory, max_instances)), keep_resident)) {
            Ok(engine) => engine,
            Err(err) => {
                // The pooling allocator reserves address space up front; where that is not allowed (a low
                // `ulimit -v`), fall back to allocating per instance, which is slower but works.
                tracing::warn!(error = %err, "pooling allocator unavailable, allocating plugin instances on demand");
                keep_resident = 0;
                Engine::new(&engine_config(None, 0)).map_err(|e| PluginLoadError::Runtime(e.to_string()))?
            }
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| PluginLoadError::Runtime(e.to_string()))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| PluginLoadError::Runtime(e.to_string()))?;
        bindings::add_to_linker(&mut linker).map_err(|e| PluginLoadError::Runtime(e.to_string()))?;
        let ticker = Arc::new(EpochTicker::start(engine.clone()));
        let memory = limits::MemoryBudget::new(crate::config::defaults::PLUGIN_MEMORY_TOTAL);
        Ok(Self { engine, linker: Arc::new(linker), ticker, memory, keep_resident })
    }

    /// Draws every instance's linear memory from a budget of `total` bytes (`server.plugin_memory_total`).
    /// Call before loading plugins: plugins share the budget of the runtime they were loaded by.
    pub fn with_memory_total(mut self, total: usize) -> Self {
        self.memory = limits::MemoryBudget::new(total);
        self
    }

    /// (bytes in use, budget) of plugin linear memory.
    pub fn memory(&self) -> (usize, usize) {
        (self.memory.used(), self.memory.limit())
    }

    /// Bytes of each memory and table slot kept resident between calls: `server.plugin_keep_resident`, or 0
    /// where the kernel cannot say which pages a call wrote.
    pub fn keep_resident(&self) -> usize {
        self.keep_resident
    }

    /// Bytes the pool keeps mapped in memory slots no call is using (`server.plugin_keep_resident` each at most).
    pub fn pool_resident_bytes(&self) -> usize {
        self.engine.pooling_allocator_metrics().map_or(0, |m| m.unused_memory_bytes_resident())
    }

    /// Compiles and links a plugin. CPU-heavy (tens of milliseconds): call it off the async workers.
    /// `stores` holds the Redis stores by name, for the plugin's `kv` grant.
    pub fn load(&self, settings: &PluginSettings, stores: &Stores) -> Result<Plugin, PluginLoadError> {
        let bytes = std::fs::read(&settings.path).map_err(|e| PluginLoadError::Read {
            name: settings.name.clone(),
            path: settings.path.clone(),
            message: e.to_string(),
        })?;
        self.load_bytes(settings, &bytes, stores)
    }

    /// Like [`PluginRuntime::load`], from the component's bytes.
    pub fn load_bytes(
        &self,
        settings: &PluginSettings,
        bytes: &[u8],
        stores: &Stores,
    ) -> Result<Plugin, PluginLoadError> {
        let component = Component::from_binary(&self.engine, bytes).map_err(|e| PluginLoadError::Compile {
            name: settings.name.clone(),
            path: settings.path.clone(),
            message: compile_message(&format!("{e:#}"), bytes),
        })?;
        let link_err = |e: wasmtime::Error| PluginLoadError::Link {
            name: settings.name.clone(),
            path: settings.path.clone(),
            message: format!("{e:#}"),
        };
        let instance_pre = self.linker.instantiate_pre(&component).map_err(link_err)?;
        let pre = Pre::new(instance_pre).map_err(link_err)?;
        if let Some(dir) = &settings.grants.files
            && !dir.is_dir()
        {
            return Err(PluginLoadError::Grant {
                name: settings.name.clone(),
                grant: "grants.files",
                path: dir.clone(),
                message: "not a directory".into(),
            });
        }
        // Origins are verified against it on first use; a file that cannot serve is a load error now, so that
        // `tern check` and start-up name it instead of every request to such an origin failing.
        if let Some(ca) = &settings.grants.origin_ca {
            crate::upstream::load_roots(ca).map_err(|message| PluginLoadError::Grant {
                name: settings.name.clone(),
                grant: "grants.routes.origin_ca",
                path: ca.clone(),
                message,
            })?;
        }
        let kv = match &settings.grants.kv {
            None => None,
            Some(grant) => {
                // Config validation checks the name; this guards callers that build settings by hand.
                let store = stores.get(&grant.store).cloned().ok_or_else(|| {
                    PluginLoadError::Runtime(format!(
                        "plugin {:?}: grants.kv names no store {:?}",
                        settings.name, grant.store
                    ))
                })?;
                Some(Arc::new(KvAccess { store, prefixes: grant.prefixes.clone() }))
            }
        };
        let recipe = Recipe {
            runtime: self.clone(),
            pre,
            name: Arc::from(settings.name.as_str()),
            memory_limit: settings.memory_limit,
            files: settings.grants.files.clone(),
            settings: Arc::new(settings.settings.clone()),
            kv,
            http: settings.grants.http.clone().map(Arc::new),
        };
        Ok(Plugin {
            recipe: Arc::new(recipe),
            spares: Arc::new(Spares::new(settings.spare_instances, settings.timeout)),
            sha256: sha256_hex(bytes),
            cache_scope: Arc::from(settings.name.as_str()),
            source: settings.clone(),
            permits: Arc::new(Semaphore::new(settings.max_concurrency)),
            guard: Arc::new(
                guard::Guard::new(settings.max_calls_per_second, settings.breaker_threshold, settings.breaker_cooldown)
                    .with_client_share(settings.max_calls_per_second_per_client),
            ),
            stats: Arc::new(PluginStats::default()),
        })
    }
}

/// The compiler's message, without the byte dumps wasmparser adds (`expected=[0x0, ...] actual=[...]`), and with
/// the likely cause when the file is not WebAssembly at all.
fn compile_message(message: &str, bytes: &[u8]) -> String {
    let first = message.split(" - expected=").next().unwrap_or(message);
    let first = first.lines().next().unwrap_or(first).trim_end_matches(':').trim();
    if !bytes.starts_with(b"\0asm") {
        return format!("{first} (not a WebAssembly file: build the plugin for wasm32-wasip2)");
    }
    first.to_string()
}

/// The engine's configuration; `pooling` is (largest memory, instances at once), and `keep_resident` the bytes
/// of each memory slot reset in place instead of decommitted (0: none).
fn engine_config(pooling: Option<(usize, u32)>, keep_resident: usize) -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    if let Some((max_memory, instances)) = pooling {
        let mut pool = wasmtime::PoolingAllocationConfig::default();
        pool.total_component_instances(instances);
        // A Rust component holds a handful of core instances; other languages' runtimes a few more.
        pool.total_core_instances(instances.saturating_mul(8));
        pool.total_memories(instances.saturating_mul(2));
        pool.total_tables(instances.saturating_mul(4));
        pool.total_stacks(instances);
        pool.max_memory_size(max_memory);
        if keep_resident > 0 {
            // Reset in place, found by the PAGEMAP_SCAN ioctl: only the pages the call wrote are copied back
            // from the image (or zeroed), and they stay mapped, so the next call does not fault them in again.
            // Tables too: a JavaScript call fills funcref entries lazily, and a decommitted table page faults
            // (and flushes the other cores' TLBs) again on every call.
            pool.linear_memory_keep_resident(keep_resident);
            pool.table_keep_resident(keep_resident);
            pool.pagemap_scan(wasmtime::Enabled::Yes);
        }
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on a plain thread while at least one plugin call is running,
/// and sleeps (parked, no wake-ups) while none is: an idle or cache-hit-only tern does not wake 200 times a second.
pub(super) struct EpochTicker {
    shared: Arc<TickerShared>,
    thread: Option<std::thread::Thread>,
}

struct TickerShared {
    stop: AtomicBool,
    /// Plugin calls in flight.
    running: std::sync::atomic::AtomicUsize,
}

impl EpochTicker {
    fn start(engine: Engine) -> Self {
        let shared = Arc::new(TickerShared { stop: AtomicBool::new(false), running: Default::default() });
        let state = shared.clone();
        let spawned = std::thread::Builder::new().name("tern-epoch".into()).spawn(move || {
            while !state.stop.load(Ordering::Acquire) {
                if state.running.load(Ordering::Acquire) == 0 {
                    // `unpark` before `park` is not lost: a call starting in between wakes this at once.
                    std::thread::park();
                    continue;
                }
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        });
        let thread = match spawned {
            Ok(handle) => Some(handle.thread().clone()),
            Err(err) => {
                // Without the ticker, plugins still run but cannot be interrupted: say so loudly.
                tracing::error!(error = %err, "could not start the epoch thread; plugin deadlines will not interrupt");
                None
            }
        };
        Self { shared, thread }
    }

    /// Marks a plugin call as running until the returned guard drops (also when its future is abandoned).
    pub(super) fn running(&self) -> Ticking<'_> {
        if self.shared.running.fetch_add(1, Ordering::AcqRel) == 0
            && let Some(thread) = &self.thread
        {
            thread.unpark();
        }
        Ticking(self)
    }
}

/// A running plugin call, as far as the epoch ticker is concerned.
pub(super) struct Ticking<'a>(&'a EpochTicker);

impl Drop for Ticking<'_> {
    fn drop(&mut self) {
        self.0.shared.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(thread) = &self.thread {
            thread.unpark();
        }
    }
}

/// Loads every configured plugin, compiling them on blocking threads. Used by the server and by `tern check`.
pub async fn load_all(
    runtime: &PluginRuntime,
    plugins: &[PluginSettings],
    stores: &Stores,
) -> Result<Vec<Plugin>, PluginLoadError> {
    let mut loaded = Vec::with_capacity(plugins.len());
    for settings in plugins {
        let (runtime, settings, stores) = (runtime.clone(), settings.clone(), stores.clone());
        let plugin = tokio::task::spawn_blocking(move || runtime.load(&settings, &stores))
            .await
            .map_err(|e| PluginLoadError::Runtime(e.to_string()))??;
        loaded.push(plugin);
    }
    Ok(loaded)
}

/// Sizes a runtime for a set of plugins: the largest memory cap and the sum of concurrency caps and spares (plus
/// headroom for one-off calls). `keep_resident` is `server.plugin_keep_resident`.
pub fn runtime_for(plugins: &[PluginSettings], keep_resident: usize) -> Result<PluginRuntime, PluginLoadError> {
    let max_memory =
        plugins.iter().map(|p| p.memory_limit).max().unwrap_or(crate::config::defaults::PLUGIN_MEMORY_LIMIT);
    // Twice the caps and spares: during a swap the old build's calls finish while the new build's start.
    let instances: usize = 2 * plugins.iter().map(|p| p.max_concurrency + p.spare_instances).sum::<usize>() + 8;
    PluginRuntime::keeping(max_memory, u32::try_from(instances).unwrap_or(u32::MAX), keep_resident)
}

/// Lowercase hex SHA-256 of `bytes` (a component's identity in status and reload decisions).
pub fn sha256_hex(bytes: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl PluginRuntime {
    /// Appends the families of the process-wide plugin memory.
    pub(crate) fn render(&self, x: &mut crate::metrics::Exposition) {
        let (used, budget) = self.memory();
        x.family("tern_plugin_memory_bytes", "gauge", "Linear memory held by running plugin instances, all plugins.");
        x.sample("tern_plugin_memory_bytes", "", used as u64);
        x.family("tern_plugin_memory_budget_bytes", "gauge", "server.plugin_memory_total.");
        x.sample("tern_plugin_memory_budget_bytes", "", budget as u64);
        let resident = self.pool_resident_bytes();
        x.family(
            "tern_plugin_pool_resident_bytes",
            "gauge",
            "Plugin memory slots' pages kept mapped between calls (server.plugin_keep_resident each).",
        );
        x.sample("tern_plugin_pool_resident_bytes", "", resident as u64);
    }
}
