//! Session-ticket keys in time slots, shared by a fleet through Redis.
//!
//! Time is cut into slots of `ticket_rotation`. Slot `s` has a key in Redis (hash `<prefix>ticket-keys:<s>`,
//! field = generation, value = a JSON record whose key bytes are sealed with a key derived from the operator's
//! secret). Any node may create a slot's first key with `HSETNX` (atomic set-if-absent; the loser reads the
//! winner's), and every node pulls the next slot's key before the boundary. A node encrypts with the newest
//! active key of the current slot and decrypts with the keys of the previous N slots (N = ticket lifetime ÷
//! rotation), the current and the next one, so nodes whose clocks disagree by less than a slot still understand
//! each other. `tern tickets rotate` adds a generation to the current slot that activates a few seconds later,
//! after every node has pulled it.
//!
//! All of this happens in a background task; rustls's synchronous `encrypt`/`decrypt` only read the in-memory
//! key ring. If Redis cannot be reached and the ring holds no key for the current slot, the node makes a local
//! random key (its tickets resume on this node only) and keeps retrying Redis.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::server::ProducesTickets;

use super::ResumptionMetrics;
use super::crypto::{SealingKey, random_bytes, random_key};
use crate::store::{RedisStore, StoreError};

/// Bytes of key name at the front of every ticket.
pub const NAME_LEN: usize = 16;

/// Milliseconds since the Unix epoch (wall clock: slots must mean the same on every node).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Slot arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    /// Slot length.
    pub interval_ms: u64,
    /// Previous slots whose keys still decrypt (ticket lifetime ÷ rotation, rounded up).
    pub window: u64,
}

impl Schedule {
    /// The schedule for a rotation interval and a ticket lifetime.
    pub fn new(rotation: Duration, lifetime: Duration) -> Self {
        let interval_ms = u64::try_from(rotation.as_millis()).unwrap_or(u64::MAX).max(1);
        let lifetime_ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX);
        Self { interval_ms, window: lifetime_ms.div_ceil(interval_ms).max(1) }
    }

    /// The slot `now_ms` falls in.
    pub fn slot_at(&self, now_ms: u64) -> u64 {
        now_ms / self.interval_ms
    }

    /// When `slot` begins.
    pub fn slot_start(&self, slot: u64) -> u64 {
        slot.saturating_mul(self.interval_ms)
    }

    /// Slots whose keys decrypt at `now_ms`: the previous `window`, the current one and the next.
    pub fn accepted(&self, now_ms: u64) -> RangeInclusive<u64> {
        let current = self.slot_at(now_ms);
        current.saturating_sub(self.window)..=current + 1
    }

    /// How long Redis keeps a slot's keys: until the slot has left every node's window, with a slot to spare.
    pub fn keep(&self) -> Duration {
        Duration::from_millis(self.interval_ms.saturating_mul(self.window + 3))
    }

    /// How often nodes look for new keys: a quarter slot, at most 10 s (a forced rotation also wakes them).
    pub fn poll(&self) -> Duration {
        Duration::from_millis((self.interval_ms / 4).clamp(50, 10_000))
    }
}

/// Where a key came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// From Redis, shared by the fleet.
    Cluster {
        /// The node that made it.
        node: String,
    },
    /// Made by this node while Redis was unreachable; its tickets resume here only.
    Local,
}

/// One ticket key. The key bytes exist only inside the AES state, which is wiped on drop.
pub struct TicketKey {
    pub(crate) name: [u8; NAME_LEN],
    pub(crate) slot: u64,
    pub(crate) generation: u32,
    pub(crate) activate_ms: u64,
    pub(crate) origin: Origin,
    pub(crate) sealing: SealingKey,
}

impl std::fmt::Debug for TicketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKey")
            .field("slot", &self.slot)
            .field("generation", &self.generation)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

impl TicketKey {
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self.origin, Origin::Cluster { .. })
    }
}

/// The keys a node holds, replaced as a whole by the refresher.
#[derive(Debug, Default)]
pub struct KeyRing {
    pub(crate) keys: Vec<Arc<TicketKey>>,
    /// Fleet keys still in the window that Redis no longer has (it restarted without persistence): they keep
    /// decrypting the tickets issued under them but no longer encrypt.
    pub(crate) retired: Vec<Arc<TicketKey>>,
}

impl KeyRing {
    /// The key that encrypts at `now_ms`: of the current slot's keys already active, a fleet key before a local
    /// one, then the newest generation.
    pub(super) fn for_encryption(&self, schedule: &Schedule, now_ms: u64) -> Option<&Arc<TicketKey>> {
        let current = schedule.slot_at(now_ms);
        self.keys
            .iter()
            .filter(|k| k.slot == current && k.activate_ms <= now_ms)
            .max_by_key(|k| (k.is_cluster(), k.generation, k.activate_ms))
    }

    pub(super) fn by_name(&self, name: &[u8]) -> Option<&Arc<TicketKey>> {
        self.keys.iter().chain(&self.retired).find(|k| k.name == name)
    }
}

/// rustls's view of the ring for one resumption scope: tickets are bound to the scope through the AEAD's
/// associated data, so a ticket from a listener with other client-authentication settings never opens here.
pub struct Ticketer {
    pub(crate) ring: Arc<ArcSwap<KeyRing>>,
    pub(crate) schedule: Schedule,
    pub(crate) scope: Vec<u8>,
    pub(crate) lifetime: u32,
    pub(crate) metrics: Arc<ResumptionMetrics>,
}

impl std::fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticketer").field("scope", &String::from_utf8_lossy(&self.scope)).finish_non_exhaustive()
    }
}

impl Ticketer {
    fn aad(&self, name: &[u8]) -> Vec<u8> {
        let mut aad = Vec::with_capacity(NAME_LEN + self.scope.len());
        aad.extend_from_slice(name);
        aad.extend_from_slice(&self.scope);
        aad
    }
}

impl ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let ring = self.ring.load();
        let Some(key) = ring.for_encryption(&self.schedule, now_ms()) else {
            self.metrics.ticket_encrypt_failures.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        let sealed = key.sealing.seal(plain, &self.aad(&key.name))?;
        let mut ticket = Vec::with_capacity(NAME_LEN + sealed.len());
        ticket.extend_from_slice(&key.name);
        ticket.extend_from_slice(&sealed);
        self.metrics.tickets_issued.fetch_add(1, Ordering::Relaxed);
        Some(ticket)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        let metrics = &self.metrics;
        let (name, sealed) = ticket.split_at_checked(NAME_LEN)?;
        let ring = self.ring.load();
        let Some(key) = ring.by_name(name) else {
            metrics.ticket_unknown_key.fetch_add(1, Ordering::Relaxed);
            return None;
        };
        if !self.schedule.accepted(now_ms()).contains(&key.slot) {
            metrics.ticket_expired_key.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        match key.sealing.open(sealed, &self.aad(name)) {
            Some(plain) => Some(plain.to_vec()),
            None => {
                metrics.ticket_undecryptable.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }
}

/// A key as stored in Redis. The key bytes are sealed; the rest is what `tern tickets status` shows.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct Record {
    /// Hex of the 16-byte key name (in clear at the front of every ticket anyway).
    pub(super) name: String,
    /// Hex of the key bytes sealed with the ticket-key sealing key.
    sealed: String,
    /// The node that made it.
    pub(super) node: String,
    /// When it was made.
    created_ms: u64,
    /// When nodes start encrypting with it.
    activate_ms: u64,
}

/// A slot's keys as `tern tickets status` reports them: no key bytes.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyStatus {
    /// The slot.
    pub slot: u64,
    /// Generation within the slot (0 = scheduled; higher = forced rotations).
    pub generation: u32,
    /// The node that made it.
    pub node: String,
    /// When it was made.
    pub created_ms: u64,
    /// When nodes start encrypting with it.
    pub activate_ms: u64,
    /// Whether this config's secret opens it (a mismatch means nodes were configured with different secrets).
    pub opens: bool,
}

/// The Redis side of the key ring.
pub struct SharedKeys {
    /// The store.
    pub store: Arc<RedisStore>,
    /// Key prefix, e.g. `tern:resumption:`.
    pub prefix: String,
    /// Seals key bytes at rest.
    pub sealing: SealingKey,
}

impl std::fmt::Debug for SharedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedKeys").field("store", &self.store.name()).field("prefix", &self.prefix).finish()
    }
}

impl SharedKeys {
    fn slot_key(&self, slot: u64) -> String {
        format!("{}ticket-keys:{slot}", self.prefix)
    }

    /// The channel a forced rotation is announced on.
    pub fn channel(&self) -> String {
        format!("{}ticket-keys", self.prefix)
    }

    pub(crate) fn aad(&self, slot: u64, generation: u32, name: &str) -> Vec<u8> {
        format!("{}ticket-key:{slot}:{generation}:{name}", self.prefix).into_bytes()
    }

    pub(super) async fn read_slot(&self, slot: u64) -> Result<BTreeMap<u32, Record>, StoreError> {
        let fields: Vec<(String, String)> = self.store.run(redis::cmd("HGETALL").arg(self.slot_key(slot))).await?;
        Ok(fields
            .into_iter()
            .filter_map(|(generation, json)| Some((generation.parse().ok()?, serde_json::from_str(&json).ok()?)))
            .collect())
    }

    /// Makes a key for `(slot, generation)` unless one exists; true if this call's key won.
    pub(super) async fn create(
        &self,
        schedule: &Schedule,
        slot: u64,
        generation: u32,
        activate_ms: u64,
        node: &str,
    ) -> Result<bool, StoreError> {
        let unavailable = |message: &str| StoreError::Unavailable {
            store: self.store.name().to_string(),
            message: message.to_string(),
        };
        let secret = random_key().ok_or_else(|| unavailable("no randomness for a ticket key"))?;
        let name = hex(&random_bytes::<NAME_LEN>());
        let sealed = self
            .sealing
            .seal(secret.as_ref(), &self.aad(slot, generation, &name))
            .ok_or_else(|| unavailable("cannot seal a ticket key"))?;
        let record = Record { name, sealed: hex(&sealed), node: node.to_string(), created_ms: now_ms(), activate_ms };
        let json = serde_json::to_string(&record).map_err(|e| unavailable(&e.to_string()))?;
        let key = self.slot_key(slot);
        let won: bool = self.store.run(redis::cmd("HSETNX").arg(&key).arg(generation).arg(json)).await?;
        let keep = u64::try_from(schedule.keep().as_millis()).unwrap_or(u64::MAX);
        let _: bool = self.store.run(redis::cmd("PEXPIRE").arg(&key).arg(keep)).await?;
        Ok(won)
    }

    pub(crate) fn open(&self, slot: u64, generation: u32, record: &Record) -> Option<TicketKey> {
        let name: [u8; NAME_LEN] = unhex(&record.name)?.try_into().ok()?;
        let plain = self.sealing.open(&unhex(&record.sealed)?, &self.aad(slot, generation, &record.name))?;
        let bytes: &[u8; 32] = plain.as_slice().try_into().ok()?;
        Some(TicketKey {
            name,
            slot,
            generation,
            activate_ms: record.activate_ms,
            origin: Origin::Cluster { node: record.node.clone() },
            sealing: SealingKey::new(bytes),
        })
    }

    /// Every key of the slots a node would accept now, for `tern tickets status`.
    pub async fn status(&self, schedule: &Schedule) -> Result<Vec<KeyStatus>, StoreError> {
        let mut out = Vec::new();
        for slot in schedule.accepted(now_ms()) {
            for (generation, record) in self.read_slot(slot).await? {
                let opens = self.open(slot, generation, &record).is_some();
                out.push(KeyStatus {
                    slot,
                    generation,
                    node: record.node,
                    created_ms: record.created_ms,
                    activate_ms: record.activate_ms,
                    opens,
                });
            }
        }
        Ok(out)
    }

    /// Forces a rotation: a new generation in the current slot, active `lead` from now (long enough for every
    /// node to pull it first), announced on [`channel`](Self::channel). Returns its slot, generation and
    /// activation time.
    pub async fn rotate(&self, schedule: &Schedule, node: &str, lead: Duration) -> Result<KeyStatus, StoreError> {
        let lead_ms = u64::try_from(lead.as_millis()).unwrap_or(u64::MAX);
        for _ in 0..8 {
            let now = now_ms();
            let slot = schedule.slot_at(now);
            let generation = self.read_slot(slot).await?.keys().max().map_or(0, |g| g + 1);
            if self.create(schedule, slot, generation, now + lead_ms, node).await? {
                let _ = self.store.publish(&self.channel(), &format!("{slot}:{generation}")).await?;
                return Ok(KeyStatus {
                    slot,
                    generation,
                    node: node.to_string(),
                    created_ms: now,
                    activate_ms: now + lead_ms,
                    opens: true,
                });
            }
        }
        Err(StoreError::Command {
            store: self.store.name().to_string(),
            message: "other rotations kept winning the race; try again".into(),
        })
    }
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resumption::rotation::KeyManager;

    fn key(slot: u64, generation: u32, activate_ms: u64, origin: Origin) -> Arc<TicketKey> {
        Arc::new(TicketKey {
            name: random_bytes(),
            slot,
            generation,
            activate_ms,
            origin,
            sealing: SealingKey::new(&random_key().unwrap()),
        })
    }

    #[test]
    fn window_covers_previous_slots_and_the_next() {
        let s = Schedule::new(Duration::from_secs(3600), Duration::from_secs(6 * 3600));
        assert_eq!(s.window, 6);
        let now = 100 * 3_600_000 + 5;
        assert_eq!(s.accepted(now), 94..=101);
        assert_eq!(Schedule::new(Duration::from_secs(10), Duration::from_secs(25)).window, 3, "rounded up");
        assert_eq!(s.poll(), Duration::from_secs(10));
        assert_eq!(Schedule::new(Duration::from_millis(100), Duration::from_secs(1)).poll(), Duration::from_millis(50));
    }

    #[test]
    fn encryption_prefers_fleet_keys_then_newest_active_generation() {
        let s = Schedule::new(Duration::from_secs(60), Duration::from_secs(120));
        let now = 10 * 60_000 + 30_000;
        let local = key(10, 0, 600_000, Origin::Local);
        let fleet = key(10, 0, 600_000, Origin::Cluster { node: "a".into() });
        let rotated = key(10, 1, now - 1, Origin::Cluster { node: "b".into() });
        let pending = key(10, 2, now + 5_000, Origin::Cluster { node: "b".into() });
        let next = key(11, 0, 660_000, Origin::Cluster { node: "a".into() });
        let mut ring = KeyRing { keys: vec![local.clone(), next.clone()], retired: Vec::new() };
        assert!(Arc::ptr_eq(ring.for_encryption(&s, now).unwrap(), &local), "only a local key: use it");
        ring.keys.push(fleet.clone());
        assert!(Arc::ptr_eq(ring.for_encryption(&s, now).unwrap(), &fleet));
        ring.keys.extend([rotated.clone(), pending.clone()]);
        assert!(Arc::ptr_eq(ring.for_encryption(&s, now).unwrap(), &rotated), "pending generation not yet");
        assert!(Arc::ptr_eq(ring.for_encryption(&s, now + 5_000).unwrap(), &pending));
        assert!(Arc::ptr_eq(ring.for_encryption(&s, 660_000).unwrap(), &next), "next slot at its boundary");
    }

    fn ticketer(ring: KeyRing, scope: &str, schedule: Schedule) -> Ticketer {
        Ticketer {
            ring: Arc::new(ArcSwap::from_pointee(ring)),
            schedule,
            scope: scope.as_bytes().to_vec(),
            lifetime: 60,
            metrics: Arc::default(),
        }
    }

    #[test]
    fn tickets_open_within_the_window_and_scope_only() {
        let s = Schedule::new(Duration::from_secs(3600), Duration::from_secs(7200));
        let slot = s.slot_at(now_ms());
        let keys = || {
            vec![
                key(slot, 0, 0, Origin::Cluster { node: "a".into() }),
                key(slot - 3, 0, 0, Origin::Cluster { node: "a".into() }),
            ]
        };
        let ring = KeyRing { keys: keys(), retired: Vec::new() };
        let old_key = ring.keys[1].clone();
        let t = ticketer(ring, "none", s);
        let ticket = t.encrypt(b"state").unwrap();
        assert_eq!(t.decrypt(&ticket).unwrap(), b"state");
        let other_scope = Ticketer { scope: b"mtls:required:ab".to_vec(), ..ticketer(KeyRing::default(), "", s) };
        let other_scope = Ticketer { ring: t.ring.clone(), ..other_scope };
        assert!(other_scope.decrypt(&ticket).is_none(), "another scope's ticket must not open");
        assert_eq!(other_scope.metrics.ticket_undecryptable.load(Ordering::Relaxed), 1);

        // A ticket made with a key three slots old: outside a window of two.
        let mut stale = old_key.name.to_vec();
        stale.extend(old_key.sealing.seal(b"state", &t.aad(&old_key.name)).unwrap());
        assert!(t.decrypt(&stale).is_none());
        assert_eq!(t.metrics.ticket_expired_key.load(Ordering::Relaxed), 1);

        let stranger = ticketer(KeyRing { keys: keys(), retired: Vec::new() }, "none", s);
        assert!(stranger.decrypt(&ticket).is_none(), "a key this node never saw");
        assert_eq!(stranger.metrics.ticket_unknown_key.load(Ordering::Relaxed), 1);
        assert!(t.decrypt(b"short").is_none());
    }

    #[tokio::test]
    async fn a_local_node_keeps_keys_for_now_and_next_and_drops_old_ones() {
        let s = Schedule::new(Duration::from_secs(3600), Duration::from_secs(3600));
        let m = KeyManager::new(s, Duration::from_secs(3600), None, "n".into(), Arc::default());
        m.refresh().await.unwrap();
        let now = now_ms();
        let slots: Vec<u64> = m.ring.load().keys.iter().map(|k| k.slot).collect();
        assert_eq!(slots, vec![s.slot_at(now), s.slot_at(now) + 1]);
        let t = m.ticketer("none");
        let ticket = t.encrypt(b"x").unwrap();
        m.refresh().await.unwrap();
        assert_eq!(t.decrypt(&ticket).unwrap(), b"x", "a second pass keeps the keys");
        m.ensure_local(now + 3 * 3_600_000);
        assert!(t.decrypt(&ticket).is_none(), "two slots later the key has left a window of one");
    }
}
