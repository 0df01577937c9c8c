//! What a plugin costs per language: component size, compile time, and, on the cache-miss path (a fresh instance
//! per call, as tern runs plugins), instantiate + call latency, linear memory per instance, and the mean time of
//! each part of a call (instantiation, the export's run) from the plugin's own histograms.
//!
//! ```text
//! cargo build --release -p tern-bench
//! scripts/build-polyglot.sh                     # JavaScript and Python example plugins
//! target/release/plugin-cost --calls 500 target/wasm32-wasip2/release/redis_plugin.wasm \
//!     target/polyglot/js-redis.wasm target/polyglot/py-redis.wasm
//! ```
//!
//! Every plugin reads the same certificates from a `redis-server` this program starts (the Redis plugin's default
//! layout), for distinct names, so every call is a real miss: Redis round trip, PEM returned to the host.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use tern::config::{KvGrant, PluginSettings, RedisSettings};
use tern::plugin::{self, Selection};
use tern::sni::ServerName;

#[derive(Debug, Parser)]
struct Args {
    /// Plugin components (.wasm) to measure.
    #[arg(required = true)]
    plugins: Vec<PathBuf>,
    /// Calls per plugin, each for a different name.
    #[arg(long, default_value_t = 500)]
    calls: usize,
    /// MiB of each memory slot kept resident between calls (`server.plugin_keep_resident`); each plugin is
    /// measured once per value, in the order given (0: every slot decommitted after its call, as before 50.x).
    #[arg(long, value_delimiter = ',', default_value = "8")]
    keep_resident_mib: Vec<usize>,
    /// Spare instances made ahead of calls (`plugin.spare_instances`); each value measured after each
    /// `--keep-resident-mib` value.
    #[arg(long, value_delimiter = ',', default_value = "0,1")]
    spares: Vec<usize>,
    /// Pause between calls, ms: 0 is a burst of back-to-back misses (a spare is rarely ready), a few ms are misses
    /// arriving apart, as on a server whose misses are not all at once.
    #[arg(long, default_value_t = 0)]
    gap_ms: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let (_redis, port) = tern_bench::start_redis(dir.path()).await?;
    let store = Arc::new(tern::store::RedisStore::new(RedisSettings {
        name: "bench".into(),
        urls: vec![format!("redis://127.0.0.1:{port}")],
        cluster: false,
        timeout: Duration::from_secs(2),
    }));
    let ca = tern_fixtures::TestCa::new("plugin cost CA")?;
    let names: Vec<String> = (0..args.calls).map(|i| format!("host{i}.cost.test")).collect();
    let mut writes = Vec::new();
    for name in &names {
        let (chain, key) = ca.issue(&[name])?;
        writes.push(redis::cmd("SET").arg(format!("{name}.crt")).arg(chain).clone());
        writes.push(redis::cmd("SET").arg(format!("{name}.key")).arg(key).clone());
    }
    store.write_all(writes).await?;
    let mut stores = tern::store::Stores::new();
    stores.insert("bench".into(), store);
    println!(
        "plugin cost: {} calls per plugin {} ms apart, a fresh instance per call, certificates in Redis",
        args.calls, args.gap_ms
    );
    println!(
        "{:<22} {:>5} {:>5} {:>8} {:>9} {:>9} {:>11} {:>10} {:>10} {:>11} {:>12} {:>11} {:>9} {:>9}",
        "plugin",
        "kept",
        "spare",
        "on spare",
        "size",
        "compile",
        "first call",
        "median",
        "p99",
        "memory/inst",
        "instantiate",
        "run",
        "CPU/call",
        "resident"
    );
    for path in &args.plugins {
        for &keep in &args.keep_resident_mib {
            for &spares in &args.spares {
                let setup = Setup { keep_mib: keep, spares, gap: Duration::from_millis(args.gap_ms) };
                measure(path, &setup, &names, &stores).await?;
            }
        }
    }
    Ok(())
}

/// One line of the table: how the plugin's runtime is set up and how calls arrive.
struct Setup {
    keep_mib: usize,
    spares: usize,
    gap: Duration,
}

/// Loads (compiles) the plugin at `path`, calls it once per name, and prints its line of the table.
/// `CPU/call` is this process's CPU over the calls (the store's reset after each answer and the making of
/// spares included, Redis's not); `on spare` the share of calls that found a spare ready; `resident` what the
/// pool keeps mapped after the last call (`tern_plugin_pool_resident_bytes`).
async fn measure(path: &Path, setup: &Setup, names: &[String], stores: &tern::store::Stores) -> Result<()> {
    let size = std::fs::metadata(path).with_context(|| format!("{}", path.display()))?.len();
    let mut settings = plugin_settings(path);
    settings.spare_instances = setup.spares;
    let keep_mib = setup.keep_mib;
    // Sized as tern sizes it for this plugin alone (its default concurrency cap).
    let runtime = plugin::runtime_for(std::slice::from_ref(&settings), keep_mib << 20)?;
    let started = Instant::now();
    let plugin = plugin::load_all(&runtime, std::slice::from_ref(&settings), stores)
        .await?
        .into_iter()
        .next()
        .context("plugin did not load")?;
    let compile = started.elapsed();
    let mut times = Vec::with_capacity(names.len());
    let cpu_before = tern_bench::cpu_seconds(std::process::id())?;
    for name in names {
        let name = ServerName::parse(name).map_err(|e| anyhow::anyhow!("{e}"))?;
        let started = Instant::now();
        let answer = plugin.select(&name, "bench").await?;
        times.push(started.elapsed());
        tokio::time::sleep(setup.gap).await;
        anyhow::ensure!(matches!(answer, Selection::Serve { .. }), "{} found nothing for {name}", path.display());
    }
    let cpu = tern_bench::cpu_seconds(std::process::id())? - cpu_before;
    let first = times[0];
    let mut rest = times[1..].to_vec();
    rest.sort();
    let at = |q: f64| rest.get(((rest.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default();
    let memory = plugin.stats().peak_memory_bytes();
    // Means over every call (the first included), from the plugin's own phase histograms.
    let mean_ms = |h: &tern::metrics::Histogram| h.mean().unwrap_or_default().as_secs_f64() * 1e3;
    println!(
        "{:<22} {:>2}MiB {:>5} {:>7.0}% {:>7.2}MB {:>8.2}s {:>9.2}ms {:>8.3}ms {:>8.3}ms {:>8.1}MiB {:>10.3}ms {:>9.3}ms {:>7.3}ms {:>6.1}MiB",
        path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
        keep_mib,
        setup.spares,
        plugin.stats().calls_on_spare() as f64 * 100.0 / names.len() as f64,
        size as f64 / 1e6,
        compile.as_secs_f64(),
        first.as_secs_f64() * 1e3,
        at(0.5).as_secs_f64() * 1e3,
        at(0.99).as_secs_f64() * 1e3,
        memory as f64 / (1 << 20) as f64,
        mean_ms(plugin.stats().instantiate()),
        mean_ms(plugin.stats().run()),
        cpu * 1e3 / names.len() as f64,
        runtime.pool_resident_bytes() as f64 / (1 << 20) as f64,
    );
    Ok(())
}

/// The plugin at `path`: one instance at a time, 256 MiB of memory, no rate limit or breaker, and the keys of
/// the Redis store `bench` readable.
fn plugin_settings(path: &Path) -> PluginSettings {
    let mut settings = PluginSettings::one_off("bench", path);
    settings.timeout = Duration::from_secs(10);
    settings.memory_limit = 256 << 20;
    settings.max_concurrency = tern::config::defaults::PLUGIN_MAX_CONCURRENCY;
    settings.grants.kv = Some(KvGrant { store: "bench".into(), prefixes: vec![String::new()] });
    settings
}
