//! Certificates on demand, measured against a real ACME CA on loopback (Debian's Pebble, its default 5% `badNonce`
//! rejections left on, validation sleeps off), tern beside Debian's Caddy:
//!
//! 1. **time to first certificate**: `--sequential` names, one at a time (`--gap-ms` apart), each from its first
//!    handshake to the first handshake that presents a certificate chaining to Pebble's root (median, p99);
//! 2. **burst**: `--names` names at `--concurrency`, the same per name; wall time, orders made, failed handshakes
//!    (the fallback certificate, another certificate, errors, attempts past `--attempt-timeout`).
//!
//! tern runs as two nodes sharing one Redis, on 127.0.0.1:P and 127.0.0.2:P (P: Pebble's tlsPort), with the
//! acme-gate plugin (`settings.allow = ".allowed.test"`) answering `obtain`. Name `i` goes first to node `i % 2`,
//! a retry to the other node; Pebble's mock DNS sends the validation of name `i` to node `(i / 2) % 2`, so half
//! the challenges are answered by the node that did not order. After the burst every name is asked once on the
//! node that did not serve it first. Orders are the nodes' `tern_acme_orders_total`. `tern-race` is the same but
//! sends the first handshake of every name to both nodes at once (one order per name must still be made).
//!
//! Caddy runs as one node (Debian's build has no Redis storage module) with on-demand TLS, an `ask` endpoint
//! allowing the same names, TLS-ALPN-01 only, storage in the work folder; orders are counted from its storage
//! and its log. Each system gets its own, fresh Pebble, and one warm-up name before the clock starts (the ACME
//! account exists before any figure is taken). A phase in which no name is issued for `--stall` seconds stops
//! and says whether Pebble hung (see `diagnose`: Pebble 2.4.0 can deadlock under concurrent orders); such a run
//! is repeated on fresh processes, up to `--pebble-hang-retries` times, and counted in the row.
//!
//! ```text
//! cargo build --release -p tern -p tern-bench
//! cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
//! target/release/acme-bench --names 1000
//! ```
//!
//! Needs `pebble`, `redis-server` (scripts/setup.sh test installs both) and `caddy` (installed from Debian's
//! packages when missing, unless `--no-install`). Loopback only; every name, phase and system bounded in time.
//! Writes `results.json` and `results.md` into `--out` (default `bench/results/acme-<unix time>`).

mod caddy;
mod client;
mod tern_nodes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Parser;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use serde_json::{Value, json};
use tern_fixtures::pebble::{Pebble, PebbleOptions};

use crate::client::{Pace, Phase, Probe, confirm_elsewhere, run_phase};

#[derive(Debug, Parser)]
#[command(about = "Certificates on demand against Pebble: tern (two nodes on Redis) beside Debian's Caddy")]
pub struct Args {
    /// Names of the burst, obtained `--concurrency` at a time.
    #[arg(long, default_value_t = 1000)]
    pub names: usize,
    /// Names obtained one at a time first (time to first certificate without load); 0: none.
    #[arg(long, default_value_t = 50)]
    pub sequential: usize,
    /// Pause between two sequential names, ms (keeps Caddy's internal limit of 10 orders per 10 s out of the
    /// sequential figure).
    #[arg(long, default_value_t = 1100)]
    pub gap_ms: u64,
    /// Names in flight at once during the burst.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Systems to run, in order: tern, tern-race (the first handshake of every name on both nodes at once),
    /// caddy.
    #[arg(long, value_delimiter = ',', default_value = "tern,tern-race,caddy")]
    pub systems: Vec<String>,
    /// The tern binary.
    #[arg(long, default_value = "target/release/tern")]
    pub tern: PathBuf,
    /// The acme-gate test plugin (built with the plugins workspace).
    #[arg(long, default_value = "plugins/target/wasm32-wasip2/release/acme_gate.wasm")]
    pub plugin: PathBuf,
    /// tern's `acme.max_concurrent_orders`, per node.
    #[arg(long, default_value_t = 16)]
    pub max_concurrent_orders: usize,
    /// tern's `acme.handshake_wait`, seconds (`server.handshake_timeout` is 2 s more).
    #[arg(long, default_value_t = 8)]
    pub handshake_wait: u64,
    /// The client gives up on one handshake after this many seconds (counted as failed) and tries again.
    #[arg(long, default_value_t = 30.0)]
    pub attempt_timeout: f64,
    /// A name not served a certificate this many seconds after its first handshake counts as not issued.
    #[arg(long, default_value_t = 300.0)]
    pub name_timeout: f64,
    /// A phase stops when no name was issued for this many seconds (a hung CA), and says so.
    #[arg(long, default_value_t = 60.0)]
    pub stall: f64,
    /// Runs of a system repeated (fresh Pebble, Redis, servers) when Pebble deadlocked during it; the row says
    /// how many runs it took.
    #[arg(long, default_value_t = 3)]
    pub pebble_hang_retries: usize,
    /// Upper bound on one system's phases, minutes.
    #[arg(long, default_value_t = 40.0)]
    pub max_minutes: f64,
    /// Caddy's log level (INFO counts its orders; DEBUG also shows why handshakes failed).
    #[arg(long, default_value = "INFO")]
    pub caddy_log_level: String,
    /// Output folder (default bench/results/acme-<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep the work folder (configs, logs of tern, Caddy and Pebble) and print where it is.
    #[arg(long)]
    pub keep: bool,
    /// Do not install Caddy from Debian's packages when it is missing (skip its rows instead).
    #[arg(long)]
    pub no_install: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    // tern reads relative paths of its config from the config's folder (the work folder).
    args.plugin = std::path::absolute(&args.plugin)?;
    for system in &args.systems {
        anyhow::ensure!(
            ["tern", "tern-race", "caddy"].contains(&system.as_str()),
            "unknown system {system:?} (tern, tern-race, caddy)"
        );
    }
    if args.systems.iter().any(|s| s.starts_with("tern")) {
        anyhow::ensure!(args.tern.exists(), "{} missing (cargo build --release -p tern)", args.tern.display());
        anyhow::ensure!(
            args.plugin.exists(),
            "{} missing (cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml)",
            args.plugin.display()
        );
    }
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from(format!("bench/results/acme-{stamp}")));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let work = tempfile::Builder::new().prefix("acme-bench-").tempdir()?;
    let work_dir = std::path::absolute(work.path())?;
    let machine = machine_info(&args);
    println!("acme bench: {machine}");
    println!(
        "{} sequential names ({} ms apart), then {} names at concurrency {}; attempt timeout {} s, name timeout {} s",
        args.sequential, args.gap_ms, args.names, args.concurrency, args.attempt_timeout, args.name_timeout
    );
    let mut rows = Vec::new();
    'systems: for system in &args.systems {
        let mut hangs = Vec::new();
        let row = loop {
            let dir = work_dir.join(format!("{system}-{}", hangs.len() + 1));
            std::fs::create_dir_all(&dir)?;
            let run = async {
                match system.as_str() {
                    "tern" => Some(run_tern(&args, &dir, false).await),
                    "tern-race" => Some(run_tern(&args, &dir, true).await),
                    _ if caddy::available(args.no_install).await => Some(run_caddy(&args, &dir).await),
                    _ => None,
                }
            };
            // Interrupted: dropping the run kills what it started (Pebble, Redis, tern, Caddy); the rows so far
            // are written.
            let row = tokio::select! {
                row = run => row,
                signal = interrupted() => {
                    eprintln!("{system}: stopped by {signal}");
                    rows.push(json!({ "system": system, "error": format!("stopped by {signal}") }));
                    break 'systems;
                }
            };
            match row {
                Some(Ok(row))
                    if row["pebble_hang"]["pebble_answers_store_requests"] == false
                        && hangs.len() < args.pebble_hang_retries =>
                {
                    print_row(&row);
                    hangs.push(json!({ "burst": row["burst"], "pebble_hang": row["pebble_hang"] }));
                    println!(
                        "{system}: Pebble hung (deadlocked store, see pebble_hang); running {system} again on a fresh Pebble"
                    );
                }
                other => break other,
            }
        };
        match row {
            None => {}
            Some(Ok(mut row)) => {
                print_row(&row);
                row["runs_stopped_by_a_pebble_hang"] = hangs.into();
                rows.push(row);
            }
            Some(Err(err)) => {
                eprintln!("{system}: {err:#}");
                rows.push(
                    json!({ "system": system, "error": format!("{err:#}"), "runs_stopped_by_a_pebble_hang": hangs }),
                );
            }
        }
    }
    write_results(&args, &out, &machine, &rows, &work_dir)?;
    if args.keep {
        let kept = work.keep();
        println!("work folder kept: {}", kept.display());
    }
    Ok(())
}

/// SIGINT or SIGTERM.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
        (Ok(mut int), Ok(mut term)) => tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        _ => std::future::pending().await,
    }
}

/// Pebble with its defaults (5% badNonce, 50% authorization reuse), validation sleeps off, on fresh ports,
/// validating TLS-ALPN-01 on `tls_port`; with the httpPort it was given.
async fn start_pebble(tls_port: u16) -> Result<(Pebble, u16)> {
    let http_port = free_port().await?;
    Ok((Pebble::start(PebbleOptions::new(tls_port, http_port)).await?, http_port))
}

async fn free_port() -> Result<u16> {
    Ok(tokio::net::TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port())
}

fn deadline(args: &Args) -> Instant {
    Instant::now() + Duration::from_secs_f64(args.max_minutes * 60.0)
}

fn names(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}{i}.allowed.test")).collect()
}

/// tern's two nodes; with `race`, the first handshake of every name goes to both nodes at once.
async fn run_tern(args: &Args, work: &Path, race: bool) -> Result<Value> {
    let port = free_port().await?;
    let (pebble, _) = start_pebble(port).await?;
    let ca = tern_fixtures::TestCa::new("acme bench fallback CA")?;
    let (chain, key) = ca.issue(&["fallback.invalid"])?;
    std::fs::write(work.join("fallback.crt"), &chain)?;
    std::fs::write(work.join("fallback.key"), key)?;
    let fallback = CertificateDer::from_pem_slice(chain.as_bytes())?;
    let (redis, redis_port) = tern_bench::start_redis(work).await?;
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let directory = pebble.directory_url();
    let binds: [SocketAddr; 2] = [format!("127.0.0.1:{port}").parse()?, format!("127.0.0.2:{port}").parse()?];
    let mut nodes = Vec::new();
    for (name, bind) in ["a", "b"].into_iter().zip(binds) {
        nodes.push(
            tern_nodes::start(args, work, name, bind, &redis_url, &directory, pebble.directory_ca(), backend).await?,
        );
    }
    println!("tern: nodes on {} and {}, Redis {redis_url}, Pebble {directory}", binds[0], binds[1]);

    // The validation of name i goes to node (i / 2) % 2; its first handshake to node i % 2.
    let sequential = names("s", args.sequential);
    let burst = names("n", args.names);
    for list in [&sequential, &burst] {
        for (i, name) in list.iter().enumerate() {
            if (i / 2) % 2 == 1 {
                pebble.set_a(name, "127.0.0.2").await?;
            }
        }
    }
    let probe = Probe::new(&pebble.roots_pem().await?, Some(fallback), Duration::from_secs_f64(args.attempt_timeout))?;
    let end = deadline(args);
    warm_up(&probe, &binds, end).await?;
    let seq = run_phase(&probe, &binds, &sequential, Pace { race, ..sequential_pace(args, end) }).await;
    println!("tern: sequential phase done ({} of {} issued)", seq.issued(), seq.names);
    let (before, _) = tern_nodes::fleet_counters(&nodes).await?;
    let phase = run_phase(&probe, &binds, &burst, Pace { race, ..burst_pace(args, end) }).await;
    let (after_burst, _) = tern_nodes::fleet_counters(&nodes).await?;
    let pebble_hang = diagnose(&pebble, &[&seq, &phase], work).await;
    let issued: Vec<String> =
        burst.iter().zip(&phase.outcomes).filter(|(_, o)| o.issued_after.is_some()).map(|(n, _)| n.clone()).collect();
    let missed_elsewhere = confirm_elsewhere(&probe, &binds, &issued, args.concurrency).await;
    let (after, per_node) = tern_nodes::fleet_counters(&nodes).await?;
    let mut exits = Vec::new();
    for node in &mut nodes {
        exits.push(tern_nodes::stop(node).await?);
    }
    drop(redis);
    Ok(json!({
        "system": if race { "tern-race" } else { "tern" },
        "first_handshake": if race { "on both nodes at once" } else { "on node i % 2, retries on the other" },
        "version": command_line("tern", &[args.tern.to_string_lossy().as_ref(), "--version"]),
        "nodes": 2,
        "storage": "one Redis shared by both nodes",
        "challenge": "tls-alpn-01",
        "settings": tern_nodes::acme_settings(args),
        "sequential": phase_json(&seq),
        "burst": phase_json(&phase),
        "burst_orders": after_burst.minus(before).json(),
        "burst_orders_counted_from": "tern_acme_orders_total of both nodes, before and after the burst",
        "served_by_the_other_node": {
            "names": issued.len(),
            "not_served_at_once": missed_elsewhere,
            "orders_meanwhile": after.minus(after_burst).issued + after.minus(after_burst).failed,
        },
        "totals_per_node": per_node.iter().map(|c| c.json()).collect::<Vec<_>>(),
        "pebble_hang": pebble_hang,
        "exit": exits,
    }))
}

async fn run_caddy(args: &Args, work: &Path) -> Result<Value> {
    let https_port = free_port().await?;
    let (pebble, http_port) = start_pebble(https_port).await?;
    let (ask, asked) = caddy::spawn_ask_server().await?;
    let directory = pebble.directory_url();
    let mut server =
        caddy::start(work, https_port, http_port, &directory, pebble.directory_ca(), ask, &args.caddy_log_level)
            .await?;
    println!("caddy: {} on {}, Pebble {directory}", caddy::version(), server.listen);
    let sequential = names("s", args.sequential);
    let burst = names("n", args.names);
    let probe = Probe::new(&pebble.roots_pem().await?, None, Duration::from_secs_f64(args.attempt_timeout))?;
    let end = deadline(args);
    let targets = [server.listen];
    warm_up(&probe, &targets, end).await?;
    let seq = run_phase(&probe, &targets, &sequential, sequential_pace(args, end)).await;
    println!("caddy: sequential phase done ({} of {} issued)", seq.issued(), seq.names);
    let stored_before = caddy::stored_certificates(&server.storage);
    let (_, log_mark) = caddy::log_messages(&server.log, 0);
    let phase = run_phase(&probe, &targets, &burst, burst_pace(args, end)).await;
    // Orders still running when the burst gave up finish or fail within seconds; let the log catch up.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pebble_hang = diagnose(&pebble, &[&seq, &phase], work).await;
    let stored_after = caddy::stored_certificates(&server.storage);
    let (burst_messages, _) = caddy::log_messages(&server.log, log_mark);
    let (all_messages, _) = caddy::log_messages(&server.log, 0);
    let exit = caddy::stop(&mut server).await?;
    Ok(json!({
        "system": "caddy",
        "version": caddy::version(),
        "nodes": 1,
        "storage": "file_system in the work folder (Debian's Caddy has no Redis storage module)",
        "challenge": "tls-alpn-01 (http-01 disabled, as on tern)",
        "caddyfile": caddy::caddyfile(Path::new("<work>"), https_port, http_port, "<pebble directory>", Path::new("<pebble https ca>"), ask, &args.caddy_log_level),
        "sequential": phase_json(&seq),
        "burst": phase_json(&phase),
        "burst_orders": {
            "certificates_stored": stored_after.saturating_sub(stored_before),
            "log": caddy::orders_from_log(&burst_messages),
        },
        "burst_orders_counted_from": "certificates added to Caddy's storage during the burst, and its log",
        "ask_requests": asked.load(std::sync::atomic::Ordering::Relaxed),
        "whole_run_log": caddy::orders_from_log(&all_messages),
        "pebble_hang": pebble_hang,
        "exit": [exit],
    }))
}

/// One name obtained before the clock starts, so that the ACME account exists: its creation is not part of any
/// figure, and Caddy 2.6.2 (certmagic 0.17.2) does not lock account creation: with no account yet, concurrent
/// first orders each register one and can store the key of one with the account URL of another, after which every
/// order fails (`JWS verification error: square/go-jose: error in cryptographic primitive`).
async fn warm_up(probe: &Probe, targets: &[SocketAddr], end: Instant) -> Result<()> {
    let until = end.min(Instant::now() + Duration::from_secs(60));
    let outcome =
        client::obtain(probe, targets, 0, "warm-up.allowed.test", until, &client::Progress::default(), false).await;
    anyhow::ensure!(outcome.issued_after.is_some(), "warm-up name not issued within 60 s: {:?}", outcome.failures);
    Ok(())
}

fn sequential_pace(args: &Args, deadline: Instant) -> Pace {
    Pace { concurrency: 1, pause: Duration::from_millis(args.gap_ms), ..burst_pace(args, deadline) }
}

fn burst_pace(args: &Args, deadline: Instant) -> Pace {
    Pace {
        concurrency: args.concurrency,
        pause: Duration::ZERO,
        name_timeout: Duration::from_secs_f64(args.name_timeout),
        stall: Duration::from_secs_f64(args.stall),
        deadline,
        race: false,
    }
}

/// When a phase stopped for want of progress: whether Pebble still answers a request that needs its in-memory
/// store, and if not, its goroutine dump (SIGQUIT; Pebble exits) summarised and kept in the work folder. Pebble
/// 2.4.0 can deadlock there: `MemoryStore.FindValidAuthorization` (every new order) holds the store's read lock
/// while it read-locks each authorization, the authorization handler holds an authorization's lock while it
/// read-locks the store (`GetAccountByKey`), and a pending writer (`AddAuthorization`, `AddChallenge`) makes
/// that second read lock wait.
async fn diagnose(pebble: &Pebble, phases: &[&Phase], work: &Path) -> Value {
    if phases.iter().all(|p| p.stalled.is_none()) {
        return Value::Null;
    }
    let answers = tokio::time::timeout(Duration::from_secs(5), pebble.cert_status("01")).await.is_ok();
    if answers {
        return json!({ "stalled": true, "pebble_answers_store_requests": true });
    }
    let Some(pid) = pebble.pid() else { return json!({ "stalled": true, "pebble": "not running" }) };
    let _ = std::process::Command::new("kill").args(["-QUIT", &pid.to_string()]).status();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = std::fs::read_to_string(pebble.log_path()).unwrap_or_default();
    let kept = work.join("pebble-goroutines.log");
    let _ = std::fs::write(&kept, &log);
    let goroutines: Vec<&str> = log.split("\ngoroutine ").skip(1).collect();
    let in_store =
        goroutines.iter().filter(|g| g.contains("[semacquire") && g.contains("pebble/db.(*MemoryStore)")).count();
    let find_valid = goroutines.iter().filter(|g| g.contains("MemoryStore).FindValidAuthorization")).count();
    let authz_handler = goroutines
        .iter()
        .filter(|g| g.contains("WebFrontEndImpl).Authz(") && g.contains("MemoryStore).GetAccountByKey"))
        .count();
    json!({
        "stalled": true,
        "pebble_answers_store_requests": false,
        "goroutines": goroutines.len(),
        "blocked_on_the_memory_store": in_store,
        "in_find_valid_authorization": find_valid,
        "authorization_handler_waiting_for_the_store": authz_handler,
        "dump": kept.display().to_string(),
    })
}

fn phase_json(phase: &Phase) -> Value {
    phase.json()
}

fn print_row(row: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.0}"));
    let seq = &row["sequential"];
    let burst = &row["burst"];
    let orders = match row["system"].as_str() {
        Some(tern) if tern.starts_with("tern") => {
            format!("{} ({} failed)", row["burst_orders"]["orders"], row["burst_orders"]["orders_failed"])
        }
        _ => format!(
            "{} stored, {} obtained in log, {} failed attempts",
            row["burst_orders"]["certificates_stored"],
            row["burst_orders"]["log"]["certificates_obtained"],
            row["burst_orders"]["log"]["failed_attempts"]
        ),
    };
    println!(
        "{:<6} nodes {} | first cert p50 {} ms p99 {} ms | burst {} names c={}: {} issued in {:.1} s ({:.1}/s), p50 {} ms p99 {} ms | orders {orders} | failed handshakes {} (fallback {}, errors {}, timeouts {})",
        row["system"].as_str().unwrap_or(""),
        row["nodes"],
        f(&seq["time_to_certificate_ms"]["p50"]),
        f(&seq["time_to_certificate_ms"]["p99"]),
        burst["names"],
        burst["concurrency"],
        burst["issued"],
        burst["wall_s"].as_f64().unwrap_or(0.0),
        burst["certificates_per_s"].as_f64().unwrap_or(0.0),
        f(&burst["time_to_certificate_ms"]["p50"]),
        f(&burst["time_to_certificate_ms"]["p99"]),
        burst["failed_handshakes"]["total"],
        burst["failed_handshakes"]["fallback_certificate"],
        burst["failed_handshakes"]["errors"],
        burst["failed_handshakes"]["timeouts"],
    );
}

fn write_results(args: &Args, out: &Path, machine: &str, rows: &[Value], work: &Path) -> Result<()> {
    let json = json!({
        "machine": machine,
        "pebble": "Debian's pebble, defaults (PEBBLE_WFE_NONCEREJECT 5, PEBBLE_AUTHZREUSE 50), PEBBLE_VA_NOSLEEP=1",
        "options": {
            "names": args.names,
            "sequential": args.sequential,
            "gap_ms": args.gap_ms,
            "concurrency": args.concurrency,
            "attempt_timeout_s": args.attempt_timeout,
            "name_timeout_s": args.name_timeout,
        },
        "rows": rows,
    });
    let ms = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.0}"));
    let mut md = format!("Machine: {machine}\n\n");
    md += "| system | nodes | time to first certificate, one at a time: p50 / p99 (ms) | burst: names × concurrency | issued | wall (s) | certificates/s | time to certificate in the burst: p50 / p99 (ms) | orders made | failed handshakes (fallback / other certificate / error / timeout) |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|\n";
    for row in rows {
        if row.get("error").is_some() {
            md += &format!("| {} | error: {} | | | | | | | | |\n", row["system"].as_str().unwrap_or(""), row["error"]);
            continue;
        }
        let (seq, burst) = (&row["sequential"], &row["burst"]);
        let orders = match row["system"].as_str() {
            Some(tern) if tern.starts_with("tern") => {
                format!("{} ({} failed)", row["burst_orders"]["orders"], row["burst_orders"]["orders_failed"])
            }
            _ => format!(
                "{} certificates stored ({} failed attempts in its log)",
                row["burst_orders"]["certificates_stored"], row["burst_orders"]["log"]["failed_attempts"]
            ),
        };
        let failed = &burst["failed_handshakes"];
        md += &format!(
            "| {} | {} | {} / {} | {} × {} | {} | {:.1} | {:.1} | {} / {} | {orders} | {} ({} / {} / {} / {}) |\n",
            row["system"].as_str().unwrap_or(""),
            row["nodes"],
            ms(&seq["time_to_certificate_ms"]["p50"]),
            ms(&seq["time_to_certificate_ms"]["p99"]),
            burst["names"],
            burst["concurrency"],
            burst["issued"],
            burst["wall_s"].as_f64().unwrap_or(0.0),
            burst["certificates_per_s"].as_f64().unwrap_or(0.0),
            ms(&burst["time_to_certificate_ms"]["p50"]),
            ms(&burst["time_to_certificate_ms"]["p99"]),
            failed["total"],
            failed["fallback_certificate"],
            failed["wrong_certificate"],
            failed["errors"],
            failed["timeouts"],
        );
    }
    // Paths of this machine's work folder stay out of the results.
    let text = serde_json::to_string_pretty(&json)?.replace(&work.display().to_string(), "<work>");
    std::fs::write(out.join("results.json"), text)?;
    std::fs::write(out.join("results.md"), &md)?;
    println!("\n{md}\nwritten to {}", out.display());
    Ok(())
}

fn command_line(program: &str, argv: &[&str]) -> String {
    let (cmd, rest) = argv.split_first().map_or((program, &[][..]), |(c, r)| (*c, r));
    std::process::Command::new(cmd)
        .args(rest)
        .output()
        .map(|o| {
            let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            text.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_else(|_| format!("{program}: not installed"))
}

fn machine_info(args: &Args) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pebble = command_line("pebble", &["dpkg-query", "-W", "-f", "pebble ${Version}", "pebble"]);
    let caddy = format!("caddy {}", command_line("caddy", &["caddy", "version"]));
    format!(
        "{cpu}, {cores} cores; {}; {}; {}; {}; client, CA and servers share the cores",
        command_line("tern", &[args.tern.to_string_lossy().as_ref(), "--version"]),
        caddy,
        pebble,
        command_line("redis-server", &["redis-server", "--version"]),
    )
}
