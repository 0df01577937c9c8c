//! Keeping the ticket-key ring filled: each node pulls the fleet's keys for the accepted slots from Redis before
//! they are needed, creates a slot's first key when nobody has, and falls back to local random keys (retrying
//! Redis) when the store is down. See [`super::tickets`] for the slot scheme.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::ResumptionMetrics;
use super::crypto::{SealingKey, random_bytes, random_key};
use super::tickets::*;
use crate::store::StoreError;

/// Keeps the ring filled: pulls the fleet's keys, creates missing ones, falls back to local keys.
#[derive(Debug)]
pub struct KeyManager {
    pub(super) ring: Arc<ArcSwap<KeyRing>>,
    schedule: Schedule,
    shared: Option<SharedKeys>,
    node: String,
    lifetime: u32,
    metrics: Arc<ResumptionMetrics>,
}

impl KeyManager {
    /// A manager with an empty ring; call [`refresh`](Self::refresh) (or [`run`](Self::run)) to fill it.
    pub fn new(
        schedule: Schedule,
        lifetime: Duration,
        shared: Option<SharedKeys>,
        node: String,
        metrics: Arc<ResumptionMetrics>,
    ) -> Self {
        Self {
            ring: Arc::new(ArcSwap::from_pointee(KeyRing::default())),
            schedule,
            shared,
            node,
            lifetime: u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX),
            metrics,
        }
    }

    /// The Redis side, if keys are shared.
    pub fn shared(&self) -> Option<&SharedKeys> {
        self.shared.as_ref()
    }

    /// A ticketer for one resumption scope, reading this manager's ring.
    pub fn ticketer(&self, scope: &str) -> Arc<Ticketer> {
        Arc::new(Ticketer {
            ring: self.ring.clone(),
            schedule: self.schedule,
            scope: scope.as_bytes().to_vec(),
            lifetime: self.lifetime,
            metrics: self.metrics.clone(),
        })
    }

    /// One pass: on success the ring holds the fleet's keys for every accepted slot (plus local keys still in
    /// their window); on failure the ring is kept and, if it has no key for the current slot, gains a local one.
    pub async fn refresh(&self) -> Result<(), StoreError> {
        let result = match &self.shared {
            Some(shared) => self.pull(shared).await,
            None => Ok(()),
        };
        self.ensure_local(now_ms());
        self.publish_gauges();
        result
    }

    async fn pull(&self, shared: &SharedKeys) -> Result<(), StoreError> {
        let now = now_ms();
        let current = self.schedule.slot_at(now);
        let old = self.ring.load_full();
        let mut keys = Vec::new();
        for slot in self.schedule.accepted(now) {
            let mut records = shared.read_slot(slot).await?;
            if slot >= current && !records.contains_key(&0) {
                shared.create(&self.schedule, slot, 0, self.schedule.slot_start(slot), &self.node).await?;
                records = shared.read_slot(slot).await?;
            }
            for (generation, record) in &records {
                let known = unhex(&record.name).and_then(|name| old.by_name(&name).cloned());
                match known {
                    Some(key) => keys.push(key),
                    None => match shared.open(slot, generation.to_owned(), record) {
                        Some(key) => keys.push(Arc::new(key)),
                        None => {
                            self.metrics.ticket_key_unopenable.fetch_add(1, Ordering::Relaxed);
                            tracing::error!(
                                slot,
                                generation,
                                node = record.node,
                                "a ticket key in Redis does not open with this node's resumption secret; \
                                 are all nodes configured with the same secret?"
                            );
                        }
                    },
                }
            }
        }
        let accepted = self.schedule.accepted(now);
        let retired = old
            .keys
            .iter()
            .chain(&old.retired)
            .filter(|k| k.is_cluster() && accepted.contains(&k.slot) && !keys.iter().any(|n| n.name == k.name))
            .cloned()
            .collect();
        keys.extend(old.keys.iter().filter(|k| !k.is_cluster() && accepted.contains(&k.slot)).cloned());
        self.ring.store(Arc::new(KeyRing { keys, retired }));
        Ok(())
    }

    /// Makes sure the current (and, locally, the next) slot has a key, adding local ones if needed, and drops
    /// keys that left the window.
    pub(super) fn ensure_local(&self, now: u64) {
        let current = self.schedule.slot_at(now);
        let old = self.ring.load_full();
        let accepted = self.schedule.accepted(now);
        let mut keys: Vec<_> = old.keys.iter().filter(|k| accepted.contains(&k.slot)).cloned().collect();
        let retired: Vec<_> = old.retired.iter().filter(|k| accepted.contains(&k.slot)).cloned().collect();
        // A local-only node prepares the next slot too; a fleet node in trouble only covers the present.
        let wanted = if self.shared.is_none() { current..=current + 1 } else { current..=current };
        for slot in wanted {
            if keys.iter().any(|k| k.slot == slot) {
                continue;
            }
            let Some(bytes) = random_key() else { continue };
            let activate_ms = self.schedule.slot_start(slot);
            keys.push(Arc::new(TicketKey {
                name: random_bytes(),
                slot,
                generation: 0,
                activate_ms,
                origin: Origin::Local,
                sealing: SealingKey::new(&bytes),
            }));
            if self.shared.is_some() {
                tracing::warn!(slot, "no fleet ticket key for this slot (Redis unreachable): using a local key");
            }
        }
        let changed = keys.len() != old.keys.len() || retired.len() != old.retired.len();
        if changed || keys.iter().zip(&old.keys).any(|(a, b)| !Arc::ptr_eq(a, b)) {
            self.ring.store(Arc::new(KeyRing { keys, retired }));
        }
    }

    fn publish_gauges(&self) {
        let now = now_ms();
        let ring = self.ring.load();
        let key = ring.for_encryption(&self.schedule, now);
        let m = &self.metrics;
        m.ticket_key_activated_ms.store(key.map_or(0, |k| k.activate_ms), Ordering::Relaxed);
        m.ticket_key_local.store(u64::from(key.is_some_and(|k| !k.is_cluster())), Ordering::Relaxed);
        m.ticket_keys_held.store(ring.keys.len() as u64, Ordering::Relaxed);
    }

    /// Refreshes forever: every [`Schedule::poll`], at once when `wake` fires (a forced rotation), and after an
    /// error again within a second, doubling up to the poll interval.
    pub async fn run(self: Arc<Self>, wake: Arc<tokio::sync::Notify>) {
        let poll = self.schedule.poll();
        let mut retry = Duration::from_millis(100);
        let mut failing = false;
        loop {
            let wait = match self.refresh().await {
                Ok(()) => {
                    if failing {
                        tracing::info!("ticket keys: Redis reachable again, fleet keys in use");
                    }
                    failing = false;
                    retry = Duration::from_millis(100);
                    poll
                }
                Err(err) => {
                    self.metrics.redis_errors.fetch_add(1, Ordering::Relaxed);
                    if !failing {
                        tracing::warn!(error = %err, "ticket keys: cannot reach Redis; retrying");
                    }
                    failing = true;
                    retry = (retry * 2).min(poll.max(Duration::from_secs(1)));
                    retry.min(poll)
                }
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = wake.notified() => {}
            }
        }
    }
}
