//! TLS session resumption for a fleet: one session space across nodes, ticket keys rotated cluster-wide.
//!
//! - [`tickets`]: ticket keys in time slots, shared through Redis, used by a [`rustls::server::ProducesTickets`]
//!   that only reads memory.
//! - [`sessions`]: the session-ID / TLS 1.3 stateful session cache, replicated ahead of use through a Redis
//!   stream, behind a [`rustls::server::StoresServerSessions`] that only reads memory.
//!
//! Without `[resumption] redis`, both run locally (this node's sessions, this node's random keys, same rotation
//! schedule). Resumption state is partitioned by *scope*: listeners with different client-authentication
//! settings never share it (see [`scope_of`]).

pub(crate) mod crypto;
mod rotation;
pub(crate) mod sessions;
pub(crate) mod tickets;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::config::ResumptionSettings;
use crate::metrics::{Exposition, Histogram, get};
use crate::store::RedisStore;
use rotation::KeyManager;
use sessions::{Replication, ScopedSessions, SessionCache, SharedSessions};
pub use tickets::now_ms;
use tickets::{Schedule, SharedKeys, Ticketer};

/// Counters and gauges of resumption, per node.
#[derive(Debug, Default)]
pub struct ResumptionMetrics {
    /// Tickets issued.
    pub tickets_issued: AtomicU64,
    /// Tickets not issued: no key for the current slot.
    pub ticket_encrypt_failures: AtomicU64,
    /// Tickets presented under a key this node does not hold (full handshake follows).
    pub ticket_unknown_key: AtomicU64,
    /// Tickets presented under a key whose slot has left the window (full handshake follows).
    pub ticket_expired_key: AtomicU64,
    /// Tickets that failed authentication (tampered, or another scope's).
    pub ticket_undecryptable: AtomicU64,
    /// Keys in Redis this node's secret does not open.
    pub ticket_key_unopenable: AtomicU64,
    /// When the key now encrypting became active (ms since the epoch; 0 = none).
    pub ticket_key_activated_ms: AtomicU64,
    /// 1 while the key encrypting is a local fallback key.
    pub ticket_key_local: AtomicU64,
    /// Keys held (all slots of the window).
    pub ticket_keys_held: AtomicU64,
    /// Sessions written to Redis.
    pub sessions_published: AtomicU64,
    /// Other nodes' sessions received.
    pub sessions_received: AtomicU64,
    /// Sessions not replicated (queue full or Redis failed); they resume on this node only.
    pub sessions_dropped: AtomicU64,
    /// Stream entries that did not open with this node's secret.
    pub sessions_undecryptable: AtomicU64,
    /// Redis commands that failed (keys or sessions).
    pub redis_errors: AtomicU64,
    /// Time from another node's write to this node holding the session.
    pub replication_lag: Histogram,
}

impl ResumptionMetrics {
    /// Appends the resumption families.
    pub(crate) fn render(&self, x: &mut Exposition) {
        x.family("tern_tickets_issued_total", "counter", "Session tickets issued.");
        x.sample("tern_tickets_issued_total", "", get(&self.tickets_issued));
        x.family("tern_ticket_rejections_total", "counter", "Tickets refused (a full handshake followed), by reason.");
        x.counters(
            "tern_ticket_rejections_total",
            "reason",
            [
                ("no_key", &self.ticket_encrypt_failures),
                ("unknown_key", &self.ticket_unknown_key),
                ("expired_key", &self.ticket_expired_key),
                ("undecryptable", &self.ticket_undecryptable),
            ],
        );
        let activated = get(&self.ticket_key_activated_ms);
        let age = if activated == 0 { 0 } else { tickets::now_ms().saturating_sub(activated) / 1000 };
        x.family("tern_ticket_key_age_seconds", "gauge", "Age of the ticket key now encrypting.");
        x.sample("tern_ticket_key_age_seconds", "", age);
        x.family("tern_ticket_key_local", "gauge", "1 while encrypting with a local fallback key (Redis unreachable).");
        x.sample("tern_ticket_key_local", "", get(&self.ticket_key_local));
        x.family("tern_ticket_keys", "gauge", "Ticket keys held for the decryption window.");
        x.sample("tern_ticket_keys", "", get(&self.ticket_keys_held));
        x.family("tern_ticket_keys_unopenable_total", "counter", "Fleet keys this node's secret does not open.");
        x.sample("tern_ticket_keys_unopenable_total", "", get(&self.ticket_key_unopenable));
        x.family("tern_sessions_replicated_total", "counter", "Sessions replicated through Redis, by direction.");
        x.sample("tern_sessions_replicated_total", "direction=\"out\"", get(&self.sessions_published));
        x.sample("tern_sessions_replicated_total", "direction=\"in\"", get(&self.sessions_received));
        x.sample("tern_sessions_replicated_total", "direction=\"dropped\"", get(&self.sessions_dropped));
        x.sample("tern_sessions_replicated_total", "direction=\"undecryptable\"", get(&self.sessions_undecryptable));
        x.family("tern_resumption_redis_errors_total", "counter", "Failed Redis commands for keys and sessions.");
        x.sample("tern_resumption_redis_errors_total", "", get(&self.redis_errors));
        x.family("tern_session_replication_lag_seconds", "histogram", "From another node's write to local use.");
        x.histogram("tern_session_replication_lag_seconds", "", &self.replication_lag);
    }
}

/// The scope of a listener's resumption state: listeners share sessions and tickets only with listeners of the
/// same client-authentication settings (same CA bundle, same mode), so a session authenticated by one CA never
/// resumes where another CA, or none, is required.
pub(crate) fn scope_of(client_auth: Option<(&[u8], bool)>) -> String {
    match client_auth {
        None => "none".to_string(),
        Some((ca_pem, required)) => {
            let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, ca_pem);
            let mode = if required { "required" } else { "optional" };
            format!("mtls:{mode}:{}", &tickets::hex(digest.as_ref())[..32])
        }
    }
}

/// A scope's session store and ticketer (none when tickets are off).
pub(crate) type ScopeState = (Arc<ScopedSessions>, Option<Arc<Ticketer>>);

/// What a node needs for resumption: the key manager, the session cache, and their background tasks.
#[derive(Debug)]
pub struct Resumption {
    keys: Option<Arc<KeyManager>>,
    sessions: Arc<SessionCache>,
    replication: Mutex<Option<Replication>>,
    metrics: Arc<ResumptionMetrics>,
    scopes: Mutex<HashMap<String, ScopeState>>,
}

impl Resumption {
    /// Builds the node's resumption state and fills the key ring once (from Redis if configured and reachable,
    /// else with local keys) so the first handshake already gets a ticket.
    pub(crate) async fn start(
        settings: &ResumptionSettings,
        store: Option<Arc<RedisStore>>,
        session_capacity: u64,
    ) -> Arc<Self> {
        let metrics = Arc::new(ResumptionMetrics::default());
        let secret = settings.secret.as_ref().map(|s| s.bytes());
        let shared_store = store.zip(secret);
        let keys = settings.tickets.then(|| {
            let shared = shared_store.as_ref().map(|(store, secret)| SharedKeys {
                store: store.clone(),
                prefix: settings.prefix.clone(),
                sealing: crypto::SealingKey::new(&crypto::derive(secret, "ticket-keys")),
            });
            Arc::new(KeyManager::new(
                Schedule::new(settings.ticket_rotation, settings.ticket_lifetime),
                settings.ticket_lifetime,
                shared,
                settings.node.clone(),
                metrics.clone(),
            ))
        });
        let shared_sessions = shared_store.as_ref().map(|(store, secret)| SharedSessions {
            store: store.clone(),
            prefix: settings.prefix.clone(),
            sealing: crypto::SealingKey::new(&crypto::derive(secret, "sessions")),
        });
        let (sessions, replication) = SessionCache::new(
            session_capacity,
            settings.session_lifetime,
            shared_sessions,
            settings.node.clone(),
            metrics.clone(),
        );
        if let Some(keys) = &keys
            && let Err(err) = keys.refresh().await
        {
            metrics.redis_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %err, "ticket keys: Redis unreachable at start; using a local key until it is back");
        }
        Arc::new(Self {
            keys,
            sessions,
            replication: Mutex::new(replication),
            metrics,
            scopes: Mutex::new(HashMap::new()),
        })
    }

    /// The session store and ticketer for listeners of `scope` (one pair per scope, shared by its listeners).
    pub(crate) fn for_scope(&self, scope: &str) -> ScopeState {
        let mut scopes = self.scopes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        scopes
            .entry(scope.to_string())
            .or_insert_with(|| (self.sessions.scoped(scope), self.keys.as_ref().map(|k| k.ticketer(scope))))
            .clone()
    }

    /// Starts the background tasks: key refresh (and the rotation announcements that wake it), session
    /// replication.
    pub(crate) fn spawn(&self, tasks: &mut tokio::task::JoinSet<()>) {
        if let Some(keys) = &self.keys {
            let wake = Arc::new(tokio::sync::Notify::new());
            if let Some(shared) = keys.shared() {
                tasks.spawn(listen_for_rotations(shared.store.clone(), shared.channel(), wake.clone()));
            }
            tasks.spawn(keys.clone().run(wake));
        }
        let replication = self.replication.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(replication) = replication {
            tasks.spawn(replication.run(self.sessions.clone()));
        }
    }

    /// The node's resumption counters.
    pub fn metrics(&self) -> &Arc<ResumptionMetrics> {
        &self.metrics
    }
}

/// The fleet's ticket keys as `settings` describe them, for `tern tickets status|rotate`.
pub fn fleet_keys(settings: &ResumptionSettings, store: Arc<RedisStore>) -> Option<(SharedKeys, Schedule)> {
    let secret = settings.secret.as_ref()?;
    let keys = SharedKeys {
        store,
        prefix: settings.prefix.clone(),
        sealing: crypto::SealingKey::new(&crypto::derive(secret.bytes(), "ticket-keys")),
    };
    Some((keys, Schedule::new(settings.ticket_rotation, settings.ticket_lifetime)))
}

/// Wakes the key refresher whenever a rotation is announced, resubscribing after a drop.
async fn listen_for_rotations(store: Arc<RedisStore>, channel: String, wake: Arc<tokio::sync::Notify>) {
    use futures_util::StreamExt;
    let mut retry = std::time::Duration::from_millis(100);
    loop {
        if let Ok(messages) = store.subscribe(&channel).await {
            retry = std::time::Duration::from_millis(100);
            let mut messages = std::pin::pin!(messages);
            while let Some(announcement) = messages.next().await {
                tracing::info!(key = %announcement, "ticket key rotation announced");
                wake.notify_one();
            }
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(std::time::Duration::from_secs(5));
    }
}
