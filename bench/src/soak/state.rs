//! State the tasks share: counters per load class and of churn, events, failure log, task context, random numbers.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::watch;

use crate::clients::Clients;

/// Failures written to failures.csv per class at most (all are counted).
const FAILURE_LOG_CAP: u64 = 10_000;

#[derive(Debug)]
pub struct Shared {
    pub start: Instant,
    pub deadline: Instant,
    pub hot: Class,
    pub flood: Class,
    pub churn: Churn,
    pub redis_up: AtomicBool,
    /// Held by the churn task while a name is invalidated and not yet re-cached, and by the chaos task for a
    /// whole outage: a name is never invalidated while Redis is down.
    pub redis_lock: tokio::sync::Mutex<()>,
    pub events: Mutex<Vec<(f64, String, String)>>,
    failures: Mutex<FailureLog>,
}

impl Shared {
    /// The clock starts now and runs until `deadline`; failures go to `failures` (a CSV file).
    pub fn new(start: Instant, deadline: Instant, failures: &Path) -> Result<Self> {
        Ok(Self {
            start,
            deadline,
            hot: Class::default(),
            flood: Class::default(),
            churn: Churn::default(),
            redis_up: AtomicBool::new(true),
            redis_lock: tokio::sync::Mutex::new(()),
            events: Mutex::new(Vec::new()),
            failures: Mutex::new(FailureLog::new(failures)?),
        })
    }

    pub fn t(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    pub fn event(&self, kind: &str, detail: &str) {
        lock(&self.events).push((self.t(), kind.to_string(), detail.to_string()));
    }

    pub fn failure(&self, class: &str, name: &str, stage: &str, err: &anyhow::Error) {
        let t = self.t();
        let up = self.redis_up.load(Relaxed);
        lock(&self.failures).record(t, class, name, stage, up, err);
    }
}

/// Counters of one load class.
#[derive(Debug, Default)]
pub struct Class {
    pub handshakes_ok: AtomicU64,
    pub handshakes_failed: AtomicU64,
    /// Handshakes that completed with the wrong certificate (flood: not the default one).
    pub wrong_certificate: AtomicU64,
    pub requests_ok: AtomicU64,
    pub requests_failed: AtomicU64,
    /// Handshake latencies (µs) since the last sample, and of the whole run.
    pub interval: Mutex<Vec<u32>>,
    pub all: Mutex<Vec<u32>>,
}

impl Class {
    pub fn latency(&self, took: Duration) {
        let us = took.as_micros().min(u32::MAX as u128) as u32;
        lock(&self.interval).push(us);
        lock(&self.all).push(us);
    }
}

#[derive(Debug, Default)]
pub struct Churn {
    pub issued: AtomicU64,
    /// The new leaf was seen by a handshake.
    pub observed: AtomicU64,
    /// The new leaf was not seen within 60 s.
    pub not_observed: AtomicU64,
    /// PUBLISH reached no subscriber (tern's subscription was down): only the TTL brings the new leaf.
    pub unheard: AtomicU64,
    /// Handshakes for the churned name that failed while watching for the new leaf (cached-name failures).
    pub probe_failed: AtomicU64,
    /// Writing to Redis failed.
    pub write_failed: AtomicU64,
    /// Milliseconds from PUBLISH to the first handshake showing the new leaf.
    pub latencies_ms: Mutex<Vec<f64>>,
}

/// failures.csv: the first `FAILURE_LOG_CAP` failures per class, and the first few on stderr.
#[derive(Debug)]
struct FailureLog {
    file: std::io::BufWriter<std::fs::File>,
    per_class: BTreeMap<String, u64>,
}

impl FailureLog {
    fn new(path: &Path) -> Result<Self> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(file, "t_s,class,name,stage,redis_up,error")?;
        Ok(Self { file, per_class: BTreeMap::new() })
    }

    fn record(&mut self, t: f64, class: &str, name: &str, stage: &str, redis_up: bool, err: &anyhow::Error) {
        let seen = self.per_class.entry(class.to_string()).or_default();
        *seen += 1;
        let message = format!("{err:#}").replace(['"', '\n'], "'");
        if *seen <= 5 {
            eprintln!("[{t:7.1}s] {class} {stage} failed for {name} (redis {}): {message}", up(redis_up));
        }
        if *seen <= FAILURE_LOG_CAP {
            let _ = writeln!(self.file, "{t:.3},{class},{name},{stage},{redis_up},\"{message}\"");
            let _ = self.file.flush();
        }
    }
}

pub fn up(redis_up: bool) -> &'static str {
    if redis_up { "up" } else { "down" }
}

pub fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What every task gets.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub shared: Arc<Shared>,
    pub clients: Clients,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub names: Arc<Vec<String>>,
    pub hot: usize,
    pub stop: watch::Receiver<bool>,
}

impl Ctx {
    pub fn stopped(&self) -> bool {
        *self.stop.borrow() || Instant::now() >= self.shared.deadline
    }

    /// Sleeps `d`; false if the soak is stopping.
    pub async fn pause(&mut self, d: Duration) -> bool {
        let until = (Instant::now() + d).min(self.shared.deadline);
        let stopped = tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => false,
            _ = self.stop.wait_for(|stop| *stop) => true,
        };
        !stopped && !self.stopped()
    }
}

/// A small xorshift64* generator: the bench needs no statistical quality, only no dependency.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Uniform in [lo, hi].
    pub fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}
