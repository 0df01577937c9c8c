//! Certificates on demand: names a plugin permits (its `obtain` answer) and names listed in `acme.names` get a
//! certificate through ACME, fleet-wide, and keep it renewed.
//!
//! | concept | file |
//! |---|---|
//! | obtaining, waiting, renewing, revoking; the fleet-wide order lock; budgets and backoff | `mod.rs` |
//! | one order through instant-acme; the account; challenge certificates | `order.rs` |
//! | what is stored per name (key sealed) | `record.rs` |
//! | Redis or directory storage | `storage.rs` |
//! | counters | `metrics.rs` |
//!
//! One order per name across the fleet: the node that takes the name's lock (leased, renewed while the order
//! runs, released and fenced by its token) orders; every other node, and every other handshake on this node,
//! waits for the stored result. A handshake waits at most `acme.handshake_wait`, then the listener's fallback
//! applies while the order goes on. Issued certificates are served from memory; the stored record is the truth.

mod metrics;
mod order;
mod record;
mod storage;

pub use metrics::AcmeMetrics;
pub use storage::StorageError;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};
use rustls::sign::CertifiedKey;

use crate::certs::ParsedCert;
use crate::config::{AcmeSettings, AcmeStorage};
use crate::resumption::crypto::SealingKey;
use crate::sni::ServerName;
use record::{Record, State};
use storage::{ACCOUNT, Kind, Storage};

/// Why no ACME certificate was served to a handshake.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AcmeError {
    /// No `[acme]` section, but a plugin answered `obtain`.
    #[error("the plugin answered obtain, but there is no [acme] section")]
    NotConfigured,
    /// The order is running; it was not done within `acme.handshake_wait`.
    #[error("certificate not issued yet (order in progress)")]
    Pending,
    /// `acme.max_pending` names are being obtained already.
    #[error("too many names being obtained at once (acme.max_pending)")]
    Busy,
    /// An order budget is spent for this hour.
    #[error("order budget spent for this hour: {scope}")]
    Budget {
        /// `all` or the registered domain.
        scope: String,
    },
    /// The name's last order failed; the next may start at `retry_at`.
    #[error("last order failed, next attempt in {wait_seconds} s: {last_error}")]
    Backoff {
        /// Seconds until the next attempt.
        wait_seconds: i64,
        /// The failure.
        last_error: String,
    },
    /// The order failed (CA error, validation failed, timeout).
    #[error("order failed: {0}")]
    Order(String),
    /// Storage failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl AcmeError {
    /// Whether a client can have caused it (choosing names the plugin permits): pending orders, spent budgets,
    /// backoff, too many pending names. Everything else is the CA's or the storage's.
    pub fn client_provoked(&self) -> bool {
        matches!(self, AcmeError::Pending | AcmeError::Busy | AcmeError::Budget { .. } | AcmeError::Backoff { .. })
    }
}

/// A certificate this node serves, with when to look for a renewal.
#[derive(Debug)]
struct Managed {
    cert: Arc<ParsedCert>,
    renew_at: i64,
    /// When the stored record was last read (a renewal by another node shows up there).
    checked: Mutex<Instant>,
}

type Obtaining = Shared<BoxFuture<'static, Result<Arc<ParsedCert>, AcmeError>>>;

/// What an order is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A first certificate.
    Issue,
    /// A renewal that is due (skipped if another node renewed meanwhile).
    Renew,
    /// A renewal the operator asked for.
    Force,
}

/// A stored record is read again at most this often for a certificate past its renew-at.
const RECHECK: Duration = Duration::from_secs(10);
/// How often a node waiting for another node's order looks at storage.
const POLL: Duration = Duration::from_millis(250);
/// Further orders after one failed on `badNonce` alone.
const BAD_NONCE_ORDERS: u32 = 2;
/// Due certificates one node takes up per look at the schedule (the rest wait for the next look).
const RENEWALS_PER_CHECK: usize = 1000;
/// How long the CA's renewal information may take before the lifetime fraction decides.
const ARI_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a refused name is refused from memory before storage is asked again.
const REFUSAL_MEMORY: Duration = Duration::from_secs(60);
/// Certificates kept in memory (more are read from storage again when asked for).
const IN_MEMORY: u64 = 100_000;

/// The ACME subsystem of one node.
pub struct Acme {
    settings: AcmeSettings,
    storage: Storage,
    seal: SealingKey,
    account: tokio::sync::Mutex<Option<instant_acme::Account>>,
    issued: moka::sync::Cache<ServerName, Arc<Managed>>,
    pending: Mutex<HashMap<ServerName, Obtaining>>,
    orders: tokio::sync::Semaphore,
    challenge_keys: moka::sync::Cache<String, Arc<CertifiedKey>>,
    /// Names just refused for a client-provoked reason (budget, backoff): further handshakes for them are
    /// refused from memory, without touching storage, for a while (the negative cache of issuance).
    refused: moka::sync::Cache<ServerName, AcmeError>,
    node: String,
    /// Counters.
    pub metrics: AcmeMetrics,
}

impl std::fmt::Debug for Acme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acme").field("directory", &self.settings.directory).field("node", &self.node).finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Acme {
    /// The subsystem for these settings; `redis` is the store `acme.redis` names. Nothing is contacted yet.
    pub fn new(settings: AcmeSettings, redis: Option<Arc<crate::store::RedisStore>>, node: &str) -> Self {
        let storage = match (&settings.storage, redis) {
            (AcmeStorage::Redis(_), Some(store)) => Storage::redis(store, settings.prefix.clone()),
            (AcmeStorage::Directory(root), _) => Storage::directory(root.clone()),
            // Validated in config: acme.redis names a [[redis]] store, and the server hands it over.
            (AcmeStorage::Redis(r), None) => {
                Storage::redis(Arc::new(crate::store::RedisStore::new(r.clone())), settings.prefix.clone())
            }
        };
        let key = crate::resumption::crypto::derive(settings.secret.bytes(), "tern acme storage v1");
        let node = format!("{node}-{:016x}", u64::from_le_bytes(crate::resumption::crypto::random_bytes::<8>()));
        let refused = moka::sync::Cache::builder()
            .max_capacity(IN_MEMORY)
            .time_to_live(settings.failure_backoff.min(REFUSAL_MEMORY))
            .build();
        Self {
            orders: tokio::sync::Semaphore::new(settings.max_concurrent_orders),
            refused,
            settings,
            storage,
            seal: SealingKey::new(&key),
            account: tokio::sync::Mutex::new(None),
            issued: moka::sync::Cache::new(IN_MEMORY),
            pending: Mutex::new(HashMap::new()),
            challenge_keys: moka::sync::Cache::builder()
                .max_capacity(1024)
                .time_to_live(Duration::from_secs(60))
                .build(),
            node,
            metrics: AcmeMetrics::default(),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &AcmeSettings {
        &self.settings
    }

    /// Whether `name` is listed in `acme.names` (served without a plugin).
    pub fn is_listed(&self, name: &ServerName) -> bool {
        self.settings.names.iter().any(|n| n == name)
    }

    /// The certificate for `name`: from memory, else from storage, else ordered (one order per name across the
    /// fleet). Waits at most `acme.handshake_wait` for an order; the order goes on after the wait gives up.
    pub async fn certificate(self: &Arc<Self>, name: &ServerName) -> Result<Arc<ParsedCert>, AcmeError> {
        if let Some(managed) = self.issued.get(name)
            && managed.cert.remaining_validity() > Duration::ZERO
        {
            if managed.renew_at <= record::now() {
                let mut checked = lock(&managed.checked);
                if checked.elapsed() >= RECHECK {
                    *checked = Instant::now();
                    let (acme, name) = (self.clone(), name.clone());
                    tokio::spawn(async move {
                        let _ = acme.load_stored(&name).await;
                    });
                }
            }
            return Ok(managed.cert.clone());
        }
        if let Some(refused) = self.refused.get(name) {
            return Err(refused);
        }
        let obtaining = self.obtaining(name, Purpose::Issue)?;
        match tokio::time::timeout(self.settings.handshake_wait, obtaining).await {
            Ok(Ok(cert)) => {
                crate::metrics::inc(&self.metrics.served_after_wait);
                Ok(cert)
            }
            // A refusal is remembered by the order task (also when this handshake stopped waiting first).
            Ok(Err(err)) => Err(err),
            Err(_) => {
                crate::metrics::inc(&self.metrics.wait_expired);
                Err(AcmeError::Pending)
            }
        }
    }

    /// The shared, spawned work of obtaining `name` on this node (one per name at a time).
    fn obtaining(self: &Arc<Self>, name: &ServerName, purpose: Purpose) -> Result<Obtaining, AcmeError> {
        let mut pending = lock(&self.pending);
        if let Some(work) = pending.get(name) {
            return Ok(work.clone());
        }
        if pending.len() >= self.settings.max_pending {
            crate::metrics::inc(&self.metrics.refused_busy);
            return Err(AcmeError::Busy);
        }
        let (acme, owned) = (self.clone(), name.clone());
        let task = tokio::spawn(async move {
            let result = acme.obtain(&owned, purpose).await;
            // Remembered here, not by the waiting handshake: one that stopped waiting (`acme.handshake_wait`)
            // before the budget said no would leave the name to ask storage and spend the check again each time.
            // Before the name leaves `pending`, so a handshake meanwhile finds the one or the other.
            if let Err(err @ (AcmeError::Budget { .. } | AcmeError::Backoff { .. })) = &result
                && purpose == Purpose::Issue
            {
                acme.refused.insert(owned.clone(), err.clone());
            }
            lock(&acme.pending).remove(&owned);
            result
        });
        let work = async move { task.await.unwrap_or_else(|e| Err(AcmeError::Order(format!("order task: {e}")))) }
            .boxed()
            .shared();
        pending.insert(name.clone(), work.clone());
        Ok(work)
    }

    /// Stored, or ordered under the fleet-wide lock.
    async fn obtain(self: &Arc<Self>, name: &ServerName, purpose: Purpose) -> Result<Arc<ParsedCert>, AcmeError> {
        if purpose == Purpose::Issue
            && let Some(cert) = self.load_stored(name).await?
        {
            return Ok(cert);
        }
        let token =
            format!("{}-{:016x}", self.node, u64::from_le_bytes(crate::resumption::crypto::random_bytes::<8>()));
        let deadline = Instant::now() + self.settings.order_timeout + self.settings.lock_lease;
        loop {
            if self.storage.lock(name.as_str(), &token, self.settings.lock_lease).await? {
                break;
            }
            // Another node (or task) orders this name: wait for its result rather than ordering again.
            crate::metrics::inc(&self.metrics.waited_for_other);
            loop {
                tokio::time::sleep(POLL).await;
                if purpose == Purpose::Issue
                    && let Some(cert) = self.load_stored(name).await?
                {
                    return Ok(cert);
                }
                if !self.storage.is_locked(name.as_str()).await? {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(AcmeError::Order("another node's order did not finish in time".into()));
                }
            }
            if purpose != Purpose::Issue {
                // The other node renewed (or failed to): this renewal is moot either way.
                return self.load_stored(name).await?.ok_or(AcmeError::Order("renewed elsewhere, not stored".into()));
            }
        }
        let result = self.order_locked(name, purpose, &token).await;
        if let Err(err) = self.storage.unlock(name.as_str(), &token).await {
            tracing::warn!(servername = %name, error = %err, "could not release the order lock (its lease ends it)");
        }
        result
    }

    /// Holding the name's lock: checks again, spends the budget, orders, stores.
    async fn order_locked(
        self: &Arc<Self>,
        name: &ServerName,
        purpose: Purpose,
        token: &str,
    ) -> Result<Arc<ParsedCert>, AcmeError> {
        let stored = self.stored_record(name).await?;
        match (&stored, purpose) {
            // Finished by whoever held the lock before us.
            (Some((_, cert)), Purpose::Issue) => return Ok(cert.clone()),
            (Some((record, cert)), Purpose::Renew) if !record.due() => return Ok(cert.clone()),
            _ => {}
        }
        let state = self.state(name).await?;
        if state.retry_at > record::now() && purpose != Purpose::Force {
            crate::metrics::inc(&self.metrics.refused_backoff);
            return Err(AcmeError::Backoff {
                wait_seconds: state.retry_at - record::now(),
                last_error: state.last_error,
            });
        }
        self.spend_budget(name, purpose).await?;
        let _slot = self.orders.acquire().await.map_err(|_| AcmeError::Order("shutting down".into()))?;
        let started = Instant::now();
        // The account (created or restored) and the order share one deadline: a CA that accepts connections but
        // never answers cannot hold the name's lock, its pending slot or an order slot past it.
        let ordering = async {
            let account = self.account().await.map_err(|e| e.to_string())?;
            // instant-acme retries a rejected nonce three times per request; a CA that keeps rejecting them
            // (Pebble under load) gets a fresh order twice more before the order counts as failed.
            let mut attempts = 0;
            let issued = loop {
                match order::order(&account, &self.settings, &self.storage, name.as_str()).await {
                    Err(message) if message.contains("badNonce") && attempts < BAD_NONCE_ORDERS => {
                        attempts += 1;
                        tracing::debug!(servername = %name, attempts, "nonce rejected again, ordering afresh");
                    }
                    other => break other?,
                }
            };
            Ok::<_, String>((account, issued))
        };
        let ordered = tokio::select! {
            ordered = tokio::time::timeout(self.settings.order_timeout, ordering) => {
                ordered.unwrap_or_else(|_| Err(format!("no certificate within acme.order_timeout ({:?})", self.settings.order_timeout)))
            }
            lost = self.keep_lease(name, token) => Err(lost),
        };
        let renewal = purpose != Purpose::Issue;
        let outcome = match ordered {
            Ok((account, issued)) => self.store_issued(name, token, issued, &account).await,
            Err(message) => {
                if message.contains("accountDoesNotExist") {
                    // The CA forgot the account (a test CA restarted, or it was deactivated): make a new one next time.
                    tracing::warn!(directory = %self.settings.directory, "the CA does not know the ACME account; a new one will be created");
                    *self.account.lock().await = None;
                    let _ = self.storage.delete(Kind::Cert, ACCOUNT).await;
                }
                Err(AcmeError::Order(message))
            }
        };
        let elapsed = started.elapsed();
        match &outcome {
            Ok(cert) => {
                self.metrics.count_order(renewal, true);
                let _ = self.storage.delete(Kind::State, name.as_str()).await;
                tracing::info!(servername = %name, renewal, ?elapsed, not_after = ?cert.not_after, "certificate issued");
            }
            Err(err) => {
                self.metrics.count_order(renewal, false);
                let state =
                    state.failed(err.to_string(), self.settings.failure_backoff, self.settings.failure_backoff_max);
                if let Ok(json) = serde_json::to_vec(&state) {
                    let _ = self.storage.put(Kind::State, name.as_str(), &json).await;
                }
                if renewal {
                    // The old certificate keeps serving; the renewal is tried again after the backoff.
                    let _ = self.storage.schedule(name.as_str(), state.retry_at).await;
                }
                tracing::warn!(servername = %name, renewal, ?elapsed, error = %err, retry_at = state.retry_at, "order failed");
            }
        }
        outcome
    }

    /// Renews the lock's lease every third of it while the order runs; returns only if the lock was lost.
    async fn keep_lease(&self, name: &ServerName, token: &str) -> String {
        let lease = self.settings.lock_lease;
        loop {
            tokio::time::sleep(lease / 3).await;
            match self.storage.extend(name.as_str(), token, lease).await {
                Ok(true) => {}
                Ok(false) => return "the order lock was lost (lease ran out); another node may order".into(),
                // A storage blip: the lease still runs; the next extension tries again.
                Err(err) => tracing::warn!(servername = %name, error = %err, "could not extend the order lock"),
            }
        }
    }

    /// Seals and stores what an order produced (only while still holding the lock), schedules its renewal.
    async fn store_issued(
        &self,
        name: &ServerName,
        token: &str,
        issued: order::Issued,
        account: &instant_acme::Account,
    ) -> Result<Arc<ParsedCert>, AcmeError> {
        let (mut record, parsed) =
            Record::seal(&self.seal, name, issued.chain, &issued.key, self.settings.renewal_window)
                .map_err(|e| AcmeError::Order(format!("the CA's certificate is unusable: {e}")))?;
        if let Some(id) = order::certificate_id(&record.chain)
            && let Ok(Ok((info, _))) = tokio::time::timeout(ARI_TIMEOUT, account.renewal_info(&id)).await
        {
            // ACME Renewal Information (RFC 9773): the CA's window wins over the lifetime fraction.
            record
                .renew_within(info.suggested_window.start.unix_timestamp(), info.suggested_window.end.unix_timestamp());
        }
        let json = serde_json::to_vec(&record).map_err(|e| AcmeError::Order(e.to_string()))?;
        if !self.storage.put_fenced(Kind::Cert, name.as_str(), token, &json).await? {
            return Err(AcmeError::Order("the order lock was lost before the certificate was stored".into()));
        }
        self.storage.schedule(name.as_str(), jittered(record.renew_at)).await?;
        Ok(self.remember(name, Arc::new(parsed), record.renew_at))
    }

    fn remember(&self, name: &ServerName, cert: Arc<ParsedCert>, renew_at: i64) -> Arc<ParsedCert> {
        let managed = Managed { cert: cert.clone(), renew_at, checked: Mutex::new(Instant::now()) };
        self.issued.insert(name.clone(), Arc::new(managed));
        cert
    }

    /// The stored record and its certificate, if there is a usable one.
    async fn stored_record(&self, name: &ServerName) -> Result<Option<(Record, Arc<ParsedCert>)>, AcmeError> {
        let Some(bytes) = self.storage.get(Kind::Cert, name.as_str()).await? else {
            return Ok(None);
        };
        let record: Record = match serde_json::from_slice(&bytes) {
            Ok(record) => record,
            Err(err) => {
                tracing::warn!(servername = %name, error = %err, "stored ACME record unreadable; ordering anew");
                return Ok(None);
            }
        };
        // Unsealing and parsing is tens of microseconds of CPU: fine on a worker.
        match record.open(&self.seal, name) {
            Ok(parsed) => Ok(Some((record, Arc::new(parsed)))),
            Err(err) => {
                tracing::warn!(servername = %name, error = %err, "stored ACME certificate unusable; ordering anew");
                Ok(None)
            }
        }
    }

    /// The stored certificate, now served from memory.
    async fn load_stored(&self, name: &ServerName) -> Result<Option<Arc<ParsedCert>>, AcmeError> {
        Ok(self.stored_record(name).await?.map(|(record, cert)| self.remember(name, cert, record.renew_at)))
    }

    async fn state(&self, name: &ServerName) -> Result<State, AcmeError> {
        let bytes = self.storage.get(Kind::State, name.as_str()).await?;
        Ok(bytes.and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default())
    }

    /// Counts the order against the hour's budgets: all orders, and first orders per registered domain.
    async fn spend_budget(&self, name: &ServerName, purpose: Purpose) -> Result<(), AcmeError> {
        let hour = u64::try_from(record::now() / 3600).unwrap_or(0);
        if self.storage.count_order("all", hour).await? > self.settings.orders_per_hour {
            crate::metrics::inc(&self.metrics.refused_budget);
            return Err(AcmeError::Budget { scope: "all".into() });
        }
        if purpose == Purpose::Issue {
            let domain = psl::domain_str(name.as_str()).unwrap_or(name.as_str()).to_string();
            if self.storage.count_order(&domain, hour).await? > self.settings.orders_per_hour_per_domain {
                crate::metrics::inc(&self.metrics.refused_budget);
                return Err(AcmeError::Budget { scope: domain });
            }
        }
        Ok(())
    }

    /// The ACME account: from storage, or created once for the fleet (under the account's own lock).
    async fn account(&self) -> Result<instant_acme::Account, AcmeError> {
        let mut account = self.account.lock().await;
        if let Some(account) = account.as_ref() {
            return Ok(account.clone());
        }
        let settings = self.settings.clone();
        let builder = || async {
            let settings = settings.clone();
            tokio::task::spawn_blocking(move || order::builder(&settings))
                .await
                .map_err(|e| AcmeError::Order(e.to_string()))?
                .map_err(AcmeError::Order)
        };
        let token = format!("{}-account", self.node);
        let deadline = Instant::now() + self.settings.order_timeout;
        let restored = loop {
            if let Some(stored) = self.storage.get(Kind::Cert, ACCOUNT).await? {
                let json = record::open_account(&self.seal, &stored)
                    .ok_or(AcmeError::Order("the stored ACME account does not open with acme.secret".into()))?;
                break order::restore_account(builder().await?, &json).await.map_err(AcmeError::Order)?;
            }
            if self.storage.lock(ACCOUNT, &token, self.settings.lock_lease).await? {
                let created = async {
                    let (account, json) =
                        order::create_account(&self.settings, builder().await?).await.map_err(AcmeError::Order)?;
                    let sealed =
                        record::seal_account(&self.seal, &json).ok_or(AcmeError::Order("sealing failed".into()))?;
                    self.storage.put(Kind::Cert, ACCOUNT, sealed.as_bytes()).await?;
                    tracing::info!(directory = %self.settings.directory, "ACME account created");
                    Ok::<_, AcmeError>(account)
                }
                .await;
                let _ = self.storage.unlock(ACCOUNT, &token).await;
                break created?;
            }
            if Instant::now() > deadline {
                return Err(AcmeError::Order("another node is creating the ACME account".into()));
            }
            tokio::time::sleep(POLL).await;
        };
        *account = Some(restored.clone());
        Ok(restored)
    }

    /// The TLS-ALPN-01 answer for `name`, if an order of any node published one.
    pub async fn challenge_key(&self, name: &ServerName) -> Option<Arc<CertifiedKey>> {
        let digest = match self.storage.challenge(&order::tls_challenge(name.as_str())).await {
            Ok(Some(digest)) => digest,
            Ok(None) => return None,
            Err(err) => {
                tracing::warn!(servername = %name, error = %err, "cannot read the ACME challenge");
                return None;
            }
        };
        let cache_key = format!("{name} {digest}");
        if let Some(key) = self.challenge_keys.get(&cache_key) {
            return Some(key);
        }
        let (owned, digest_owned) = (name.to_string(), digest.clone());
        let built = tokio::task::spawn_blocking(move || order::challenge_certificate(&owned, &digest_owned)).await;
        match built {
            Ok(Ok(key)) => {
                let key = Arc::new(key);
                self.challenge_keys.insert(cache_key, key.clone());
                crate::metrics::inc(&self.metrics.challenges_tls_alpn);
                Some(key)
            }
            Ok(Err(err)) => {
                tracing::warn!(servername = %name, error = %err, "cannot build the TLS-ALPN-01 certificate");
                None
            }
            Err(_) => None,
        }
    }

    /// The HTTP-01 answer for `token`, if an order of any node published one.
    pub async fn http_answer(&self, token: &str) -> Option<String> {
        let plausible = !token.is_empty()
            && token.len() <= 256
            && token.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !plausible {
            return None;
        }
        let answer = self.storage.challenge(&order::http_challenge(token)).await.ok().flatten();
        if answer.is_some() {
            crate::metrics::inc(&self.metrics.challenges_http);
        }
        answer
    }

    /// Renews what is due, obtains `acme.names`, and keeps the gauges current; forever, every
    /// `acme.renew_check_interval` (jittered by up to a tenth, so a fleet does not look at once).
    pub async fn maintain(self: Arc<Self>) {
        for name in self.settings.names.clone() {
            if let Ok(work) = self.obtaining(&name, Purpose::Issue) {
                tokio::spawn(async move {
                    let _ = work.await;
                });
            }
        }
        loop {
            self.renew_due().await;
            let interval = self.settings.renew_check_interval;
            let jitter = record::random_below(u64::try_from(interval.as_millis() / 10).unwrap_or(0).max(1));
            tokio::time::sleep(interval + Duration::from_millis(jitter)).await;
        }
    }

    async fn renew_due(self: &Arc<Self>) {
        use futures_util::StreamExt as _;
        match self.storage.scheduled(record::now(), RENEWALS_PER_CHECK).await {
            Ok(due) => {
                // As many at once as orders may run; the budgets bound what reaches the CA.
                let renewals =
                    due.into_iter().filter_map(|(raw, _)| ServerName::parse(&raw).ok()).map(|name| async move {
                        if let Ok(work) = self.obtaining(&name, Purpose::Renew) {
                            let _ = work.await;
                        }
                    });
                futures_util::stream::iter(renewals)
                    .buffer_unordered(self.settings.max_concurrent_orders)
                    .collect::<Vec<()>>()
                    .await;
            }
            Err(err) => tracing::warn!(error = %err, "cannot read the renewal schedule"),
        }
        if let Ok(count) = self.storage.managed().await {
            self.metrics.managed.store(count, std::sync::atomic::Ordering::Relaxed);
        }
        let soonest = self.issued.iter().map(|(_, m)| record::unix(m.cert.not_after)).min().unwrap_or(0);
        self.metrics.soonest_expiry.store(soonest, std::sync::atomic::Ordering::Relaxed);
    }

    /// Renews `name` now, whatever its schedule (`tern acme renew`).
    pub async fn renew_now(self: &Arc<Self>, name: &ServerName) -> Result<Arc<ParsedCert>, AcmeError> {
        self.obtaining(name, Purpose::Force)?.await
    }

    /// Revokes `name`'s certificate at the CA and deletes it (`tern acme revoke`). The next handshake the policy
    /// permits obtains a new one.
    pub async fn revoke(self: &Arc<Self>, name: &ServerName) -> Result<bool, AcmeError> {
        let Some((record, _)) = self.stored_record(name).await? else {
            return Ok(false);
        };
        use rustls::pki_types::pem::PemObject;
        let leaf = rustls::pki_types::CertificateDer::pem_slice_iter(record.chain.as_bytes())
            .next()
            .and_then(Result::ok)
            .ok_or(AcmeError::Order("stored chain has no certificate".into()))?;
        let revoking = async {
            let account = self.account().await?;
            account
                .revoke(&instant_acme::RevocationRequest { certificate: &leaf, reason: None })
                .await
                .map_err(|e| AcmeError::Order(format!("revoke: {e}")))
        };
        tokio::time::timeout(self.settings.order_timeout, revoking)
            .await
            .map_err(|_| AcmeError::Order("the CA did not answer the revocation within acme.order_timeout".into()))??;
        self.storage.delete(Kind::Cert, name.as_str()).await?;
        self.storage.unschedule(name.as_str()).await?;
        self.issued.invalidate(name);
        tracing::info!(servername = %name, "certificate revoked and deleted");
        Ok(true)
    }

    /// Every managed name with its dates, issuer and last error (never keys), soonest renewal first; at most
    /// `limit`.
    pub async fn list(&self, limit: usize) -> Result<Vec<serde_json::Value>, AcmeError> {
        let mut out = Vec::new();
        for (raw, renew_at) in self.storage.scheduled(i64::MAX, limit).await? {
            let record =
                self.storage.get(Kind::Cert, &raw).await?.and_then(|b| serde_json::from_slice::<Record>(&b).ok());
            let state =
                self.storage.get(Kind::State, &raw).await?.and_then(|b| serde_json::from_slice::<State>(&b).ok());
            out.push(serde_json::json!({
                "name": raw,
                "issuer": record.as_ref().map(|r| r.issuer.clone()),
                "issued_at": record.as_ref().map(|r| r.issued_at),
                "not_after": record.as_ref().map(|r| r.not_after),
                "renew_at": renew_at,
                "failures": state.as_ref().map_or(0, |s| s.failures),
                "last_error": state.map(|s| s.last_error),
            }));
        }
        Ok(out)
    }
}

/// What `tern check` and start-up verify of `[acme]` before anything is ordered: the `acme.ca` file holds a usable
/// CA certificate, and the `acme.directory_path` folder exists or can be made, and is writable. The error names the
/// key and the file.
pub async fn preflight(settings: &AcmeSettings) -> Result<(), (&'static str, std::path::PathBuf, String)> {
    if let Some(ca) = settings.ca.clone() {
        let checked = tokio::task::spawn_blocking({
            let ca = ca.clone();
            move || crate::upstream::load_roots(&ca).map(drop)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        checked.map_err(|message| ("acme.ca", ca, message))?;
    }
    if let AcmeStorage::Directory(root) = &settings.storage {
        let folder = root.clone();
        let written = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&folder)?;
            let probe = folder.join(".tern-write-test");
            std::fs::write(&probe, b"")?;
            std::fs::remove_file(&probe)
        })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        written.map_err(|e| ("acme.directory_path", root.clone(), format!("not a writable folder: {e}")))?;
    }
    Ok(())
}

/// Up to an hour (and at most a twentieth of the time left) later, so that certificates issued together are not
/// all renewed in the same minute.
fn jittered(renew_at: i64) -> i64 {
    let left = u64::try_from(renew_at - record::now()).unwrap_or(0);
    renew_at + i64::try_from(record::random_below((left / 20).min(3600))).unwrap_or(0)
}
