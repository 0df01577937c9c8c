//! Counters indexed by an outcome type. Each failure domain has one enum of outcomes (`failure::FailureKind`,
//! `plugin::Outcome`, `watchdog::Expired`); [`Counters`] keeps one counter per variant, found by the variant
//! itself, so a new variant is counted and labelled the moment it exists.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};

/// A closed set of outcomes with stable labels.
pub trait Key: Copy + std::fmt::Debug + PartialEq + 'static {
    /// Every key, in the order metrics list them.
    const ALL: &'static [Self];
    /// Metric and log label.
    fn label(self) -> &'static str;
    /// Its place in [`Key::ALL`] (derived, so `ALL` is the only list); `None` if it was left out of it.
    fn index(self) -> Option<usize> {
        Self::ALL.iter().position(|key| *key == self)
    }
}

/// One counter per key.
#[derive(Debug)]
pub struct Counters<K: Key> {
    counters: Box<[AtomicU64]>,
    /// Where a key left out of [`Key::ALL`] by mistake is counted (never rendered): counting must not panic.
    unlisted: AtomicU64,
    keys: PhantomData<K>,
}

impl<K: Key> Default for Counters<K> {
    fn default() -> Self {
        Self {
            counters: K::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
            unlisted: AtomicU64::new(0),
            keys: PhantomData,
        }
    }
}

impl<K: Key> Counters<K> {
    /// The counter of `key`.
    pub fn by(&self, key: K) -> &AtomicU64 {
        let counter = key.index().and_then(|i| self.counters.get(i));
        debug_assert!(counter.is_some(), "{key:?} is missing from Key::ALL");
        counter.unwrap_or(&self.unlisted)
    }

    /// The count of `key`.
    pub fn get(&self, key: K) -> u64 {
        self.by(key).load(Ordering::Relaxed)
    }

    /// Adds one to `key`.
    pub fn inc(&self, key: K) {
        self.by(key).fetch_add(1, Ordering::Relaxed);
    }

    /// Every key's label with its counter, in [`Key::ALL`] order.
    pub fn all(&self) -> impl Iterator<Item = (&'static str, &AtomicU64)> {
        K::ALL.iter().map(|key| (key.label(), self.by(*key)))
    }
}

/// Checks a key type: no key listed twice, every label distinct, every key its own counter.
#[cfg(test)]
pub(crate) fn assert_well_formed<K: Key>() {
    let counters = Counters::<K>::default();
    let mut labels = std::collections::HashSet::new();
    for (i, key) in K::ALL.iter().enumerate() {
        assert_eq!(key.index(), Some(i), "{key:?}: listed twice in ALL");
        assert!(labels.insert(key.label()), "{key:?}: label used twice");
        counters.inc(*key);
    }
    assert!(K::ALL.iter().all(|key| counters.get(*key) == 1));
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_outcome_type_has_ordered_keys_distinct_labels_and_its_own_counters() {
        super::assert_well_formed::<crate::failure::FailureKind>();
        super::assert_well_formed::<crate::plugin::Outcome>();
        super::assert_well_formed::<crate::watchdog::Expired>();
        super::assert_well_formed::<crate::proxy_protocol::Refused>();
    }
}
