//! tern against itself (dynamic via the file plugin, dynamic via the Redis plugin, static preload) and against
//! nginx (preload, and `ssl_certificate $ssl_server_name`), side by side in one run, for N host certificates.
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
//! preload runs all tern configurations at once and alternates short phases between them (`--ab-rounds`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

#[derive(Debug, Parser)]
struct Args {
    /// Numbers of hosts (ECDSA P-256; 0: none).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    sizes: Vec<usize>,
    /// Numbers of hosts also run with RSA 2048 certificates (0: none).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    rsa_sizes: Vec<usize>,
    /// Seconds per load phase.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Concurrency levels of the full-handshake phases.
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    concurrency: Vec<usize>,
    /// Configurations to run (tern-file, tern-redis, tern-static, nginx-static, nginx-var; diagnostic:
    /// tern-static-idle-plugin).
    #[arg(long, value_delimiter = ',', default_value = "tern-static,tern-file,tern-redis,nginx-static,nginx-var")]
    configs: Vec<String>,
    /// The tern binary.
    #[arg(long, default_value = "target/release/tern")]
    tern: PathBuf,
    /// Where certificate sets are kept between runs.
    #[arg(long, default_value = "target/bench-certs")]
    certs: PathBuf,
    /// Results folder (a timestamped subfolder and `latest` are written).
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Rounds of the interleaved cache-hit comparison (tern dynamic vs tern static, all running at once).
    #[arg(long, default_value_t = 10)]
    ab_rounds: usize,
    /// Seconds per configuration and round of the interleaved comparison.
    #[arg(long, default_value_t = 1.5)]
    ab_seconds: f64,
    /// Pin the servers to the last core and this program (the load client) to the others, instead of letting
    /// the scheduler share all cores between them.
    #[arg(long)]
    pin: bool,
    /// Do not install nginx from Debian packages when it is missing (skip the nginx rows instead).
    #[arg(long)]
    no_install: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let work = tempfile::tempdir()?;
    let machine = machine_info(&args).await;
    if args.pin {
        let (client, server) = pinned_cores()?;
        let status = std::process::Command::new("taskset")
            .args(["-a", "-c", "-p", &client, &std::process::id().to_string()])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "taskset could not pin the client");
        println!("pinned: client on cpu {client}, servers on cpu {server}");
    }
    println!("{machine}");
    let nginx = nginx_available(&args).await;
    let backend = spawn_backend().await?;
    let (_redis, redis_port) = tern_bench::start_redis(work.path()).await?;
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let bench = Bench { args: &args, work: work.path(), backend, redis_url: &redis_url };
    let mut rows = Vec::new();
    let mut comparisons = Vec::new();
    let mut sets: Vec<(usize, tern_bench::KeyKind)> =
        args.sizes.iter().filter(|&&n| n > 0).map(|&n| (n, tern_bench::KeyKind::Ecdsa)).collect();
    sets.extend(args.rsa_sizes.iter().filter(|&&n| n > 0).map(|&n| (n, tern_bench::KeyKind::Rsa)));
    for (n, kind) in sets {
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
            .args(["--redis", &redis_url, "--prefix", &prefix])
            .output()?;
        anyhow::ensure!(import.status.success(), "certs import: {}", String::from_utf8_lossy(&import.stderr));
        for config in &args.configs {
            if config.starts_with("nginx") && !nginx {
                continue;
            }
            let setup = Setup { n, key, dir: dir.clone(), names: names.clone(), prefix: prefix.clone() };
            match run_config(&bench, config, &setup).await {
                Ok(row) => {
                    print_row(&row);
                    rows.push(row);
                }
                Err(err) => println!("{config} n={n} {key}: FAILED: {err:#}"),
            }
        }
        let tern: Vec<&str> = ["tern-static", "tern-file", "tern-redis", "tern-static-idle-plugin"]
            .into_iter()
            .filter(|c| args.configs.iter().any(|a| a == c))
            .collect();
        if tern.len() > 1 && tern[0] == "tern-static" && args.ab_rounds > 0 {
            let setup = Setup { n, key, dir: dir.clone(), names: names.clone(), prefix: prefix.clone() };
            match compare_interleaved(&bench, &tern, &setup).await {
                Ok(result) => comparisons.push(result),
                Err(err) => println!("interleaved comparison n={n} {key}: FAILED: {err:#}"),
            }
        }
    }
    write_results(&args, &machine, &rows, &comparisons)?;
    Ok(())
}

/// What every configuration of a run shares: options, scratch folder, HTTP backend, Redis.
#[derive(Clone, Copy)]
struct Bench<'a> {
    args: &'a Args,
    work: &'a Path,
    backend: SocketAddr,
    redis_url: &'a str,
}

struct Setup {
    n: usize,
    key: &'static str,
    dir: PathBuf,
    names: Arc<Vec<String>>,
    prefix: String,
}

/// A server under test: its processes (nginx: master and workers) and the listener.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn pids(&self) -> Vec<u32> {
        let Some(pid) = self.child.id() else { return Vec::new() };
        let mut pids = vec![pid];
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            pids.extend(children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
        pids
    }

    fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().filter_map(|p| tern_bench::cpu_seconds(p).ok()).sum()
    }

    /// (RSS, PSS) in MiB over all processes.
    fn memory_mib(&self) -> (f64, f64) {
        let mut rss = 0.0;
        let mut pss = 0.0;
        for pid in self.pids() {
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
                for line in text.lines() {
                    let value = |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok());
                    if line.starts_with("Rss:") {
                        rss += value(line).unwrap_or(0.0) / 1024.0;
                    } else if line.starts_with("Pss:") {
                        pss += value(line).unwrap_or(0.0) / 1024.0;
                    }
                }
            }
        }
        (rss, pss)
    }
}

impl Drop for Server {
    /// nginx workers outlive a killed master: kill every process of the server, and wait until they are gone
    /// (reaped, memory freed) so that the next configuration's start-up is not measured against a dying one.
    fn drop(&mut self) {
        let pids = self.pids();
        if pids.is_empty() {
            return;
        }
        let _ = std::process::Command::new("kill").arg("-9").args(pids.iter().map(u32::to_string)).status();
        // Gone or a zombie (its memory already freed) both count as dead; `try_wait` reaps the direct child.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && pids.iter().any(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
            })
        {
            std::thread::sleep(Duration::from_millis(5));
            let _ = self.child.try_wait();
        }
    }
}

async fn run_config(bench: &Bench<'_>, config: &str, setup: &Setup) -> Result<serde_json::Value> {
    let (server, startup) = start_server(bench, config, setup).await?;
    let args = bench.args;
    let client = Client::new(&setup.dir)?;
    let addr = server.addr;
    let (rss_start, pss_start) = server.memory_mib();

    // Cold vs warm: 200 names never asked before, one at a time, verified; then the same names again.
    let sample: Vec<String> = setup.names.iter().rev().take(200.min(setup.n - 1)).cloned().collect();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for pass in [&mut cold, &mut warm] {
        for name in &sample {
            let t = Instant::now();
            client.visit(addr, name, Verify::Yes, false).await.with_context(|| name.to_string())?;
            pass.push(t.elapsed());
        }
    }

    // Full handshakes, one request each: uniform over N at each concurrency, Zipf at the highest, and a warmed
    // hot set of 1,000 names (cache hits for the dynamic configurations).
    let hot: Arc<Vec<String>> = Arc::new(setup.names.iter().take(1000).cloned().collect());
    for name in hot.iter() {
        client.visit(addr, name, Verify::No, false).await?;
    }
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
    for name in hot.iter() {
        client.visit(addr, name, Verify::No, true).await?;
    }
    let resumed = load(&client, &server, hot.clone(), Draw::Uniform, top, args.seconds, Mode::Resumed).await?;
    let keepalive = load(&client, &server, hot.clone(), Draw::Uniform, top, args.seconds, Mode::KeepAlive).await?;
    let (rss_after, pss_after) = server.memory_mib();
    let full_rate = phases[&format!("hot_c{top}")]["rate"].as_f64().unwrap_or(0.0);
    Ok(json!({
        "config": config,
        "n": setup.n,
        "key": setup.key,
        "startup_s": startup,
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
    }))
}

/// (client cores, server core) for `--pin`: the last core serves, the others load.
fn pinned_cores() -> Result<(String, String)> {
    let cores = std::thread::available_parallelism()?.get();
    anyhow::ensure!(cores >= 2, "--pin needs at least 2 cores");
    Ok((format!("0-{}", cores - 2), (cores - 1).to_string()))
}

/// A server process, pinned to the server core under `--pin` (nginx's workers inherit the affinity).
fn server_command(args: &Args, program: &std::ffi::OsStr) -> Command {
    match pinned_cores() {
        Ok((_, server)) if args.pin => {
            let mut command = Command::new("taskset");
            command.args(["-c", &server]).arg(program);
            command
        }
        _ => Command::new(program),
    }
}

/// Starts one configuration and waits for its first successful (verified) handshake; returns the start-up time.
async fn start_server(bench: &Bench<'_>, config: &str, setup: &Setup) -> Result<(Server, f64)> {
    let Bench { args, work, backend, redis_url } = *bench;
    let port = tokio::net::TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let started = Instant::now();
    let child = match config {
        "tern-static" | "tern-file" | "tern-redis" | "tern-static-idle-plugin" => {
            let path = work.join(format!("{config}.toml"));
            std::fs::write(&path, tern_config(config, setup, addr, backend, redis_url))?;
            server_command(args, args.tern.as_os_str())
                .args(["run", "-c"])
                .arg(&path)
                .stderr(std::fs::File::create(work.join(format!("{config}.log")))?)
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()?
        }
        "nginx-static" | "nginx-var" => {
            let prefix = work.join(config);
            std::fs::create_dir_all(prefix.join("logs"))?;
            let conf = prefix.join("nginx.conf");
            std::fs::write(&conf, nginx_config(config, setup, addr, backend, &prefix))?;
            server_command(args, "nginx".as_ref())
                .arg("-p")
                .arg(&prefix)
                .arg("-c")
                .arg(&conf)
                .args(["-g", "daemon off;"])
                .stderr(std::fs::File::create(work.join(format!("{config}.log")))?)
                .kill_on_drop(true)
                .spawn()?
        }
        other => bail!("unknown configuration {other}"),
    };
    let mut server = Server { child, addr };
    let client = Client::new(&setup.dir)?;
    // Start-up: until a handshake for a known name succeeds.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if client.visit(addr, &setup.names[0], Verify::Yes, false).await.is_ok() {
            break;
        }
        if let Some(status) = server.child.try_wait()? {
            let log = std::fs::read_to_string(work.join(format!("{config}.log"))).unwrap_or_default();
            bail!("{config} exited ({status}): {}", log.lines().take(3).collect::<Vec<_>>().join(" | "));
        }
        anyhow::ensure!(Instant::now() < deadline, "{config} did not serve within 600 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let startup = started.elapsed().as_secs_f64();
    Ok((server, startup))
}

/// Cache-hit throughput of the dynamic configurations against tern's static preload, measured without drift: all
/// configurations run at once, warmed on the hot set, and short phases alternate between them round by round
/// (rotating the order), so each round's ratio compares neighbours in time. Reports the median and range of the
/// per-round ratios of handshakes/s and of server CPU per handshake.
async fn compare_interleaved(bench: &Bench<'_>, configs: &[&str], setup: &Setup) -> Result<serde_json::Value> {
    let args = bench.args;
    let mut servers = Vec::new();
    for config in configs {
        servers.push(start_server(bench, config, setup).await?.0);
    }
    let client = Client::new(&setup.dir)?;
    let hot: Arc<Vec<String>> = Arc::new(setup.names.iter().take(1000).cloned().collect());
    for server in &servers {
        for name in hot.iter() {
            client.visit(server.addr, name, Verify::No, false).await?;
        }
    }
    let top = *args.concurrency.iter().max().unwrap_or(&64);
    let mut rates = vec![Vec::new(); servers.len()];
    let mut cpu = vec![Vec::new(); servers.len()];
    let mut errors = vec![0u64; servers.len()];
    // (handshakes, server CPU-seconds) summed over all rounds: the ratio of totals is steadier than any round's.
    let mut totals = vec![(0.0f64, 0.0f64); servers.len()];
    for round in 0..args.ab_rounds {
        for k in 0..servers.len() {
            let i = (round + k) % servers.len();
            let phase =
                load(&client, &servers[i], hot.clone(), Draw::Uniform, top, args.ab_seconds, Mode::Full).await?;
            errors[i] += phase["errors"].as_u64().unwrap_or(0);
            let count = phase["count"].as_f64().unwrap_or(0.0);
            totals[i].0 += count;
            totals[i].1 += phase["server_cpu_s_per_1k"].as_f64().unwrap_or(0.0) * count / 1000.0;
            rates[i].push(phase["rate"].as_f64().unwrap_or(0.0));
            cpu[i].push(phase["server_cpu_s_per_1k"].as_f64().unwrap_or(0.0));
        }
    }
    let mut result = serde_json::Map::new();
    for i in 1..servers.len() {
        let mut rate_ratio: Vec<f64> = (0..args.ab_rounds).map(|r| rates[i][r] / rates[0][r].max(1e-9)).collect();
        let mut cpu_ratio: Vec<f64> = (0..args.ab_rounds).map(|r| cpu[i][r] / cpu[0][r].max(1e-9)).collect();
        let rate_median = median(&mut rate_ratio);
        let cpu_median = median(&mut cpu_ratio);
        let rate_total = totals[i].0 / totals[0].0.max(1.0);
        let cpu_total = (totals[i].1 / totals[i].0.max(1.0)) / (totals[0].1 / totals[0].0.max(1.0)).max(1e-12);
        println!(
            "interleaved n={} {}: {} / tern-static handshakes/s x{rate_total:.3} over all rounds, median x{rate_median:.3} (rounds {:.3}..{:.3}); server CPU per handshake x{cpu_total:.3} over all rounds, median x{cpu_median:.3} (rounds {:.3}..{:.3})",
            setup.n,
            setup.key,
            configs[i],
            rate_ratio[0],
            rate_ratio[rate_ratio.len() - 1],
            cpu_ratio[0],
            cpu_ratio[cpu_ratio.len() - 1]
        );
        result.insert(
            configs[i].to_string(),
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
            }),
        );
    }
    Ok(json!({
        "n": setup.n,
        "key": setup.key,
        "rounds": args.ab_rounds,
        "seconds": args.ab_seconds,
        "concurrency": top,
        "static_rates": rates[0],
        "static_cpu_s_per_1k": cpu[0],
        "static_errors": errors[0],
        "vs_static": result,
    }))
}

/// Sorts `values` and returns the median.
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// A `[[certificate]]` entry for every host of the set (tern's static preload).
fn static_certificates(setup: &Setup) -> String {
    let dir = setup.dir.display();
    setup
        .names
        .iter()
        .map(|name| {
            format!("[[certificate]]\nname = \"{name}\"\ncert = \"{dir}/{name}.crt\"\nkey = \"{dir}/{name}.key\"\n")
        })
        .collect()
}

fn tern_config(config: &str, setup: &Setup, addr: SocketAddr, backend: SocketAddr, redis_url: &str) -> String {
    let dir = setup.dir.display();
    let mut text = format!(
        "[log]\nlevel = \"warn\"\naccess = false\n\n[cache]\nmax_entries = {}\n\n",
        (setup.n + 1000).max(100_000)
    );
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/wasm32-wasip2/release");
    match config {
        "tern-static" => {
            text += &static_certificates(setup);
            text += &format!("\n[[listener]]\nbind = \"{addr}\"\nstrict = true\nbackend = \"http://{backend}\"\n");
        }
        // Diagnostic: the static preload plus a file plugin on the listener that is never asked (every name is
        // static). Separates what a loaded plugin runtime costs a process from what the cache lookup costs.
        "tern-static-idle-plugin" => {
            text += &static_certificates(setup);
            text += &format!(
                "[[plugin]]\nname = \"files\"\npath = \"{}\"\ngrants.files = \"{dir}\"\n\n\
                 [[listener]]\nbind = \"{addr}\"\nplugin = \"files\"\nstrict = true\nbackend = \"http://{backend}\"\n",
                plugins.join("file_path.wasm").display()
            );
        }
        "tern-file" => {
            text += &format!(
                "[[plugin]]\nname = \"files\"\npath = \"{}\"\ngrants.files = \"{dir}\"\n\n\
                 [[listener]]\nbind = \"{addr}\"\nplugin = \"files\"\nstrict = true\nbackend = \"http://{backend}\"\n",
                plugins.join("file_path.wasm").display()
            );
        }
        _ => {
            let prefix = &setup.prefix;
            text += &format!(
                "[[redis]]\nname = \"certs\"\nurls = [\"{redis_url}\"]\n\n\
                 [[plugin]]\nname = \"redis\"\npath = \"{}\"\n\
                 settings = {{ cert_key = \"{prefix}{{name}}.crt\", key_key = \"{prefix}{{name}}.key\" }}\n\
                 grants.kv = {{ redis = \"certs\", prefixes = [\"{prefix}\"] }}\n\n\
                 [[listener]]\nbind = \"{addr}\"\nplugin = \"redis\"\nstrict = true\nbackend = \"http://{backend}\"\n",
                plugins.join("redis_plugin.wasm").display()
            );
        }
    }
    text
}

fn nginx_config(config: &str, setup: &Setup, addr: SocketAddr, backend: SocketAddr, prefix: &Path) -> String {
    let dir = setup.dir.display();
    let mut text = format!(
        "user root;\nworker_processes 2;\npid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log warn;\n\
         worker_rlimit_nofile 65536;\nevents {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  server_names_hash_max_size 1048576;\n  server_names_hash_bucket_size 128;\n\
         ssl_protocols TLSv1.2 TLSv1.3;\n  ssl_session_cache shared:SSL:50m;\n  ssl_session_tickets on;\n\
         upstream backend {{ server {backend}; keepalive 64; }}\n",
        prefix = prefix.display()
    );
    let location =
        "location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }";
    match config {
        "nginx-static" => {
            for (i, name) in setup.names.iter().enumerate() {
                let default = if i == 0 { " default_server" } else { "" };
                text += &format!(
                    "  server {{ listen {addr} ssl{default}; server_name {name}; \
                     ssl_certificate {dir}/{name}.crt; ssl_certificate_key {dir}/{name}.key; {location} }}\n"
                );
            }
        }
        _ => {
            text += &format!(
                "  server {{ listen {addr} ssl default_server; server_name _; \
                 ssl_certificate {dir}/$ssl_server_name.crt; ssl_certificate_key {dir}/$ssl_server_name.key; {location} }}\n"
            );
        }
    }
    text + "}\n"
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verify {
    Yes,
    No,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Full,
    Resumed,
    KeepAlive,
}

#[derive(Clone, Copy)]
enum Draw {
    Uniform,
    Zipf,
}

/// TLS client configs: verifying, not verifying (load phases: the client's CPU is precious), resuming.
#[derive(Clone)]
struct Client {
    verifying: Arc<rustls::ClientConfig>,
    fast: Arc<rustls::ClientConfig>,
    resuming: Arc<rustls::ClientConfig>,
}

impl Client {
    fn new(dir: &Path) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from_pem_file(dir.join("ca.crt"))?)?;
        // Cipher suites in browsers' order (Chrome, Firefox and Safari offer TLS_AES_128_GCM_SHA256 first; rustls
        // and OpenSSL clients offer AES-256 first). Every server here honours the client's order, so all of them
        // negotiate the same suite; X25519 is the key exchange throughout.
        let mut provider = (**tern::crypto::provider()).clone();
        provider.cipher_suites.sort_by_key(|suite| {
            (
                matches!(suite, rustls::SupportedCipherSuite::Tls12(_)),
                !format!("{:?}", suite.suite()).contains("AES_128"),
            )
        });
        let provider = Arc::new(provider);
        let base =
            rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let mut verifying = base.clone().with_root_certificates(roots).with_no_client_auth();
        verifying.resumption = rustls::client::Resumption::disabled();
        verifying.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut fast = verifying.clone();
        fast.dangerous().set_certificate_verifier(Arc::new(tern_bench::AcceptAll(provider)));
        let mut resuming = fast.clone();
        // rustls remembers size ÷ 8 servers (8 TLS 1.3 tickets each): room for 8,192 names, above the hot set.
        resuming.resumption = rustls::client::Resumption::in_memory_sessions(65_536);
        Ok(Self { verifying: Arc::new(verifying), fast: Arc::new(fast), resuming: Arc::new(resuming) })
    }

    /// One connection, one request; returns whether it resumed.
    async fn visit(&self, addr: SocketAddr, name: &str, verify: Verify, resume: bool) -> Result<(bool, Duration)> {
        let config = match (verify, resume) {
            (Verify::Yes, _) => self.verifying.clone(),
            (Verify::No, false) => self.fast.clone(),
            (Verify::No, true) => self.resuming.clone(),
        };
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let started = Instant::now();
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string())?;
        let mut tls = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(config).connect(server_name, tcp),
        )
        .await
        .context("handshake timed out")??;
        let handshake = started.elapsed();
        let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        tls.write_all(format!("GET / HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n").as_bytes()).await?;
        tls.flush().await?;
        let mut response = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut response)).await;
        anyhow::ensure!(response.starts_with(b"HTTP/1.1 200"), "no 200 for {name}");
        Ok((resumed, handshake))
    }
}

/// Runs `concurrency` workers for `seconds`; returns rate, latency percentiles, server and client CPU.
async fn load(
    client: &Client,
    server: &Server,
    names: Arc<Vec<String>>,
    draw: Draw,
    concurrency: usize,
    seconds: f64,
    mode: Mode,
) -> Result<serde_json::Value> {
    let zipf = Arc::new(match draw {
        Draw::Zipf => Some(zipf_cdf(names.len(), 1.0)),
        Draw::Uniform => None,
    });
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let server_cpu = server.cpu_seconds();
    let client_cpu = tern_bench::cpu_seconds(std::process::id())?;
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    let clients = Arc::new(client.clone());
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (names, zipf, done, errors, resumed, clients) =
            (names.clone(), zipf.clone(), done.clone(), errors.clone(), resumed.clone(), clients.clone());
        let addr = server.addr;
        workers.push(tokio::spawn(async move {
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (w as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
            let mut latencies = Vec::new();
            while Instant::now() < until {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let index = match zipf.as_ref() {
                    Some(cdf) => {
                        let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
                        cdf.partition_point(|&c| c < u).min(names.len() - 1)
                    }
                    None => (rng % names.len() as u64) as usize,
                };
                let name = &names[index];
                if mode == Mode::KeepAlive {
                    // A server may close a connection after some requests (nginx: `keepalive_requests`, 1,000
                    // by default); the answered requests still count, and the worker reconnects.
                    if keepalive(addr, &clients.fast, name, until, &done).await.is_err() {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                match clients.visit(addr, name, Verify::No, mode == Mode::Resumed).await {
                    Ok((r, t)) => {
                        done.fetch_add(1, Ordering::Relaxed);
                        resumed.fetch_add(u64::from(r), Ordering::Relaxed);
                        latencies.push(t);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let server_cpu = server.cpu_seconds() - server_cpu;
    let client_cpu = tern_bench::cpu_seconds(std::process::id())? - client_cpu;
    let done = done.load(Ordering::Relaxed);
    Ok(json!({
        "concurrency": concurrency,
        "count": done,
        "errors": errors.load(Ordering::Relaxed),
        "resumed": resumed.load(Ordering::Relaxed),
        "rate": done as f64 / elapsed,
        "p50_ms": percentile(&mut latencies, 0.5),
        "p99_ms": percentile(&mut latencies, 0.99),
        "server_cpu_s_per_1k": server_cpu * 1000.0 / (done.max(1) as f64),
        "server_cpu_share": server_cpu / elapsed,
        "client_cpu_share": client_cpu / elapsed,
    }))
}

/// One TLS connection, requests until `until` or until the server closes it; each answer is counted in `done`.
async fn keepalive(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    name: &str,
    until: Instant,
    done: &AtomicU64,
) -> Result<()> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(config.clone()).connect(server_name, tcp).await?;
    let request = format!("GET / HTTP/1.1\r\nhost: {name}\r\n\r\n");
    let mut buf = vec![0u8; 16 * 1024];
    while Instant::now() < until {
        tls.write_all(request.as_bytes()).await?;
        tls.flush().await?;
        // The backend's answer is small and has a content-length; read until its end.
        let mut got = Vec::new();
        loop {
            let n = tls.read(&mut buf).await?;
            if n == 0 && got.is_empty() {
                return Ok(()); // closed between requests
            }
            anyhow::ensure!(n > 0, "closed mid-response");
            got.extend_from_slice(&buf[..n]);
            if let Some(end) = find(&got, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                    .unwrap_or(0);
                if got.len() >= end + 4 + length {
                    break;
                }
            }
        }
        let closing = String::from_utf8_lossy(&got).to_ascii_lowercase().contains("connection: close");
        done.fetch_add(1, Ordering::Relaxed);
        if closing {
            return Ok(());
        }
    }
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut cdf = Vec::with_capacity(n);
    let mut total = 0.0;
    for k in 1..=n {
        total += 1.0 / (k as f64).powf(s);
        cdf.push(total);
    }
    for c in &mut cdf {
        *c /= total;
    }
    cdf
}

fn percentile(values: &mut [Duration], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort();
    values[((values.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3
}

/// A minimal HTTP/1.1 backend answering every request with a small 200 (keep-alive), on its own thread's runtime.
async fn spawn_backend() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else { continue };
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let mut buf = vec![0u8; 8192];
                    let mut pending = Vec::new();
                    loop {
                        let Ok(n) = tcp.read(&mut buf).await else { return };
                        if n == 0 {
                            return;
                        }
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = find(&pending, b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-type: text/plain\r\n\r\nok\n";
                            if tcp.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
    });
    Ok(addr)
}

async fn nginx_available(args: &Args) -> bool {
    let present = || std::process::Command::new("nginx").arg("-v").output().is_ok_and(|o| o.status.success());
    if present() {
        return true;
    }
    if args.no_install {
        println!("nginx not installed: nginx rows skipped");
        return false;
    }
    println!("installing nginx from Debian packages");
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-qq", "nginx-light"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .await;
    if !present() {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status().await;
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "nginx"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .await;
    }
    // Debian starts the packaged service; it listens on :80 and is not what we measure.
    let _ = Command::new("sh").args(["-c", "service nginx stop >/dev/null 2>&1 || true"]).status().await;
    present()
}

async fn machine_info(args: &Args) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<f64>().unwrap_or(0.0))
        })
        .unwrap_or(0.0)
        / 1024.0
        / 1024.0;
    let version = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| {
                let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                text.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_else(|_| "not installed".into())
    };
    format!(
        "machine: {cpu}, {cores} cores, {memory:.1} GiB; {}; {}; {}; {}; {}; client offers TLS_AES_128_GCM_SHA256 first (as browsers do), X25519",
        version(&args.tern.to_string_lossy(), "--version"),
        version("nginx", "-v"),
        version("openssl", "version"),
        version("redis-server", "--version"),
        if args.pin {
            "servers pinned to the last core, the client to the others"
        } else {
            "client and servers share the cores"
        },
    )
}

fn print_row(row: &serde_json::Value) {
    let top = &row["top_concurrency"];
    let hot = &row["phases"][format!("hot_c{top}")];
    let uniform = &row["phases"][format!("uniform_c{top}")];
    println!(
        "{:<13} n={:<7} {:<10} start {:>7.2}s rss {:>7.1}MiB pss {:>7.1}MiB | hot {:>6.0}/s p50 {:>5.2} p99 {:>6.2}ms cpu/1k {:.3}s | uniform {:>6.0}/s | cold p99 {:.2}ms warm p99 {:.2}ms | resumed x{:.2} rate, x{:.2} CPU | keep-alive {:.0} req/s",
        row["config"].as_str().unwrap_or(""),
        row["n"],
        row["key"].as_str().unwrap_or(""),
        row["startup_s"].as_f64().unwrap_or(0.0),
        row["rss_start_mib"].as_f64().unwrap_or(0.0),
        row["pss_start_mib"].as_f64().unwrap_or(0.0),
        hot["rate"].as_f64().unwrap_or(0.0),
        hot["p50_ms"].as_f64().unwrap_or(0.0),
        hot["p99_ms"].as_f64().unwrap_or(0.0),
        hot["server_cpu_s_per_1k"].as_f64().unwrap_or(0.0),
        uniform["rate"].as_f64().unwrap_or(0.0),
        row["cold_p99_ms"].as_f64().unwrap_or(0.0),
        row["warm_p99_ms"].as_f64().unwrap_or(0.0),
        row["resumed_over_full"].as_f64().unwrap_or(0.0),
        row["resumed_cost_ratio"].as_f64().unwrap_or(0.0),
        row["keepalive"]["rate"].as_f64().unwrap_or(0.0),
    );
}

fn write_results(
    args: &Args,
    machine: &str,
    rows: &[serde_json::Value],
    comparisons: &[serde_json::Value],
) -> Result<()> {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let json =
        json!({ "machine": machine, "seconds_per_phase": args.seconds, "rows": rows, "interleaved": comparisons });
    let mut md = format!("Machine: {machine}\n\n");
    md += "| config | N | key | start (s) | RSS (MiB) | PSS (MiB) | hot full hs/s | p50 / p99 (ms) | server CPU-s / 1k | uniform hs/s (c=max) | zipf hs/s | cold p50 / p99 (ms) | warm p50 / p99 (ms) | resumed ÷ full (hs/s) | resumed ÷ full (server CPU) | keep-alive req/s |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for row in rows {
        let top = &row["top_concurrency"];
        let pick = |prefix: &str| row["phases"][format!("{prefix}_c{top}")].clone();
        let (hot, uniform, zipf) = (pick("hot"), pick("uniform"), pick("zipf"));
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
        md += &format!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} / {:.2} | {:.3} | {:.0} | {:.0} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} | {:.2} | {:.0} |\n",
            row["config"].as_str().unwrap_or(""),
            row["n"],
            row["key"].as_str().unwrap_or(""),
            f(&row["startup_s"]),
            f(&row["rss_start_mib"]),
            f(&row["pss_start_mib"]),
            f(&hot["rate"]),
            f(&hot["p50_ms"]),
            f(&hot["p99_ms"]),
            f(&hot["server_cpu_s_per_1k"]),
            f(&uniform["rate"]),
            f(&zipf["rate"]),
            f(&row["cold_p50_ms"]),
            f(&row["cold_p99_ms"]),
            f(&row["warm_p50_ms"]),
            f(&row["warm_p99_ms"]),
            f(&row["resumed_over_full"]),
            f(&row["resumed_cost_ratio"]),
            f(&row["keepalive"]["rate"]),
        );
    }
    if !comparisons.is_empty() {
        md += "\nCache hits, dynamic ÷ tern-static, interleaved rounds (all servers up at once, hot set warmed): ratio of the totals over all rounds, then the median and range of the per-round ratios:\n\n";
        md += "| N | key | config | handshakes/s ratio, all rounds (median; range) | server CPU per handshake ratio, all rounds (median; range) | rounds × seconds |\n|---|---|---|---|---|---|\n";
        for c in comparisons {
            if let Some(map) = c["vs_static"].as_object() {
                for (config, r) in map {
                    let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
                    md += &format!(
                        "| {} | {} | {config} | {:.3} ({:.3}; {:.3}–{:.3}) | {:.3} ({:.3}; {:.3}–{:.3}) | {} × {} |\n",
                        c["n"],
                        c["key"].as_str().unwrap_or(""),
                        f("rate_ratio_total"),
                        f("rate_ratio_median"),
                        f("rate_ratio_min"),
                        f("rate_ratio_max"),
                        f("cpu_ratio_total"),
                        f("cpu_ratio_median"),
                        f("cpu_ratio_min"),
                        f("cpu_ratio_max"),
                        c["rounds"],
                        c["seconds"],
                    );
                }
            }
        }
    }
    for folder in [args.out.join(stamp.to_string()), args.out.join("latest")] {
        std::fs::create_dir_all(&folder)?;
        std::fs::write(folder.join("results.json"), serde_json::to_string_pretty(&json)?)?;
        std::fs::write(folder.join("results.md"), &md)?;
    }
    println!(
        "\n{md}\nwritten to {} and {}",
        args.out.join(stamp.to_string()).display(),
        args.out.join("latest").display()
    );
    Ok(())
}
