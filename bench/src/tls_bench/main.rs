//! tern against itself (dynamic via the file plugin, the Redis plugin or the HTTP-API plugin, static preload) and
//! against nginx (preload, and `ssl_certificate $ssl_server_name`), Caddy (N `load_files`, and its
//! `get_certificate http` manager against the same certificate API as tern's HTTP-API plugin) and HAProxy (a
//! crt-list of N lines), side by side in one run, for N host certificates.
//!
//! ```text
//! cargo build --release -p tern -p tern-bench
//! target/release/tls-bench --sizes 1000,10000,100000          # writes results/<time>/ and results/latest/
//! python3 bench/plot.py results/latest                         # PNG plots (matplotlib; see bench/plot.sh)
//! ```
//!
//! Per configuration and N: time from start to the first successful handshake, RSS and PSS after start and after
//! load, full-handshake throughput (one small request per connection, SNI drawn per connection, uniform and Zipf)
//! at two concurrency levels, p50/p99 handshake latency, server CPU-seconds per 1,000 handshakes, cold (first
//! handshake per name) vs warm latency, keep-alive requests/s, and resumed vs full (throughput and server CPU).
//! Client and servers share this machine's cores: the client's own CPU time is reported beside the server's, and
//! configurations are compared as ratios taken in the same run; the cache-hit comparison against tern's static
//! preload runs all tern configurations at once and alternates short phases between them (`--ab-rounds`), and so
//! does the comparison of every peer server with tern-file at the sizes of `--peer-sizes`. A server that does not
//! serve within `--start-timeout` is reported as not started, and the run goes on.
//!
//! Two floors put tern's server CPU per proxied full handshake in proportion (issue 16): `floor-direct`, the minimal
//! tokio + tokio-rustls server answering the request itself (`tls-floor`), run as a configuration and compared with
//! tern-static and tern-file in interleaved rounds; and the in-memory floor, rustls alone without sockets (server
//! side's CPU only, `--memory-floor-handshakes`). `--perf DIR` records a profile of each server under load.
//!
//! `--propagation` measures instead how long a changed certificate takes to be served by both nodes of a two-node
//! fleet of each system, under load, and what the change costs (`propagation.rs`).

mod args;
mod backend;
mod cert_api;
mod client;
mod configs;
mod environment;
mod load;
mod measure;
mod peers;
mod propagation;
mod report;
mod server;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;

use crate::args::Args;
use crate::backend::spawn_backend;
use crate::cert_api::CertApi;
use crate::configs::{FLOOR_DIRECT, FLOOR_PROXY};
use crate::environment::{Peers, machine_info, pin_client};
use crate::measure::{compare_interleaved, memory_all_cached, memory_floor, run_config};
use crate::report::{print_row, write_results};

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let work = tempfile::tempdir()?;
    if args.pin {
        pin_client()?;
    }
    // Peers first: the machine's description names the versions of those this run installed.
    let peers = Peers::find(&args).await;
    let machine = machine_info(&args).await;
    println!("{machine}");
    let backend = spawn_backend().await?;
    let (_redis, redis_port) = tern_bench::start_redis(work.path()).await?;
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let api = CertApi::spawn(std::path::absolute(&args.certs)?)?;
    let bench = Bench { args: &args, work: work.path(), backend, redis_url: &redis_url, api: &api, fleet: None };
    if args.propagation {
        return propagation::run(&bench, peers, &machine).await;
    }
    let mut results = Results::default();
    let mut sets: Vec<(usize, tern_bench::KeyKind)> =
        args.sizes.iter().filter(|&&n| n > 0).map(|&n| (n, tern_bench::KeyKind::Ecdsa)).collect();
    sets.extend(args.rsa_sizes.iter().filter(|&&n| n > 0).map(|&n| (n, tern_bench::KeyKind::Rsa)));
    for (n, kind) in sets {
        run_set(&bench, n, kind, peers, &mut results).await?;
    }
    write_results(&args, &machine, &results)?;
    Ok(())
}

/// What the certificate sets have measured so far: a row per configuration, the interleaved comparisons, and the
/// configurations that failed (a server that did not start in time, or a phase that failed).
#[derive(Default)]
pub(crate) struct Results {
    pub rows: Vec<serde_json::Value>,
    pub comparisons: Vec<serde_json::Value>,
    pub failures: Vec<serde_json::Value>,
    /// The in-memory floor of each certificate set.
    pub memory_floors: Vec<serde_json::Value>,
}

/// One certificate set of `n` hosts: generated (or reused) and imported into Redis, then every configuration in
/// turn and the interleaved comparison.
async fn run_set(
    bench: &Bench<'_>,
    n: usize,
    kind: tern_bench::KeyKind,
    peers: Peers,
    results: &mut Results,
) -> Result<()> {
    let args = bench.args;
    let key = if kind == tern_bench::KeyKind::Rsa { "rsa2048" } else { "ecdsa-p256" };
    // Absolute: configs resolve relative paths against their own folder.
    let dir = std::path::absolute(&args.certs)?.join(format!("{key}-{n}"));
    let started = Instant::now();
    let domain = format!("{key}.bench.test");
    if tern_bench::generate(n, &dir, &domain, kind)? {
        println!("generated {n} {key} certificates in {:.1?}", started.elapsed());
    }
    let names: Arc<Vec<String>> = Arc::new((0..n).map(|i| format!("host{i}.{domain}")).collect());
    // The Redis plugin's layout, under a per-set prefix.
    let prefix = format!("{key}-{n}:");
    let import = std::process::Command::new(&args.tern)
        .args(["certs", "import"])
        .arg(&dir)
        .args(["--redis", bench.redis_url, "--prefix", &prefix])
        .output()?;
    anyhow::ensure!(import.status.success(), "certs import: {}", String::from_utf8_lossy(&import.stderr));
    if args.memory_floor_handshakes > 0 {
        // Before any server starts: the in-memory floor has the machine to itself (but for the other processes).
        let setup = Setup { n, key, dir: dir.clone(), names: names.clone(), prefix: prefix.clone() };
        match memory_floor(bench, &setup).await {
            Ok(floor) => results.memory_floors.push(floor),
            Err(err) => println!("in-memory floor n={n} {key}: FAILED: {err:#}"),
        }
    }
    for config in &args.configs {
        if !peers.runs(config) {
            continue;
        }
        if config == "tern-routed-unique" {
            continue; // measured by --memory-all only: its origins lead nowhere
        }
        let setup = Setup { n, key, dir: dir.clone(), names: names.clone(), prefix: prefix.clone() };
        match run_config(bench, config, &setup).await {
            Ok(row) => {
                print_row(&row);
                results.rows.push(row);
            }
            Err(err) => {
                println!("{config} n={n} {key}: FAILED: {err:#}");
                results
                    .failures
                    .push(serde_json::json!({ "config": config, "n": n, "key": key, "error": format!("{err:#}") }));
            }
        }
    }
    let tern: Vec<&str> = ["tern-static", "tern-file", "tern-redis", "tern-static-idle-plugin"]
        .into_iter()
        .filter(|c| args.configs.iter().any(|a| a == c))
        .collect();
    if tern.len() > 1 && tern[0] == "tern-static" && args.ab_rounds > 0 {
        let setup = Setup { n, key, dir: dir.clone(), names: names.clone(), prefix: prefix.clone() };
        match compare_interleaved(bench, &tern, &setup).await {
            Ok(result) => results.comparisons.push(result),
            Err(err) => println!("interleaved comparison n={n} {key}: FAILED: {err:#}"),
        }
    }
    // Routing (issue 13): a route per name against the single-backend path, interleaved, on cache hits.
    let has = |c: &str| args.configs.iter().any(|a| a == c);
    if has("tern-file") && has("tern-routed") && args.ab_rounds > 0 {
        let setup = Setup { n, key, dir: dir.clone(), names: names.clone(), prefix: prefix.clone() };
        match compare_interleaved(bench, &["tern-file", "tern-routed"], &setup).await {
            Ok(result) => results.comparisons.push(result),
            Err(err) => println!("interleaved routed comparison n={n} {key}: FAILED: {err:#}"),
        }
    }
    // Peers (issue 16): tern-file (else tern-static) against every peer server and tern-http, interleaved.
    let peer_configs = ["tern-http", "nginx-static", "nginx-var", "caddy-files", "caddy-http", "haproxy-crtlist"];
    let baseline = ["tern-file", "tern-static"].into_iter().find(|c| has(c));
    let mut compared: Vec<&str> = peer_configs.into_iter().filter(|c| has(c) && peers.runs(c)).collect();
    if let Some(baseline) = baseline
        && !compared.is_empty()
        && args.ab_rounds > 0
        && args.peer_sizes.contains(&n)
    {
        compared.insert(0, baseline);
        let setup = Setup { n, key, dir: dir.clone(), names: names.clone(), prefix: prefix.clone() };
        match compare_interleaved(bench, &compared, &setup).await {
            Ok(result) => results.comparisons.push(result),
            Err(err) => println!("interleaved peer comparison n={n} {key}: FAILED: {err:#}"),
        }
    }
    // Floors (issue 16): tern's full handshake against the minimal direct-answer server (and the minimal proxy,
    // when asked for), interleaved.
    let mut floored: Vec<&str> =
        [FLOOR_PROXY, "tern-static", "tern-static-b", "tern-file"].into_iter().filter(|c| has(c)).collect();
    if has(FLOOR_DIRECT) && !floored.is_empty() && args.ab_rounds > 0 {
        floored.insert(0, FLOOR_DIRECT);
        let setup = Setup { n, key, dir: dir.clone(), names: names.clone(), prefix: prefix.clone() };
        match compare_interleaved(bench, &floored, &setup).await {
            Ok(result) => results.comparisons.push(result),
            Err(err) => println!("interleaved floor comparison n={n} {key}: FAILED: {err:#}"),
        }
    }
    if has("tern-routed-unique") && args.memory_all {
        let setup = Setup { n, key, dir: dir.clone(), names: names.clone(), prefix: prefix.clone() };
        match memory_all_cached(bench, &["tern-file", "tern-routed-unique"], &setup).await {
            Ok(result) => results.comparisons.push(result),
            Err(err) => println!("memory with every name cached n={n} {key}: FAILED: {err:#}"),
        }
    }
    Ok(())
}

/// What every configuration of a run shares: options, scratch folder, HTTP backend, Redis, certificate API.
#[derive(Clone, Copy)]
pub(crate) struct Bench<'a> {
    pub args: &'a Args,
    pub work: &'a Path,
    pub backend: SocketAddr,
    pub redis_url: &'a str,
    /// The certificate API of tern-http and caddy-http.
    pub api: &'a CertApi,
    /// Set for a node of the propagation benchmark's two-node fleets: the controls an update goes through.
    pub fleet: Option<Fleet>,
}

/// What a configuration adds as a node of a propagation fleet (`--propagation`): Caddy's admin API at
/// `caddy_admin`, HAProxy's Runtime API socket in the node's folder, and for tern a cache TTL of `cache_ttl`
/// seconds with `[invalidation]` on its Redis store.
#[derive(Clone, Copy)]
pub(crate) struct Fleet {
    pub caddy_admin: SocketAddr,
    pub cache_ttl: u32,
}

/// One certificate set: its size, key type, folder, host names and Redis prefix.
#[derive(Clone)]
pub(crate) struct Setup {
    pub n: usize,
    pub key: &'static str,
    pub dir: PathBuf,
    pub names: Arc<Vec<String>>,
    pub prefix: String,
}
