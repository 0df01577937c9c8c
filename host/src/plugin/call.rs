//! One plugin call: a fresh instance (made for it, or a spare made ahead), bounded by the guard (rate cap,
//! breaker), the concurrency cap, a deadline and a memory cap; its failure classified into a [`PluginError`].

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use wasmtime::Store;

use super::bindings::{CallState, StoreSeen, v0_1, v0_2};
use super::instance::{Bound, Failed, Fresh, Recipe, Spares};
use super::{Outcome, PemCertificate, PluginError, PluginStats, RouteRequest, Selection, guard};
use crate::config::PluginSettings;
use crate::sni::ServerName;

/// A compiled, linked plugin, ready to be called.
pub struct Plugin {
    /// How its instances are made (engine, component, capabilities, its name).
    pub(super) recipe: Arc<Recipe>,
    /// Instances made ahead of calls (`spare_instances`).
    pub(super) spares: Arc<Spares>,
    /// The settings it was loaded from (a reload compares against them).
    pub(super) source: PluginSettings,
    /// SHA-256 of the component, hex.
    pub(super) sha256: String,
    /// The cache key prefix of this build's answers: the plugin name, or a new one after a flushing swap.
    pub(super) cache_scope: Arc<str>,
    pub(super) permits: Arc<Semaphore>,
    pub(super) guard: Arc<guard::Guard>,
    pub(super) stats: Arc<PluginStats>,
}

/// The contract version a plugin was built against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Contract {
    /// `tern:plugin@0.1.0`: one certificate, no route.
    V0_1,
    /// `tern:plugin@0.2.0`: certificate sets, routes, passthrough; told the listener.
    V0_2,
}

impl Contract {
    /// The WIT package version.
    pub fn version(self) -> &'static str {
        match self {
            Contract::V0_1 => "0.1.0",
            Contract::V0_2 => "0.2.0",
        }
    }
}

/// A pre-instantiated component of either contract version.
pub(super) enum Pre {
    V0_1(v0_1::CertSelectorPre<CallState>),
    V0_2(v0_2::CertSelectorPre<CallState>),
}

impl Pre {
    /// The component's exports checked against 0.2, then 0.1.
    pub(super) fn new(instance: wasmtime::component::InstancePre<CallState>) -> Result<Self, wasmtime::Error> {
        match v0_2::CertSelectorPre::new(instance.clone()) {
            Ok(pre) => Ok(Pre::V0_2(pre)),
            Err(v2) => v0_1::CertSelectorPre::new(instance)
                .map(Pre::V0_1)
                .map_err(|v1| wasmtime::Error::msg(format!("as 0.2.0: {v2:#}; as 0.1.0: {v1:#}"))),
        }
    }
}

impl std::fmt::Debug for Plugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plugin").field("name", &self.recipe.name).field("sha256", &self.sha256).finish_non_exhaustive()
    }
}

impl Plugin {
    /// The plugin's configured name.
    pub fn name(&self) -> &Arc<str> {
        &self.recipe.name
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

    /// The contract version it was built against.
    pub fn contract(&self) -> Contract {
        match self.recipe.pre {
            Pre::V0_1(_) => Contract::V0_1,
            Pre::V0_2(_) => Contract::V0_2,
        }
    }

    /// Spare instances ready for the next calls now.
    pub fn spares_ready(&self) -> usize {
        self.spares.ready()
    }

    /// Makes this plugin count into `stats` (a replacement keeps its slot's counters).
    pub fn share_stats(&mut self, stats: Arc<PluginStats>) {
        self.stats = stats;
    }

    /// Calls `select-certificate` for `servername` reached on `listener` in a fresh instance, within the
    /// plugin's limits.
    pub async fn select(&self, servername: &ServerName, listener: &str) -> Result<Selection, PluginError> {
        self.select_for(servername, listener, None).await
    }

    /// Like [`Plugin::select`], on behalf of a client at `client` (its network's share of the rate cap applies).
    pub async fn select_for(
        &self,
        servername: &ServerName,
        listener: &str,
        client: Option<std::net::IpAddr>,
    ) -> Result<Selection, PluginError> {
        if let Err(shed) = self.guard.admit_for(client) {
            if shed == guard::Shed::CircuitOpen {
                self.probe_store();
            }
            let shed = PluginError::Shed(shed);
            self.stats.record(shed.outcome());
            return Err(shed);
        }
        // Waiting for a slot is bounded by the caller's handshake deadline, not by the plugin's own timeout.
        // The permit lives until the call's instance is torn down (see `retire`), not just until it answers.
        let permit =
            self.permits.clone().acquire_owned().await.map_err(|_| PluginError::Instantiate("plugin closed".into()))?;
        self.stats.started();
        let timeout = self.source.timeout;
        let store = Arc::new(StoreSeen::default());
        let result = match tokio::time::timeout(timeout, self.call(servername, listener, store.clone(), permit)).await {
            Ok(result) => result,
            // The time went to a store that failed or did not answer: the store's fault, not the plugin's.
            Err(_) if store.troubled() => Err(PluginError::StoreUnavailable(format!(
                "the store did not answer within the plugin's timeout ({timeout:?})"
            ))),
            Err(_) => Err(PluginError::Timeout(timeout)),
        };
        self.stats.record(match &result {
            Ok(Selection::Serve { .. } | Selection::Passthrough { .. } | Selection::Obtain { .. }) => Outcome::Found,
            Ok(Selection::NotFound) => Outcome::NotFound,
            Err(err) => err.outcome(),
        });
        let store_outage = matches!(result, Err(PluginError::StoreUnavailable(_)));
        self.guard.report(result.as_ref().is_err_and(PluginError::counts_against_plugin), store_outage);
        result
    }

    /// With the breaker open over store outages, asks the store (in the background, at most every 100 ms while
    /// calls are being shed) whether it answers again: if it does, the next call is the breaker's trial, without
    /// waiting out the cooldown. The ping goes through the same client the plugin's calls use, so a trial never
    /// runs on a client that has not reconnected yet.
    fn probe_store(&self) {
        let Some(kv) = &self.recipe.kv else { return };
        if !self.guard.probe_due() {
            return;
        }
        let (store, guard) = (kv.store.clone(), self.guard.clone());
        tokio::spawn(async move {
            let answered = store.ping().await.is_ok();
            guard.store_probed(answered);
        });
    }

    async fn call(
        &self,
        servername: &ServerName,
        listener: &str,
        seen: Arc<StoreSeen>,
        permit: OwnedSemaphorePermit,
    ) -> Result<Selection, PluginError> {
        // Epoch ticks (hence deadlines and yielding) while this call runs; dropped with the future on timeout.
        let _ticking = self.recipe.runtime.ticker.running();
        let spare = self.spares.take();
        let on_spare = spare.is_some();
        let mut fresh = match spare {
            Some(spare) => spare,
            None => match self.recipe.instantiate().await? {
                Ok(fresh) => fresh,
                Err(Failed { store, error }) => return Err(self.classify(&store, error, "instantiate")),
            },
        };
        // Where a miss's time goes (`tern_plugin_instantiate_seconds`, `tern_plugin_run_seconds`); a spare's
        // instantiation counts too, though no handshake waited for it.
        self.stats.instantiated(fresh.took, on_spare);
        fresh.begin(servername, &seen);
        let started = std::time::Instant::now();
        let Fresh { mut store, bound, .. } = fresh;
        let answer = match bound {
            Bound::V0_1(instance) => {
                instance.call_select_certificate(&mut store, servername.as_str()).await.map(|a| a.map(from_v0_1))
            }
            Bound::V0_2(instance) => {
                let hello = v0_2::tern::plugin::types::Hello {
                    servername: servername.as_str().to_string(),
                    listener: listener.to_string(),
                };
                instance.call_select_certificate(&mut store, &hello).await.map(|a| a.map(from_v0_2))
            }
        };
        self.stats.ran(started.elapsed());
        let answer = answer.map_err(|e| self.classify(&store, e, "call"))?;
        self.stats.saw_memory(store.data().limiter.peak);
        retire(store, permit, self.spares.clone(), self.recipe.clone());
        match answer {
            Ok(selection) => Ok(selection),
            Err(message) if seen.down.load(Ordering::Relaxed) => Err(PluginError::StoreUnavailable(message)),
            Err(message) => Err(PluginError::Returned(message)),
        }
    }

    fn classify(&self, store: &Store<CallState>, err: wasmtime::Error, stage: &str) -> PluginError {
        if store.data().limiter.memory_exceeded {
            return PluginError::MemoryLimit { limit: store.data().limiter.memory_limit() };
        }
        if store.data().limiter.budget_exceeded {
            return PluginError::MemoryBudget { limit: self.recipe.runtime.memory.limit() };
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

/// Tears down a finished call's store on a blocking thread, frees its concurrency slot, then tops the spares
/// up. Dropping the store resets the instance's pool slot for the next call: its dirtied linear-memory pages are
/// copied back from the component's image (or decommitted), ~0.3 ms of CPU for a JavaScript or Python plugin
/// (`plugin-cost`). That is the plugin's cost, not the handshake's: the answer goes back at once, and the reset
/// and the making of spares stay off the async workers. Holding the permit until the slot is free keeps
/// `max_concurrency` a bound on the slots calls use. (A call that fails or times out drops its store where it
/// stands and makes no spare.)
fn retire(store: Store<CallState>, permit: OwnedSemaphorePermit, spares: Arc<Spares>, recipe: Arc<Recipe>) {
    drop(tokio::task::spawn_blocking(move || {
        drop(store);
        drop(permit);
        spares.top_up(&recipe);
    }));
}

fn ttl(seconds: Option<u32>) -> Option<Duration> {
    seconds.map(|s| Duration::from_secs(u64::from(s)))
}

/// A 0.1 answer: a set of one certificate, no route.
fn from_v0_1(answer: v0_1::tern::plugin::types::Selection) -> Selection {
    use v0_1::tern::plugin::types::Selection as Wit;
    match answer {
        Wit::Found(cert) => Selection::Serve {
            certificates: vec![PemCertificate { chain: cert.chain, key: cert.private_key }],
            route: None,
            ttl: ttl(cert.ttl_seconds),
        },
        Wit::NotFound => Selection::NotFound,
    }
}

fn from_v0_2(answer: v0_2::tern::plugin::types::Answer) -> Selection {
    use v0_2::tern::plugin::types::Answer;
    match answer {
        Answer::Serve(served) => Selection::Serve {
            certificates: served
                .certificates
                .into_iter()
                .map(|c| PemCertificate { chain: c.chain, key: c.private_key })
                .collect(),
            route: served.route.map(route_request),
            ttl: ttl(served.ttl_seconds),
        },
        Answer::Passthrough(p) => Selection::Passthrough { target: p.target, ttl: ttl(p.ttl_seconds) },
        Answer::Obtain(o) => Selection::Obtain { route: o.route.map(route_request), ttl: ttl(o.ttl_seconds) },
        Answer::NotFound => Selection::NotFound,
    }
}

/// A 0.2 route, as asked for (the grants are checked later, by `select::check_answer`).
fn route_request(route: v0_2::tern::plugin::types::Route) -> RouteRequest {
    use v0_2::tern::plugin::types::Route;
    match route {
        Route::Pool(name) => RouteRequest::Pool(name),
        Route::Origin(url) => RouteRequest::Origin(url),
    }
}
