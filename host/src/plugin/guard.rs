//! Load shedding in front of a plugin: a call-rate cap (token bucket) and a circuit breaker. Both answer at
//! once, without calling the plugin, so a flood of random names or a plugin that keeps failing costs the host
//! nothing but a fallback (the listener's default certificate, or an alert when strict).

use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Why a call was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// More calls per second than `max_calls_per_second`.
    RateLimited,
    /// More calls per second from one client network than `max_calls_per_second_per_client`.
    ClientRateLimited,
    /// The breaker is open after repeated failures.
    CircuitOpen,
}

/// Rate cap and breaker of one plugin.
#[derive(Debug)]
pub struct Guard {
    rate: Option<Mutex<Bucket>>,
    /// Each client network's share of the rate cap: one client's flood of names cannot spend the cap that
    /// serves everyone else's names.
    per_client: Option<ClientBuckets>,
    breaker: Option<Mutex<Breaker>>,
}

/// Token buckets by client network (/24 IPv4, /64 IPv6), bounded in count: a network idle for
/// [`CLIENT_IDLE`] is forgotten, and at most [`MAX_CLIENT_BUCKETS`] are kept (the least used go first).
struct ClientBuckets {
    per_second: u32,
    buckets: moka::sync::Cache<IpAddr, Arc<Mutex<Bucket>>>,
}

impl std::fmt::Debug for ClientBuckets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuckets").field("per_second", &self.per_second).finish_non_exhaustive()
    }
}

/// Client networks tracked at once by a plugin's guard.
pub const MAX_CLIENT_BUCKETS: u64 = 65_536;
/// A client network's bucket is dropped after this long without a call (it would be full again by then).
const CLIENT_IDLE: Duration = Duration::from_secs(10);

/// The network a client address is counted under: its /24 (IPv4) or /64 (IPv6).
pub fn client_network(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, _] = v4.octets();
            IpAddr::from([a, b, c, 0])
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => client_network(IpAddr::V4(v4)),
            None => IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

impl Bucket {
    fn full(per_second: u32) -> Self {
        let per_second = f64::from(per_second.max(1));
        Self { per_second, tokens: per_second, refilled: Instant::now() }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.refilled).as_secs_f64() * self.per_second;
        self.tokens = (self.tokens + refill).min(self.per_second);
        self.refilled = now;
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

#[derive(Debug)]
struct Bucket {
    per_second: f64,
    tokens: f64,
    refilled: Instant,
}

#[derive(Debug)]
struct Breaker {
    threshold: u32,
    cooldown: Duration,
    failures: u32,
    /// While open: when the next trial call may go through.
    open_until: Option<Instant>,
    /// A trial call is running (half-open): everyone else is shed until it reports.
    trial: bool,
    /// The last failure was the plugin's store being unreachable: the store's answering again ends the cooldown
    /// ([`Guard::probe_due`]).
    store_outage: bool,
    /// A store probe is running.
    probing: bool,
    /// When the last store probe started.
    probed_at: Option<Instant>,
}

/// How often, at most, an open breaker whose failures were store outages has the store asked whether it is back.
const STORE_PROBE_INTERVAL: Duration = Duration::from_millis(100);

impl Guard {
    /// A guard allowing `max_calls_per_second` (burst of one second's worth), and opening the breaker after
    /// `threshold` consecutive failures for `cooldown`. `None` / 0 disable either.
    pub fn new(max_calls_per_second: Option<u32>, threshold: u32, cooldown: Duration) -> Self {
        let rate = max_calls_per_second.map(|n| Mutex::new(Bucket::full(n)));
        let breaker = (threshold > 0).then(|| {
            Mutex::new(Breaker {
                threshold,
                cooldown,
                failures: 0,
                open_until: None,
                trial: false,
                store_outage: false,
                probing: false,
                probed_at: None,
            })
        });
        Self { rate, per_client: None, breaker }
    }

    /// Also caps each client network at `per_second` calls (within the overall cap).
    pub fn with_client_share(mut self, per_second: Option<u32>) -> Self {
        self.per_client = per_second.map(|per_second| ClientBuckets {
            per_second,
            buckets: moka::sync::Cache::builder().max_capacity(MAX_CLIENT_BUCKETS).time_to_idle(CLIENT_IDLE).build(),
        });
        self
    }

    /// Whether a call for `client` (`None`: not on behalf of a network client, e.g. a reload probe) may go
    /// ahead now.
    pub fn admit_for(&self, client: Option<IpAddr>) -> Result<(), Shed> {
        if let (Some(shares), Some(client)) = (&self.per_client, client) {
            let bucket = shares
                .buckets
                .get_with(client_network(client), || Arc::new(Mutex::new(Bucket::full(shares.per_second))));
            if !lock(&bucket).take() {
                return Err(Shed::ClientRateLimited);
            }
        }
        self.admit()
    }

    /// Whether a call may go ahead now.
    pub fn admit(&self) -> Result<(), Shed> {
        if let Some(breaker) = &self.breaker {
            let mut b = lock(breaker);
            if let Some(until) = b.open_until {
                if Instant::now() < until || b.trial {
                    return Err(Shed::CircuitOpen);
                }
                b.trial = true;
            }
        }
        if let Some(rate) = &self.rate
            && !lock(rate).take()
        {
            return Err(Shed::RateLimited);
        }
        Ok(())
    }

    /// Whether the breaker is open because the plugin's store was unreachable and it is time to ask the store
    /// whether it answers again; if so the caller must report the answer with [`Guard::store_probed`].
    pub fn probe_due(&self) -> bool {
        let Some(breaker) = &self.breaker else { return false };
        let mut b = lock(breaker);
        let due = b.probed_at.is_none_or(|at| at.elapsed() >= STORE_PROBE_INTERVAL);
        if b.open_until.is_none() || !b.store_outage || b.trial || b.probing || !due {
            return false;
        }
        b.probing = true;
        b.probed_at = Some(Instant::now());
        true
    }

    /// The store probe's answer: a store that answers ends the cooldown, so the next call is the trial.
    pub fn store_probed(&self, answered: bool) {
        let Some(breaker) = &self.breaker else { return };
        let mut b = lock(breaker);
        b.probing = false;
        if answered && b.open_until.is_some() && !b.trial {
            b.open_until = Some(Instant::now());
        }
    }

    /// Reports how an admitted call ended: `failed` if it counts against the plugin, and whether that failure was
    /// its store being unreachable.
    pub fn report(&self, failed: bool, store_outage: bool) {
        let Some(breaker) = &self.breaker else { return };
        let mut b = lock(breaker);
        b.trial = false;
        b.store_outage = failed && store_outage;
        if failed {
            b.failures += 1;
            if b.failures >= b.threshold {
                if b.open_until.is_none() {
                    tracing::warn!(failures = b.failures, cooldown = ?b.cooldown, "plugin circuit breaker opened");
                }
                b.open_until = Some(Instant::now() + b.cooldown);
            }
        } else {
            if b.open_until.is_some() {
                tracing::info!("plugin circuit breaker closed");
            }
            b.failures = 0;
            b.open_until = None;
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded values are plain numbers, consistent after any panic: recover the lock.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_cap_allows_a_burst_then_refills() {
        let guard = Guard::new(Some(5), 0, Duration::ZERO);
        let admitted = (0..20).filter(|_| guard.admit().is_ok()).count();
        assert_eq!(admitted, 5);
        std::thread::sleep(Duration::from_millis(450));
        let admitted = (0..20).filter(|_| guard.admit().is_ok()).count();
        // About 2 refill in 450 ms; a late wake-up refills more, but never past the burst of 5.
        assert!((2..=5).contains(&admitted), "refilled {admitted}");
    }

    #[test]
    fn one_client_network_cannot_spend_the_whole_cap() {
        let guard = Guard::new(Some(20), 0, Duration::ZERO).with_client_share(Some(5));
        let attacker: IpAddr = "192.0.2.10".parse().unwrap();
        let neighbour: IpAddr = "192.0.2.99".parse().unwrap();
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!((0..50).filter(|_| guard.admit_for(Some(attacker)).is_ok()).count(), 5);
        assert_eq!(guard.admit_for(Some(neighbour)), Err(Shed::ClientRateLimited), "same /24");
        assert_eq!(guard.admit_for(Some(other)), Ok(()));
        assert_eq!(
            client_network("2001:db8:1:2:3:4:5:6".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn a_store_that_answers_again_ends_the_cooldown_of_a_breaker_opened_by_store_outages() {
        let guard = Guard::new(None, 2, Duration::from_secs(3600));
        for _ in 0..2 {
            guard.admit().unwrap();
            guard.report(true, true);
        }
        assert_eq!(guard.admit(), Err(Shed::CircuitOpen));
        assert!(guard.probe_due());
        assert!(!guard.probe_due(), "one probe at a time");
        guard.store_probed(false);
        assert!(!guard.probe_due(), "not again before the probe interval");
        assert_eq!(guard.admit(), Err(Shed::CircuitOpen), "a store still down keeps it open");
        std::thread::sleep(STORE_PROBE_INTERVAL);
        assert!(guard.probe_due());
        guard.store_probed(true);
        guard.admit().expect("the trial goes through at once, long before the cooldown");
        assert_eq!(guard.admit(), Err(Shed::CircuitOpen), "one trial at a time");
        guard.report(false, false);
        assert_eq!(guard.admit(), Ok(()), "a good trial closes it");
        // A breaker opened by the plugin's own faults (traps, timeouts) waits out its cooldown.
        for _ in 0..2 {
            guard.admit().unwrap();
            guard.report(true, false);
        }
        assert!(!guard.probe_due());
    }

    #[test]
    fn breaker_opens_after_the_threshold_and_lets_one_trial_through_after_cooldown() {
        // Long enough that no scheduling delay between two lines lets it half-open by accident.
        let guard = Guard::new(None, 3, Duration::from_secs(1));
        for _ in 0..3 {
            guard.admit().unwrap();
            guard.report(true, false);
        }
        assert_eq!(guard.admit(), Err(Shed::CircuitOpen));
        std::thread::sleep(Duration::from_millis(1050));
        guard.admit().unwrap();
        assert_eq!(guard.admit(), Err(Shed::CircuitOpen), "one trial at a time");
        guard.report(true, false);
        assert_eq!(guard.admit(), Err(Shed::CircuitOpen), "a failed trial reopens");
        std::thread::sleep(Duration::from_millis(1050));
        guard.admit().unwrap();
        guard.report(false, false);
        assert_eq!(guard.admit(), Ok(()), "a good trial closes it");
    }
}
