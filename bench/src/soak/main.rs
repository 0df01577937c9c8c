//! Soak: one tern process for `--minutes` under mixed load while Redis is killed and restarted, the plugin is
//! swapped, certificates are re-issued and invalidated and random names flood in. Reports handshakes made and
//! failed per class (cached names: the target is zero failures), tern's RSS and open file descriptors over time,
//! and plugin calls by outcome; writes `samples.csv`, `events.csv`, `failures.csv`, `summary.json` and tern's log
//! into the output folder, which `bench/plot-soak.py` turns into a PNG. Exits non-zero if a cached-name handshake
//! or request failed, or tern died or did not exit 0 on SIGTERM at the end.
//!
//! ```text
//! cargo build --release -p tern -p tern-bench
//! cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
//! target/release/soak --minutes 30
//! target/plot-venv/bin/python bench/plot-soak.py bench/results/soak-<stamp>   # venv: see bench/plot.sh
//! ```
//!
//! What runs at once (all on loopback, every rate bounded):
//! - **hot**: `--hot-rate` full handshakes per second (verifying against the soak CA, no resumption) plus one GET
//!   each, for names drawn from `--hot` names warmed before the clock starts. Every failed handshake or request
//!   is a cached-name failure.
//! - **flood**: `--flood-rate` handshakes per second for random names nobody has; each must get the listener's
//!   default certificate.
//! - **redis chaos**: every `--redis-every` seconds (±20 %) `SAVE`, SIGKILL redis-server, keep it down
//!   `--redis-down-min`..`--redis-down-max` seconds, restart it on the same port from the RDB file (so it never
//!   answers "not found" for a name it had). Cached names are then served stale (`--max-stale`).
//! - **plugin swaps**: every `--swap-every` seconds the config is rewritten to point at the other of two copies of
//!   the Redis plugin (they differ by one custom section, so their SHA-256 differs) and a reload is triggered,
//!   alternately `POST /reload` and SIGHUP. The plugin has a probe name, so a reload during an outage is rejected.
//! - **certificate churn**: every `--churn-every` seconds a hot name gets a new leaf (`MSET` of chain and key) and
//!   is published on the invalidation channel; its handshakes are then watched until they show the new leaf.
//!   Churn pauses while Redis is down (an invalidated name is no longer cached).
//! - **sampler**: every `--sample-every` seconds tern's VmRSS, open fds, threads and `/metrics` counters.

mod args;
mod chaos;
mod churn;
mod clients;
mod load;
mod process;
mod redis_server;
mod sampling;
mod setup;
mod state;
mod summary;
mod swaps;
mod tasks;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use tokio::sync::watch;

use crate::args::Args;
use crate::clients::{Clients, warm_up};
use crate::process::{start_tern, stop_tern};
use crate::redis_server::Redis;
use crate::sampling::{Sample, print_sample_header};
use crate::setup::{Workspace, import_certificates, issue_certificates, write_plugin_builds};
use crate::state::{Ctx, Shared};
use crate::summary::{log_levels, print_summary, summarize, write_events};
use crate::tasks::Tasks;

const DOMAIN: &str = "soak.test";
const PREFIX: &str = "cert:";
const CHANNEL: &str = "tern:invalidate";
const IO_LIMIT: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let passed = run(args).await?;
    if !passed {
        eprintln!("soak FAILED: see the summary above");
        std::process::exit(1);
    }
    Ok(())
}

/// Everything that must outlive the tasks; its children are killed when it drops.
async fn run(args: Args) -> Result<bool> {
    let tern = args.check()?;
    let workspace = Workspace::new(&args)?;
    let seed = workspace.seed;

    // Certificates: a CA, `certs` host certificates and the default certificate.
    let started = Instant::now();
    let certs = issue_certificates(&workspace.dir, args.certs)?;
    write_plugin_builds(&args.plugin, &workspace.dir)?;
    let redis = Redis::launch(&workspace).await?;
    let redis_url = format!("redis://127.0.0.1:{}", redis.port);
    import_certificates(&tern, &certs.dir, &redis_url, args.certs, started)?;
    let mut server = start_tern(&tern, &workspace, &redis_url, &certs.names[0], &args).await?;
    let clients = Clients::new(&certs.ca)?;
    warm_up(&clients, server.listen, &certs.names[..args.hot]).await?;

    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(args.minutes * 60.0);
    let shared = Arc::new(Shared::new(start, deadline, &workspace.out.join("failures.csv"))?);
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Ctx {
        shared: shared.clone(),
        clients: clients.clone(),
        listen: server.listen,
        admin: server.admin,
        names: certs.names.clone(),
        hot: args.hot,
        stop: stop_rx,
    };
    args.print_plan(seed);
    print_sample_header();
    let mut tasks = Tasks::spawn(&ctx, &args, &certs, &redis_url, &server, redis, seed, &workspace.out);

    let early = tasks.wait_for_end(&mut server.child, deadline).await;
    if let Some(reason) = &early {
        eprintln!("stopping early: {reason}");
        shared.event("early_stop", reason);
    }
    let elapsed = start.elapsed();
    stop_tx.send_replace(true);
    let (samples, redis) = tasks.finish().await?;
    let exit = stop_tern(&mut server.child, server.pid).await?;
    drop(redis);
    report(&args, &shared, &samples, elapsed, &exit, early.as_deref(), seed, &workspace.out)
}

/// Writes `summary.json` and `events.csv`, prints the summary; whether the soak passed.
fn report(
    args: &Args,
    shared: &Shared,
    samples: &[Sample],
    elapsed: Duration,
    exit: &str,
    early: Option<&str>,
    seed: u64,
    out: &Path,
) -> Result<bool> {
    let log_levels = log_levels(&out.join("tern.log"));
    let clean_exit = exit == "exit status: 0";
    let summary = summarize(args, shared, samples, elapsed, exit, &log_levels, early, seed);
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    write_events(shared, &out.join("events.csv"))?;
    print_summary(&summary);
    println!(
        "\nwritten to {} (target/plot-venv/bin/python bench/plot-soak.py {} draws soak.png)",
        out.display(),
        out.display()
    );
    let cached_failures = summary["cached_name_failures"].as_u64().unwrap_or(u64::MAX);
    Ok(cached_failures == 0 && early.is_none() && clean_exit)
}
