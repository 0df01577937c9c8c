//! The soak's concurrent tasks: started together, watched until the end of the run, then drained in order.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::process::Child;
use tokio::task::{JoinHandle, JoinSet};

use crate::args::Args;
use crate::chaos::chaos;
use crate::churn::churn;
use crate::load::{flood_load, hot_load};
use crate::process::Tern;
use crate::redis_server::Redis;
use crate::sampling::{Sample, sampler};
use crate::setup::Certificates;
use crate::state::Ctx;
use crate::swaps::swaps;

/// The running tasks: the load generators (hot, flood, churn, swaps), the sampler and the Redis chaos.
#[derive(Debug)]
pub struct Tasks {
    load: JoinSet<Result<&'static str>>,
    sampler: JoinHandle<Result<Vec<Sample>>>,
    chaos: JoinHandle<Result<Redis>>,
}

impl Tasks {
    /// Starts every task; Redis moves into the chaos task, which hands it back at the end.
    pub fn spawn(
        ctx: &Ctx,
        args: &Args,
        certs: &Certificates,
        redis_url: &str,
        tern: &Tern,
        redis: Redis,
        seed: u64,
        out: &Path,
    ) -> Self {
        let pid = tern.pid;
        let mut load: JoinSet<Result<&'static str>> = JoinSet::new();
        {
            let ctx = ctx.clone();
            let (rate, clients) = (args.hot_rate, args.hot_clients);
            load.spawn(async move { hot_load(ctx, rate, clients, seed ^ 1).await.map(|()| "hot") });
        }
        {
            let ctx = ctx.clone();
            let (rate, clients, leaf) = (args.flood_rate, args.flood_clients, certs.default_leaf.clone());
            load.spawn(async move { flood_load(ctx, rate, clients, leaf, seed ^ 2).await.map(|()| "flood") });
        }
        {
            let ctx = ctx.clone();
            let (ca, certs_dir, url, every) =
                (certs.ca.clone(), certs.dir.clone(), redis_url.to_string(), args.churn_every);
            load.spawn(async move { churn(ctx, ca, certs_dir, url, every, seed ^ 3).await.map(|()| "churn") });
        }
        {
            let ctx = ctx.clone();
            let (setup, config_path, every) = (tern.setup.clone(), tern.config_path.clone(), args.swap_every);
            load.spawn(async move { swaps(ctx, setup, config_path, pid, every).await.map(|()| "swaps") });
        }
        let sampler = {
            let ctx = ctx.clone();
            let (csv, every) = (out.join("samples.csv"), args.sample_every);
            tokio::spawn(async move { sampler(ctx, pid, csv, every).await })
        };
        let chaos = {
            let ctx = ctx.clone();
            let (every, down) = (args.redis_every, (args.redis_down_min, args.redis_down_max));
            tokio::spawn(async move { chaos(ctx, redis, every, down, seed ^ 4).await })
        };
        Self { load, sampler, chaos }
    }

    /// Until the deadline, tern dying, Ctrl-C, or a task failing; returns why the run stopped early, if it did.
    pub async fn wait_for_end(&mut self, tern: &mut Child, deadline: Instant) -> Option<String> {
        let mut early = None;
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {}
            status = tern.wait() => {
                early = Some(format!("tern exited during the soak: {status:?}"));
            }
            _ = tokio::signal::ctrl_c() => {
                early = Some("interrupted (Ctrl-C)".to_string());
            }
            Some(joined) = self.load.join_next() => {
                early = match joined {
                    // The load tasks end by themselves at the deadline too; that race is no early stop.
                    Ok(Ok(_)) if Instant::now() + Duration::from_secs(2) >= deadline => None,
                    Ok(Ok(name)) => Some(format!("task {name} ended early")),
                    Ok(Err(err)) => Some(format!("a task failed: {err:#}")),
                    Err(err) => Some(format!("a task panicked: {err}")),
                };
            }
        }
        early
    }

    /// After the stop: the load tasks drained, the sampler's samples (it takes one last sample after the load has
    /// stopped), and Redis back from the chaos task if it returned it. Load tasks that did not finish are aborted
    /// only when the tasks drop.
    pub async fn finish(&mut self) -> Result<(Vec<Sample>, Option<Redis>)> {
        let drain = async {
            while let Some(joined) = self.load.join_next().await {
                match joined {
                    Ok(Ok(_)) => {}
                    Ok(Err(err)) => eprintln!("task failed: {err:#}"),
                    Err(err) => eprintln!("task panicked: {err}"),
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(60), drain).await.is_err() {
            eprintln!("tasks did not finish within 60 s of the stop; abandoning them");
        }
        let samples = match tokio::time::timeout(Duration::from_secs(30), &mut self.sampler).await {
            Ok(Ok(Ok(samples))) => samples,
            Ok(Ok(Err(err))) => bail!("sampler: {err:#}"),
            Ok(Err(err)) => bail!("sampler panicked: {err}"),
            Err(_) => bail!("sampler did not finish"),
        };
        let redis = match tokio::time::timeout(Duration::from_secs(30), &mut self.chaos).await {
            Ok(Ok(Ok(redis))) => Some(redis),
            Ok(Ok(Err(err))) => {
                eprintln!("redis chaos: {err:#}");
                None
            }
            Ok(Err(err)) => {
                eprintln!("redis chaos panicked: {err}");
                None
            }
            Err(_) => None,
        };
        Ok((samples, redis))
    }
}
