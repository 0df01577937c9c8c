//! Upstream connections that belong to one client connection. A PROXY protocol header describes one client
//! connection, so on routes that send one (`upstream.proxy_protocol`, `listener.backend_proxy_protocol`) an upstream
//! connection that carried one client's header must never carry another client's requests. hyper-util's pooled
//! client keys connections by scheme and authority only; such routes therefore get a small client per client
//! connection (HAProxy's "private" server connections, attached to their session):
//!
//! - its pool lives and dies with the client connection: keep-alive reuse within it, at most
//!   `proxy.max_idle_per_client` idle connections per upstream, each closed after `proxy.pool_idle_timeout` or when
//!   the client connection ends, whichever comes first;
//! - its connections hold permits of the same backend budgets as the shared clients ([`crate::backend`]);
//! - a client connection has one route, so it makes at most one client per server of that route.
//!
//! Routes without PROXY protocol never come here: their requests use the shared clients as before.

use std::sync::{Arc, Mutex, OnceLock};

use super::proxy_header::{self, ClientFacts};
use super::{HttpClient, Recipe};

/// The upstream clients of one client connection (empty, and without allocation, until a route that sends PROXY
/// protocol headers first needs one).
#[derive(Debug, Default)]
pub struct Private {
    /// The connection's header, encoded once.
    header: OnceLock<Arc<[u8]>>,
    /// One client per upstream the connection's route reached: bounded by the servers of one pool (or one backend).
    clients: Mutex<Vec<(Slot, HttpClient)>>,
}

/// Which upstream a private client connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Slot {
    /// The listener's backend.
    Backend,
    /// A server of a pool, by the pool's name and the server's index.
    Server(Arc<str>, usize),
}

impl Private {
    /// The connection's client for `slot`, made from `recipe` on first use with the header of `facts`.
    pub(crate) fn client<'a>(
        &self,
        slot: Slot,
        recipe: &Recipe,
        facts: impl FnOnce() -> ClientFacts<'a>,
    ) -> HttpClient {
        let mut clients = lock(&self.clients);
        if let Some((_, client)) = clients.iter().find(|(s, _)| *s == slot) {
            return client.clone();
        }
        let header = self.header.get_or_init(|| proxy_header::client(facts())).clone();
        let client = recipe.private(header);
        clients.push((slot, client.clone()));
        client
    }

    /// How many private clients the connection has made.
    #[cfg(test)]
    fn len(&self) -> usize {
        lock(&self.clients).len()
    }
}

impl Clone for Private {
    /// A clone stands for the same client connection: it shares the clients and their pools.
    fn clone(&self) -> Self {
        Self { header: self.header.clone(), clients: Mutex::new(lock(&self.clients).clone()) }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A list of clients stays consistent across a panic elsewhere: recover the lock.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Budget;
    use crate::config::ProxySettings;
    use crate::upstream::{Versions, no_tls};

    #[tokio::test]
    async fn one_client_per_slot_and_one_header_per_connection() {
        let proxy = ProxySettings {
            connect_timeout: std::time::Duration::from_secs(1),
            response_timeout: std::time::Duration::from_secs(1),
            pool_idle_timeout: std::time::Duration::from_secs(1),
            max_connections_per_backend: 4,
            max_backend_connections: 16,
            max_idle_per_client: 5,
            max_idle_per_backend: 32,
        };
        let budget = Budget::new(4, Arc::new(tokio::sync::Semaphore::new(16)));
        let recipe = Recipe::new(&proxy, proxy.connect_timeout, budget, no_tls(), Versions::Http1);
        let private = Private::default();
        let mut made = 0;
        let facts = |made: &mut i32| {
            *made += 1;
            ClientFacts { source: "192.0.2.1:1000".parse().unwrap(), destination: None, authority: None, alpn: None }
        };
        for slot in [Slot::Backend, Slot::Backend, Slot::Server("p".into(), 0), Slot::Server("p".into(), 1)] {
            private.client(slot, &recipe, || facts(&mut made));
        }
        private.client(Slot::Server("p".into(), 0), &recipe, || facts(&mut made));
        assert_eq!(private.len(), 3, "a client per upstream, reused");
        assert_eq!(made, 1, "the header is encoded once per client connection");
        assert_eq!(private.clone().len(), 3);
    }
}
