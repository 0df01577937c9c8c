//! tern past 100k names: the certificate cache's memory at 100k and at 1M cached names, and uniform traffic over
//! 1M names with the default cache bounds.
//!
//! ```text
//! cargo build --release -p tern -p tern-bench --bin tern --bin scale-bench
//! cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
//! target/release/scale-bench --names 1000000 --first 100000 --uniform-seconds 300
//! ```
//!
//! Set-up: its own `redis-server` (nothing persisted), filled with `--names` names `host<i>.scale.test`, each its
//! own ECDSA P-256 certificate and key (`--key-pool K`: K keys shared in turn, still a distinct certificate per
//! name), in the Redis plugin's default layout (`<name>.crt`, `<name>.key`), written with pipelined `MSET`s while
//! the certificates are issued on every core. Then two `tern run` processes, one after the other, with the Redis
//! plugin granted that Redis:
//! - Phase A and B, a cache sized for every name (`max_entries` = 4 × names, `max_bytes` = 1 KiB × that, so one
//!   entry's minimum weight, its slot, is 1 KiB and below a real entry's estimate): one handshake per name for the
//!   first `--first` names (A), then for the rest (B); every handshake a miss that fills the cache. After each,
//!   tern's RSS, PSS and anonymous memory (`/proc/<pid>/smaps_rollup`) and its cache gauges (`/metrics`): bytes per
//!   cached certificate is the memory's growth over the entries' growth.
//! - Phase C, a fresh tern with the default cache bounds: handshakes for names drawn uniformly from all of them
//!   (mostly misses), for `--uniform-seconds` or `--uniform-handshakes`; memory and cache gauges sampled every
//!   `--sample-every`. `--skip-fill` runs this phase alone (e.g. for longer).
//!
//! The client makes rustls TLS 1.3 full handshakes (no resumption), SNI = the name, the chain verified against the
//! bench CA; no request: after the handshake it sends close_notify and drops the connection once tern closes.
//! Handshake latency is TCP connect to handshake done, on the client. Loopback only; every phase bounded in time.
//! tern logs at `warn`, no access log. The last line is the result as JSON.

mod certs;
mod load;
mod probe;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use serde_json::json;
use tern_bench::TernProcess;

use crate::load::{Names, Outcome};
use crate::probe::Reading;

const MIB: f64 = (1 << 20) as f64;

#[derive(Debug, Parser)]
struct Args {
    /// Names in Redis, each with its own certificate.
    #[arg(long, default_value_t = 1_000_000)]
    names: usize,
    /// Names cached in phase A (phase B caches the rest).
    #[arg(long, default_value_t = 100_000)]
    first: usize,
    /// 0: a fresh key per certificate; K: K keys used in turn (the certificates stay distinct).
    #[arg(long, default_value_t = 0)]
    key_pool: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The longest the import may take, in seconds.
    #[arg(long, default_value = "1800", value_parser = seconds)]
    import_limit: Duration,
    /// The longest phase A, and then phase B, may take, in seconds.
    #[arg(long, default_value = "1800", value_parser = seconds)]
    fill_limit: Duration,
    /// How long phase C runs, in seconds.
    #[arg(long, default_value = "300", value_parser = seconds)]
    uniform_seconds: Duration,
    /// At most this many handshakes in phase C.
    #[arg(long, default_value_t = 1_000_000)]
    uniform_handshakes: usize,
    /// Memory and cache sampled this often, in seconds.
    #[arg(long, default_value = "10", value_parser = seconds)]
    sample_every: Duration,
    /// Seed of phase C's name draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Skip phases A and B (the filled cache): only phase C.
    #[arg(long)]
    skip_fill: bool,
    /// The tern binary.
    #[arg(long, default_value = "target/release/tern")]
    tern: PathBuf,
    /// The Redis plugin component.
    #[arg(long, default_value = "plugins/target/wasm32-wasip2/release/redis_plugin.wasm")]
    plugin: PathBuf,
}

fn seconds(s: &str) -> Result<Duration, String> {
    s.parse().map(Duration::from_secs).map_err(|e| format!("{e}"))
}

/// A phase's load and the readings around it.
#[derive(Debug)]
struct Phase {
    outcome: Outcome,
    /// tern after the phase (settled).
    end: Reading,
    /// Samples taken during the phase.
    samples: Vec<Reading>,
}

/// Phases A and B, on one tern with a cache sized for every name.
#[derive(Debug)]
struct Fill {
    /// tern before any handshake.
    start: Reading,
    a: Phase,
    b: Phase,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(args.first <= args.names && args.names > 0, "--first must be at most --names");
    for (file, build) in [
        (&args.tern, "cargo build --release -p tern"),
        (&args.plugin, "cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml"),
    ] {
        ensure!(file.exists(), "{} missing ({build})", file.display());
    }
    let plugin = std::path::absolute(&args.plugin)?;
    let work = tempfile::tempdir()?;
    let dir = work.path();
    let (_redis, port) = tern_bench::start_redis(dir).await?;
    let url = format!("redis://127.0.0.1:{port}");
    let ca = Arc::new(tern_fixtures::TestCa::new("tern scale bench CA")?);
    let keys = if args.key_pool == 0 { "a fresh key each".to_string() } else { format!("{} keys", args.key_pool) };
    println!("scale-bench: issuing and importing {} ECDSA P-256 certificates ({keys})", args.names);
    let imported = certs::import(ca.clone(), args.names, args.key_pool, &url, args.import_limit).await?;
    print_import(&imported, args.names);
    let client = load::client_config(&ca)?;

    let fill = if args.skip_fill { None } else { Some(fill(&args, &url, &plugin, dir, &client).await?) };

    let mut fresh = TernProcess::start(&args.tern, &dir.join("uniform"), &config(&url, &plugin, None)).await?;
    let uniform_start = settle(&fresh, &client, false).await?;
    let names = Names::Uniform { of: args.names, count: args.uniform_handshakes, seed: args.seed };
    let c = phase("C", &fresh, &client, names, &args, args.uniform_seconds).await?;
    fresh.child.kill().await?;
    report_log(&dir.join("uniform"));

    let fill_json = print_table(&args, fill.as_ref(), &uniform_start, &c);
    let uniform_json = print_uniform(&uniform_start, &c);
    let result = json!({
        "names": args.names,
        "first": args.first,
        "key_pool": args.key_pool,
        "concurrency": args.concurrency,
        "import": {"seconds": imported.elapsed.as_secs_f64(), "redis_used_memory": imported.redis_bytes,
                   "pem_bytes": imported.pem_bytes,
                   "first_10k_seconds": imported.first_sample.map(|d| d.as_secs_f64())},
        "fill": fill_json,
        "uniform": uniform_json,
    });
    println!("{result}");
    Ok(())
}

/// Phases A and B on a tern whose cache holds every name: `max_entries` = 4 × names, `max_bytes` = 1 KiB × that.
async fn fill(args: &Args, url: &str, plugin: &Path, dir: &Path, client: &Arc<rustls::ClientConfig>) -> Result<Fill> {
    let slot = 1024;
    let max_entries = 4 * args.names as u64;
    let fill_config = config(url, plugin, Some((max_entries, max_entries * slot)));
    let mut tern = TernProcess::start(&args.tern, &dir.join("fill"), &fill_config).await?;
    let start = settle(&tern, client, false).await?;
    println!("tern started (cache max_entries {max_entries}, max_bytes {} MiB)", (max_entries * slot) >> 20);
    let a = phase("A", &tern, client, Names::Each(0..args.first), args, args.fill_limit).await?;
    let b = phase("B", &tern, client, Names::Each(args.first..args.names), args, args.fill_limit).await?;
    tern.child.kill().await?;
    report_log(&dir.join("fill"));
    Ok(Fill { start, a, b })
}

/// tern's config: the Redis plugin (default layout, every key granted) on a strict listener `main`, quiet logs,
/// and `bounds` (max_entries, max_bytes) for the cache, or its defaults. Timeouts are raised over the defaults
/// (Redis 250 ms, plugin 1 s) so that a busy shared machine does not turn into failed handshakes.
fn config(redis_url: &str, plugin: &Path, bounds: Option<(u64, u64)>) -> String {
    let cache = match bounds {
        Some((entries, bytes)) => format!("[cache]\nmax_entries = {entries}\nmax_bytes = {bytes}\nttl = \"3h\"\n\n"),
        None => String::new(),
    };
    format!(
        "[log]\nlevel = \"warn\"\naccess = false\n\n{cache}\
         [[redis]]\nname = \"certs\"\nurls = [\"{redis_url}\"]\ntimeout = \"2s\"\n\n\
         [[plugin]]\nname = \"redis\"\npath = \"{}\"\ntimeout = \"5s\"\n\
         grants.kv = {{ redis = \"certs\", prefixes = [\"\"] }}\n\n\
         [[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\nplugin = \"redis\"\nstrict = true\n\
         backend = \"http://127.0.0.1:9\"\n\n\
         [admin]\nbind = \"127.0.0.1:0\"\n",
        plugin.display()
    )
}

/// Runs one phase's handshakes while sampling tern every `--sample-every`, then reads tern once settled.
async fn phase(
    label: &'static str,
    tern: &TernProcess,
    client: &Arc<rustls::ClientConfig>,
    names: Names,
    args: &Args,
    limit: Duration,
) -> Result<Phase> {
    let started = Instant::now();
    let load = load::run(client.clone(), tern.listener, names, args.concurrency, started + limit);
    tokio::pin!(load);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + args.sample_every, args.sample_every);
    let mut samples = Vec::new();
    let outcome = loop {
        tokio::select! {
            outcome = &mut load => break outcome?,
            _ = tick.tick() => {
                let reading = Reading::take(tern.pid, tern.admin, started.elapsed().as_secs_f64()).await?;
                println!(
                    "  [{label}] {:>6.0} s: {:>8} entries, {:>8.1} MiB estimated, RSS {:>8.1} MiB, {:>9} misses",
                    reading.at, reading.entries, reading.weighted as f64 / MIB, reading.rss as f64 / MIB,
                    reading.misses
                );
                samples.push(reading);
            }
        }
    };
    let end = settle(tern, client, true).await?;
    println!(
        "phase {label}: {} handshakes in {:.1?} ({:.0}/s), {} failed{}",
        outcome.done,
        outcome.elapsed,
        outcome.rate(),
        outcome.failed,
        outcome.first_error.as_deref().map(|e| format!(" (first: {e})")).unwrap_or_default()
    );
    Ok(Phase { outcome, end, samples })
}

/// Reads tern once its closing connections are done. With `touch`, two hits for an already cached name first, a
/// moment apart, so that the cache runs its pending bookkeeping and its gauges are exact.
async fn settle(tern: &TernProcess, client: &Arc<rustls::ClientConfig>, touch: bool) -> Result<Reading> {
    tokio::time::sleep(Duration::from_secs(1)).await;
    if touch {
        for _ in 0..2 {
            let deadline = Instant::now() + Duration::from_secs(10);
            load::run(client.clone(), tern.listener, Names::Each(0..1), 1, deadline).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    Reading::take(tern.pid, tern.admin, 0.0).await.context("reading tern")
}

/// How many lines tern logged (at `warn` and above) in `dir`, and the first of them.
fn report_log(dir: &Path) {
    let log = std::fs::read_to_string(dir.join("tern.log")).unwrap_or_default();
    match log.lines().next() {
        Some(first) => println!("tern logged {} lines; the first: {first}", log.lines().count()),
        None => println!("tern logged nothing"),
    }
}

/// From the first sample at which the cache held 95% of `bound` entries (the steady state of uniform traffic once
/// the cache is full) to the phase's end: (miss share, when, RSS then); `None` if it never got there.
fn full_cache(phase: &Phase, bound: u64) -> Option<(f64, f64, u64)> {
    let full = phase.samples.iter().find(|r| r.entries * 100 >= bound * 95)?;
    let lookups = (phase.end.hits + phase.end.misses).checked_sub(full.hits + full.misses)?;
    let misses = phase.end.misses - full.misses;
    (lookups > 0).then(|| (misses as f64 / lookups as f64, full.at, full.rss))
}

fn print_import(imported: &certs::Imported, names: usize) {
    let secs = imported.elapsed.as_secs_f64();
    print!(
        "imported {names} names in {secs:.1} s ({:.0}/s); Redis used_memory {:.1} MiB, PEM {:.1} MiB",
        names as f64 / secs,
        imported.redis_bytes as f64 / MIB,
        imported.pem_bytes as f64 / MIB
    );
    match imported.first_sample {
        Some(first) => println!(
            "; the first {} took {:.1} s, so 1,000,000 at that rate: {:.0} s",
            certs::SAMPLE,
            first.as_secs_f64(),
            first.as_secs_f64() * 1e6 / certs::SAMPLE as f64
        ),
        None => println!(),
    }
}

/// `(memory growth / entries growth)` in bytes, for RSS, PSS, anonymous memory and tern's estimate.
fn per_entry(from: &Reading, to: &Reading) -> [f64; 4] {
    let entries = to.entries.saturating_sub(from.entries).max(1) as f64;
    let grow = |a: u64, b: u64| (b as f64 - a as f64) / entries;
    [grow(from.rss, to.rss), grow(from.pss, to.pss), grow(from.anon, to.anon), grow(from.weighted, to.weighted)]
}

/// The highest value of `field` over the phase's samples and its end.
fn peak(phase: &Phase, field: impl Fn(&Reading) -> u64) -> u64 {
    phase.samples.iter().chain(std::iter::once(&phase.end)).map(field).max().unwrap_or(0)
}

/// The table of every phase, and with the fill phases the bytes per cached certificate: their JSON.
fn print_table(args: &Args, fill: Option<&Fill>, uniform_start: &Reading, c: &Phase) -> serde_json::Value {
    println!();
    println!(
        "{:<24} {:>9} {:>8} {:>7} {:>8} {:>7} {:>7} {:>9} {:>9} {:>10} {:>9} {:>9} {:>9}",
        "",
        "handshk",
        "failed",
        "secs",
        "hs/s",
        "p50 ms",
        "p99 ms",
        "misses",
        "entries",
        "est. MiB",
        "RSS MiB",
        "PSS MiB",
        "anon MiB"
    );
    let row = |label: &str, outcome: Option<&Outcome>, r: &Reading| {
        let (done, failed, secs, rate, p50, p99) = outcome.map_or((0, 0, 0.0, 0.0, f64::NAN, f64::NAN), |o| {
            (o.done, o.failed, o.elapsed.as_secs_f64(), o.rate(), o.quantile_ms(0.5), o.quantile_ms(0.99))
        });
        println!(
            "{label:<24} {done:>9} {failed:>8} {secs:>7.0} {rate:>8.0} {p50:>7.2} {p99:>7.2} {:>9} {:>9} {:>10.1} \
             {:>9.1} {:>9.1} {:>9.1}",
            r.misses,
            r.entries,
            r.weighted as f64 / MIB,
            r.rss as f64 / MIB,
            r.pss as f64 / MIB,
            r.anon as f64 / MIB
        );
    };
    if let Some(Fill { start, a, b }) = fill {
        row("tern started (fill)", None, start);
        row(&format!("A: {} names", args.first), Some(&a.outcome), &a.end);
        row(&format!("B: to {} names", args.names), Some(&b.outcome), &b.end);
    }
    row("tern started (defaults)", None, uniform_start);
    row("C: uniform, default cap", Some(&c.outcome), &c.end);
    let Some(Fill { start, a, b }) = fill else { return serde_json::Value::Null };

    let start_a = per_entry(start, &a.end);
    let a_b = per_entry(&a.end, &b.end);
    let start_b = per_entry(start, &b.end);
    println!();
    println!("bytes per cached certificate  {:>9} {:>9} {:>9} {:>14}", "RSS", "PSS", "anon", "tern estimate");
    for (label, v) in [("start to A", start_a), ("A to B", a_b), ("start to B", start_b)] {
        println!("{label:<29} {:>9.0} {:>9.0} {:>9.0} {:>14.0}", v[0], v[1], v[2], v[3]);
    }
    let per = |v: [f64; 4]| json!({"rss": v[0], "pss": v[1], "anon": v[2], "estimate": v[3]});
    json!({
        "start": reading_json(start),
        "a": phase_json(a),
        "b": phase_json(b),
        "bytes_per_entry": {"start_to_a": per(start_a), "a_to_b": per(a_b), "start_to_b": per(start_b)},
    })
}

/// Phase C against the default bounds: misses, evictions, the peaks against the bounds, RSS over the run; its
/// JSON.
fn print_uniform(start: &Reading, c: &Phase) -> serde_json::Value {
    let default_entries = tern::config::defaults::CACHE_MAX_ENTRIES;
    let default_bytes = tern::config::defaults::CACHE_MAX_BYTES;
    let lookups = (c.end.hits + c.end.misses).saturating_sub(start.hits + start.misses).max(1);
    let misses = c.end.misses - start.misses;
    let rss: Vec<u64> = c.samples.iter().map(|r| r.rss).collect();
    let (entries_peak, weighted_peak) = (peak(c, |r| r.entries), peak(c, |r| r.weighted));
    println!();
    println!(
        "C: {:.1}% misses of {lookups} lookups, {} evictions; entries peak {entries_peak} (bound {default_entries}), \
         estimate peak {:.1} MiB (bound {:.0} MiB); RSS samples {:.1} to {:.1} MiB, peak RSS {:.1} MiB",
        100.0 * misses as f64 / lookups as f64,
        c.end.evictions,
        weighted_peak as f64 / MIB,
        default_bytes as f64 / MIB,
        rss.iter().min().copied().unwrap_or(0) as f64 / MIB,
        rss.iter().max().copied().unwrap_or(0) as f64 / MIB,
        c.end.hwm as f64 / MIB,
    );
    let full = full_cache(c, default_entries);
    if let Some((share, at, rss_full)) = full {
        println!(
            "C: once the cache was full (from {at:.0} s on): {:.1}% misses; RSS then {:.1} MiB, at the end {:.1} MiB",
            share * 100.0,
            rss_full as f64 / MIB,
            c.end.rss as f64 / MIB
        );
    }
    json!({
        "start": reading_json(start),
        "c": phase_json(c),
        "miss_share": misses as f64 / lookups as f64,
        "miss_share_full": full.map(|f| f.0),
        "full_at_s": full.map(|f| f.1),
        "rss_full": full.map(|f| f.2),
        "entries_peak": entries_peak,
        "weighted_peak": weighted_peak,
        "bound_entries": default_entries,
        "bound_bytes": default_bytes,
    })
}

fn reading_json(r: &Reading) -> serde_json::Value {
    json!({"rss": r.rss, "pss": r.pss, "anon": r.anon, "hwm": r.hwm, "entries": r.entries, "weighted": r.weighted,
           "hits": r.hits, "misses": r.misses, "evictions": r.evictions, "handshakes_ok": r.handshakes_ok})
}

fn phase_json(p: &Phase) -> serde_json::Value {
    let o = &p.outcome;
    let samples: Vec<_> = p
        .samples
        .iter()
        .map(|r| json!({"at_s": r.at, "rss": r.rss, "pss": r.pss, "entries": r.entries, "weighted": r.weighted}))
        .collect();
    json!({
        "load": {"handshakes": o.done, "failed": o.failed, "first_error": o.first_error,
                 "slow_closes": o.slow_closes, "seconds": o.elapsed.as_secs_f64(), "per_s": o.rate(),
                 "hit_deadline": o.hit_deadline, "p50_ms": o.quantile_ms(0.5), "p99_ms": o.quantile_ms(0.99)},
        "end": reading_json(&p.end),
        "samples": samples,
    })
}
