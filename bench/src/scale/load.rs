//! The load client: concurrent rustls TLS 1.3 full handshakes (no resumption), SNI = the name, the chain verified
//! against the bench CA for that name. No request is sent: after the handshake the client sends close_notify,
//! reads until tern closes (bounded), and drops the connection.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::certs::name;

/// The longest one handshake may take.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// The longest the close after it may take.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// Which names the handshakes ask for.
#[derive(Debug, Clone)]
pub enum Names {
    /// Each name of the range once, in order: every handshake a miss.
    Each(Range<usize>),
    /// Names drawn uniformly from `0..of`, at most `count` handshakes.
    Uniform { of: usize, count: usize, seed: u64 },
}

/// What a run of handshakes gave.
#[derive(Debug)]
pub struct Outcome {
    /// Handshakes completed and verified.
    pub done: usize,
    pub failed: usize,
    /// The first failure's message.
    pub first_error: Option<String>,
    /// Closes that did not finish within [`CLOSE_LIMIT`] (the handshake itself had completed).
    pub slow_closes: usize,
    pub elapsed: Duration,
    /// Whether the run stopped at its deadline rather than at the end of its names.
    pub hit_deadline: bool,
    /// Handshake latencies (TCP connect to handshake done), µs, sorted.
    pub micros: Vec<u32>,
}

impl Outcome {
    /// The `q` quantile of the latencies in ms (NaN without any).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let at = ((self.micros.len() as f64 * q) as usize).min(self.micros.len().saturating_sub(1));
        self.micros.get(at).map_or(f64::NAN, |us| f64::from(*us) / 1e3)
    }

    /// Completed handshakes per second.
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// What one worker did.
#[derive(Debug, Default)]
struct Tally {
    micros: Vec<u32>,
    failed: usize,
    slow_closes: usize,
    first_error: Option<String>,
}

/// Runs handshakes for `names` against `addr`, `concurrency` at a time, until the names are used up or `deadline`.
pub async fn run(
    client: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    names: Names,
    concurrency: usize,
    deadline: Instant,
) -> Result<Outcome> {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let connector = tokio_rustls::TlsConnector::from(client);
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|w| {
            let (next, names, connector) = (next.clone(), names.clone(), connector.clone());
            tokio::spawn(async move { worker(w as u64, &connector, addr, &names, &next, deadline).await })
        })
        .collect();
    let mut micros = Vec::new();
    let (mut failed, mut slow_closes, mut first_error) = (0, 0, None);
    for worker in workers {
        let tally = worker.await.context("a load worker panicked")?;
        micros.extend(tally.micros);
        failed += tally.failed;
        slow_closes += tally.slow_closes;
        first_error = first_error.or(tally.first_error);
    }
    micros.sort_unstable();
    let total = match &names {
        Names::Each(range) => range.len(),
        Names::Uniform { count, .. } => *count,
    };
    Ok(Outcome {
        done: micros.len(),
        failed,
        first_error,
        slow_closes,
        elapsed: started.elapsed(),
        hit_deadline: micros.len() + failed < total,
        micros,
    })
}

/// One connection at a time until the shared counter passes the names or the deadline passes.
async fn worker(
    id: u64,
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
    names: &Names,
    next: &AtomicUsize,
    deadline: Instant,
) -> Tally {
    let mut tally = Tally::default();
    let mut rng = match names {
        Names::Uniform { seed, .. } => Rng::new(seed ^ id.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        Names::Each(_) => Rng::new(1),
    };
    while Instant::now() < deadline {
        let n = next.fetch_add(1, Ordering::Relaxed);
        let host = match names {
            Names::Each(range) if n < range.len() => range.start + n,
            Names::Uniform { of, count, .. } if n < *count => rng.below(*of),
            _ => break,
        };
        match handshake(connector, addr, &name(host)).await {
            Ok((took, closed)) => {
                tally.micros.push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
                tally.slow_closes += usize::from(!closed);
            }
            Err(err) => {
                tally.failed += 1;
                tally.first_error.get_or_insert_with(|| format!("{}: {err:#}", name(host)));
            }
        }
    }
    tally
}

/// A verified full handshake for `host`, then the close: (connect to handshake done, whether the close finished
/// in time).
async fn handshake(connector: &tokio_rustls::TlsConnector, addr: SocketAddr, host: &str) -> Result<(Duration, bool)> {
    let server_name = rustls::pki_types::ServerName::try_from(host.to_string())?;
    let started = Instant::now();
    let connect = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        anyhow::Ok(connector.connect(server_name, tcp).await?)
    };
    let mut tls = tokio::time::timeout(HANDSHAKE_LIMIT, connect).await.context("handshake stalled")??;
    let took = started.elapsed();
    // close_notify, then whatever tern still sends until it closes.
    let close = async {
        tls.shutdown().await?;
        let mut sink = [0u8; 2048];
        while tls.read(&mut sink).await? > 0 {}
        anyhow::Ok(())
    };
    let closed = tokio::time::timeout(CLOSE_LIMIT, close).await.is_ok();
    Ok((took, closed))
}

/// TLS 1.3 only, no resumption, the bench CA as the only root (tern's provider: aws-lc-rs).
pub fn client_config(ca: &tern_fixtures::TestCa) -> Result<Arc<rustls::ClientConfig>> {
    Ok(Arc::new(tern_bench::tls13_client_config(ca.der())?))
}

/// xorshift64*: uniform enough for picking names, and reproducible from the seed.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        ((u128::from(self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)) * n as u128) >> 64) as usize
    }
}
