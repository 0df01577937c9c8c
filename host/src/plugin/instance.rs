//! Making one plugin instance (a fresh `Store` with its own WASI context, limits and capabilities, instantiated
//! from the pre-linked component), and the spare instances made ahead of calls, off the handshake.
//!
//! Every call still runs in an instance nothing ran in before: a spare is instantiated, never called, and is
//! dropped after the one call that takes it. Only the instantiation moves out of the handshake's way.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use wasmtime::component::ResourceTable;
use wasmtime::{Store, UpdateDeadline};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{FsPerms, WasiCtx};

use super::bindings::{CallState, KvAccess, StoreSeen, v0_1, v0_2};
use super::call::Pre;
use super::limits::CallLimiter;
use super::{PluginError, PluginRuntime, http};
use crate::sni::ServerName;

/// Bytes of a plugin's stderr kept per call, to explain traps (a panic message fits easily).
const STDERR_CAPTURE: usize = 2048;

/// What every instance of one plugin build is made from; shared by its calls and the making of its spares.
pub(super) struct Recipe {
    /// Keeps the engine and its epoch ticker alive as long as the plugin can be called: without the ticker a
    /// spinning plugin would never yield and its deadline would never fire.
    pub(super) runtime: PluginRuntime,
    pub(super) pre: Pre,
    pub(super) name: Arc<str>,
    /// `memory_limit` of the plugin's settings.
    pub(super) memory_limit: usize,
    /// `grants.files`: opened read-only at `/` in every instance.
    pub(super) files: Option<PathBuf>,
    /// The plugin's own settings, shared with every call's store.
    pub(super) settings: Arc<BTreeMap<String, String>>,
    pub(super) kv: Option<Arc<KvAccess>>,
    pub(super) http: Option<Arc<crate::config::HttpGrant>>,
}

/// An instantiated component of either contract version.
pub(super) enum Bound {
    V0_1(v0_1::CertSelector),
    V0_2(v0_2::CertSelector),
}

/// An instance that has not run yet, with the store it lives in and how long making it took.
pub(super) struct Fresh {
    pub(super) store: Store<CallState>,
    pub(super) bound: Bound,
    pub(super) took: Duration,
}

/// A store whose instantiation failed, kept to classify the failure (memory cap, stderr).
pub(super) struct Failed {
    pub(super) store: Store<CallState>,
    pub(super) error: wasmtime::Error,
}

impl Recipe {
    /// A fresh store and instance. The caller keeps the epoch ticker running while this runs, and sets the
    /// call's server name before calling (see [`Fresh::begin`]).
    pub(super) async fn instantiate(&self) -> Result<Result<Fresh, Failed>, PluginError> {
        let stderr = MemoryOutputPipe::new(STDERR_CAPTURE);
        let wasi = self.wasi_ctx(stderr.clone()).await?;
        let seen = Arc::new(StoreSeen::default());
        let state = CallState {
            wasi,
            stderr,
            table: ResourceTable::new(),
            limiter: CallLimiter::new(self.memory_limit, self.runtime.memory.clone()),
            plugin: self.name.clone(),
            servername: None,
            settings: self.settings.clone(),
            kv: self.kv.clone(),
            http: wasmtime_wasi_http::WasiHttpCtx::new(),
            http_hooks: http::HttpHooks { grant: self.http.clone(), store: seen.clone() },
            store: seen,
            log_lines: 0,
        };
        let mut store = Store::new(&self.runtime.engine, state);
        store.limiter(|state| &mut state.limiter);
        // Yield to the executor at every tick: a spinning plugin shares its worker thread, and the timeout
        // around this future can fire and drop it.
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));
        let started = Instant::now();
        let bound = match &self.pre {
            Pre::V0_1(pre) => pre.instantiate_async(&mut store).await.map(Bound::V0_1),
            Pre::V0_2(pre) => pre.instantiate_async(&mut store).await.map(Bound::V0_2),
        };
        Ok(match bound {
            Ok(bound) => Ok(Fresh { store, bound, took: started.elapsed() }),
            Err(error) => Err(Failed { store, error }),
        })
    }

    /// The WASI context of one instance: nothing inherited, the granted directory (if any) read-only at `/`.
    async fn wasi_ctx(&self, stderr: MemoryOutputPipe) -> Result<WasiCtx, PluginError> {
        let Some(dir) = self.files.clone() else {
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
}

impl Fresh {
    /// Hands the instance to the call for `servername`, whose capabilities report to `seen`; its deadline counts
    /// from now, not from when it was made.
    pub(super) fn begin(&mut self, servername: &ServerName, seen: &Arc<StoreSeen>) {
        let state = self.store.data_mut();
        state.servername = Some(servername.clone());
        state.store = seen.clone();
        state.http_hooks.store = seen.clone();
        self.store.set_epoch_deadline(1);
    }
}

/// Up to `target` instances of one build, made after calls on a blocking thread and taken by later calls.
/// They sit outside the plugin's `max_concurrency` (a call waiting for a slot never waits on a spare), so the
/// slots one build uses are at most `max_concurrency + spare_instances`, each spare holding its linear memory
/// against `server.plugin_memory_total`.
pub(super) struct Spares {
    target: usize,
    /// The plugin's timeout bounds the making of one.
    timeout: Duration,
    state: Mutex<SpareState>,
}

#[derive(Default)]
struct SpareState {
    ready: Vec<Fresh>,
    /// Being made now.
    making: usize,
}

impl Spares {
    pub(super) fn new(target: usize, timeout: Duration) -> Self {
        Self { target, timeout, state: Mutex::default() }
    }

    /// A ready spare, if there is one.
    pub(super) fn take(&self) -> Option<Fresh> {
        self.lock().ready.pop()
    }

    /// Spares ready now.
    pub(super) fn ready(&self) -> usize {
        self.lock().ready.len()
    }

    /// On a blocking thread inside the runtime: makes spares until `target` are ready or being made. A failure
    /// is left to the next call, which instantiates for itself and reports it.
    pub(super) fn top_up(&self, recipe: &Recipe) {
        while let Some(claim) = self.claim() {
            let made = tokio::runtime::Handle::current().block_on(async {
                let _ticking = recipe.runtime.ticker.running();
                tokio::time::timeout(self.timeout, recipe.instantiate()).await
            });
            match made {
                Ok(Ok(Ok(fresh))) => self.lock().ready.push(fresh),
                failed => {
                    // A failed store is dropped (its slot reset) before the claim gives its place back.
                    drop(failed);
                    tracing::debug!(target: "tern::plugin", plugin = %recipe.name, "a spare instance could not be made");
                    return;
                }
            }
            drop(claim);
        }
    }

    /// A place for one more spare, if fewer than `target` are ready or being made; given back when dropped
    /// (a spare made by then is counted as ready instead).
    fn claim(&self) -> Option<Claim<'_>> {
        let mut state = self.lock();
        if state.ready.len() + state.making >= self.target {
            return None;
        }
        state.making += 1;
        Some(Claim(self))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SpareState> {
        // Every critical section is a push, a pop or a counter step: a poisoned lock holds consistent data.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One spare being made; the count of those falls back when this drops, however the making ended.
struct Claim<'a>(&'a Spares);

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.0.lock().making -= 1;
    }
}
