//! Load shedding in front of a plugin: a call-rate cap (token bucket) and a circuit breaker. Both answer at
//! once, without calling the plugin, so a flood of random names or a plugin that keeps failing costs the host
//! nothing but a fallback (the listener's default certificate, or an alert when strict).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Why a call was not made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shed {
    /// More calls per second than `max_calls_per_second`.
    RateLimited,
    /// The breaker is open after repeated failures.
    CircuitOpen,
}

/// Rate cap and breaker of one plugin.
#[derive(Debug)]
pub struct Guard {
    rate: Option<Mutex<Bucket>>,
    breaker: Option<Mutex<Breaker>>,
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
}

impl Guard {
    /// A guard allowing `max_calls_per_second` (burst of one second's worth), and opening the breaker after
    /// `threshold` consecutive failures for `cooldown`. `None` / 0 disable either.
    pub fn new(max_calls_per_second: Option<u32>, threshold: u32, cooldown: Duration) -> Self {
        let rate = max_calls_per_second.map(|n| {
            let per_second = f64::from(n.max(1));
            Mutex::new(Bucket { per_second, tokens: per_second, refilled: Instant::now() })
        });
        let breaker = (threshold > 0)
            .then(|| Mutex::new(Breaker { threshold, cooldown, failures: 0, open_until: None, trial: false }));
        Self { rate, breaker }
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
        if let Some(rate) = &self.rate {
            let mut bucket = lock(rate);
            let now = Instant::now();
            let refill = now.duration_since(bucket.refilled).as_secs_f64() * bucket.per_second;
            bucket.tokens = (bucket.tokens + refill).min(bucket.per_second);
            bucket.refilled = now;
            if bucket.tokens < 1.0 {
                return Err(Shed::RateLimited);
            }
            bucket.tokens -= 1.0;
        }
        Ok(())
    }

    /// Reports how an admitted call ended.
    pub fn report(&self, failed: bool) {
        let Some(breaker) = &self.breaker else { return };
        let mut b = lock(breaker);
        b.trial = false;
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
    fn breaker_opens_after_the_threshold_and_lets_one_trial_through_after_cooldown() {
        // Long enough that no scheduling delay between two lines lets it half-open by accident.
        let guard = Guard::new(None, 3, Duration::from_secs(1));
        for _ in 0..3 {
            guard.admit().unwrap();
            guard.report(true);
        }
        assert_eq!(guard.admit(), Err(Shed::CircuitOpen));
        std::thread::sleep(Duration::from_millis(1050));
        guard.admit().unwrap();
        assert_eq!(guard.admit(), Err(Shed::CircuitOpen), "one trial at a time");
        guard.report(true);
        assert_eq!(guard.admit(), Err(Shed::CircuitOpen), "a failed trial reopens");
        std::thread::sleep(Duration::from_millis(1050));
        guard.admit().unwrap();
        guard.report(false);
        assert_eq!(guard.admit(), Ok(()), "a good trial closes it");
    }
}
