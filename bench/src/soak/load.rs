//! The steady load: paced jobs, the hot (cached-name) class and the flood of random names.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Result;
use rustls::pki_types::CertificateDer;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::DOMAIN;
use crate::clients::{Tls, connect, get, leaf};
use crate::state::{Class, Ctx, Rng};

/// Starts `job` `rate` times a second, at most `concurrency` at once, until the soak stops.
async fn paced<F, Fut>(ctx: &Ctx, rate: f64, concurrency: usize, mut job: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    anyhow::ensure!(rate > 0.0 && concurrency > 0, "rates and concurrency must be positive");
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut running = JoinSet::new();
    let mut stop = ctx.stop.clone();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        if ctx.stopped() {
            break;
        }
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit?,
            _ = stop.wait_for(|s| *s) => break,
        };
        let work = job();
        running.spawn(async move {
            work.await;
            drop(permit);
        });
        while running.try_join_next().is_some() {}
    }
    while running.join_next().await.is_some() {}
    Ok(())
}

/// Cached names: verified handshake, one GET; every failure is a cached-name failure.
pub async fn hot_load(ctx: Ctx, rate: f64, concurrency: usize, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let job_ctx = ctx.clone();
    paced(&ctx, rate, concurrency, move || {
        let ctx = job_ctx.clone();
        let name = ctx.names[rng.below(ctx.hot)].clone();
        async move {
            let stats = &ctx.shared.hot;
            let Some(mut tls) = timed_connect(&ctx, stats, "hot", ctx.clients.verify.clone(), &name).await else {
                return;
            };
            stats.handshakes_ok.fetch_add(1, Relaxed);
            match get(&mut tls, &name).await {
                Ok(()) => stats.requests_ok.fetch_add(1, Relaxed),
                Err(err) => {
                    ctx.shared.failure("hot", &name, "request", &err);
                    stats.requests_failed.fetch_add(1, Relaxed)
                }
            };
        }
    })
    .await
}

/// Random names nobody has: each must complete with the default certificate.
pub async fn flood_load(
    ctx: Ctx,
    rate: f64,
    concurrency: usize,
    default: CertificateDer<'static>,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    let job_ctx = ctx.clone();
    let default = Arc::new(default);
    paced(&ctx, rate, concurrency, move || {
        let (ctx, default) = (job_ctx.clone(), default.clone());
        let name = format!("r{:016x}.flood.{DOMAIN}", rng.next());
        async move {
            let stats = &ctx.shared.flood;
            let Some(mut tls) = timed_connect(&ctx, stats, "flood", ctx.clients.any.clone(), &name).await else {
                return;
            };
            if leaf(&tls).as_ref() == Some(&*default) {
                stats.handshakes_ok.fetch_add(1, Relaxed);
            } else {
                stats.wrong_certificate.fetch_add(1, Relaxed);
                ctx.shared.failure("flood", &name, "certificate", &anyhow::anyhow!("not the default certificate"));
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
        }
    })
    .await
}

/// A handshake for `name` in load class `class` (counted in `stats`), its latency recorded; a failed one is counted
/// and logged, and gives `None`.
async fn timed_connect(
    ctx: &Ctx,
    stats: &Class,
    class: &str,
    config: Arc<rustls::ClientConfig>,
    name: &str,
) -> Option<Tls> {
    let started = Instant::now();
    match connect(config, ctx.listen, name).await {
        Err(err) => {
            stats.handshakes_failed.fetch_add(1, Relaxed);
            ctx.shared.failure(class, name, "handshake", &err);
            None
        }
        Ok(tls) => {
            stats.latency(started.elapsed());
            Some(tls)
        }
    }
}
