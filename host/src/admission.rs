//! Admission: per-client limits on each accepted connection, applied right after the PROXY protocol header (so the
//! client is the header's address, not the load balancer's) and before a byte of TLS is read. A refused connection
//! costs an accept, two sharded-map lookups and a reset; no ClientHello is parsed, no certificate chosen.
//!
//! Two keys per client: its address (an IPv4-mapped IPv6 address counts as IPv4) and its prefix (/24 IPv4, /64
//! IPv6, the network one subscriber or one host usually has). Each key has a token bucket of new connections
//! (`*_new_per_second`, `*_burst`) and a count of open connections (`*_concurrent`), released by [`Admitted`]'s
//! drop when the connection ends, whatever it became (proxied, upgraded, passed through). Networks in
//! `admission.exempt` (loopback by default) skip both.
//!
//! The tables are bounded: each holds at most `max_tracked` keys (rounded up to a multiple of [`SHARDS`]), in
//! [`SHARDS`] shards with a mutex each, so no lock serialises all accepts. A shard that is full drops its *idle*
//! entries (no open connection, bucket refilled): an idle entry says nothing a fresh one would not, so dropping it
//! loses nothing. When a shard is full of live entries a new key is admitted untracked (fail open, counted as
//! `tern_admission_untracked_total`): refusing every client the table has no room for would let a flood from many
//! addresses lock out everyone else, which is what these limits exist to prevent; the listener's other bounds
//! (`server.max_connections`, `server.handshake_timeout`) still hold. Refusals are logged at most once a second
//! per listener, with the number of refusals the line stands for.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use crate::config::Cidr;
use crate::counters::{Counters, Key};
use crate::metrics::{Exposition, get, inc, label_value};

/// `listener.admission`: the per-client limits of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionSettings {
    /// Limits per client address.
    pub address: KeyLimits,
    /// Limits per client prefix (/24 IPv4, /64 IPv6).
    pub prefix: KeyLimits,
    /// Client networks no limit applies to.
    pub exempt: Vec<Cidr>,
    /// Keys each table (addresses, prefixes) holds at most.
    pub max_tracked: usize,
}

/// The limits on one key (an address or a prefix).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyLimits {
    /// New connections per second, sustained (the bucket's refill rate).
    pub new_per_second: u32,
    /// New connections at once after a quiet spell (the bucket's size).
    pub burst: u32,
    /// Connections open at once.
    pub concurrent: u32,
}

/// The limit that refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The address's new-connection bucket is empty.
    AddressRate,
    /// The address holds `address_concurrent` connections.
    AddressConcurrent,
    /// The prefix's new-connection bucket is empty.
    PrefixRate,
    /// The prefix holds `prefix_concurrent` connections.
    PrefixConcurrent,
}

impl Key for Limit {
    const ALL: &'static [Limit] =
        &[Limit::AddressRate, Limit::AddressConcurrent, Limit::PrefixRate, Limit::PrefixConcurrent];

    fn label(self) -> &'static str {
        match self {
            Limit::AddressRate => "address_rate",
            Limit::AddressConcurrent => "address_concurrent",
            Limit::PrefixRate => "prefix_rate",
            Limit::PrefixConcurrent => "prefix_concurrent",
        }
    }
}

/// Shards per table: enough that two accepting cores rarely meet on one lock, few enough that a sweep of one shard
/// stays short.
pub const SHARDS: usize = 64;
/// A full shard looks for idle entries to drop at most this often; in between, new keys on it are untracked.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// At most one refusal line per listener this often.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// One listener's admission state: both tables, the refusal counters and the log sampler.
#[derive(Debug)]
pub struct Admission {
    listener: Arc<str>,
    exempt: Vec<Cidr>,
    addresses: Table,
    prefixes: Table,
    refused: Counters<Limit>,
    /// The clock every timestamp in the tables counts from.
    epoch: Instant,
    /// When (µs since `epoch`) the next refusal may be logged.
    next_log: AtomicU64,
    /// Refusals not logged since the last line.
    suppressed: AtomicU64,
}

/// An admitted connection's hold on its address's and prefix's counts; released when dropped.
#[derive(Debug)]
pub struct Admitted {
    /// `None` for exempt clients: nothing to release.
    admission: Option<Arc<Admission>>,
    address: Option<u128>,
    prefix: Option<u128>,
}

impl Admission {
    /// The admission state of the listener `listener`.
    pub fn new(listener: Arc<str>, settings: &AdmissionSettings) -> Self {
        Self {
            listener,
            exempt: settings.exempt.clone(),
            addresses: Table::new(settings.address, settings.max_tracked),
            prefixes: Table::new(settings.prefix, settings.max_tracked),
            refused: Counters::default(),
            epoch: Instant::now(),
            next_log: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Admits a new connection from `client`, or names the limit that refuses it (counted, and logged at the
    /// sampled rate). The answer holds the client's counts until it is dropped.
    pub fn admit(self: &Arc<Self>, client: IpAddr) -> Result<Admitted, Limit> {
        let client = canonical(client);
        if self.exempt.iter().any(|net| net.contains(client)) {
            return Ok(Admitted { admission: None, address: None, prefix: None });
        }
        let now = self.now();
        let (address, prefix) = (address_key(client), prefix_key(client));
        // Always the address shard first, then the prefix shard: one order, so two accepts never deadlock.
        let mut address_shard = self.addresses.shard(address);
        let mut prefix_shard = self.prefixes.shard(prefix);
        let address_entry = self.addresses.entry(&mut address_shard, address, now);
        let prefix_entry = self.prefixes.entry(&mut prefix_shard, prefix, now);
        let verdict = self
            .addresses
            .check(address_entry.as_deref(), Limit::AddressRate, Limit::AddressConcurrent)
            .and_then(|()| self.prefixes.check(prefix_entry.as_deref(), Limit::PrefixRate, Limit::PrefixConcurrent));
        if let Err(limit) = verdict {
            drop((address_shard, prefix_shard));
            self.refused.inc(limit);
            self.log_refusal(client, limit, now);
            return Err(limit);
        }
        let address = self.addresses.hold(address_entry, address);
        let prefix = self.prefixes.hold(prefix_entry, prefix);
        Ok(Admitted { admission: Some(self.clone()), address, prefix })
    }

    /// Microseconds since this state was made.
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// One line per [`LOG_EVERY`] at most, saying how many refusals it stands for; the rest only count.
    fn log_refusal(&self, client: IpAddr, limit: Limit, now: u64) {
        let next = self.next_log.load(Ordering::Relaxed);
        let every = u64::try_from(LOG_EVERY.as_micros()).unwrap_or(u64::MAX);
        if now < next
            || self.next_log.compare_exchange(next, now + every, Ordering::Relaxed, Ordering::Relaxed).is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let suppressed = self.suppressed.swap(0, Ordering::Relaxed);
        tracing::info!(
            listener = %self.listener,
            %client,
            limit = limit.label(),
            suppressed,
            "connection refused by an admission limit"
        );
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let Some(admission) = &self.admission else { return };
        if let Some(key) = self.address {
            admission.addresses.release(key);
        }
        if let Some(key) = self.prefix {
            admission.prefixes.release(key);
        }
    }
}

/// Closes a refused connection with a reset (`SO_LINGER` 0): no FIN handshake, no TIME_WAIT socket left behind
/// for a minute per refused connection, and nothing TLS to say since nothing TLS was read.
pub fn close(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
    drop(tcp);
}

/// Renders the admission families of every listener.
pub(crate) fn render(x: &mut Exposition, listeners: &[Arc<Admission>]) {
    let name = "tern_admission_refused_total";
    x.family(name, "counter", "Connections refused right after accept by a per-client limit, by listener and limit.");
    for admission in listeners {
        let listener = label_value(&admission.listener);
        for (limit, counter) in admission.refused.all() {
            x.sample(name, &format!("listener=\"{listener}\",limit=\"{limit}\""), get(counter));
        }
    }
    let name = "tern_admission_tracked";
    x.family(name, "gauge", "Client addresses and prefixes the admission tables hold, by listener and table.");
    for admission in listeners {
        let listener = label_value(&admission.listener);
        for (table, tracked) in [("address", &admission.addresses), ("prefix", &admission.prefixes)] {
            x.sample(name, &format!("listener=\"{listener}\",table=\"{table}\""), tracked.len() as u64);
        }
    }
    let name = "tern_admission_untracked_total";
    x.family(name, "counter", "Connections admitted without a per-client count: the table was full of live clients.");
    for admission in listeners {
        let listener = label_value(&admission.listener);
        for (table, tracked) in [("address", &admission.addresses), ("prefix", &admission.prefixes)] {
            x.sample(name, &format!("listener=\"{listener}\",table=\"{table}\""), get(&tracked.untracked));
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// An address as a table key: IPv4 in its IPv6-mapped form, so the two families never collide.
fn address_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// The prefix an address is counted under, as a key: its /24 (IPv4, mapped) or its /64 (IPv6). A mapped IPv4
/// prefix has bits in the low 64, a /64 has none: the two never collide.
fn prefix_key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(std::net::Ipv4Addr::from(u32::from(v4) & 0xffff_ff00).to_ipv6_mapped()),
        IpAddr::V6(v6) => u128::from(v6) & !u128::from(u64::MAX),
    }
}

/// One kind of key (addresses or prefixes) and its limits, in [`SHARDS`] shards.
#[derive(Debug)]
struct Table {
    limits: KeyLimits,
    /// Keys one shard holds at most.
    per_shard: usize,
    shards: Box<[Mutex<Shard>]>,
    /// Picks the shard; keyed at random so that nobody can aim a flood at one shard.
    hasher: RandomState,
    /// Connections admitted untracked because their shard was full of live entries.
    untracked: AtomicU64,
}

#[derive(Default)]
struct Shard {
    /// Keyed by `RandomState` (SipHash under a random key): client-chosen keys cannot collide on purpose.
    entries: HashMap<u128, Entry>,
    /// When (µs) this shard last dropped its idle entries.
    swept: Option<u64>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the entries: a table holds up to `max_tracked` of them.
        f.debug_struct("Shard").field("entries", &self.entries.len()).field("swept", &self.swept).finish()
    }
}

/// One key's bucket and count: 16 bytes, 32 with its key.
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// When (µs) `tokens` was last brought up to date.
    refilled: u64,
    /// New connections it may still open at once.
    tokens: f32,
    /// Its connections open now.
    active: u32,
}

impl Table {
    fn new(limits: KeyLimits, max_tracked: usize) -> Self {
        Self {
            limits,
            per_shard: max_tracked.div_ceil(SHARDS).max(1),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            untracked: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: u128) -> MutexGuard<'_, Shard> {
        // The remainder is below SHARDS, so the index is in range.
        let index = (self.hasher.hash_one(key) % SHARDS as u64) as usize;
        lock(&self.shards[index])
    }

    /// `key`'s entry refilled to `now`, a new (full) one if the shard has room, or `None` when the shard is full of
    /// live entries.
    fn entry<'a>(&self, shard: &'a mut Shard, key: u128, now: u64) -> Option<&'a mut Entry> {
        if !shard.entries.contains_key(&key) && shard.entries.len() >= self.per_shard {
            if shard.swept.is_none_or(|at| now.saturating_sub(at) >= SWEEP_EVERY.as_micros() as u64) {
                shard.swept = Some(now);
                shard.entries.retain(|_, entry| !self.idle(entry, now));
            }
            if shard.entries.len() >= self.per_shard {
                return None;
            }
        }
        let burst = self.limits.burst as f32;
        let entry = shard.entries.entry(key).or_insert(Entry { refilled: now, tokens: burst, active: 0 });
        entry.tokens = self.refilled(entry, now);
        entry.refilled = now;
        Some(entry)
    }

    /// `entry`'s tokens at `now`.
    fn refilled(&self, entry: &Entry, now: u64) -> f32 {
        let elapsed = now.saturating_sub(entry.refilled) as f64 / 1e6;
        let tokens = f64::from(entry.tokens) + elapsed * f64::from(self.limits.new_per_second);
        tokens.min(f64::from(self.limits.burst)) as f32
    }

    /// No open connection and a full bucket: the entry is the same as none.
    fn idle(&self, entry: &Entry, now: u64) -> bool {
        entry.active == 0 && self.refilled(entry, now) >= self.limits.burst as f32
    }

    /// Whether one more connection fits `entry` (an untracked key always fits).
    fn check(&self, entry: Option<&Entry>, rate: Limit, concurrent: Limit) -> Result<(), Limit> {
        match entry {
            Some(e) if e.active >= self.limits.concurrent => Err(concurrent),
            Some(e) if e.tokens < 1.0 => Err(rate),
            _ => Ok(()),
        }
    }

    /// Spends a token of `entry` and counts one more connection; `None` (the shard had no room) is counted as
    /// admitted untracked. Returns the key to release, if any.
    fn hold(&self, entry: Option<&mut Entry>, key: u128) -> Option<u128> {
        let Some(entry) = entry else {
            inc(&self.untracked);
            return None;
        };
        entry.tokens -= 1.0;
        entry.active += 1;
        Some(key)
    }

    /// One connection of `key` ended.
    fn release(&self, key: u128) {
        if let Some(entry) = self.shard(key).entries.get_mut(&key) {
            entry.active = entry.active.saturating_sub(1);
        }
    }

    /// Keys held now, idle ones not yet swept included.
    fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).entries.len()).sum()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are plain numbers, consistent after any panic: recover the lock.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(address: (u32, u32, u32), prefix: (u32, u32, u32), max_tracked: usize) -> AdmissionSettings {
        let limits = |(new_per_second, burst, concurrent)| KeyLimits { new_per_second, burst, concurrent };
        AdmissionSettings { address: limits(address), prefix: limits(prefix), exempt: Vec::new(), max_tracked }
    }

    fn admission(settings: &AdmissionSettings) -> Arc<Admission> {
        Arc::new(Admission::new("test".into(), settings))
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn limits_have_ordered_keys_and_distinct_labels() {
        crate::counters::assert_well_formed::<Limit>();
    }

    #[test]
    fn an_address_gets_its_burst_then_its_rate_and_others_are_not_affected() {
        let a = admission(&settings((1, 3, 100), (1000, 1000, 1000), 1024));
        let held: Vec<_> = (0..3).map(|_| a.admit(ip("192.0.2.1")).unwrap()).collect();
        assert_eq!(a.admit(ip("192.0.2.1")).unwrap_err(), Limit::AddressRate);
        // Releasing connections does not give tokens back: the rate counts new connections.
        drop(held);
        assert_eq!(a.admit(ip("192.0.2.1")).unwrap_err(), Limit::AddressRate);
        assert!(a.admit(ip("192.0.2.2")).is_ok(), "another address of the same /24");
        std::thread::sleep(Duration::from_millis(1100));
        assert!(a.admit(ip("192.0.2.1")).is_ok(), "one token a second");
        assert_eq!(a.refused.get(Limit::AddressRate), 2);
    }

    #[test]
    fn concurrent_connections_are_held_until_dropped() {
        let a = admission(&settings((1000, 1000, 2), (1000, 1000, 1000), 1024));
        let first = a.admit(ip("198.51.100.7")).unwrap();
        let _second = a.admit(ip("::ffff:198.51.100.7")).unwrap();
        assert_eq!(a.admit(ip("198.51.100.7")).unwrap_err(), Limit::AddressConcurrent, "mapped IPv4 is IPv4");
        drop(first);
        assert!(a.admit(ip("198.51.100.7")).is_ok());
    }

    #[test]
    fn a_prefix_limit_counts_every_address_in_it() {
        let a = admission(&settings((1000, 1000, 1000), (1000, 1000, 3), 1024));
        let _held: Vec<_> = ["203.0.113.1", "203.0.113.2", "203.0.113.3"].map(|c| a.admit(ip(c)).unwrap()).into();
        assert_eq!(a.admit(ip("203.0.113.200")).unwrap_err(), Limit::PrefixConcurrent);
        assert!(a.admit(ip("203.0.114.1")).is_ok(), "the next /24");
        let _v6: Vec<_> = (1..=3).map(|i| a.admit(ip(&format!("2001:db8:0:1::{i}"))).unwrap()).collect();
        assert_eq!(a.admit(ip("2001:db8:0:1:ffff::1")).unwrap_err(), Limit::PrefixConcurrent, "same /64");
        assert!(a.admit(ip("2001:db8:0:2::1")).is_ok(), "the next /64");
        // A refusal by the prefix spends nothing of the address's bucket or count.
        let b = admission(&settings((1, 1, 1), (1000, 1000, 1), 1024));
        let first = b.admit(ip("203.0.113.1")).unwrap();
        assert_eq!(b.admit(ip("203.0.113.2")).unwrap_err(), Limit::PrefixConcurrent);
        drop(first);
        assert!(b.admit(ip("203.0.113.2")).is_ok(), "203.0.113.2 still has its token");
    }

    #[test]
    fn exempt_networks_are_not_counted() {
        let mut s = settings((1, 1, 1), (1, 1, 1), 1024);
        s.exempt = vec!["127.0.0.0/8".parse().unwrap()];
        let a = admission(&s);
        let held: Vec<_> = (0..10).map(|_| a.admit(ip("::ffff:127.0.0.1")).unwrap()).collect();
        assert_eq!(held.len(), 10);
        assert_eq!(a.addresses.len() + a.prefixes.len(), 0);
    }

    #[test]
    fn a_full_table_drops_idle_entries_and_admits_new_keys_untracked_when_all_are_live() {
        // 64 shards of one key each.
        let a = admission(&settings((1_000_000, 1, 1), (1_000_000, 1000, 1000), SHARDS));
        let held: Vec<_> = (0..5000u32)
            .filter_map(|i| a.admit(IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i * 256))).ok())
            .collect();
        assert_eq!(held.len(), 5000, "fail open: every new key admitted");
        assert!(a.addresses.len() <= SHARDS, "never more than max_tracked: {}", a.addresses.len());
        assert!(get(&a.addresses.untracked) > 0);
        drop(held);
        // Idle now (no connection, buckets refill within a microsecond): the next sweep makes room.
        std::thread::sleep(SWEEP_EVERY + Duration::from_millis(10));
        let untracked = get(&a.addresses.untracked);
        let _fresh: Vec<_> = (0..20u32).map(|i| a.admit(ip(&format!("172.16.{i}.1"))).unwrap()).collect();
        assert!(get(&a.addresses.untracked) - untracked < 20, "swept entries made room for new keys");
        assert!(a.addresses.len() <= SHARDS);
    }

    #[test]
    fn refusals_are_logged_at_most_once_a_second() {
        let a = admission(&settings((1, 1, 1), (1000, 1000, 1000), 1024));
        let _held = a.admit(ip("192.0.2.9")).unwrap();
        for _ in 0..100 {
            let _ = a.admit(ip("192.0.2.9"));
        }
        assert_eq!(a.refused.get(Limit::AddressConcurrent), 100);
        assert_eq!(a.suppressed.load(Ordering::Relaxed), 99, "one line, 99 refusals only counted");
    }

    #[test]
    fn metrics_name_every_listener_limit_and_table() {
        let a = admission(&settings((1, 1, 1), (1000, 1000, 1000), 1024));
        let _held = a.admit(ip("192.0.2.9")).unwrap();
        let _ = a.admit(ip("192.0.2.9"));
        let mut x = Exposition::default();
        render(&mut x, &[a]);
        let text = x.finish();
        assert!(text.contains("tern_admission_refused_total{listener=\"test\",limit=\"address_concurrent\"} 1\n"));
        assert!(text.contains("tern_admission_refused_total{listener=\"test\",limit=\"prefix_rate\"} 0\n"));
        assert!(text.contains("tern_admission_tracked{listener=\"test\",table=\"prefix\"} 1\n"), "{text}");
        assert!(text.contains("tern_admission_untracked_total{listener=\"test\",table=\"address\"} 0\n"));
    }
}
