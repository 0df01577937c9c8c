//! The name set: one ECDSA P-256 certificate per name, issued on every core and written to Redis in the Redis
//! plugin's default layout (`<name>.crt`, `<name>.key`) with pipelined `MSET`s while the issuing goes on.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use tern_fixtures::TestCa;

/// Names per `MSET` (two keys each): a few hundred kB per command.
const BATCH: usize = 500;
/// `MSET`s in flight at once on the one multiplexed connection.
const IN_FLIGHT: usize = 8;
/// Issued batches waiting for the writer: bounds what the issuing threads run ahead by.
const QUEUE: usize = 64;
/// The import rate is reported for this many first names, to extrapolate from.
pub const SAMPLE: usize = 10_000;

/// The name of host `i`.
pub fn name(i: usize) -> String {
    format!("host{i}.scale.test")
}

/// How the import went.
#[derive(Debug)]
pub struct Imported {
    /// The whole import: issuing and writing.
    pub elapsed: Duration,
    /// When the first [`SAMPLE`] names were in Redis (`None` if fewer were imported).
    pub first_sample: Option<Duration>,
    /// Redis's `used_memory` afterwards.
    pub redis_bytes: u64,
    /// Bytes of PEM written (certificates and keys).
    pub pem_bytes: u64,
}

/// Issues `count` certificates (a fresh key each, or, with `key_pool > 0`, keys taken in turn from that many) and
/// writes them into the Redis at `url`; gives up after `limit`.
pub async fn import(ca: Arc<TestCa>, count: usize, key_pool: usize, url: &str, limit: Duration) -> Result<Imported> {
    let started = Instant::now();
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await.context("connecting to redis")?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<(String, String, String)>>(QUEUE);
    let stop = Arc::new(AtomicBool::new(false));
    let issuers = spawn_issuers(ca, count, key_pool, tx, stop.clone())?;
    let mut written = 0usize;
    let mut pem_bytes = 0u64;
    let mut first_sample = None;
    let write = async {
        use futures_util::StreamExt;
        let mut pending = futures_util::stream::FuturesUnordered::new();
        while let Some(batch) = rx.recv().await {
            let mut mset = redis::cmd("MSET");
            for (name, chain, key) in &batch {
                pem_bytes += (chain.len() + key.len()) as u64;
                mset.arg(format!("{name}.crt")).arg(chain).arg(format!("{name}.key")).arg(key);
            }
            let mut conn = conn.clone();
            let len = batch.len();
            pending.push(async move { mset.query_async::<()>(&mut conn).await.map(|()| len) });
            while pending.len() >= IN_FLIGHT {
                written += pending.next().await.context("a write")??;
            }
            if first_sample.is_none() && written >= SAMPLE {
                first_sample = Some(started.elapsed());
            }
        }
        while let Some(done) = pending.next().await {
            written += done?;
        }
        anyhow::Ok(())
    };
    let outcome = tokio::time::timeout(limit, write).await;
    stop.store(true, Ordering::Relaxed);
    for issuer in issuers {
        issuer.join().map_err(|_| anyhow::anyhow!("an issuing thread panicked"))??;
    }
    outcome.with_context(|| format!("import not done after {limit:?}"))??;
    ensure!(written == count, "imported {written} of {count} names");
    let first_sample = first_sample.or((count >= SAMPLE).then(|| started.elapsed()));
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut conn).await?;
    let redis_bytes =
        info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    Ok(Imported { elapsed: started.elapsed(), first_sample, redis_bytes, pem_bytes })
}

/// One issuing thread per core; thread `t` issues names `t, t + threads, ...` in batches of [`BATCH`].
fn spawn_issuers(
    ca: Arc<TestCa>,
    count: usize,
    key_pool: usize,
    tx: tokio::sync::mpsc::Sender<Vec<(String, String, String)>>,
    stop: Arc<AtomicBool>,
) -> Result<Vec<std::thread::JoinHandle<Result<()>>>> {
    let keys = Arc::new((0..key_pool).map(|_| rcgen::KeyPair::generate()).collect::<Result<Vec<_>, _>>()?);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok((0..threads)
        .map(|t| {
            let (ca, keys, tx, stop) = (ca.clone(), keys.clone(), tx.clone(), stop.clone());
            std::thread::spawn(move || -> Result<()> {
                let mut batch = Vec::with_capacity(BATCH);
                for i in (t..count).step_by(threads) {
                    let name = name(i);
                    let (chain, key) = match keys.get(i % key_pool.max(1)) {
                        Some(key) => ca.issue_with_key(&[&name], key)?,
                        None => ca.issue(&[&name])?,
                    };
                    batch.push((name, chain, key));
                    if batch.len() == BATCH {
                        // A closed channel: the writer gave up (its error is the one reported).
                        if stop.load(Ordering::Relaxed) || tx.blocking_send(std::mem::take(&mut batch)).is_err() {
                            return Ok(());
                        }
                        batch.reserve(BATCH);
                    }
                }
                if !batch.is_empty() {
                    let _ = tx.blocking_send(batch);
                }
                Ok(())
            })
        })
        .collect())
}
