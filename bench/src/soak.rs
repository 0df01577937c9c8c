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

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Parser;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

#[derive(Debug, Parser)]
#[command(about = "Soak tern under mixed load with Redis outages, plugin swaps and certificate churn")]
struct Args {
    /// How long the load runs (after set-up and warm-up).
    #[arg(long, default_value_t = 30.0)]
    minutes: f64,
    /// The tern binary (default target/release/tern, else target/debug/tern).
    #[arg(long)]
    tern: Option<PathBuf>,
    /// The Redis plugin component.
    #[arg(long, default_value = "plugins/target/wasm32-wasip2/release/redis_plugin.wasm")]
    plugin: PathBuf,
    /// Output folder (default bench/results/soak-<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Certificates generated and imported into Redis.
    #[arg(long, default_value_t = 500)]
    certs: usize,
    /// Hot names (the first of the certificates), warmed before the clock starts.
    #[arg(long, default_value_t = 200)]
    hot: usize,
    /// Hot handshakes (each with one GET) per second.
    #[arg(long, default_value_t = 100.0)]
    hot_rate: f64,
    /// Hot connections in flight at most.
    #[arg(long, default_value_t = 4)]
    hot_clients: usize,
    /// Random-name handshakes per second.
    #[arg(long, default_value_t = 200.0)]
    flood_rate: f64,
    /// Random-name connections in flight at most.
    #[arg(long, default_value_t = 16)]
    flood_clients: usize,
    /// Seconds between Redis outages (±20 %); the first comes after half of it.
    #[arg(long, default_value_t = 150.0)]
    redis_every: f64,
    /// Shortest outage, seconds.
    #[arg(long, default_value_t = 20.0)]
    redis_down_min: f64,
    /// Longest outage, seconds.
    #[arg(long, default_value_t = 40.0)]
    redis_down_max: f64,
    /// Seconds between plugin swaps.
    #[arg(long, default_value_t = 60.0)]
    swap_every: f64,
    /// Seconds between certificate re-issues.
    #[arg(long, default_value_t = 5.0)]
    churn_every: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10.0)]
    sample_every: f64,
    /// tern's `cache.ttl`, seconds.
    #[arg(long, default_value_t = 20)]
    cache_ttl: u64,
    /// tern's `cache.max_stale`, seconds (must outlast an outage).
    #[arg(long, default_value_t = 300)]
    max_stale: u64,
    /// Seed of the random choices (default: the clock).
    #[arg(long)]
    seed: Option<u64>,
}

const DOMAIN: &str = "soak.test";
const PREFIX: &str = "cert:";
const CHANNEL: &str = "tern:invalidate";
const IO_LIMIT: Duration = Duration::from_secs(10);
/// Failures written to failures.csv per class at most (all are counted).
const FAILURE_LOG_CAP: u64 = 10_000;
/// Plugin-call outcomes in `/metrics`, in column order (an outcome this tern does not export reads 0). `error`
/// includes `store_unavailable`, and `trap` includes `memory_limit` and `memory_budget`.
const OUTCOMES: [&str; 11] = [
    "found",
    "not_found",
    "error",
    "store_unavailable",
    "rate_limited",
    "client_rate_limited",
    "circuit_open",
    "trap",
    "memory_limit",
    "memory_budget",
    "timeout",
];

fn outcome(name: &str) -> usize {
    OUTCOMES.iter().position(|o| *o == name).unwrap_or(0)
}
const SELECTIONS: [&str; 6] = ["static", "cache_hit", "cache_negative_hit", "cache_miss", "stale", "default"];

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
    anyhow::ensure!(args.hot > 0 && args.hot <= args.certs, "--hot must be 1..=--certs");
    anyhow::ensure!(args.redis_down_min <= args.redis_down_max, "--redis-down-min > --redis-down-max");
    let tern = match &args.tern {
        Some(path) => path.clone(),
        None if Path::new("target/release/tern").exists() => PathBuf::from("target/release/tern"),
        None => PathBuf::from("target/debug/tern"),
    };
    anyhow::ensure!(tern.exists(), "{} missing (cargo build -p tern)", tern.display());
    anyhow::ensure!(
        args.plugin.exists(),
        "{} missing (cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml)",
        args.plugin.display()
    );
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("bench/results/soak-{stamp}")));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = std::path::absolute(&out)?;
    let work = tempfile::tempdir()?;
    let dir = std::path::absolute(work.path())?;
    let seed = args
        .seed
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1);

    // Certificates: a CA, `certs` host certificates and the default certificate.
    let started = Instant::now();
    let ca = Arc::new(tern_fixtures::TestCa::new("tern soak CA")?);
    std::fs::write(dir.join("ca.crt"), ca.pem())?;
    let certs_dir = dir.join("certs");
    std::fs::create_dir_all(&certs_dir)?;
    let names: Arc<Vec<String>> = Arc::new((0..args.certs).map(|i| format!("host{i}.{DOMAIN}")).collect());
    for name in names.iter() {
        let (chain, key) = ca.issue(&[name])?;
        std::fs::write(certs_dir.join(format!("{name}.crt")), chain)?;
        std::fs::write(certs_dir.join(format!("{name}.key")), key)?;
    }
    let (default_chain, default_key) = ca.issue(&[&format!("default.{DOMAIN}")])?;
    std::fs::write(dir.join("default.crt"), &default_chain)?;
    std::fs::write(dir.join("default.key"), default_key)?;
    let default_leaf = CertificateDer::from_pem_slice(default_chain.as_bytes())?;

    // Two builds of the same plugin with different hashes: the second carries one more custom section.
    let component = std::fs::read(&args.plugin)?;
    std::fs::write(dir.join("plugin-a.wasm"), &component)?;
    std::fs::write(dir.join("plugin-b.wasm"), with_custom_section(&component, "tern-soak", b"build b"))?;

    // Redis, below the ephemeral port range so no outgoing connection takes its port while it is down.
    let redis_dir = dir.join("redis");
    std::fs::create_dir_all(&redis_dir)?;
    let mut redis = Redis { port: quiet_port(seed)?, dir: redis_dir, log: out.join("redis.log"), child: None };
    redis.start().await?;
    let redis_url = format!("redis://127.0.0.1:{}", redis.port);
    let import = std::process::Command::new(&tern)
        .args(["certs", "import"])
        .arg(&certs_dir)
        .args(["--redis", &redis_url, "--prefix", PREFIX])
        .output()
        .context("tern certs import")?;
    anyhow::ensure!(import.status.success(), "certs import: {}", String::from_utf8_lossy(&import.stderr));
    println!(
        "soak: {} certificates generated and imported in {:.1?} ({})",
        args.certs,
        started.elapsed(),
        String::from_utf8_lossy(&import.stdout).lines().last().unwrap_or("").trim()
    );

    // tern: one listener behind the Redis plugin, default certificate for unknown names, admin, invalidation.
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let listen: SocketAddr = format!("127.0.0.1:{}", quiet_port(seed ^ 0x9e37)?).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", quiet_port(seed ^ 0x7f4a)?).parse()?;
    let setup = Setup {
        dir: dir.clone(),
        redis_url: redis_url.clone(),
        backend,
        listen,
        admin,
        probe: names[0].clone(),
        cache_ttl: args.cache_ttl,
        max_stale: args.max_stale,
    };
    let config_path = dir.join("tern.toml");
    setup.write_config(&config_path, "plugin-a.wasm")?;
    std::fs::copy(&config_path, out.join("tern.toml"))?;
    let mut tern_child = Command::new(&tern)
        .args(["run", "-c"])
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(out.join("tern.log"))?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", tern.display()))?;
    let pid = tern_child.id().context("tern has no pid")?;
    wait_ready(&mut tern_child, admin).await?;
    println!("tern {} (pid {pid}) on {listen}, admin {admin}, redis {redis_url}, backend {backend}", tern.display());

    let clients = Clients::new(&ca)?;
    // Warm-up: every hot name once, verified, so the hot set is cached before the clock starts.
    let warm = Instant::now();
    let mut warm_set = JoinSet::new();
    let permits = Arc::new(Semaphore::new(8));
    for name in &names[..args.hot] {
        let name = name.clone();
        let (client, permit) = (clients.verify.clone(), permits.clone().acquire_owned().await?);
        warm_set.spawn(async move {
            let result = handshake(client, listen, &name).await;
            drop(permit);
            result.with_context(|| format!("warming {name}"))
        });
    }
    while let Some(joined) = warm_set.join_next().await {
        joined??;
    }
    println!("warmed {} hot names in {:.1?}", args.hot, warm.elapsed());

    let minutes = args.minutes;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(minutes * 60.0);
    let shared = Arc::new(Shared {
        start,
        deadline,
        hot: Class::default(),
        flood: Class::default(),
        churn: Churn::default(),
        redis_up: std::sync::atomic::AtomicBool::new(true),
        redis_lock: tokio::sync::Mutex::new(()),
        events: Mutex::new(Vec::new()),
        failures: Mutex::new(FailureLog::new(&out.join("failures.csv"))?),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Ctx {
        shared: shared.clone(),
        clients: clients.clone(),
        listen,
        admin,
        names: names.clone(),
        hot: args.hot,
        stop: stop_rx,
    };
    println!(
        "running {minutes} min: hot {}/s (≤{} in flight), flood {}/s (≤{}), redis outage every ~{}s for {}–{}s, \
         swap every {}s, churn every {}s, cache ttl {}s, max_stale {}s, seed {seed}",
        args.hot_rate,
        args.hot_clients,
        args.flood_rate,
        args.flood_clients,
        args.redis_every,
        args.redis_down_min,
        args.redis_down_max,
        args.swap_every,
        args.churn_every,
        args.cache_ttl,
        args.max_stale,
    );
    print_sample_header();

    let mut tasks: JoinSet<Result<&'static str>> = JoinSet::new();
    {
        let ctx = ctx.clone();
        let (rate, clients) = (args.hot_rate, args.hot_clients);
        tasks.spawn(async move { hot_load(ctx, rate, clients, seed ^ 1).await.map(|()| "hot") });
    }
    {
        let ctx = ctx.clone();
        let (rate, clients, leaf) = (args.flood_rate, args.flood_clients, default_leaf.clone());
        tasks.spawn(async move { flood_load(ctx, rate, clients, leaf, seed ^ 2).await.map(|()| "flood") });
    }
    {
        let ctx = ctx.clone();
        let (ca, certs_dir, url, every) = (ca.clone(), certs_dir.clone(), redis_url.clone(), args.churn_every);
        tasks.spawn(async move { churn(ctx, ca, certs_dir, url, every, seed ^ 3).await.map(|()| "churn") });
    }
    {
        let ctx = ctx.clone();
        let (setup, config_path, every) = (setup.clone(), config_path.clone(), args.swap_every);
        tasks.spawn(async move { swaps(ctx, setup, config_path, pid, every).await.map(|()| "swaps") });
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

    // Until the deadline, tern dying, Ctrl-C, or a task failing; then the same orderly stop.
    let mut early = None;
    tokio::select! {
        _ = tokio::time::sleep_until(deadline.into()) => {}
        status = tern_child.wait() => {
            early = Some(format!("tern exited during the soak: {status:?}"));
        }
        _ = tokio::signal::ctrl_c() => {
            early = Some("interrupted (Ctrl-C)".to_string());
        }
        Some(joined) = tasks.join_next() => {
            early = match joined {
                // The load tasks end by themselves at the deadline too; that race is no early stop.
                Ok(Ok(_)) if Instant::now() + Duration::from_secs(2) >= deadline => None,
                Ok(Ok(name)) => Some(format!("task {name} ended early")),
                Ok(Err(err)) => Some(format!("a task failed: {err:#}")),
                Err(err) => Some(format!("a task panicked: {err}")),
            };
        }
    }
    if let Some(reason) = &early {
        eprintln!("stopping early: {reason}");
        shared.event("early_stop", reason);
    }
    let elapsed = start.elapsed();
    stop_tx.send_replace(true);
    let drain = async {
        while let Some(joined) = tasks.join_next().await {
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
    // The sampler takes one last sample after the load has stopped.
    let samples = match tokio::time::timeout(Duration::from_secs(30), sampler).await {
        Ok(Ok(Ok(samples))) => samples,
        Ok(Ok(Err(err))) => bail!("sampler: {err:#}"),
        Ok(Err(err)) => bail!("sampler panicked: {err}"),
        Err(_) => bail!("sampler did not finish"),
    };
    let redis = match tokio::time::timeout(Duration::from_secs(30), chaos).await {
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

    // Graceful stop: SIGTERM, then tern should exit 0 within its shutdown grace.
    let exit = match tern_child.try_wait()? {
        Some(status) => format!("already exited: {status}"),
        None => {
            signal(pid, "TERM")?;
            match tokio::time::timeout(Duration::from_secs(20), tern_child.wait()).await {
                Ok(status) => status.map_or_else(|e| format!("wait failed: {e}"), |s| s.to_string()),
                Err(_) => {
                    tern_child.start_kill()?;
                    tern_child.wait().await?;
                    "did not stop within 20 s of SIGTERM; killed".to_string()
                }
            }
        }
    };
    drop(redis);
    let log = std::fs::read_to_string(out.join("tern.log")).unwrap_or_default();
    let log_levels: BTreeMap<&str, usize> = ["WARN", "ERROR"]
        .into_iter()
        .map(|level| (level, log.lines().filter(|l| l.contains(&format!(" {level} "))).count()))
        .collect();
    let clean_exit = exit == "exit status: 0";
    let summary = summarize(&args, &shared, &samples, elapsed, &exit, &log_levels, early.as_deref(), seed);
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    write_events(&shared, &out.join("events.csv"))?;
    print_summary(&summary);
    println!(
        "\nwritten to {} (target/plot-venv/bin/python bench/plot-soak.py {} draws soak.png)",
        out.display(),
        out.display()
    );
    let cached_failures = summary["cached_name_failures"].as_u64().unwrap_or(u64::MAX);
    Ok(cached_failures == 0 && early.is_none() && clean_exit)
}

// ---------------------------------------------------------------------------------------------------------------
// Shared state

#[derive(Debug)]
struct Shared {
    start: Instant,
    deadline: Instant,
    hot: Class,
    flood: Class,
    churn: Churn,
    redis_up: std::sync::atomic::AtomicBool,
    /// Held by the churn task while a name is invalidated and not yet re-cached, and by the chaos task for a
    /// whole outage: a name is never invalidated while Redis is down.
    redis_lock: tokio::sync::Mutex<()>,
    events: Mutex<Vec<(f64, String, String)>>,
    failures: Mutex<FailureLog>,
}

impl Shared {
    fn t(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn event(&self, kind: &str, detail: &str) {
        lock(&self.events).push((self.t(), kind.to_string(), detail.to_string()));
    }

    fn failure(&self, class: &str, name: &str, stage: &str, err: &anyhow::Error) {
        let t = self.t();
        let up = self.redis_up.load(Relaxed);
        lock(&self.failures).record(t, class, name, stage, up, err);
    }
}

/// Counters of one load class.
#[derive(Debug, Default)]
struct Class {
    handshakes_ok: AtomicU64,
    handshakes_failed: AtomicU64,
    /// Handshakes that completed with the wrong certificate (flood: not the default one).
    wrong_certificate: AtomicU64,
    requests_ok: AtomicU64,
    requests_failed: AtomicU64,
    /// Handshake latencies (µs) since the last sample, and of the whole run.
    interval: Mutex<Vec<u32>>,
    all: Mutex<Vec<u32>>,
}

impl Class {
    fn latency(&self, took: Duration) {
        let us = took.as_micros().min(u32::MAX as u128) as u32;
        lock(&self.interval).push(us);
        lock(&self.all).push(us);
    }
}

#[derive(Debug, Default)]
struct Churn {
    issued: AtomicU64,
    /// The new leaf was seen by a handshake.
    observed: AtomicU64,
    /// The new leaf was not seen within 60 s.
    not_observed: AtomicU64,
    /// PUBLISH reached no subscriber (tern's subscription was down): only the TTL brings the new leaf.
    unheard: AtomicU64,
    /// Handshakes for the churned name that failed while watching for the new leaf (cached-name failures).
    probe_failed: AtomicU64,
    /// Writing to Redis failed.
    write_failed: AtomicU64,
    /// Milliseconds from PUBLISH to the first handshake showing the new leaf.
    latencies_ms: Mutex<Vec<f64>>,
}

/// failures.csv: the first `FAILURE_LOG_CAP` failures per class, and the first few on stderr.
#[derive(Debug)]
struct FailureLog {
    file: std::io::BufWriter<std::fs::File>,
    per_class: BTreeMap<String, u64>,
}

impl FailureLog {
    fn new(path: &Path) -> Result<Self> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
        writeln!(file, "t_s,class,name,stage,redis_up,error")?;
        Ok(Self { file, per_class: BTreeMap::new() })
    }

    fn record(&mut self, t: f64, class: &str, name: &str, stage: &str, redis_up: bool, err: &anyhow::Error) {
        let seen = self.per_class.entry(class.to_string()).or_default();
        *seen += 1;
        let message = format!("{err:#}").replace(['"', '\n'], "'");
        if *seen <= 5 {
            eprintln!("[{t:7.1}s] {class} {stage} failed for {name} (redis {}): {message}", up(redis_up));
        }
        if *seen <= FAILURE_LOG_CAP {
            let _ = writeln!(self.file, "{t:.3},{class},{name},{stage},{redis_up},\"{message}\"");
            let _ = self.file.flush();
        }
    }
}

fn up(redis_up: bool) -> &'static str {
    if redis_up { "up" } else { "down" }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What every task gets.
#[derive(Debug, Clone)]
struct Ctx {
    shared: Arc<Shared>,
    clients: Clients,
    listen: SocketAddr,
    admin: SocketAddr,
    names: Arc<Vec<String>>,
    hot: usize,
    stop: watch::Receiver<bool>,
}

impl Ctx {
    fn stopped(&self) -> bool {
        *self.stop.borrow() || Instant::now() >= self.shared.deadline
    }

    /// Sleeps `d`; false if the soak is stopping.
    async fn pause(&mut self, d: Duration) -> bool {
        let until = (Instant::now() + d).min(self.shared.deadline);
        let stopped = tokio::select! {
            _ = tokio::time::sleep_until(until.into()) => false,
            _ = self.stop.wait_for(|stop| *stop) => true,
        };
        !stopped && !self.stopped()
    }
}

/// A small xorshift64* generator: the bench needs no statistical quality, only no dependency.
#[derive(Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    /// Uniform in [lo, hi].
    fn between(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Load

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
async fn hot_load(ctx: Ctx, rate: f64, concurrency: usize, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let job_ctx = ctx.clone();
    paced(&ctx, rate, concurrency, move || {
        let ctx = job_ctx.clone();
        let name = ctx.names[rng.below(ctx.hot)].clone();
        async move {
            let stats = &ctx.shared.hot;
            let started = Instant::now();
            match connect(ctx.clients.verify.clone(), ctx.listen, &name).await {
                Err(err) => {
                    stats.handshakes_failed.fetch_add(1, Relaxed);
                    ctx.shared.failure("hot", &name, "handshake", &err);
                }
                Ok(mut tls) => {
                    stats.handshakes_ok.fetch_add(1, Relaxed);
                    stats.latency(started.elapsed());
                    match get(&mut tls, &name).await {
                        Ok(()) => stats.requests_ok.fetch_add(1, Relaxed),
                        Err(err) => {
                            ctx.shared.failure("hot", &name, "request", &err);
                            stats.requests_failed.fetch_add(1, Relaxed)
                        }
                    };
                }
            }
        }
    })
    .await
}

/// Random names nobody has: each must complete with the default certificate.
async fn flood_load(
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
            let started = Instant::now();
            match connect(ctx.clients.any.clone(), ctx.listen, &name).await {
                Err(err) => {
                    stats.handshakes_failed.fetch_add(1, Relaxed);
                    ctx.shared.failure("flood", &name, "handshake", &err);
                }
                Ok(mut tls) => {
                    stats.latency(started.elapsed());
                    if leaf(&tls).as_ref() == Some(&*default) {
                        stats.handshakes_ok.fetch_add(1, Relaxed);
                    } else {
                        stats.wrong_certificate.fetch_add(1, Relaxed);
                        ctx.shared.failure(
                            "flood",
                            &name,
                            "certificate",
                            &anyhow::anyhow!("not the default certificate"),
                        );
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(1), tls.shutdown()).await;
                }
            }
        }
    })
    .await
}

/// Re-issues a hot name's certificate, writes it with MSET, publishes an invalidation and watches for the new leaf.
async fn churn(
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
        let write = async {
            let mut conn = redis_conn(&url).await?;
            redis::cmd("MSET")
                .arg(format!("{PREFIX}{name}.crt"))
                .arg(&chain)
                .arg(format!("{PREFIX}{name}.key"))
                .arg(&key)
                .query_async::<()>(&mut conn)
                .await?;
            let receivers: u64 = redis::cmd("PUBLISH").arg(CHANNEL).arg(&name).query_async(&mut conn).await?;
            anyhow::Ok(receivers)
        };
        let receivers = match tokio::time::timeout(IO_LIMIT, write).await {
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
        let published = Instant::now();
        let mut seen = false;
        // The TTL bounds it without an invalidation; 60 s is past any sensible `--cache-ttl` here.
        while published.elapsed() < Duration::from_secs(60) && !ctx.stopped() {
            match handshake(ctx.clients.verify.clone(), ctx.listen, &name).await {
                Ok(leaf) if leaf == new_leaf => {
                    seen = true;
                    break;
                }
                Ok(_) => {}
                Err(err) => {
                    stats.probe_failed.fetch_add(1, Relaxed);
                    shared.failure("churn", &name, "handshake", &err);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if seen {
            stats.observed.fetch_add(1, Relaxed);
            lock(&stats.latencies_ms).push(published.elapsed().as_secs_f64() * 1e3);
        } else if !ctx.stopped() {
            stats.not_observed.fetch_add(1, Relaxed);
            shared.event("churn_not_observed", &name);
        }
        drop(guard);
    }
    Ok(())
}

/// Alternates the plugin between its two builds, by `POST /reload` and SIGHUP in turn.
async fn swaps(mut ctx: Ctx, setup: Setup, config_path: PathBuf, pid: u32, every: f64) -> Result<()> {
    let mut serving = "plugin-a.wasm";
    let mut round = 0u64;
    while ctx.pause(Duration::from_secs_f64(every)).await {
        let target = if serving == "plugin-a.wasm" { "plugin-b.wasm" } else { "plugin-a.wasm" };
        let before = plugin_status(ctx.admin).await.ok();
        setup.write_config(&config_path, target)?;
        round += 1;
        let up_before = ctx.shared.redis_up.load(Relaxed);
        let (trigger, outcome) = if round % 2 == 1 {
            let outcome = match admin_request(ctx.admin, "POST", "/reload").await {
                Ok((_, body)) => {
                    let report: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                    let swapped = report["swapped"].as_array().is_some_and(|a| a.iter().any(|p| p == "redis"));
                    if swapped { Ok(()) } else { Err(report["rejected"].to_string()) }
                }
                Err(err) => Err(format!("admin: {err:#}")),
            };
            ("admin", outcome)
        } else {
            signal(pid, "HUP")?;
            ("sighup", wait_for_swap(ctx.admin, target, before.as_ref()).await)
        };
        let up_after = ctx.shared.redis_up.load(Relaxed);
        let redis = if up_before == up_after {
            up(up_after).to_string()
        } else {
            format!("{}->{}", up(up_before), up(up_after))
        };
        match outcome {
            Ok(()) => {
                serving = target;
                ctx.shared.event("swap", &format!("{trigger} -> {target} (redis {redis})"));
            }
            Err(reason) => {
                let reason = reason.replace(['\n', ','], " ");
                ctx.shared.event("swap_rejected", &format!("{trigger} -> {target} (redis {redis}): {reason}"));
            }
        }
    }
    Ok(())
}

/// After a SIGHUP: the slot serves `target`, or the reload was rejected (a newer `last_error`).
async fn wait_for_swap(admin: SocketAddr, target: &str, before: Option<&serde_json::Value>) -> Result<(), String> {
    let old_error = before.map(|b| b["status"]["last_error"].clone());
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(status) = plugin_status(admin).await else { continue };
        if status["status"]["path"].as_str().is_some_and(|p| p.ends_with(target)) {
            return Ok(());
        }
        let error = &status["status"]["last_error"];
        if !error.is_null() && Some(error) != old_error.as_ref() {
            return Err(error[1].as_str().unwrap_or("rejected").to_string());
        }
    }
    Err("no swap and no rejection within 15 s of SIGHUP".to_string())
}

async fn plugin_status(admin: SocketAddr) -> Result<serde_json::Value> {
    let (_, body) = admin_request(admin, "GET", "/plugins").await?;
    let all: serde_json::Value = serde_json::from_str(&body)?;
    all.as_array()
        .and_then(|a| a.iter().find(|p| p["status"]["name"] == "redis"))
        .cloned()
        .context("no plugin named redis in /plugins")
}

/// Kills Redis (after SAVE) every `every` seconds (±20 %), keeps it down, restarts it from its RDB file.
async fn chaos(
    mut ctx: Ctx,
    mut redis: Redis,
    every: f64,
    (down_min, down_max): (f64, f64),
    seed: u64,
) -> Result<Redis> {
    let mut rng = Rng::new(seed);
    let shared = ctx.shared.clone();
    let mut wait = every / 2.0 * rng.between(0.8, 1.2);
    while ctx.pause(Duration::from_secs_f64(wait)).await {
        let down = rng.between(down_min, down_max);
        // An outage that cannot end before the deadline is not started.
        if Instant::now() + Duration::from_secs_f64(down + 10.0) > shared.deadline {
            break;
        }
        let guard = tokio::select! {
            guard = shared.redis_lock.lock() => guard,
            _ = ctx.stop.wait_for(|s| *s) => break,
        };
        redis.save_and_kill().await?;
        shared.redis_up.store(false, Relaxed);
        shared.event("redis_down", &format!("planned {down:.0}s"));
        let finished = ctx.pause(Duration::from_secs_f64(down)).await;
        redis.start().await?;
        shared.redis_up.store(true, Relaxed);
        shared.event("redis_up", "");
        drop(guard);
        if !finished {
            break;
        }
        wait = every * rng.between(0.8, 1.2);
    }
    // Redis lives until the end of the soak.
    let _ = ctx.stop.wait_for(|s| *s).await;
    Ok(redis)
}

// ---------------------------------------------------------------------------------------------------------------
// Sampling

#[derive(Debug, Clone, Default)]
struct Sample {
    t: f64,
    redis_up: bool,
    rss_kib: u64,
    hwm_kib: u64,
    fds: u64,
    threads: u64,
    cache_entries: f64,
    hot_ok: u64,
    hot_failed: u64,
    hot_requests_ok: u64,
    hot_requests_failed: u64,
    hot_p50_ms: f64,
    hot_p99_ms: f64,
    flood_ok: u64,
    flood_failed: u64,
    flood_wrong: u64,
    flood_p99_ms: f64,
    churn_issued: u64,
    churn_probe_failed: u64,
    calls: [f64; OUTCOMES.len()],
    selections: [f64; SELECTIONS.len()],
    swaps: f64,
    /// tern's own count of failed handshakes (every outcome but ok).
    tern_handshakes_failed: f64,
    /// /metrics could not be read.
    admin_failed: bool,
}

fn print_sample_header() {
    println!(
        "{:>7} {:>5} {:>8} {:>4} {:>4} {:>6} | {:>13} {:>7} | {:>13} {:>7} | {:>22} | {:>6} {:>5} {:>5}",
        "t",
        "redis",
        "rss MiB",
        "fds",
        "thr",
        "cache",
        "hot +ok/fail",
        "p99 ms",
        "flood +ok/fail",
        "p99 ms",
        "calls +found/nf/unav/open",
        "stale+",
        "swaps",
        "churn"
    );
}

fn print_sample(s: &Sample, prev: &Sample) {
    let d = |a: u64, b: u64| a.saturating_sub(b);
    let df = |i: usize| (s.calls[i] - prev.calls[i]).max(0.0);
    let stale = SELECTIONS.iter().position(|h| *h == "stale").map_or(0.0, |i| s.selections[i] - prev.selections[i]);
    println!(
        "{:>6.0}s {:>5} {:>8.1} {:>4} {:>4} {:>6} | {:>13} {:>7.1} | {:>13} {:>7.1} | {:>22} | {:>6} {:>5} {:>5}{}",
        s.t,
        up(s.redis_up),
        s.rss_kib as f64 / 1024.0,
        s.fds,
        s.threads,
        s.cache_entries,
        format!(
            "{}/{}",
            d(s.hot_ok, prev.hot_ok),
            d(s.hot_failed + s.hot_requests_failed, prev.hot_failed + prev.hot_requests_failed)
        ),
        s.hot_p99_ms,
        format!(
            "{}/{}",
            d(s.flood_ok, prev.flood_ok),
            d(s.flood_failed + s.flood_wrong, prev.flood_failed + prev.flood_wrong)
        ),
        s.flood_p99_ms,
        format!(
            "{}/{}/{}/{}",
            df(outcome("found")),
            df(outcome("not_found")),
            df(outcome("store_unavailable")),
            df(outcome("circuit_open"))
        ),
        stale,
        s.swaps,
        s.churn_issued,
        if s.admin_failed { "  (metrics unavailable)" } else { "" },
    );
}

fn csv_header() -> String {
    let mut columns: Vec<String> = "t_s,redis_up,rss_kib,hwm_kib,fds,threads,cache_entries,hot_ok,hot_failed,\
        hot_requests_ok,hot_requests_failed,hot_p50_ms,hot_p99_ms,flood_ok,flood_failed,flood_wrong,flood_p99_ms,\
        churn_issued,churn_probe_failed"
        .split(',')
        .map(|c| c.trim().to_string())
        .collect();
    columns.extend(OUTCOMES.iter().map(|o| format!("calls_{o}")));
    columns.extend(SELECTIONS.iter().map(|h| format!("sel_{h}")));
    columns.extend(["swaps", "tern_handshakes_failed", "admin_failed"].map(String::from));
    columns.join(",")
}

fn csv_line(s: &Sample) -> String {
    let mut fields = vec![
        format!("{:.1}", s.t),
        u8::from(s.redis_up).to_string(),
        s.rss_kib.to_string(),
        s.hwm_kib.to_string(),
        s.fds.to_string(),
        s.threads.to_string(),
        s.cache_entries.to_string(),
        s.hot_ok.to_string(),
        s.hot_failed.to_string(),
        s.hot_requests_ok.to_string(),
        s.hot_requests_failed.to_string(),
        format!("{:.2}", s.hot_p50_ms),
        format!("{:.2}", s.hot_p99_ms),
        s.flood_ok.to_string(),
        s.flood_failed.to_string(),
        s.flood_wrong.to_string(),
        format!("{:.2}", s.flood_p99_ms),
        s.churn_issued.to_string(),
        s.churn_probe_failed.to_string(),
    ];
    fields.extend(s.calls.iter().map(|v| v.to_string()));
    fields.extend(s.selections.iter().map(|v| v.to_string()));
    fields.push(s.swaps.to_string());
    fields.push(s.tern_handshakes_failed.to_string());
    fields.push(u8::from(s.admin_failed).to_string());
    fields.join(",")
}

/// One sample every `every` seconds until the stop, then a last one; each printed and appended to the CSV.
async fn sampler(mut ctx: Ctx, pid: u32, csv: PathBuf, every: f64) -> Result<Vec<Sample>> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(&csv)?);
    writeln!(file, "{}", csv_header())?;
    let mut samples = vec![take_sample(&ctx, pid).await];
    writeln!(file, "{}", csv_line(&samples[0]))?;
    file.flush()?;
    let mut next = Instant::now();
    loop {
        next += Duration::from_secs_f64(every);
        let running = ctx.pause(next.saturating_duration_since(Instant::now())).await;
        if !running {
            // Let the load drain, so the last sample counts everything.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let sample = take_sample(&ctx, pid).await;
        if let Some(prev) = samples.last() {
            print_sample(&sample, prev);
        }
        writeln!(file, "{}", csv_line(&sample))?;
        file.flush()?;
        samples.push(sample);
        if !running {
            return Ok(samples);
        }
    }
}

async fn take_sample(ctx: &Ctx, pid: u32) -> Sample {
    let shared = &ctx.shared;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse::<u64>().ok()).unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    let (hot_p50_ms, hot_p99_ms) = take_percentiles(&shared.hot);
    let (_, flood_p99_ms) = take_percentiles(&shared.flood);
    let mut sample = Sample {
        t: shared.t(),
        redis_up: shared.redis_up.load(Relaxed),
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        fds,
        threads: field("Threads:"),
        hot_ok: shared.hot.handshakes_ok.load(Relaxed),
        hot_failed: shared.hot.handshakes_failed.load(Relaxed),
        hot_requests_ok: shared.hot.requests_ok.load(Relaxed),
        hot_requests_failed: shared.hot.requests_failed.load(Relaxed),
        hot_p50_ms,
        hot_p99_ms,
        flood_ok: shared.flood.handshakes_ok.load(Relaxed),
        flood_failed: shared.flood.handshakes_failed.load(Relaxed),
        flood_wrong: shared.flood.wrong_certificate.load(Relaxed),
        flood_p99_ms,
        churn_issued: shared.churn.issued.load(Relaxed),
        churn_probe_failed: shared.churn.probe_failed.load(Relaxed),
        ..Sample::default()
    };
    match admin_request(ctx.admin, "GET", "/metrics").await {
        Ok((200, body)) => {
            let metrics = parse_metrics(&body);
            let get = |key: &str| metrics.get(key).copied().unwrap_or(0.0);
            for (i, outcome) in OUTCOMES.iter().enumerate() {
                sample.calls[i] = get(&format!("tern_plugin_calls_total{{plugin=\"redis\",outcome=\"{outcome}\"}}"));
            }
            for (i, how) in SELECTIONS.iter().enumerate() {
                sample.selections[i] = get(&format!("tern_selections_total{{how=\"{how}\"}}"));
            }
            sample.cache_entries = get("tern_cache_entries");
            sample.swaps = get("tern_plugin_swaps_total{plugin=\"redis\"}");
            sample.tern_handshakes_failed = metrics
                .iter()
                .filter(|(k, _)| k.starts_with("tern_handshakes_total{") && !k.contains("outcome=\"ok\""))
                .map(|(_, v)| v)
                .sum();
        }
        _ => sample.admin_failed = true,
    }
    sample
}

/// p50 and p99 (ms) of the latencies since the last call.
fn take_percentiles(class: &Class) -> (f64, f64) {
    let mut values = std::mem::take(&mut *lock(&class.interval));
    (percentile(&mut values, 0.50), percentile(&mut values, 0.99))
}

fn percentile(values: &mut [u32], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_unstable();
    values[((values.len() as f64 - 1.0) * q).round() as usize] as f64 / 1e3
}

/// Prometheus text to `name{labels}` → value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Summary

fn stats_u64(values: &[u64]) -> serde_json::Value {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let pick = |q: f64| sorted.get(((sorted.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0);
    json!({
        "min": sorted.first().copied().unwrap_or(0),
        "median": pick(0.5),
        "max": sorted.last().copied().unwrap_or(0),
        "first": values.first().copied().unwrap_or(0),
        "last": values.last().copied().unwrap_or(0),
    })
}

/// Least-squares slope of `ys` over `xs`, per hour.
fn slope_per_hour(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    if xs.len() < 3 {
        return 0.0;
    }
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let cov: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    if var == 0.0 { 0.0 } else { cov / var * 3600.0 }
}

fn summarize(
    args: &Args,
    shared: &Shared,
    samples: &[Sample],
    elapsed: Duration,
    exit: &str,
    log_levels: &BTreeMap<&str, usize>,
    early: Option<&str>,
    seed: u64,
) -> serde_json::Value {
    let last = samples.iter().rev().find(|s| !s.admin_failed).cloned().unwrap_or_default();
    let first = samples.first().cloned().unwrap_or_default();
    let class = |c: &Class| {
        let mut all = std::mem::take(&mut *lock(&c.all));
        let p50 = percentile(&mut all, 0.5);
        let p99 = percentile(&mut all, 0.99);
        json!({
            "handshakes_ok": c.handshakes_ok.load(Relaxed),
            "handshakes_failed": c.handshakes_failed.load(Relaxed),
            "wrong_certificate": c.wrong_certificate.load(Relaxed),
            "requests_ok": c.requests_ok.load(Relaxed),
            "requests_failed": c.requests_failed.load(Relaxed),
            "handshake_p50_ms": p50,
            "handshake_p99_ms": p99,
            "rate_per_s": (c.handshakes_ok.load(Relaxed) + c.handshakes_failed.load(Relaxed) + c.wrong_certificate.load(Relaxed)) as f64 / elapsed.as_secs_f64().max(1e-9),
        })
    };
    let hot = class(&shared.hot);
    let flood = class(&shared.flood);
    let churn = &shared.churn;
    let mut churn_ms = lock(&churn.latencies_ms).clone();
    churn_ms.sort_by(f64::total_cmp);
    let churn_pick =
        |q: f64| churn_ms.get(((churn_ms.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0);
    let events = lock(&shared.events).clone();
    let mut outages = Vec::new();
    let mut down_since = None;
    for (t, kind, _) in &events {
        match kind.as_str() {
            "redis_down" => down_since = Some(*t),
            "redis_up" => {
                if let Some(start) = down_since.take() {
                    outages.push(json!({ "start_s": start, "end_s": t, "seconds": t - start }));
                }
            }
            _ => {}
        }
    }
    if let Some(start) = down_since {
        outages.push(json!({ "start_s": start, "end_s": null, "seconds": null }));
    }
    let swaps: Vec<_> = events
        .iter()
        .filter(|(_, k, _)| k == "swap" || k == "swap_rejected")
        .map(|(t, k, d)| json!({ "t_s": t, "swapped": k == "swap", "detail": d }))
        .collect();
    let swapped = swaps.iter().filter(|s| s["swapped"] == true).count();
    // The trend over the second half of the run: by then the flood has filled the cache to its bound.
    let half = elapsed.as_secs_f64() / 2.0;
    let settled: Vec<&Sample> = samples.iter().filter(|s| s.t >= half && s.rss_kib > 0).collect();
    let rss_slope = slope_per_hour(
        &settled.iter().map(|s| s.t).collect::<Vec<_>>(),
        &settled.iter().map(|s| s.rss_kib as f64 / 1024.0).collect::<Vec<_>>(),
    );
    let fds_slope = slope_per_hour(
        &settled.iter().map(|s| s.t).collect::<Vec<_>>(),
        &settled.iter().map(|s| s.fds as f64).collect::<Vec<_>>(),
    );
    let live: Vec<&Sample> = samples.iter().filter(|s| s.rss_kib > 0).collect();
    let rss: Vec<u64> = live.iter().map(|s| s.rss_kib).collect();
    let fds: Vec<u64> = live.iter().map(|s| s.fds).collect();
    let threads: Vec<u64> = live.iter().map(|s| s.threads).collect();
    let calls: serde_json::Map<String, serde_json::Value> =
        OUTCOMES.iter().enumerate().map(|(i, o)| (o.to_string(), json!(last.calls[i] - first.calls[i]))).collect();
    let selections: serde_json::Map<String, serde_json::Value> = SELECTIONS
        .iter()
        .enumerate()
        .map(|(i, o)| (o.to_string(), json!(last.selections[i] - first.selections[i])))
        .collect();
    let cached_failures = shared.hot.handshakes_failed.load(Relaxed)
        + shared.hot.requests_failed.load(Relaxed)
        + churn.probe_failed.load(Relaxed);
    json!({
        "seed": seed,
        "minutes_planned": args.minutes,
        "seconds_run": elapsed.as_secs_f64(),
        "early_stop": early,
        "settings": {
            "certs": args.certs, "hot": args.hot, "hot_rate": args.hot_rate, "hot_clients": args.hot_clients,
            "flood_rate": args.flood_rate, "flood_clients": args.flood_clients, "redis_every_s": args.redis_every,
            "redis_down_s": [args.redis_down_min, args.redis_down_max], "swap_every_s": args.swap_every,
            "churn_every_s": args.churn_every, "sample_every_s": args.sample_every, "cache_ttl_s": args.cache_ttl,
            "max_stale_s": args.max_stale,
        },
        "cached_name_failures": cached_failures,
        "hot": hot,
        "flood": flood,
        "churn": {
            "issued": churn.issued.load(Relaxed),
            "observed": churn.observed.load(Relaxed),
            "not_observed": churn.not_observed.load(Relaxed),
            "invalidation_unheard": churn.unheard.load(Relaxed),
            "probe_failed": churn.probe_failed.load(Relaxed),
            "write_failed": churn.write_failed.load(Relaxed),
            "new_leaf_ms": { "p50": churn_pick(0.5), "p99": churn_pick(0.99), "max": churn_ms.last().copied().unwrap_or(0.0) },
        },
        "plugin_calls": calls,
        "selections": selections,
        "tern_handshakes_failed": last.tern_handshakes_failed - first.tern_handshakes_failed,
        "redis_outages": outages,
        "swaps": { "swapped": swapped, "rejected": swaps.len() - swapped, "tern_swaps_total": last.swaps, "events": swaps },
        "rss_kib": stats_u64(&rss),
        "rss_hwm_kib": live.last().map_or(0, |s| s.hwm_kib),
        "rss_slope_mib_per_hour_second_half": rss_slope,
        "fds": stats_u64(&fds),
        "fds_slope_per_hour_second_half": fds_slope,
        "threads": stats_u64(&threads),
        "cache_entries_last": last.cache_entries,
        "tern_exit": exit,
        "tern_log_lines": log_levels,
        "samples": samples.len(),
    })
}

fn print_summary(s: &serde_json::Value) {
    let n = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    println!("\nsummary ({:.0} s of load, seed {})", n(&s["seconds_run"]), s["seed"]);
    println!(
        "{:<8} {:>12} {:>10} {:>10} {:>12} {:>10} {:>9} {:>9} {:>9}",
        "class", "handshakes", "failed", "wrong cert", "requests", "failed", "rate/s", "p50 ms", "p99 ms"
    );
    for class in ["hot", "flood"] {
        let c = &s[class];
        let u = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
        let requests = |v: &serde_json::Value| if class == "hot" { u(v).to_string() } else { "-".to_string() };
        println!(
            "{:<8} {:>12} {:>10} {:>10} {:>12} {:>10} {:>9.1} {:>9.2} {:>9.2}",
            class,
            u(&c["handshakes_ok"]),
            u(&c["handshakes_failed"]),
            u(&c["wrong_certificate"]),
            requests(&c["requests_ok"]),
            requests(&c["requests_failed"]),
            n(&c["rate_per_s"]),
            n(&c["handshake_p50_ms"]),
            n(&c["handshake_p99_ms"]),
        );
    }
    println!(
        "cached-name failures (hot handshakes + hot requests + churned-name handshakes): {}",
        s["cached_name_failures"]
    );
    let c = &s["churn"];
    println!(
        "certificate churn: {} issued, new leaf seen {} (p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms), not seen {}, \
         invalidation heard by nobody {}, write failures {}",
        c["issued"],
        c["observed"],
        n(&c["new_leaf_ms"]["p50"]),
        n(&c["new_leaf_ms"]["p99"]),
        n(&c["new_leaf_ms"]["max"]),
        c["not_observed"],
        c["invalidation_unheard"],
        c["write_failed"],
    );
    let calls = s["plugin_calls"].as_object().map(|m| {
        m.iter().filter(|(_, v)| n(v) > 0.0).map(|(k, v)| format!("{k} {}", n(v))).collect::<Vec<_>>().join(", ")
    });
    println!("plugin calls by outcome (error includes store_unavailable): {}", calls.unwrap_or_default());
    let selections = s["selections"].as_object().map(|m| {
        m.iter().filter(|(_, v)| n(v) > 0.0).map(|(k, v)| format!("{k} {}", n(v))).collect::<Vec<_>>().join(", ")
    });
    println!("selections: {}", selections.unwrap_or_default());
    println!("tern's own failed-handshake count: {}", n(&s["tern_handshakes_failed"]));
    let outages = s["redis_outages"].as_array().cloned().unwrap_or_default();
    let down: f64 = outages.iter().map(|o| n(&o["seconds"])).sum();
    println!("redis outages: {} ({down:.0} s down in total)", outages.len());
    println!("plugin swaps: {} swapped, {} rejected", s["swaps"]["swapped"], s["swaps"]["rejected"]);
    for e in s["swaps"]["events"].as_array().into_iter().flatten() {
        if e["swapped"] == false {
            println!("  rejected at {:.0}s: {}", n(&e["t_s"]), e["detail"].as_str().unwrap_or(""));
        }
    }
    let kib = |v: &serde_json::Value| n(v) / 1024.0;
    let r = &s["rss_kib"];
    println!(
        "tern RSS MiB: min {:.1}, median {:.1}, max {:.1}, first {:.1}, last {:.1}; second-half slope {:+.1} MiB/h; peak (VmHWM) {:.1}",
        kib(&r["min"]),
        kib(&r["median"]),
        kib(&r["max"]),
        kib(&r["first"]),
        kib(&r["last"]),
        n(&s["rss_slope_mib_per_hour_second_half"]),
        kib(&s["rss_hwm_kib"]),
    );
    let f = &s["fds"];
    println!(
        "tern fds: min {}, max {}, first {}, last {}; second-half slope {:+.1}/h; threads {}–{}",
        f["min"],
        f["max"],
        f["first"],
        f["last"],
        n(&s["fds_slope_per_hour_second_half"]),
        s["threads"]["min"],
        s["threads"]["max"]
    );
    println!(
        "tern log: {} WARN, {} ERROR lines; exit after SIGTERM: {}",
        s["tern_log_lines"]["WARN"],
        s["tern_log_lines"]["ERROR"],
        s["tern_exit"].as_str().unwrap_or("")
    );
    if let Some(reason) = s["early_stop"].as_str() {
        println!("stopped early: {reason}");
    }
}

fn write_events(shared: &Shared, path: &Path) -> Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(file, "t_s,kind,detail")?;
    for (t, kind, detail) in lock(&shared.events).iter() {
        writeln!(file, "{t:.3},{kind},\"{}\"", detail.replace('"', "'"))?;
    }
    file.flush()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// Processes, config, network helpers

#[derive(Debug, Clone)]
struct Setup {
    dir: PathBuf,
    redis_url: String,
    backend: SocketAddr,
    listen: SocketAddr,
    admin: SocketAddr,
    probe: String,
    cache_ttl: u64,
    max_stale: u64,
}

impl Setup {
    /// Writes the config (atomically: tern may read it at any moment) with the plugin at `plugin_file`.
    fn write_config(&self, path: &Path, plugin_file: &str) -> Result<()> {
        let Setup { dir, redis_url, backend, listen, admin, probe, cache_ttl, max_stale } = self;
        let config = format!(
            "# Written by bench/src/soak.rs.\n\
             [server]\nhandshake_timeout = \"10s\"\nshutdown_grace = \"5s\"\n\n\
             [log]\nlevel = \"info\"\naccess = false\n\n\
             [cache]\nmax_entries = 20000\nttl = \"{cache_ttl}s\"\nnegative_ttl = \"30s\"\nmax_stale = \"{max_stale}s\"\n\n\
             [[redis]]\nname = \"certs\"\nurls = [\"{redis_url}\"]\ntimeout = \"250ms\"\n\n\
             [invalidation]\nredis = \"certs\"\nchannel = \"{CHANNEL}\"\n\n\
             [[certificate]]\nname = \"fallback\"\ncert = \"default.crt\"\nkey = \"default.key\"\nnames = []\n\n\
             [[plugin]]\nname = \"redis\"\npath = \"{plugin_file}\"\nprobe_names = [\"{probe}\"]\n\
             grants.kv = {{ redis = \"certs\", prefixes = [\"{PREFIX}\"] }}\n\
             settings = {{ cert_key = \"{PREFIX}{{name}}.crt\", key_key = \"{PREFIX}{{name}}.key\" }}\n\n\
             [[listener]]\nname = \"soak\"\nbind = \"{listen}\"\nplugin = \"redis\"\ndefault_certificate = \"fallback\"\n\
             backend = \"http://{backend}\"\n\n\
             [admin]\nbind = \"{admin}\"\n"
        );
        let tmp = dir.join(".tern.toml.tmp");
        std::fs::write(&tmp, config)?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }
}

/// `component` with one more custom section at the end (a different SHA-256, the same behaviour).
fn with_custom_section(component: &[u8], name: &str, payload: &[u8]) -> Vec<u8> {
    fn leb128(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut body = Vec::new();
    leb128(name.len(), &mut body);
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(payload);
    let mut out = component.to_vec();
    out.push(0);
    leb128(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

/// A free loopback port below the kernel's ephemeral range (so no outgoing connection can be given it).
fn quiet_port(seed: u64) -> Result<u16> {
    let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
    let low: u16 = range.split_whitespace().next().and_then(|s| s.parse().ok()).unwrap_or(32768);
    let mut rng = Rng::new(seed);
    if low > 11_000 {
        for _ in 0..500 {
            let port = 10_000 + rng.below(usize::from(low) - 10_000) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

#[derive(Debug)]
struct Redis {
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Redis {
    /// Starts redis-server (loading its RDB file if there is one) and waits until it answers PING.
    async fn start(&mut self) -> Result<()> {
        for attempt in 0..20 {
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
            let mut child = Command::new("redis-server")
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--dbfilename", "soak.rdb", "--dir"])
                .arg(&self.dir)
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .context("redis-server (scripts/setup.sh test installs it)")?;
            let url = format!("redis://127.0.0.1:{}", self.port);
            for _ in 0..500 {
                if child.try_wait()?.is_some() {
                    break;
                }
                let ping = async {
                    let mut conn = redis_conn(&url).await?;
                    anyhow::Ok(redis::cmd("PING").query_async::<String>(&mut conn).await?)
                };
                if matches!(tokio::time::timeout(Duration::from_secs(1), ping).await, Ok(Ok(_))) {
                    self.child = Some(child);
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            eprintln!("redis-server did not start on port {} (attempt {}), retrying", self.port, attempt + 1);
            let _ = child.start_kill();
            let _ = child.wait().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        bail!("redis-server would not start on port {}", self.port)
    }

    /// SAVE (so the restart has every certificate, churned ones included), then SIGKILL.
    async fn save_and_kill(&mut self) -> Result<()> {
        let url = format!("redis://127.0.0.1:{}", self.port);
        let save = async {
            let mut conn = redis_conn(&url).await?;
            redis::cmd("SAVE").query_async::<()>(&mut conn).await?;
            anyhow::Ok(())
        };
        tokio::time::timeout(IO_LIMIT, save).await.context("SAVE timed out")??;
        let mut child = self.child.take().context("redis is not running")?;
        child.start_kill()?;
        child.wait().await?;
        Ok(())
    }
}

async fn redis_conn(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    Ok(tokio::time::timeout(Duration::from_secs(2), client.get_multiplexed_async_connection())
        .await
        .context("redis connect timed out")??)
}

fn signal(pid: u32, name: &str) -> Result<()> {
    let status = std::process::Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status()?;
    anyhow::ensure!(status.success(), "kill -{name} {pid} failed");
    Ok(())
}

/// Until `/readyz` answers 200 (tern compiles the plugin first).
async fn wait_ready(child: &mut Child, admin: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("tern exited during start-up ({status}); see tern.log");
        }
        if matches!(admin_request(admin, "GET", "/readyz").await, Ok((200, _))) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "tern not ready within 120 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One admin request: (status, body).
async fn admin_request(admin: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    let exchange = async {
        let mut tcp = TcpStream::connect(admin).await?;
        let request =
            format!("{method} {path} HTTP/1.1\r\nhost: admin\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await?;
        let mut text = String::new();
        tcp.read_to_string(&mut text).await?;
        anyhow::Ok(text)
    };
    // A reload compiles a component, which takes seconds with a debug build.
    let text = tokio::time::timeout(Duration::from_secs(60), exchange).await.context("admin request timed out")??;
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("admin: no status line")?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((status, body))
}

/// TLS client configs: one verifying against the soak CA, one accepting anything (the flood checks the leaf).
#[derive(Debug, Clone)]
struct Clients {
    verify: Arc<rustls::ClientConfig>,
    any: Arc<rustls::ClientConfig>,
}

impl Clients {
    fn new(ca: &tern_fixtures::TestCa) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der())?;
        let provider = tern::crypto::provider().clone();
        let mut verify = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Full handshakes every time: resumption would skip certificate selection.
        verify.resumption = rustls::client::Resumption::disabled();
        verify.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut any = verify.clone();
        any.dangerous().set_certificate_verifier(Arc::new(tern_bench::AcceptAll(provider)));
        Ok(Self { verify: Arc::new(verify), any: Arc::new(any) })
    }
}

type Tls = tokio_rustls::client::TlsStream<TcpStream>;

async fn connect(config: Arc<rustls::ClientConfig>, addr: SocketAddr, name: &str) -> Result<Tls> {
    let tcp = tokio::time::timeout(IO_LIMIT, TcpStream::connect(addr)).await.context("connect timed out")??;
    tcp.set_nodelay(true)?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string())?;
    let tls = tokio::time::timeout(IO_LIMIT, tokio_rustls::TlsConnector::from(config).connect(server_name, tcp))
        .await
        .context("handshake timed out")??;
    Ok(tls)
}

fn leaf(tls: &Tls) -> Option<CertificateDer<'static>> {
    tls.get_ref().1.peer_certificates()?.first().map(|c| c.clone().into_owned())
}

/// A verified handshake and one GET; the leaf served.
async fn handshake(config: Arc<rustls::ClientConfig>, addr: SocketAddr, name: &str) -> Result<CertificateDer<'static>> {
    let mut tls = connect(config, addr, name).await?;
    let leaf = leaf(&tls).context("no peer certificate")?;
    get(&mut tls, name).await?;
    Ok(leaf)
}

async fn get(tls: &mut Tls, name: &str) -> Result<()> {
    tls.write_all(format!("GET /soak HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n").as_bytes()).await?;
    tls.flush().await?;
    let mut response = Vec::new();
    let read = tokio::time::timeout(IO_LIMIT, tls.read_to_end(&mut response)).await;
    match read {
        Err(_) => bail!("response timed out after {} bytes", response.len()),
        // A peer that closes without close_notify after a complete response is fine here.
        Ok(Err(err)) if response.is_empty() => Err(err.into()),
        Ok(_) => {
            let line = response.split(|b| *b == b'\n').next().unwrap_or_default();
            anyhow::ensure!(response.starts_with(b"HTTP/1.1 200"), "status {:?}", String::from_utf8_lossy(line).trim());
            Ok(())
        }
    }
}
