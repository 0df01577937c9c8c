//! The measurements of one configuration, and the interleaved comparisons (tern's dynamic configurations against
//! tern-static on cache hits; every peer server against tern).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::json;

use crate::client::{Client, Verify};
use crate::configs::{FLOOR_DIRECT, FLOOR_PROXY};
use crate::load::{Draw, Mode, load, percentile};
use crate::server::{Server, start_server};
use crate::{Bench, Setup};

pub async fn run_config(bench: &Bench<'_>, config: &str, setup: &Setup) -> Result<serde_json::Value> {
    let (server, startup) = start_server(bench, config, setup).await?;
    let args = bench.args;
    let client = Client::new(&setup.dir)?;
    let addr = server.addr;
    let (rss_start, pss_start) = server.memory_mib();
    let negotiated = client.negotiated(addr, &setup.names[0]).await?;
    // The floors serve one certificate for every name: their cold and warm handshakes are timed unverified.
    let verify = if config == FLOOR_DIRECT || config == FLOOR_PROXY { Verify::No } else { Verify::Yes };
    let (mut cold, mut warm) = cold_and_warm(&client, addr, setup, verify).await?;

    // Full handshakes, one request each: uniform over N at each concurrency, Zipf at the highest, and a warmed
    // hot set of 1,000 names (cache hits for the dynamic configurations).
    let hot: Arc<Vec<String>> = Arc::new(setup.names.iter().take(1000).cloned().collect());
    visit_all(&client, addr, &hot, false).await?;
    let mut phases = serde_json::Map::new();
    let top = *args.concurrency.iter().max().unwrap_or(&64);
    let mut plan: Vec<(String, Arc<Vec<String>>, Draw, usize)> =
        args.concurrency.iter().map(|&c| (format!("uniform_c{c}"), setup.names.clone(), Draw::Uniform, c)).collect();
    plan.push((format!("zipf_c{top}"), setup.names.clone(), Draw::Zipf, top));
    plan.push((format!("hot_c{top}"), hot.clone(), Draw::Uniform, top));
    for (label, names, draw, concurrency) in plan {
        let phase = load(&client, &server, names, draw, concurrency, args.seconds, Mode::Full).await?;
        phases.insert(label, phase);
    }
    // Resumption: the client first holds a session for every hot name, so the phase measures resumed handshakes.
    visit_all(&client, addr, &hot, true).await?;
    let resumed = load(&client, &server, hot.clone(), Draw::Uniform, top, args.seconds, Mode::Resumed).await?;
    let keepalive = load(&client, &server, hot.clone(), Draw::Uniform, top, args.seconds, Mode::KeepAlive).await?;
    let (rss_after, pss_after) = server.memory_mib();
    let perf = match &args.perf {
        Some(dir) => {
            perf_phase(bench, &client, &server, &hot, dir, &format!("{config}-{}-{}", setup.n, setup.key)).await?
        }
        None => serde_json::Value::Null,
    };
    let full_rate = phases[&format!("hot_c{top}")]["rate"].as_f64().unwrap_or(0.0);
    Ok(json!({
        "config": config,
        "n": setup.n,
        "key": setup.key,
        "startup_s": startup,
        "negotiated": negotiated,
        "rss_start_mib": rss_start,
        "pss_start_mib": pss_start,
        "rss_after_mib": rss_after,
        "pss_after_mib": pss_after,
        "cold_p50_ms": percentile(&mut cold, 0.5),
        "cold_p99_ms": percentile(&mut cold, 0.99),
        "warm_p50_ms": percentile(&mut warm, 0.5),
        "warm_p99_ms": percentile(&mut warm, 0.99),
        "phases": phases,
        "resumed": resumed,
        "resumed_over_full": resumed["rate"].as_f64().unwrap_or(0.0) / full_rate.max(1e-9),
        // Server CPU per resumed handshake over per full handshake (same hot set, same concurrency).
        "resumed_cost_ratio": resumed["server_cpu_s_per_1k"].as_f64().unwrap_or(0.0)
            / phases[&format!("hot_c{top}")]["server_cpu_s_per_1k"].as_f64().unwrap_or(0.0).max(1e-9),
        "top_concurrency": top,
        "keepalive": keepalive,
        "perf_phase": perf,
    }))
}

/// An extra hot-set phase of full handshakes under `perf` (`--perf`, `--perf-args`: `record ...` or `stat ...`),
/// written to `dir/<label>.<subcommand>`. The load runs inside perf's window (it starts a quarter of a second
/// after perf and ends a quarter before), so that what perf counts can be divided by the phase's handshakes. Its
/// figures are returned but are not the configuration's: perf's sampling costs the server.
async fn perf_phase(
    bench: &Bench<'_>,
    client: &Client,
    server: &Server,
    hot: &Arc<Vec<String>>,
    dir: &std::path::Path,
    label: &str,
) -> Result<serde_json::Value> {
    let args = bench.args;
    std::fs::create_dir_all(dir)?;
    let pids: Vec<String> = server.pids().iter().map(u32::to_string).collect();
    let mut perf_args = args.perf_args.split_whitespace();
    let subcommand = perf_args.next().unwrap_or("record");
    let output = dir.join(format!("{label}.{subcommand}"));
    let mut perf = tokio::process::Command::new("perf")
        .arg(subcommand)
        .args(perf_args)
        .arg("-p")
        .arg(pids.join(","))
        .arg("-o")
        .arg(&output)
        .args(["--", "sleep", &format!("{}", args.perf_seconds)])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("perf (apt-get install linux-perf)")?;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let top = *args.concurrency.iter().max().unwrap_or(&64);
    let seconds = (args.perf_seconds - 0.5).max(0.5);
    let phase = load(client, server, hot.clone(), Draw::Uniform, top, seconds, Mode::Full).await?;
    let status = perf.wait().await?;
    anyhow::ensure!(status.success(), "perf {subcommand} failed ({status})");
    println!("perf {subcommand} of {label} over {} handshakes: {}", phase["count"], output.display());
    Ok(phase)
}

/// The in-memory floor of one certificate set: rustls server and client connections on one blocking thread, full
/// TLS 1.3 handshakes with the first name's certificate and one small request each, the server side's thread CPU
/// only; beside it, what the signature and one side of the key exchange cost alone (tern's provider).
pub async fn memory_floor(bench: &Bench<'_>, setup: &Setup) -> Result<serde_json::Value> {
    let handshakes = bench.args.memory_floor_handshakes;
    let name = setup.names[0].clone();
    let (cert, key) = (setup.dir.join(format!("{name}.crt")), setup.dir.join(format!("{name}.key")));
    let (n, kind) = (setup.n, setup.key);
    let measured = tokio::task::spawn_blocking(move || -> Result<serde_json::Value> {
        use tern_bench::floor;
        let server = floor::server_config(&cert, &key)?;
        let m = floor::memory_floor(&server, &floor::client_config()?, &name, handshakes)?;
        let provider = tern::crypto::provider();
        let pem = std::fs::read(&key)?;
        let (sign_us, _) = floor::sign_and_load_us(provider, &pem, if kind == "rsa2048" { 1000 } else { 10_000 })?;
        let kx_us = floor::kx_side_us(provider, 5000)?;
        println!(
            "in-memory floor n={n} {kind}: server {:.1} us per full handshake with its request (client {:.1} us; \
             signature {sign_us:.1} us, one side of {:?} {kx_us:.1} us; {}; {handshakes} handshakes)",
            m.server_us,
            m.client_us,
            provider.kx_groups[0].name(),
            m.negotiated
        );
        Ok(json!({
            "n": n,
            "key": kind,
            "server_us": m.server_us,
            "client_us": m.client_us,
            "clock_us": m.clock_us,
            "handshakes": m.handshakes,
            "negotiated": m.negotiated,
            "sign_us": sign_us,
            "kx_side_us": kx_us,
        }))
    });
    measured.await?
}

/// Cold vs warm: 200 names never asked before, one at a time, verified (unless `verify` says no); then the same
/// names again.
async fn cold_and_warm(
    client: &Client,
    addr: SocketAddr,
    setup: &Setup,
    verify: Verify,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    let sample: Vec<String> = setup.names.iter().rev().take(200.min(setup.n - 1)).cloned().collect();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for pass in [&mut cold, &mut warm] {
        for name in &sample {
            let t = Instant::now();
            client.visit(addr, name, verify, false).await.with_context(|| name.to_string())?;
            pass.push(t.elapsed());
        }
    }
    Ok((cold, warm))
}

/// One unverified connection for each name in turn (resuming or not): warms a server's cache, or the client's
/// sessions.
async fn visit_all(client: &Client, addr: SocketAddr, names: &[String], resume: bool) -> Result<()> {
    for name in names {
        client.visit(addr, name, Verify::No, resume).await?;
    }
    Ok(())
}

/// Cache-hit throughput of configurations against a baseline (the first: tern's static preload for tern's dynamic
/// configurations, tern-file for the peer servers), measured without drift: all configurations run at once, warmed
/// on the hot set, and short phases alternate between them round by round (rotating the order), so each round's
/// ratio compares neighbours in time. Reports the median and range of the per-round ratios of handshakes/s and of
/// server CPU per handshake.
pub async fn compare_interleaved(bench: &Bench<'_>, configs: &[&str], setup: &Setup) -> Result<serde_json::Value> {
    let args = bench.args;
    // A configuration other than the baseline that does not start is left out of the comparison.
    let mut servers = Vec::new();
    let mut started = Vec::new();
    for (i, config) in configs.iter().enumerate() {
        match start_server(bench, config, setup).await {
            Ok((server, _)) => {
                servers.push(server);
                started.push(*config);
            }
            Err(err) if i > 0 => println!("interleaved n={} {}: {config} left out: {err:#}", setup.n, setup.key),
            Err(err) => return Err(err),
        }
    }
    let configs = &started[..];
    let client = Client::new(&setup.dir)?;
    let hot: Arc<Vec<String>> = Arc::new(setup.names.iter().take(1000).cloned().collect());
    for server in &servers {
        visit_all(&client, server.addr, &hot, false).await?;
    }
    let top = *args.concurrency.iter().max().unwrap_or(&64);
    let rounds = Rounds::run(&client, &servers, &hot, top, args.ab_rounds, args.ab_seconds).await?;
    let mut result = serde_json::Map::new();
    // One server per configuration, in order; the first is the baseline.
    for (i, config) in configs.iter().enumerate().skip(1) {
        result.insert(config.to_string(), rounds.vs_baseline(i, config, configs[0], setup));
    }
    Ok(json!({
        "n": setup.n,
        "key": setup.key,
        "rounds": args.ab_rounds,
        "seconds": args.ab_seconds,
        "concurrency": top,
        "baseline": configs[0],
        "static_rates": rounds.rates[0],
        "static_cpu_s_per_1k": rounds.cpu[0],
        "static_errors": rounds.errors[0],
        "baseline_cpu_us_per_handshake": rounds.us_per_handshake(0),
        "vs_static": result,
    }))
}

/// What the interleaved rounds measured, per server (the first is the baseline).
struct Rounds {
    count: usize,
    rates: Vec<Vec<f64>>,
    cpu: Vec<Vec<f64>>,
    errors: Vec<u64>,
    /// (handshakes, server CPU-seconds) summed over all rounds: the ratio of totals is steadier than any round's.
    totals: Vec<(f64, f64)>,
}

impl Rounds {
    /// `count` rounds of one phase per server, the order rotating by one each round.
    async fn run(
        client: &Client,
        servers: &[Server],
        hot: &Arc<Vec<String>>,
        top: usize,
        count: usize,
        seconds: f64,
    ) -> Result<Self> {
        let mut rates = vec![Vec::new(); servers.len()];
        let mut cpu = vec![Vec::new(); servers.len()];
        let mut errors = vec![0u64; servers.len()];
        let mut totals = vec![(0.0f64, 0.0f64); servers.len()];
        for round in 0..count {
            for k in 0..servers.len() {
                let i = (round + k) % servers.len();
                let phase = load(client, &servers[i], hot.clone(), Draw::Uniform, top, seconds, Mode::Full).await?;
                errors[i] += phase["errors"].as_u64().unwrap_or(0);
                let count = phase["count"].as_f64().unwrap_or(0.0);
                totals[i].0 += count;
                totals[i].1 += phase["server_cpu_s_per_1k"].as_f64().unwrap_or(0.0) * count / 1000.0;
                rates[i].push(phase["rate"].as_f64().unwrap_or(0.0));
                cpu[i].push(phase["server_cpu_s_per_1k"].as_f64().unwrap_or(0.0));
            }
        }
        Ok(Self { count, rates, cpu, errors, totals })
    }

    /// Server CPU per handshake of server `i` over all rounds (µs).
    fn us_per_handshake(&self, i: usize) -> f64 {
        self.totals[i].1 * 1e6 / self.totals[i].0.max(1.0)
    }

    /// Server `i` (configuration `config`) against the baseline (server 0): printed, and as JSON.
    fn vs_baseline(&self, i: usize, config: &str, baseline: &str, setup: &Setup) -> serde_json::Value {
        let Rounds { count, rates, cpu, errors, totals } = self;
        let mut rate_ratio: Vec<f64> = (0..*count).map(|r| rates[i][r] / rates[0][r].max(1e-9)).collect();
        let mut cpu_ratio: Vec<f64> = (0..*count).map(|r| cpu[i][r] / cpu[0][r].max(1e-9)).collect();
        let rate_median = median(&mut rate_ratio);
        let cpu_median = median(&mut cpu_ratio);
        let rate_total = totals[i].0 / totals[0].0.max(1.0);
        let cpu_total = (totals[i].1 / totals[i].0.max(1.0)) / (totals[0].1 / totals[0].0.max(1.0)).max(1e-12);
        println!(
            "interleaved n={} {}: {} / {baseline} handshakes/s x{rate_total:.3} over all rounds, median x{rate_median:.3} (rounds {:.3}..{:.3}); server CPU per handshake x{cpu_total:.3} over all rounds ({:.1} us vs {:.1} us), median x{cpu_median:.3} (rounds {:.3}..{:.3})",
            setup.n,
            setup.key,
            config,
            rate_ratio[0],
            rate_ratio[rate_ratio.len() - 1],
            self.us_per_handshake(i),
            self.us_per_handshake(0),
            cpu_ratio[0],
            cpu_ratio[cpu_ratio.len() - 1]
        );
        json!({
            "rate_ratio_total": rate_total,
            "cpu_ratio_total": cpu_total,
            "rate_ratio_median": rate_median,
            "rate_ratio_min": rate_ratio[0],
            "rate_ratio_max": rate_ratio[rate_ratio.len() - 1],
            "cpu_ratio_median": cpu_median,
            "cpu_ratio_min": cpu_ratio[0],
            "cpu_ratio_max": cpu_ratio[cpu_ratio.len() - 1],
            "rates": rates[i],
            "cpu_s_per_1k": cpu[i],
            "errors": errors[i],
            "cpu_us_per_handshake": self.us_per_handshake(i),
        })
    }
}

/// Sorts `values` and returns the median.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Memory with every name of the set cached: PSS after one verified handshake for each name (no request:
/// tern-routed-unique's origins lead nowhere), against the same for a baseline configuration (printed, and as
/// JSON).
pub async fn memory_all_cached(bench: &Bench<'_>, configs: &[&str], setup: &Setup) -> Result<serde_json::Value> {
    let mut rows = serde_json::Map::new();
    for config in configs {
        let (server, _) = start_server(bench, config, setup).await?;
        let client = Client::new(&setup.dir)?;
        let (_, pss_start) = server.memory_mib();
        let started = Instant::now();
        for name in setup.names.iter() {
            client.handshake_only(server.addr, name).await.with_context(|| name.to_string())?;
        }
        let (_, pss_after) = server.memory_mib();
        let per_name = (pss_after - pss_start) * 1024.0 / setup.n as f64;
        println!(
            "memory n={} {} {config}: PSS {pss_start:.1} MiB at start, {pss_after:.1} MiB with every name cached \
             ({per_name:.2} KiB per name; visiting all took {:.1} s)",
            setup.n,
            setup.key,
            started.elapsed().as_secs_f64()
        );
        rows.insert(
            config.to_string(),
            json!({ "pss_start_mib": pss_start, "pss_all_cached_mib": pss_after, "kib_per_name": per_name }),
        );
    }
    Ok(json!({ "n": setup.n, "key": setup.key, "memory_all_cached": rows }))
}
