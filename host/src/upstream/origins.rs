//! Clients for the origins plugins route names to: one per trust and HTTP version set, built on first use.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::{HttpClient, Versions, client, load_roots, system_roots, tls_config};
use crate::backend::Budget;
use crate::config::ProxySettings;

/// Clients for origins, one per trust (system roots, or one CA file) and HTTP versions, built on first use. All
/// origins share the process-wide backend budget.
#[derive(Debug)]
pub(super) struct OriginClients {
    proxy: ProxySettings,
    total: Arc<Semaphore>,
    /// Bounded by the CA files named in the config (one per plugin grant) times the version sets. Read on every
    /// request to an origin: a read lock, held for a lookup and one reference count.
    clients: std::sync::RwLock<HashMap<(Trust, Versions), Arc<HttpClient>>>,
    /// Serialises building clients, so that a burst of first requests reads a CA file once.
    building: tokio::sync::Mutex<()>,
    system_roots: tokio::sync::OnceCell<rustls::RootCertStore>,
}

impl OriginClients {
    pub(super) fn new(proxy: &ProxySettings, total: Arc<Semaphore>) -> Self {
        Self {
            proxy: proxy.clone(),
            total,
            clients: std::sync::RwLock::new(HashMap::new()),
            building: tokio::sync::Mutex::new(()),
            system_roots: tokio::sync::OnceCell::new(),
        }
    }

    pub(super) async fn client(&self, trust: Trust, versions: Versions) -> Result<Arc<HttpClient>, String> {
        let key = (trust, versions);
        if let Some(client) = self.cached(&key) {
            return Ok(client);
        }
        let _building = self.building.lock().await;
        if let Some(client) = self.cached(&key) {
            return Ok(client);
        }
        // Reading CA files and the system store is file I/O: off the async workers.
        let roots = match &key.0 {
            Trust::Cleartext => rustls::RootCertStore::empty(),
            Trust::Ca(ca) => {
                let path = ca.to_path_buf();
                let read = tokio::task::spawn_blocking(move || load_roots(&path)).await.map_err(|e| e.to_string())?;
                read.map_err(|e| format!("origin_ca {}: {e}", ca.display()))?
            }
            Trust::System => self
                .system_roots
                .get_or_try_init(|| async {
                    tokio::task::spawn_blocking(system_roots).await.map_err(|e| e.to_string())?
                })
                .await?
                .clone(),
        };
        let budget = Budget::new(self.proxy.max_backend_connections, self.total.clone());
        let client = Arc::new(client(&self.proxy, self.proxy.connect_timeout, budget, tls_config(roots), versions));
        self.clients.write().unwrap_or_else(std::sync::PoisonError::into_inner).insert(key, client.clone());
        Ok(client)
    }

    fn cached(&self, key: &(Trust, Versions)) -> Option<Arc<HttpClient>> {
        // The map stays consistent across a panic elsewhere: recover the lock.
        self.clients.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(key).cloned()
    }
}

/// What an origin's TLS is verified against.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Trust {
    /// `http://`: no TLS.
    Cleartext,
    /// The system's CA store.
    System,
    /// A grant's `origin_ca` file.
    Ca(Arc<Path>),
}
