//! The one `bindgen!` of the plugin world, and the host side of the interfaces plugins import.

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::limits::CallLimiter;
use crate::sni::ServerName;

/// The generated bindings of each contract version. Both link against the same [`CallState`]; the interfaces
/// they share (log, config, kv) are implemented once below and adapted to each version by `host_interfaces!`.
macro_rules! contract {
    ($module:ident, $path:literal) => {
        #[allow(unsafe_code, missing_debug_implementations, clippy::all)]
        pub mod $module {
            wasmtime::component::bindgen!({
                path: $path,
                world: "cert-selector",
                imports: {
                    // Key-value calls wait on the network: async, so a slow store never holds a worker thread.
                    "tern:plugin/kv": async,
                    default: async,
                },
                exports: { default: async },
            });
        }
    };
}
contract!(v0_1, "../wit/tern-plugin-0.1.0");
contract!(v0_2, "../wit/tern-plugin-0.2.0");

/// Longest log line a plugin may write; longer ones are cut.
const MAX_LOG_LINE: usize = 1024;
/// Lines a plugin may log per call, so a chatty or hostile plugin cannot flood the host's log.
const MAX_LOG_LINES_PER_CALL: u32 = 64;

/// Everything one plugin call's `Store` holds. Created fresh for every call (or ahead of it, for a spare) and dropped
/// after it.
pub struct CallState {
    pub(super) wasi: WasiCtx,
    pub(super) table: ResourceTable,
    /// The plugin's stderr, kept to explain traps.
    pub(super) stderr: wasmtime_wasi::p2::pipe::MemoryOutputPipe,
    pub(super) limiter: CallLimiter,
    pub(super) plugin: Arc<str>,
    pub(super) servername: Option<ServerName>,
    pub(super) settings: Arc<std::collections::BTreeMap<String, String>>,
    pub(super) kv: Option<Arc<KvAccess>>,
    pub(super) http: wasmtime_wasi_http::WasiHttpCtx,
    pub(super) http_hooks: super::http::HttpHooks,
    /// What this call's capabilities saw of the plugin's stores.
    pub(super) store: Arc<StoreSeen>,
    pub(super) log_lines: u32,
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl wasmtime_wasi_http::WasiHttpView for CallState {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        wasmtime_wasi_http::WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.http_hooks }
    }
}

/// Adds the tern interfaces (log, config, kv) of every contract version to a linker.
pub fn add_to_linker(linker: &mut wasmtime::component::Linker<CallState>) -> wasmtime::Result<()> {
    v0_1::CertSelector::add_to_linker::<_, wasmtime::component::HasSelf<_>>(linker, |state| state)?;
    v0_2::CertSelector::add_to_linker::<_, wasmtime::component::HasSelf<_>>(linker, |state| state)
}

/// The host side of log, config and kv for one contract version: thin adapters to [`CallState`]'s methods.
macro_rules! host_interfaces {
    ($version:ident) => {
        impl $version::tern::plugin::types::Host for CallState {}

        impl $version::tern::plugin::log::Host for CallState {
            async fn log(&mut self, level: $version::tern::plugin::log::Level, message: String) {
                use $version::tern::plugin::log::Level;
                let level = match level {
                    Level::Trace => tracing::Level::TRACE,
                    Level::Debug => tracing::Level::DEBUG,
                    Level::Info => tracing::Level::INFO,
                    Level::Warn => tracing::Level::WARN,
                    Level::Error => tracing::Level::ERROR,
                };
                self.log_line(level, message);
            }
        }

        impl $version::tern::plugin::config::Host for CallState {
            async fn get(&mut self, key: String) -> Option<String> {
                self.settings.get(&key).cloned()
            }

            async fn get_all(&mut self) -> Vec<(String, String)> {
                self.settings.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
            }
        }

        impl From<KvError> for $version::tern::plugin::kv::Error {
            fn from(err: KvError) -> Self {
                match err {
                    KvError::Denied(m) => Self::Denied(m),
                    KvError::Unavailable(m) => Self::Unavailable(m),
                    KvError::Other(m) => Self::Other(m),
                }
            }
        }

        impl $version::tern::plugin::kv::Host for CallState {
            async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, $version::tern::plugin::kv::Error> {
                let grant = self.kv_grant(std::slice::from_ref(&key))?;
                let result = self.store.clone().waiting_for(grant.store.get(&key)).await;
                Ok(self.kv_result(result)?)
            }

            async fn get_many(
                &mut self,
                keys: Vec<String>,
            ) -> Result<Vec<Option<Vec<u8>>>, $version::tern::plugin::kv::Error> {
                let grant = self.kv_grant(&keys)?;
                let result = self.store.clone().waiting_for(grant.store.get_many(&keys)).await;
                Ok(self.kv_result(result)?)
            }

            async fn hash_get(
                &mut self,
                key: String,
                fields: Vec<String>,
            ) -> Result<Vec<Option<Vec<u8>>>, $version::tern::plugin::kv::Error> {
                let grant = self.kv_grant(std::slice::from_ref(&key))?;
                let result = self.store.clone().waiting_for(grant.store.hash_get(&key, &fields)).await;
                Ok(self.kv_result(result)?)
            }
        }
    };
}
host_interfaces!(v0_1);
host_interfaces!(v0_2);

/// Why a key-value call failed, before it is given the WIT type of the caller's contract version.
#[derive(Debug)]
pub(super) enum KvError {
    Denied(String),
    Unavailable(String),
    Other(String),
}

impl CallState {
    /// Writes one line of the plugin's log, clipped, at most [`MAX_LOG_LINES_PER_CALL`] per call.
    fn log_line(&mut self, level: tracing::Level, message: String) {
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES_PER_CALL {
            return;
        }
        let mut message = message;
        if message.len() > MAX_LOG_LINE {
            message.truncate(crate::clip::prefix(&message, MAX_LOG_LINE).len());
            message.push_str("...");
        }
        let plugin = &*self.plugin;
        let servername = self.servername.as_ref().map(ServerName::as_str).unwrap_or("");
        crate::failure::event_at!(level, target: "tern::plugin", plugin, servername, "{message}");
    }

    /// Converts a store reply for the guest, remembering an outage so the host can tell "store down" from a
    /// plugin's own error.
    fn kv_result<T>(&self, result: Result<T, crate::store::StoreError>) -> Result<T, KvError> {
        result.map_err(|err| {
            if matches!(err, crate::store::StoreError::Unavailable { .. }) {
                self.store.down.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            to_wit(err)
        })
    }

    /// The plugin's grant, if it covers every key asked for.
    fn kv_grant(&self, keys: &[String]) -> Result<Arc<KvAccess>, KvError> {
        let Some(grant) = &self.kv else {
            return Err(KvError::Denied(format!("plugin {} has no key-value grant", self.plugin)));
        };
        if let Some(outside) = keys.iter().find(|key| !grant.prefixes.iter().any(|p| key.starts_with(p.as_str()))) {
            return Err(KvError::Denied(format!(
                "key {outside:?} is outside the prefixes granted to plugin {}",
                self.plugin
            )));
        }
        Ok(grant.clone())
    }
}

/// What one call's capabilities (kv, outgoing HTTP) saw of the plugin's stores: the host's evidence that a failed
/// or abandoned call was the store's fault, not the plugin's.
#[derive(Debug, Default)]
pub(super) struct StoreSeen {
    /// A store could not be reached.
    pub(super) down: std::sync::atomic::AtomicBool,
    /// A store call is in progress (it stays set when the call is abandoned at its deadline).
    pub(super) waiting: std::sync::atomic::AtomicBool,
}

impl StoreSeen {
    /// Awaits a store reply with `waiting` set meanwhile.
    pub(super) async fn waiting_for<T>(self: Arc<Self>, reply: impl std::future::Future<Output = T>) -> T {
        self.waiting.store(true, std::sync::atomic::Ordering::Relaxed);
        let reply = reply.await;
        self.waiting.store(false, std::sync::atomic::Ordering::Relaxed);
        reply
    }

    /// Whether a store failed or was being waited for.
    pub(super) fn troubled(&self) -> bool {
        self.down.load(std::sync::atomic::Ordering::Relaxed) || self.waiting.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A plugin's key-value grant: the store and the key prefixes it may read.
#[derive(Debug)]
pub struct KvAccess {
    /// The store.
    pub store: Arc<crate::store::RedisStore>,
    /// Allowed key prefixes (`""` allows all).
    pub prefixes: Vec<String>,
}

fn to_wit(err: crate::store::StoreError) -> KvError {
    match err {
        crate::store::StoreError::Unavailable { .. } => KvError::Unavailable(err.to_string()),
        _ => KvError::Other(err.to_string()),
    }
}
