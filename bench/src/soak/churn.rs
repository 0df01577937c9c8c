//! Certificate churn: a hot name gets a new leaf in Redis, is invalidated, and is watched until it shows.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Result;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::clients::handshake;
use crate::redis_server::redis_conn;
use crate::state::{Ctx, Rng, lock};
use crate::{CHANNEL, IO_LIMIT, PREFIX};

/// Re-issues a hot name's certificate, writes it with MSET, publishes an invalidation and watches for the new leaf.
pub async fn churn(
    mut ctx: Ctx,
    ca: Arc<tern_fixtures::TestCa>,
    certs_dir: PathBuf,
    url: String,
    every: f64,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    let shared = ctx.shared.clone();
    let stats = &shared.churn;
    while ctx.pause(Duration::from_secs_f64(every)).await {
        // Waits out an outage: a name is only invalidated while Redis can serve it again.
        let guard = tokio::select! {
            guard = shared.redis_lock.lock() => guard,
            _ = ctx.stop.wait_for(|s| *s) => break,
        };
        if ctx.stopped() {
            break;
        }
        let name = ctx.names[rng.below(ctx.hot)].clone();
        let (chain, key) = ca.issue(&[&name])?;
        let new_leaf = CertificateDer::from_pem_slice(chain.as_bytes())?;
        let receivers = match tokio::time::timeout(IO_LIMIT, publish(&url, &name, &chain, &key)).await {
            Ok(Ok(receivers)) => receivers,
            Ok(Err(err)) => {
                stats.write_failed.fetch_add(1, Relaxed);
                shared.failure("churn", &name, "redis write", &err);
                continue;
            }
            Err(_) => {
                stats.write_failed.fetch_add(1, Relaxed);
                shared.failure("churn", &name, "redis write", &anyhow::anyhow!("timed out"));
                continue;
            }
        };
        // Kept in the folder too, as the source of truth beside Redis.
        std::fs::write(certs_dir.join(format!("{name}.crt")), &chain)?;
        std::fs::write(certs_dir.join(format!("{name}.key")), &key)?;
        stats.issued.fetch_add(1, Relaxed);
        if receivers == 0 {
            stats.unheard.fetch_add(1, Relaxed);
            shared.event("invalidation_unheard", &name);
        }
        watch_for_leaf(&ctx, &name, &new_leaf).await;
        drop(guard);
    }
    Ok(())
}

/// MSET of the new chain and key, then PUBLISH of the name; returns how many subscribers heard it.
async fn publish(url: &str, name: &str, chain: &str, key: &str) -> Result<u64> {
    let mut conn = redis_conn(url).await?;
    redis::cmd("MSET")
        .arg(format!("{PREFIX}{name}.crt"))
        .arg(chain)
        .arg(format!("{PREFIX}{name}.key"))
        .arg(key)
        .query_async::<()>(&mut conn)
        .await?;
    let receivers: u64 = redis::cmd("PUBLISH").arg(CHANNEL).arg(name).query_async(&mut conn).await?;
    Ok(receivers)
}

/// Handshakes for `name` until one shows `new_leaf`, then counts it as observed (with the latency) or not.
async fn watch_for_leaf(ctx: &Ctx, name: &str, new_leaf: &CertificateDer<'static>) {
    let (shared, stats) = (&ctx.shared, &ctx.shared.churn);
    let published = Instant::now();
    let mut seen = false;
    // The TTL bounds it without an invalidation; 60 s is past any sensible `--cache-ttl` here.
    while published.elapsed() < Duration::from_secs(60) && !ctx.stopped() {
        match handshake(ctx.clients.verify.clone(), ctx.listen, name).await {
            Ok(leaf) if leaf == *new_leaf => {
                seen = true;
                break;
            }
            Ok(_) => {}
            Err(err) => {
                stats.probe_failed.fetch_add(1, Relaxed);
                shared.failure("churn", name, "handshake", &err);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if seen {
        stats.observed.fetch_add(1, Relaxed);
        lock(&stats.latencies_ms).push(published.elapsed().as_secs_f64() * 1e3);
    } else if !ctx.stopped() {
        stats.not_observed.fetch_add(1, Relaxed);
        shared.event("churn_not_observed", name);
    }
}
