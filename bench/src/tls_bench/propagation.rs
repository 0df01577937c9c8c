//! Certificate-change propagation (`--propagation`, issue 16 part 2): "I changed a customer's certificate: how
//! long until every node serves it, and what does that cost?"
//!
//! For each N of `--sizes`, every system runs as two nodes (processes) on the same certificate set, each under a
//! load of `--propagation-concurrency` connections (full handshakes with a request, names uniform over N). Then,
//! `--updates` times, one name gets a new certificate through the system's own way of changing one:
//!
//! - `tern-redis invalidate`: `MSET` of the chain and key in Redis, then `tern certs invalidate NAME` (pub/sub to
//!   every node's `[invalidation]` subscription);
//! - `tern-redis ttl`: the `MSET` alone; the nodes' `cache.ttl` (`--fleet-ttl`) ends the old entry;
//! - `nginx-static reload`: the node's files replaced, `nginx -s reload` on each node;
//! - `haproxy-crtlist runtime-api`: the PEM replaced, `set ssl cert` + `commit ssl cert` on each node's Runtime API;
//! - `caddy-files load`: the files replaced, the node's config posted again to its admin API (`POST /load`,
//!   `Cache-Control: must-revalidate` so that an unchanged config is still reloaded).
//!
//! From the write on, both nodes are probed with fresh handshakes every 20 ms until each shows the new leaf.
//! Reported per update: that latency (both nodes), the CPU the update cost (the nodes' CPU, their exited
//! processes' and the update commands', over the window from the write to one second after the last node showed
//! it, less what the handshakes served in that window cost at the mean of the CPU per handshake measured over 3 s
//! just before and just after; ± half their difference times those handshakes), the handshakes that failed in the
//! window, and the nodes' peak PSS (sampled every 0.5 s; nginx's `-s reload` command, which parses the whole
//! configuration too, is not in it).
//!
//! `--rolling` reloads nginx and Caddy nodes one after the other (the next once the previous shows the change),
//! as operators do where a reload's memory or CPU would hurt both nodes at once. An update is stopped, and its
//! nodes killed, when the machine has under 1.5 GiB available (nginx at 100,000 names holds its old and new
//! configurations during a reload).
//!
//! Every name changed is a different one; files are changed in a hard-linked copy of the set (written to a new
//! file and renamed, which leaves the kept set as it was).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client::{Client, Verify};
use crate::environment::Peers;
use crate::load::Draws;
use crate::measure::median;
use crate::server::{Server, haproxy_socket, start_server};
use crate::{Bench, Fleet, Setup};

/// The systems measured, and the ways each changes a certificate.
const SYSTEMS: [(&str, &[&str]); 4] = [
    ("tern-redis", &["invalidate", "ttl"]),
    ("nginx-static", &["reload"]),
    ("haproxy-crtlist", &["runtime-api"]),
    ("caddy-files", &["load"]),
];

/// Both nodes are probed this often until they show the new certificate.
const PROBE_EVERY: Duration = Duration::from_millis(20);
/// The load's rate (and the nodes' CPU per handshake) is taken over this long before each update.
const BASELINE: Duration = Duration::from_secs(3);
/// Below this much available memory (`MemAvailable`) an update is stopped and its nodes killed.
const MEMORY_FLOOR_MIB: f64 = 1536.0;
/// The window an update is charged for ends this long after the last node showed the new certificate.
const SETTLE: Duration = Duration::from_secs(1);

pub async fn run(bench: &Bench<'_>, peers: Peers, machine: &str) -> Result<()> {
    let args = bench.args;
    let systems: Vec<_> =
        SYSTEMS.iter().filter(|(system, _)| args.configs.iter().any(|c| c == system) && peers.runs(system)).collect();
    ensure!(!systems.is_empty(), "--propagation measures tern-redis, nginx-static, haproxy-crtlist, caddy-files");
    println!(
        "propagation: 2 nodes per system, {} load connections per node, {} updates each, tern cache.ttl {} s",
        args.propagation_concurrency, args.updates, args.fleet_ttl
    );
    let mut rows = Vec::new();
    let mut target = 0usize;
    for &n in args.sizes.iter().filter(|&&n| n > 1) {
        let setup = prepare_set(bench, n).await?;
        for (system, ways) in &systems {
            match measure_system(bench, system, ways, &setup, &mut target).await {
                Ok(measured) => rows.extend(measured),
                Err(err) => {
                    println!("{system} n={n}: FAILED: {err:#}");
                    rows.push(json!({ "system": system, "n": n, "error": format!("{err:#}") }));
                }
            }
        }
    }
    let table = markdown(&rows);
    println!("\n{machine}\n\n{table}");
    let out = std::path::absolute(&args.out)?.join("propagation");
    std::fs::create_dir_all(&out)?;
    let sizes: Vec<String> = args.sizes.iter().map(usize::to_string).collect();
    let stem = format!("propagation-{}", sizes.join("-"));
    let json = serde_json::to_string_pretty(&json!({ "machine": machine, "rows": rows }))?;
    std::fs::write(out.join(format!("{stem}.json")), json)?;
    std::fs::write(out.join(format!("{stem}.md")), format!("{machine}\n\n{table}"))?;
    println!("written to {}", out.display());
    Ok(())
}

/// The ECDSA set of `n` names: generated (or reused), imported into Redis under its own prefix, and hard-linked
/// into the work folder, where updates replace files.
async fn prepare_set(bench: &Bench<'_>, n: usize) -> Result<Setup> {
    let args = bench.args;
    let kept = std::path::absolute(&args.certs)?.join(format!("ecdsa-p256-{n}"));
    let domain = "ecdsa-p256.bench.test";
    if tern_bench::generate(n, &kept, domain, tern_bench::KeyKind::Ecdsa)? {
        println!("generated {n} certificates");
    }
    let dir = bench.work.join(format!("propagation-set-{n}"));
    let status = tokio::process::Command::new("cp").arg("-al").arg(&kept).arg(&dir).status().await?;
    ensure!(status.success(), "cp -al {} {}", kept.display(), dir.display());
    let prefix = format!("propagation-{n}:");
    let import = tokio::process::Command::new(&args.tern)
        .args(["certs", "import"])
        .arg(&dir)
        .args(["--redis", bench.redis_url, "--prefix", &prefix])
        .output()
        .await?;
    ensure!(import.status.success(), "certs import: {}", String::from_utf8_lossy(&import.stderr));
    let names = Arc::new((0..n).map(|i| format!("host{i}.{domain}")).collect());
    Ok(Setup { n, key: "ecdsa-p256", dir, names, prefix })
}

/// A node of a fleet: its server, its folder, and where its admin API listens (Caddy).
struct Node {
    server: Server,
    work: PathBuf,
    admin: SocketAddr,
    counts: Arc<Counts>,
}

/// What a node's load connections have done.
#[derive(Default)]
struct Counts {
    done: AtomicU64,
    failed: AtomicU64,
}

/// Two nodes of `system` under load, and every way of updating it `--updates` times.
async fn measure_system(
    bench: &Bench<'_>,
    system: &str,
    ways: &[&str],
    setup: &Setup,
    target: &mut usize,
) -> Result<Vec<serde_json::Value>> {
    let args = bench.args;
    let mut nodes = Vec::new();
    let mut startups = Vec::new();
    for i in 0..2 {
        let work = bench.work.join(format!("{system}-{}-node{i}", setup.n));
        std::fs::create_dir_all(&work)?;
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
        let fleet = Fleet { caddy_admin: admin, cache_ttl: args.fleet_ttl };
        let node_bench = Bench { work: &work, fleet: Some(fleet), ..*bench };
        let (server, startup) = start_server(&node_bench, system, setup).await.with_context(|| format!("node {i}"))?;
        startups.push(startup);
        nodes.push(Node { server, work, admin, counts: Arc::default() });
    }
    let pss_started: f64 = nodes.iter().map(|n| n.server.memory_mib().1).sum();
    println!(
        "{system} n={}: nodes started in {:.2} s and {:.2} s, PSS {pss_started:.0} MiB",
        setup.n, startups[0], startups[1]
    );
    let client = Arc::new(Client::new(&setup.dir)?);
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for c in 0..args.propagation_concurrency {
            load.push(tokio::spawn(load_worker(
                client.clone(),
                node.server.addr,
                setup.names.clone(),
                node.counts.clone(),
                stop.clone(),
                i * args.propagation_concurrency + c,
            )));
        }
    }
    let mut rows = Vec::new();
    for way in ways {
        let mut updates = Vec::new();
        for u in 0..args.updates {
            // Names spread over the set, never the first (the start-up probe's) and never twice in a run.
            *target += 1;
            let name = setup.names[1 + (*target * 7919) % (setup.n - 1)].clone();
            match update_once(bench, system, way, setup, &nodes, &client, &name).await {
                Ok(update) => {
                    println!("{system} n={} {way} #{u} {name}: {update}", setup.n);
                    updates.push(update);
                }
                Err(err) => {
                    println!("{system} n={} {way} #{u} {name}: FAILED: {err:#}", setup.n);
                    updates.push(json!({ "error": format!("{err:#}") }));
                }
            }
        }
        rows.push(summarise(system, way, setup.n, &startups, pss_started, updates));
    }
    stop.store(true, Ordering::Relaxed);
    for worker in load {
        let _ = worker.await;
    }
    Ok(rows)
}

/// One load connection after another against a node: a full handshake and a request for a uniformly drawn name.
async fn load_worker(
    client: Arc<Client>,
    addr: SocketAddr,
    names: Arc<Vec<String>>,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
    worker: usize,
) {
    let mut draws = Draws::for_worker(worker);
    while !stop.load(Ordering::Relaxed) {
        let name = &names[(draws.draw() % names.len() as u64) as usize];
        let counter = match client.visit(addr, name, Verify::No, false).await {
            Ok(_) => &counts.done,
            Err(_) => &counts.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The nodes' CPU per handshake served under the load alone, over `BASELINE`.
async fn baseline(nodes: &[Node]) -> f64 {
    let (cpu, (done, _)) = (fleet_cpu(nodes), load_counts(nodes));
    tokio::time::sleep(BASELINE).await;
    let (handshakes, _) = load_counts(nodes);
    (fleet_cpu(nodes) - cpu) / (handshakes - done).max(1) as f64
}

/// The nodes' CPU so far (exited processes included) and this program's reaped children's (the update commands).
fn fleet_cpu(nodes: &[Node]) -> f64 {
    let commands = tern_bench::reaped_children_cpu_seconds(std::process::id()).unwrap_or(0.0);
    nodes.iter().map(|n| n.server.cpu_seconds_with_exited()).sum::<f64>() + commands
}

/// (handshakes done, failed) by the load over all nodes so far.
fn load_counts(nodes: &[Node]) -> (u64, u64) {
    nodes.iter().fold((0, 0), |(d, f), n| {
        (d + n.counts.done.load(Ordering::Relaxed), f + n.counts.failed.load(Ordering::Relaxed))
    })
}

/// One certificate change for `name`, measured.
async fn update_once(
    bench: &Bench<'_>,
    system: &str,
    way: &str,
    setup: &Setup,
    nodes: &[Node],
    client: &Client,
    name: &str,
) -> Result<serde_json::Value> {
    let timeout = Duration::from_secs_f64(bench.args.update_timeout);
    for node in nodes {
        // Cached (tern) and known to be served before the change.
        client.leaf(node.server.addr, name).await.context("handshake before the update")?;
    }
    let before = baseline(nodes).await;

    let (chain, key) = tern_fixtures::TestCa::new("propagation CA")?.issue(&[name])?;
    let leaf = CertificateDer::from_pem_slice(chain.as_bytes())?.into_owned();
    let cpu = fleet_cpu(nodes);
    let (done, failed) = load_counts(nodes);
    let started = Instant::now();
    let action = apply(bench, (system, way), setup, (nodes, client), name, (&chain, &key, &leaf));
    let probing = async {
        let mut seen: Vec<Option<f64>> = vec![None; nodes.len()];
        let mut pss_peak = 0.0f64;
        let mut probes_failed = 0u64;
        let mut last_sample = None::<Instant>;
        let mut out_of_memory = false;
        while seen.iter().any(Option::is_none) && started.elapsed() < timeout {
            for (node, seen) in nodes.iter().zip(seen.iter_mut()).filter(|(_, s)| s.is_none()) {
                match client.leaf(node.server.addr, name).await {
                    Ok(served) if served == leaf => *seen = Some(started.elapsed().as_secs_f64()),
                    Ok(_) => {}
                    Err(_) => probes_failed += 1,
                }
            }
            if last_sample.is_none_or(|at| at.elapsed() >= Duration::from_millis(500)) {
                pss_peak = pss_peak.max(nodes.iter().map(|n| n.server.memory_mib().1).sum());
                last_sample = Some(Instant::now());
                if available_mib() < MEMORY_FLOOR_MIB {
                    // Before the kernel's OOM killer picks something: the nodes go, and the update is reported.
                    let pids: Vec<String> = nodes.iter().flat_map(|n| n.server.pids()).map(|p| p.to_string()).collect();
                    let _ = std::process::Command::new("kill").arg("-9").args(pids).status();
                    out_of_memory = true;
                    break;
                }
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
        (seen, pss_peak, probes_failed, out_of_memory)
    };
    let (applied, (seen, pss_peak, probes_failed, out_of_memory)) = tokio::join!(action, probing);
    ensure!(
        !out_of_memory,
        "stopped: under {MEMORY_FLOOR_MIB} MiB of memory left (both nodes at {pss_peak:.0} MiB PSS); nodes killed"
    );
    let applied = applied?;
    tokio::time::sleep(SETTLE).await;
    let window = started.elapsed().as_secs_f64();
    let (done_after, failed_after) = load_counts(nodes);
    let spent = fleet_cpu(nodes) - cpu;
    let after = baseline(nodes).await;
    // What the load cost in the window at the rate measured before and after it; their difference is the noise.
    let served = done_after - done;
    let per_handshake = (before + after) / 2.0;
    let update_cpu = spent - per_handshake * served as f64;
    let noise = (before - after).abs() / 2.0 * served as f64;
    let all = seen.iter().copied().collect::<Option<Vec<f64>>>().map(|s| s.into_iter().fold(0.0, f64::max));
    Ok(json!({
        "name": name,
        "propagated_s": all,
        "per_node_s": seen,
        "command_s": applied,
        "update_cpu_s": update_cpu,
        "update_cpu_noise_s": noise,
        "window_s": window,
        "handshakes": served,
        "failed": failed_after - failed,
        "probes_failed": probes_failed,
        "pss_peak_mib": pss_peak,
        "baseline_cpu_ms_per_handshake": [before * 1e3, after * 1e3],
    }))
}

/// Writes the new certificate where `system` reads it and tells every node; returns how long that took (the
/// commands, not the propagation).
async fn apply<'a>(
    bench: &Bench<'_>,
    (system, way): (&str, &str),
    setup: &Setup,
    (nodes, client): (&'a [Node], &Client),
    name: &str,
    (chain, key, leaf): (&str, &str, &CertificateDer<'static>),
) -> Result<f64> {
    let started = Instant::now();
    match system {
        "tern-redis" => {
            let client = redis::Client::open(bench.redis_url)?;
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("MSET")
                .arg(format!("{}{name}.crt", setup.prefix))
                .arg(chain)
                .arg(format!("{}{name}.key", setup.prefix))
                .arg(key)
                .query_async::<()>(&mut conn)
                .await?;
            if way == "invalidate" {
                let out = tokio::process::Command::new(&bench.args.tern)
                    .args(["certs", "invalidate", name, "--redis", bench.redis_url])
                    .output()
                    .await?;
                ensure!(out.status.success(), "certs invalidate: {}", String::from_utf8_lossy(&out.stderr));
            }
        }
        "nginx-static" | "caddy-files" => {
            replace(&setup.dir.join(format!("{name}.crt")), chain.as_bytes())?;
            replace(&setup.dir.join(format!("{name}.key")), key.as_bytes())?;
            let tell = |node: &'a Node| async move {
                if system == "nginx-static" { nginx_reload(&node.work).await } else { caddy_load(node).await }
            };
            if bench.args.rolling {
                // One node at a time, the next once the previous serves the new certificate; all within the
                // update's timeout, as the probes are.
                let deadline = started + Duration::from_secs_f64(bench.args.update_timeout);
                for node in nodes {
                    tell(node).await?;
                    while client.leaf(node.server.addr, name).await.ok().as_ref() != Some(leaf) {
                        ensure!(Instant::now() < deadline, "rolling: a node did not show the new certificate");
                        tokio::time::sleep(PROBE_EVERY).await;
                    }
                }
            } else {
                futures_util::future::try_join_all(nodes.iter().map(tell)).await?;
            }
        }
        "haproxy-crtlist" => {
            let pem_path = setup.dir.join("haproxy").join(format!("{name}.pem"));
            let pem = format!("{chain}{key}");
            replace(&pem_path, pem.as_bytes())?;
            let tell = nodes.iter().map(|node| haproxy_set_cert(&node.work, &pem_path, &pem));
            futures_util::future::try_join_all(tell).await?;
        }
        other => bail!("no update for {other}"),
    }
    Ok(started.elapsed().as_secs_f64())
}

/// `MemAvailable` of `/proc/meminfo`, in MiB (0 when unreadable: counts as no memory left).
fn available_mib() -> f64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:")).unwrap_or_default();
    line.split_whitespace().nth(1).and_then(|kib| kib.parse::<f64>().ok()).unwrap_or(0.0) / 1024.0
}

/// Replaces a file by writing a new one and renaming it over the old (a reader never sees half a file, and a hard
/// link to the old content keeps it).
fn replace(path: &Path, content: &[u8]) -> Result<()> {
    let temporary = path.with_extension("new");
    std::fs::write(&temporary, content)?;
    std::fs::rename(&temporary, path)?;
    Ok(())
}

/// `nginx -s reload` for the node in `work` (its prefix and config as `start_server` wrote them).
async fn nginx_reload(work: &Path) -> Result<()> {
    let prefix = work.join("nginx-static");
    let out = tokio::process::Command::new("nginx")
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(prefix.join("nginx.conf"))
        .args(["-s", "reload"])
        .output()
        .await?;
    ensure!(out.status.success(), "nginx -s reload: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// Posts the node's config to Caddy's admin API again (`POST /load`), which answers once the new config runs.
async fn caddy_load(node: &Node) -> Result<()> {
    let body = std::fs::read(node.work.join("caddy-files").join("caddy.json"))?;
    let mut tcp = tokio::net::TcpStream::connect(node.admin).await?;
    let head = format!(
        "POST /load HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncache-control: must-revalidate\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        node.admin,
        body.len()
    );
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(&body).await?;
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).await?;
    ensure!(answer.starts_with("HTTP/1.1 200"), "caddy /load: {}", answer.lines().next().unwrap_or_default());
    Ok(())
}

/// HAProxy's Runtime API on the node in `work`: `set ssl cert` with the new PEM, then `commit ssl cert`.
async fn haproxy_set_cert(work: &Path, pem_path: &Path, pem: &str) -> Result<()> {
    let socket = haproxy_socket(work);
    let path = pem_path.display();
    let set = runtime_api(&socket, &format!("set ssl cert {path} <<\n{pem}\n")).await?;
    ensure!(set.contains("Transaction"), "set ssl cert: {}", set.trim());
    let commit = runtime_api(&socket, &format!("commit ssl cert {path}\n")).await?;
    ensure!(commit.contains("Success"), "commit ssl cert: {}", commit.trim());
    Ok(())
}

/// One command on HAProxy's Runtime API socket; its whole answer.
async fn runtime_api(socket: &Path, command: &str) -> Result<String> {
    let mut stream = tokio::net::UnixStream::connect(socket).await.with_context(|| socket.display().to_string())?;
    stream.write_all(command.as_bytes()).await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// One row per system, way and N from its updates: median and maximum latency, median update CPU, failures.
fn summarise(
    system: &str,
    way: &str,
    n: usize,
    startups: &[f64],
    pss_started: f64,
    updates: Vec<serde_json::Value>,
) -> serde_json::Value {
    let values = |key: &str| -> Vec<f64> { updates.iter().filter_map(|u| u[key].as_f64()).collect() };
    let (mut latencies, mut cpu, mut noise) =
        (values("propagated_s"), values("update_cpu_s"), values("update_cpu_noise_s"));
    // None when no update measured it (median() says 0 for nothing).
    let median_of = |v: &mut [f64]| (!v.is_empty()).then(|| median(v));
    let (cpu_median, noise_median) = (median_of(&mut cpu), median_of(&mut noise));
    let latency_median = median_of(&mut latencies); // sorts: the maximum is the last
    let sum = |key: &str| updates.iter().filter_map(|u| u[key].as_u64()).sum::<u64>();
    let pss_peak = updates.iter().filter_map(|u| u["pss_peak_mib"].as_f64()).fold(pss_started, f64::max);
    json!({
        "system": system,
        "way": way,
        "n": n,
        "startup_s": startups,
        "updates": updates.len(),
        "propagated": latencies.len(),
        "latency_median_s": latency_median,
        "latency_max_s": latencies.last(),
        "update_cpu_median_s": cpu_median,
        "update_cpu_noise_median_s": noise_median,
        "handshakes": sum("handshakes"),
        "failed": sum("failed"),
        "pss_started_mib": pss_started,
        "pss_peak_mib": pss_peak,
        "details": updates,
    })
}

fn markdown(rows: &[serde_json::Value]) -> String {
    let mut text = String::from(
        "| system | change | N | nodes started (s) | shown on both nodes, median (max) | update CPU-s, median (± load estimate) | \
         failed / handshakes meanwhile | PSS of both nodes, started → peak (MiB) |\n|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        if let Some(error) = row["error"].as_str() {
            text +=
                &format!("| {} | | {} | failed: {error} | | | | |\n", row["system"].as_str().unwrap_or("?"), row["n"]);
            continue;
        }
        let secs = |v: &serde_json::Value| v.as_f64().map_or("—".to_string(), format_seconds);
        let startup: Vec<String> = row["startup_s"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_f64())
            .map(|s| format!("{s:.2}"))
            .collect();
        let unseen = row["updates"].as_u64().unwrap_or(0) - row["propagated"].as_u64().unwrap_or(0);
        let unseen = if unseen > 0 { format!(", {unseen} not shown") } else { String::new() };
        text += &format!(
            "| {} | {} | {} | {} | {} ({}){unseen} | {} | {} / {} | {:.0} → {:.0} |\n",
            row["system"].as_str().unwrap_or("?"),
            row["way"].as_str().unwrap_or("?"),
            row["n"],
            startup.join(", "),
            secs(&row["latency_median_s"]),
            secs(&row["latency_max_s"]),
            row["update_cpu_median_s"].as_f64().map_or("—".into(), |c| format!(
                "{c:.2} ± {:.2}",
                row["update_cpu_noise_median_s"].as_f64().unwrap_or(0.0)
            )),
            row["failed"],
            row["handshakes"],
            row["pss_started_mib"].as_f64().unwrap_or(0.0),
            row["pss_peak_mib"].as_f64().unwrap_or(0.0),
        );
    }
    text
}

/// Seconds, or milliseconds below one second.
fn format_seconds(s: f64) -> String {
    if s < 1.0 { format!("{:.0} ms", s * 1e3) } else { format!("{s:.1} s") }
}
