//! The plugin runtime: wasmtime components compiled once, pre-instantiated once, and run in a fresh `Store`
//! for every call, bounded by a deadline, a memory cap and a concurrency cap.
//!
//! A fresh store per call (the `wasmtime serve` pattern) means no state leaks between names and a trapped
//! instance is simply dropped. Calls only happen on cache misses, and with the pooling allocator a fresh
//! instantiation costs a few microseconds.

mod bindings;
mod guard;
mod http;
mod limits;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, WasiCtx};

use self::bindings::{CallState, CertSelectorPre, KvAccess, WitSelection};
use self::limits::CallLimiter;
use crate::config::PluginSettings;
use crate::metrics::inc;
use crate::sni::ServerName;

/// How often the epoch advances. A running plugin yields to the async executor at every tick, so a plugin that
/// spins holds a worker thread for at most this long at a time.
const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Bytes of a plugin's stderr kept per call, to explain traps (a panic message fits easily).
const STDERR_CAPTURE: usize = 2048;

/// What a plugin answered.
#[derive(Clone, PartialEq, Eq)]
pub enum Selection {
    /// A certificate, still unparsed.
    Found {
        /// PEM chain, leaf first.
        chain: String,
        /// PEM private key.
        key: String,
        /// Cache TTL hint.
        ttl: Option<Duration>,
    },
    /// The plugin does not know the name.
    NotFound,
}

// Written by hand: the derived form would print the private key.
impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selection::Found { chain, ttl, .. } => f
                .debug_struct("Found")
                .field("chain_bytes", &chain.len())
                .field("key", &"<redacted>")
                .field("ttl", ttl)
                .finish(),
            Selection::NotFound => f.write_str("NotFound"),
        }
    }
}

/// Why a plugin call failed. Each variant is the plugin's (or its configuration's) fault, never the client's.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// The plugin returned `err(message)`.
    #[error("plugin returned an error: {0}")]
    Returned(String),
    /// The plugin returned an error after a store it was granted (Redis, an HTTP API) could not be reached.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// The plugin trapped (panic, unreachable, out-of-bounds access...).
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// The plugin tried to grow its memory past the cap and trapped.
    #[error("plugin exceeded its memory limit of {limit} bytes")]
    MemoryLimit {
        /// The cap.
        limit: usize,
    },
    /// Growing the instance's memory would have taken the plugins of the whole process past
    /// `server.plugin_memory_total` (many large calls at once): this call trapped, the others go on.
    #[error("process-wide plugin memory budget of {limit} bytes exhausted")]
    MemoryBudget {
        /// The budget.
        limit: usize,
    },
    /// The call was not made: the plugin's call-rate cap or circuit breaker shed it.
    #[error("plugin call shed: {0:?}")]
    Shed(guard::Shed),
    /// The call ran past its deadline and was abandoned.
    #[error("plugin did not answer within {0:?}")]
    Timeout(Duration),
    /// A fresh instance could not be set up (sandbox directory missing, instantiation failed).
    #[error("plugin could not be instantiated: {0}")]
    Instantiate(String),
}

impl PluginError {
    /// Whether this failure says the plugin (or the store behind it) is unhealthy, so that it counts towards the
    /// circuit breaker. An error the plugin returned for one name, or a shared budget that many calls at once used
    /// up, is something a client can provoke at will by choosing names: counting it would let any client switch
    /// selection off for everyone.
    pub fn counts_against_plugin(&self) -> bool {
        match self {
            PluginError::Trap(_)
            | PluginError::MemoryLimit { .. }
            | PluginError::Timeout(_)
            | PluginError::StoreUnavailable(_)
            | PluginError::Instantiate(_) => true,
            PluginError::Returned(_) | PluginError::MemoryBudget { .. } | PluginError::Shed(_) => false,
        }
    }

    /// Short, stable label for metrics and log fields.
    pub fn kind(&self) -> &'static str {
        match self {
            PluginError::Returned(_) => "error",
            PluginError::StoreUnavailable(_) => "store_unavailable",
            PluginError::Shed(guard::Shed::RateLimited) => "rate_limited",
            PluginError::Shed(guard::Shed::ClientRateLimited) => "client_rate_limited",
            PluginError::Shed(guard::Shed::CircuitOpen) => "circuit_open",
            PluginError::Trap(_) => "trap",
            PluginError::MemoryLimit { .. } => "memory",
            PluginError::MemoryBudget { .. } => "memory_budget",
            PluginError::Timeout(_) => "timeout",
            PluginError::Instantiate(_) => "instantiate",
        }
    }
}

/// A plugin that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
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
    #[error("plugin {name:?} ({}): not a tern:plugin@0.1.0 cert-selector: {message}", path.display())]
    Link {
        /// Plugin name.
        name: String,
        /// Component file.
        path: PathBuf,
        /// Linker message.
        message: String,
    },
    /// A granted directory does not exist or is not a directory.
    #[error("plugin {name:?}: grants.files {}: {message}", path.display())]
    Grant {
        /// Plugin name.
        name: String,
        /// The granted directory.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The runtime itself could not be set up.
    #[error("plugin runtime: {0}")]
    Runtime(String),
}

/// Counters of one plugin's calls.
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Calls started.
    pub calls: AtomicU64,
    /// Calls that answered with a certificate.
    pub found: AtomicU64,
    /// Calls that answered "not found".
    pub not_found: AtomicU64,
    /// Calls that returned an error message (store outages included).
    pub errors: AtomicU64,
    /// Calls that failed because a granted store could not be reached.
    pub store_unavailable: AtomicU64,
    /// Calls that trapped (memory-limit traps included).
    pub traps: AtomicU64,
    /// Calls that hit the memory cap.
    pub memory_limits: AtomicU64,
    /// Calls that trapped because all plugins' instances together reached `server.plugin_memory_total`.
    pub memory_budget: AtomicU64,
    /// Calls abandoned at the deadline.
    pub timeouts: AtomicU64,
    /// Calls not made because of the call-rate cap.
    pub rate_limited: AtomicU64,
    /// Calls not made because the client network's share of the rate cap was spent.
    pub client_rate_limited: AtomicU64,
    /// Calls not made because the circuit breaker was open.
    pub circuit_open: AtomicU64,
    /// Total time spent in calls, microseconds.
    pub busy_micros: AtomicU64,
    /// The largest linear memory one call's instance held, bytes (memory per instance).
    pub peak_memory_bytes: AtomicU64,
}

/// The shared engine: compiler, pooling allocator and the epoch ticker.
#[derive(Clone)]
pub struct PluginRuntime {
    engine: Engine,
    linker: Arc<Linker<CallState>>,
    ticker: Arc<EpochTicker>,
    memory: Arc<limits::MemoryBudget>,
}

impl std::fmt::Debug for PluginRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginRuntime").finish_non_exhaustive()
    }
}

impl PluginRuntime {
    /// A runtime sized for plugins using at most `max_memory` bytes each and `max_instances` instances at once.
    pub fn new(max_memory: usize, max_instances: u32) -> Result<Self, LoadError> {
        let engine = match Engine::new(&engine_config(Some((max_memory, max_instances)))) {
            Ok(engine) => engine,
            Err(err) => {
                // The pooling allocator reserves address space up front; where that is not allowed (a low
                // `ulimit -v`), fall back to allocating per instance, which is slower but works.
                tracing::warn!(error = %err, "pooling allocator unavailable, allocating plugin instances on demand");
                Engine::new(&engine_config(None)).map_err(|e| LoadError::Runtime(e.to_string()))?
            }
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| LoadError::Runtime(e.to_string()))?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(|e| LoadError::Runtime(e.to_string()))?;
        bindings::add_to_linker(&mut linker).map_err(|e| LoadError::Runtime(e.to_string()))?;
        let ticker = Arc::new(EpochTicker::start(engine.clone()));
        let memory = limits::MemoryBudget::new(crate::config::defaults::PLUGIN_MEMORY_TOTAL);
        Ok(Self { engine, linker: Arc::new(linker), ticker, memory })
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

    /// Compiles and links a plugin. CPU-heavy (tens of milliseconds): call it off the async workers.
    /// `stores` holds the Redis stores by name, for the plugin's `kv` grant.
    pub fn load(&self, settings: &PluginSettings, stores: &Stores) -> Result<Plugin, LoadError> {
        let bytes = std::fs::read(&settings.path).map_err(|e| LoadError::Read {
            name: settings.name.clone(),
            path: settings.path.clone(),
            message: e.to_string(),
        })?;
        self.load_bytes(settings, &bytes, stores)
    }

    /// Like [`PluginRuntime::load`], from the component's bytes.
    pub fn load_bytes(&self, settings: &PluginSettings, bytes: &[u8], stores: &Stores) -> Result<Plugin, LoadError> {
        let component = Component::from_binary(&self.engine, bytes).map_err(|e| LoadError::Compile {
            name: settings.name.clone(),
            path: settings.path.clone(),
            message: compile_message(&format!("{e:#}"), bytes),
        })?;
        let link_err = |e: wasmtime::Error| LoadError::Link {
            name: settings.name.clone(),
            path: settings.path.clone(),
            message: format!("{e:#}"),
        };
        let instance_pre = self.linker.instantiate_pre(&component).map_err(link_err)?;
        let pre = CertSelectorPre::new(instance_pre).map_err(link_err)?;
        if let Some(dir) = &settings.grants.files
            && !dir.is_dir()
        {
            return Err(LoadError::Grant {
                name: settings.name.clone(),
                path: dir.clone(),
                message: "not a directory".into(),
            });
        }
        let kv = match &settings.grants.kv {
            None => None,
            Some(grant) => {
                // Config validation checks the name; this guards callers that build settings by hand.
                let store = stores.get(&grant.store).cloned().ok_or_else(|| {
                    LoadError::Runtime(format!(
                        "plugin {:?}: grants.kv names no store {:?}",
                        settings.name, grant.store
                    ))
                })?;
                Some(Arc::new(KvAccess { store, prefixes: grant.prefixes.clone() }))
            }
        };
        Ok(Plugin {
            name: Arc::from(settings.name.as_str()),
            kv,
            http: settings.grants.http.clone().map(Arc::new),
            runtime: self.clone(),
            pre,
            settings: Arc::new(settings.settings.clone()),
            sha256: sha256_hex(bytes),
            cache_scope: Arc::from(settings.name.as_str()),
            source: settings.clone(),
            permits: Arc::new(Semaphore::new(settings.max_concurrency)),
            guard: guard::Guard::new(
                settings.max_calls_per_second,
                settings.breaker_threshold,
                settings.breaker_cooldown,
            )
            .with_client_share(settings.max_calls_per_second_per_client),
            stats: Arc::new(PluginStats::default()),
        })
    }
}

/// A compiled, linked plugin, ready to be called.
pub struct Plugin {
    name: Arc<str>,
    /// Keeps the engine and its epoch ticker alive as long as the plugin can be called: without the ticker a
    /// spinning plugin would never yield and its deadline would never fire.
    runtime: PluginRuntime,
    pre: CertSelectorPre<CallState>,
    /// The settings it was loaded from (a reload compares against them).
    source: PluginSettings,
    /// SHA-256 of the component, hex.
    sha256: String,
    /// The cache key prefix of this build's answers: the plugin name, or a new one after a flushing swap.
    cache_scope: Arc<str>,
    /// `source.settings`, shared with every call's store.
    settings: Arc<BTreeMap<String, String>>,
    kv: Option<Arc<KvAccess>>,
    http: Option<Arc<crate::config::HttpGrant>>,
    permits: Arc<Semaphore>,
    guard: guard::Guard,
    stats: Arc<PluginStats>,
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("name", &self.name).field("sha256", &self.sha256).finish_non_exhaustive()
    }
}

impl Plugin {
    /// The plugin's configured name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Its call counters.
    pub fn stats(&self) -> &Arc<PluginStats> {
        &self.stats
    }

    /// The scope its answers are cached under.
    pub fn cache_scope(&self) -> &Arc<str> {
        &self.cache_scope
    }

    /// The settings it was loaded from.
    pub fn source(&self) -> &PluginSettings {
        &self.source
    }

    /// SHA-256 of the component, hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// Makes this plugin count into `stats` (a replacement keeps its slot's counters).
    pub fn share_stats(&mut self, stats: Arc<PluginStats>) {
        self.stats = stats;
    }

    /// Calls `select-certificate(servername)` in a fresh instance, within the plugin's limits.
    pub async fn select(&self, servername: &ServerName) -> Result<Selection, PluginError> {
        self.select_for(servername, None).await
    }

    /// Like [`Plugin::select`], on behalf of a client at `client` (its network's share of the rate cap applies).
    pub async fn select_for(
        &self,
        servername: &ServerName,
        client: Option<std::net::IpAddr>,
    ) -> Result<Selection, PluginError> {
        if let Err(shed) = self.guard.admit_for(client) {
            inc(match shed {
                guard::Shed::RateLimited => &self.stats.rate_limited,
                guard::Shed::ClientRateLimited => &self.stats.client_rate_limited,
                guard::Shed::CircuitOpen => &self.stats.circuit_open,
            });
            return Err(PluginError::Shed(shed));
        }
        // Waiting for a slot is bounded by the caller's handshake deadline, not by the plugin's own timeout.
        let _permit = self.permits.acquire().await.map_err(|_| PluginError::Instantiate("plugin closed".into()))?;
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let timeout = self.source.timeout;
        let result = match tokio::time::timeout(timeout, self.call(servername)).await {
            Ok(result) => result,
            Err(_) => Err(PluginError::Timeout(timeout)),
        };
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.stats.busy_micros.fetch_add(micros, Ordering::Relaxed);
        let counter = match &result {
            Ok(Selection::Found { .. }) => &self.stats.found,
            Ok(Selection::NotFound) => &self.stats.not_found,
            Err(PluginError::Returned(_) | PluginError::Instantiate(_)) => &self.stats.errors,
            Err(PluginError::StoreUnavailable(_)) => {
                self.stats.errors.fetch_add(1, Ordering::Relaxed);
                &self.stats.store_unavailable
            }
            Err(PluginError::Trap(_)) => &self.stats.traps,
            Err(PluginError::MemoryLimit { .. }) => {
                self.stats.traps.fetch_add(1, Ordering::Relaxed);
                &self.stats.memory_limits
            }
            Err(PluginError::MemoryBudget { .. }) => {
                self.stats.traps.fetch_add(1, Ordering::Relaxed);
                &self.stats.memory_budget
            }
            Err(PluginError::Timeout(_)) => &self.stats.timeouts,
            // Shed calls return before reaching here.
            Err(PluginError::Shed(_)) => &self.stats.errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.guard.report(result.as_ref().is_err_and(PluginError::counts_against_plugin));
        result
    }

    async fn call(&self, servername: &ServerName) -> Result<Selection, PluginError> {
        // Epoch ticks (hence deadlines and yielding) while this call runs; dropped with the future on timeout.
        let _ticking = self.runtime.ticker.running();
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        // Set by the kv and HTTP capabilities when the store behind them cannot be reached.
        let store_down = Arc::new(AtomicBool::new(false));
        let wasi = self.wasi_ctx(stderr.clone()).await?;
        let state = CallState {
            wasi,
            stderr,
            table: ResourceTable::new(),
            limiter: CallLimiter::new(self.source.memory_limit, self.runtime.memory.clone()),
            plugin: self.name.clone(),
            servername: Some(servername.clone()),
            settings: self.settings.clone(),
            kv: self.kv.clone(),
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            http_hooks: http::HttpHooks { grant: self.http.clone(), store_down: store_down.clone() },
            store_down: store_down.clone(),
            log_lines: 0,
        };
        let mut store = Store::new(&self.runtime.engine, state);
        store.limiter(|state| &mut state.limiter);
        // Yield to the executor at every tick: a spinning plugin shares its worker thread, and the timeout
        // around this future can fire and drop it.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));

        let instance =
            self.pre.instantiate_async(&mut store).await.map_err(|e| self.classify(&store, e, "instantiate"))?;
        let answer = instance
            .call_select_certificate(&mut store, servername.as_str())
            .await
            .map_err(|e| self.classify(&store, e, "call"))?;
        let peak = u64::try_from(store.data().limiter.peak).unwrap_or(u64::MAX);
        self.stats.peak_memory_bytes.fetch_max(peak, Ordering::Relaxed);
        match answer {
            Ok(WitSelection::Found(cert)) => Ok(Selection::Found {
                chain: cert.chain,
                key: cert.private_key,
                ttl: cert.ttl_seconds.map(|s| Duration::from_secs(u64::from(s))),
            }),
            Ok(WitSelection::NotFound) => Ok(Selection::NotFound),
            Err(message) if store_down.load(Ordering::Relaxed) => Err(PluginError::StoreUnavailable(message)),
            Err(message) => Err(PluginError::Returned(message)),
        }
    }

    /// The WASI context of one call: nothing inherited, the granted directory (if any) read-only at `/`.
    async fn wasi_ctx(&self, stderr: MemoryOutputPipe) -> Result<WasiCtx, PluginError> {
        let Some(dir) = self.source.grants.files.clone() else {
            return Ok(WasiCtx::builder().stderr(stderr).build());
        };
        // Opening the directory is a filesystem call: keep it off the async workers.
        tokio::task::spawn_blocking(move || {
            let mut builder = WasiCtx::builder();
            builder
                .stderr(stderr)
                .preopened_dir(&dir, "/", FsPerms::ReadOnly)
                .map_err(|e| PluginError::Instantiate(format!("granted directory {}: {e}", dir.display())))?;
            Ok(builder.build())
        })
        .await
        .map_err(|e| PluginError::Instantiate(e.to_string()))?
    }

    fn classify(&self, store: &Store<CallState>, err: wasmtime::Error, stage: &str) -> PluginError {
        if store.data().limiter.memory_exceeded {
            return PluginError::MemoryLimit { limit: store.data().limiter.memory_limit() };
        }
        if store.data().limiter.budget_exceeded {
            return PluginError::MemoryBudget { limit: self.runtime.memory.limit() };
        }
        if err.downcast_ref::<wasmtime::Trap>().is_some() || stage == "call" {
            // A Rust plugin's panic message goes to stderr just before the trap: it says what went wrong.
            let stderr = store.data().stderr.contents();
            let stderr = String::from_utf8_lossy(&stderr);
            let stderr = stderr.trim();
            return PluginError::Trap(if stderr.is_empty() {
                format!("{err:#}")
            } else {
                format!("{stderr} ({err:#})")
            });
        }
        PluginError::Instantiate(format!("{err:#}"))
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

fn engine_config(pooling: Option<(usize, u32)>) -> wasmtime::Config {
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
        config.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on a plain thread while at least one plugin call is running,
/// and sleeps (parked, no wake-ups) while none is: an idle or cache-hit-only tern does not wake 200 times a second.
struct EpochTicker {
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
    fn running(&self) -> Ticking<'_> {
        if self.shared.running.fetch_add(1, Ordering::AcqRel) == 0
            && let Some(thread) = &self.thread
        {
            thread.unpark();
        }
        Ticking(self)
    }
}

/// A running plugin call, as far as the epoch ticker is concerned.
struct Ticking<'a>(&'a EpochTicker);

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

/// Lowercase hex SHA-256 of `bytes` (a component's identity in status and reload decisions).
pub fn sha256_hex(bytes: &[u8]) -> String {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

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
        f.debug_struct("PluginSlot").field("current", &self.current.load().name).finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl PluginSlot {
    /// A slot serving `plugin`.
    pub fn new(plugin: Plugin) -> Self {
        let status = SlotStatus {
            name: plugin.name.to_string(),
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
            if fresh_cache { Arc::from(format!("{}#{}", plugin.name, status.swaps)) } else { old_scope.clone() };
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

/// Redis stores by their config name.
pub type Stores = std::collections::HashMap<String, Arc<crate::store::RedisStore>>;

/// Loads every configured plugin, compiling them on blocking threads. Used by the server and by `tern check`.
pub async fn load_all(
    runtime: &PluginRuntime,
    plugins: &[PluginSettings],
    stores: &Stores,
) -> Result<Vec<Plugin>, LoadError> {
    let mut loaded = Vec::with_capacity(plugins.len());
    for settings in plugins {
        let (runtime, settings, stores) = (runtime.clone(), settings.clone(), stores.clone());
        let plugin = tokio::task::spawn_blocking(move || runtime.load(&settings, &stores))
            .await
            .map_err(|e| LoadError::Runtime(e.to_string()))??;
        loaded.push(plugin);
    }
    Ok(loaded)
}

/// Sizes a runtime for a set of plugins: the largest memory cap and the sum of concurrency caps (plus headroom
/// for one-off calls).
pub fn runtime_for(plugins: &[PluginSettings]) -> Result<PluginRuntime, LoadError> {
    let max_memory =
        plugins.iter().map(|p| p.memory_limit).max().unwrap_or(crate::config::defaults::PLUGIN_MEMORY_LIMIT);
    // Twice the caps: during a swap the old build's calls finish while the new build's start.
    let instances: usize = 2 * plugins.iter().map(|p| p.max_concurrency).sum::<usize>() + 8;
    PluginRuntime::new(max_memory, u32::try_from(instances).unwrap_or(u32::MAX))
}
