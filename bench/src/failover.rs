//! Failover with and without fleet-wide resumption: many clients hold sessions from node A, A is killed, they all
//! reconnect to node B. Prints, per TLS version and mode, the share of resumed handshakes on B and the CPU
//! seconds B spent serving them (from /proc/<pid>/stat), so "sharing on vs off" is a ratio from one run.
//!
//! ```text
//! cargo build --release -p tern -p tern-bench
//! target/release/failover --clients 2000
//! ```
//!
//! Needs `redis-server` on the PATH (scripts/setup.sh test installs it). The client runs on the same machine:
//! only B's own CPU time is reported, not the wall-clock rate.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use tern_bench::{metric, scrape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

#[derive(Debug, Parser)]
struct Args {
    /// Clients (each with its own session) that move from A to B.
    #[arg(long, default_value_t = 2000)]
    clients: usize,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// An HTTP backend to proxy to (default: a built-in echo backend in this process).
    #[arg(long)]
    backend: Option<SocketAddr>,
    /// The tern binary.
    #[arg(long, default_value = "target/release/tern")]
    tern: PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let ca = tern_fixtures::TestCa::new("failover bench CA")?;
    let (chain, key) = ca.issue(&["a.test"])?;
    std::fs::create_dir_all(dir.path().join("certs"))?;
    std::fs::write(dir.path().join("certs/a.test.crt"), chain)?;
    std::fs::write(dir.path().join("certs/a.test.key"), key)?;
    std::fs::write(dir.path().join("ca.pem"), ca.pem())?;
    let backend = match args.backend {
        Some(addr) => addr,
        None => tern_fixtures::spawn_echo_backend().await?,
    };
    let redis = tern_bench::start_redis(dir.path()).await?;
    println!(
        "failover bench: {} clients, concurrency {}, ECDSA P-256, tern {}",
        args.clients,
        args.concurrency,
        args.tern.display()
    );
    println!(
        "{:<8} {:<8} {:>9} {:>12} {:>14} {:>10} {:>18}",
        "tls", "sharing", "resumed", "B cpu (s)", "B cpu/1k (s)", "wall (s)", "replication lag"
    );
    let mut results = Vec::new();
    for version in ["1.3", "1.2"] {
        for sharing in [true, false] {
            let r = run(&args, dir.path(), backend, redis.1, version, sharing).await?;
            let lag = r.lag_ms.map_or("-".to_string(), |ms| format!("{ms:.2} ms (n={})", r.replicated));
            println!(
                "{:<8} {:<8} {:>8.1}% {:>12.3} {:>14.3} {:>10.2} {:>18}",
                version,
                if sharing { "on" } else { "off" },
                r.resumed as f64 * 100.0 / args.clients as f64,
                r.cpu_seconds,
                r.cpu_seconds * 1000.0 / args.clients as f64,
                r.wall.as_secs_f64(),
                lag
            );
            results.push((version, sharing, r));
        }
    }
    for version in ["1.3", "1.2"] {
        let cpu =
            |s: bool| results.iter().find(|(v, sh, _)| *v == version && *sh == s).map_or(0.0, |r| r.2.cpu_seconds);
        println!("TLS {version}: B spends {:.2}x the CPU without sharing", cpu(false) / cpu(true).max(1e-9));
    }
    drop(redis);
    Ok(())
}

struct Outcome {
    resumed: usize,
    cpu_seconds: f64,
    wall: Duration,
    /// Mean time from A's write to B holding the session, over `replicated` sessions.
    lag_ms: Option<f64>,
    replicated: f64,
}

async fn run(
    args: &Args,
    dir: &Path,
    backend: SocketAddr,
    redis: u16,
    version: &str,
    sharing: bool,
) -> Result<Outcome> {
    let mut a = start_tern(args, dir, "a", backend, redis, sharing).await?;
    let b = start_tern(args, dir, "b", backend, redis, sharing).await?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der(dir)?)?;
    let versions: &[&'static rustls::SupportedProtocolVersion] =
        if version == "1.3" { &[&rustls::version::TLS13] } else { &[&rustls::version::TLS12] };
    let clients = (0..args.clients)
        .map(|_| {
            let mut c = rustls::ClientConfig::builder_with_provider(tern::crypto::provider().clone())
                .with_protocol_versions(versions)?
                .with_root_certificates(roots.clone())
                .with_no_client_auth();
            c.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(c))
        })
        .collect::<Result<Vec<_>>>()?;
    // Phase 1: every client gets a session from A.
    drive(&clients, a.1, args.concurrency).await?;
    // Give replication a moment (it normally takes about a millisecond per batch).
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.0.start_kill()?;
    a.0.wait().await?;
    // Phase 2: all of them reconnect to B.
    let before = tern_bench::cpu_seconds(b.0.id().context("running")?)?;
    let started = Instant::now();
    let resumed = drive(&clients, b.1, args.concurrency).await?;
    let wall = started.elapsed();
    let after = tern_bench::cpu_seconds(b.0.id().context("running")?)?;
    let metrics = scrape(b.2).await?;
    let lag_sum = metric(&metrics, "tern_session_replication_lag_seconds_sum");
    let lag_count = metric(&metrics, "tern_session_replication_lag_seconds_count");
    let lag_ms = if lag_count > 0.0 { Some(lag_sum * 1000.0 / lag_count) } else { None };
    drop(b);
    Ok(Outcome { resumed, cpu_seconds: after - before, wall, lag_ms, replicated: lag_count })
}

fn ca_der(dir: &Path) -> Result<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    Ok(rustls::pki_types::CertificateDer::from_pem_file(dir.join("ca.pem"))?)
}

/// One handshake and one request per client, `concurrency` at a time; returns how many resumed.
async fn drive(clients: &[Arc<rustls::ClientConfig>], addr: SocketAddr, concurrency: usize) -> Result<usize> {
    use futures_util::StreamExt;
    let outcomes: Vec<Result<bool>> = futures_util::stream::iter(clients.iter().cloned())
        .map(|client| async move { visit(client, addr).await })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut resumed = 0;
    let mut failed = 0;
    for outcome in outcomes {
        match outcome {
            Ok(true) => resumed += 1,
            Ok(false) => {}
            Err(err) => {
                if failed == 0 {
                    eprintln!("connection failed: {err:#}");
                }
                failed += 1;
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} connections failed", clients.len());
    }
    Ok(resumed)
}

/// One handshake and one request; true if the handshake resumed.
async fn visit(client: Arc<rustls::ClientConfig>, addr: SocketAddr) -> Result<bool> {
    let limit = Duration::from_secs(10);
    let tcp =
        tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr)).await.context("tcp connect stalled")??;
    // As browsers do: without it Nagle holds the request behind TLS 1.2's abbreviated Finished for a delayed ACK.
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("a.test")?;
    let mut tls = tokio::time::timeout(limit, tokio_rustls::TlsConnector::from(client).connect(name, tcp))
        .await
        .context("TLS handshake stalled")??;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    tls.write_all(b"GET / HTTP/1.1\r\nhost: a.test\r\nconnection: close\r\n\r\n").await?;
    // tokio-rustls may keep part of a write buffered until flushed.
    tls.flush().await?;
    let mut sink = Vec::new();
    let read = tokio::time::timeout(limit, tls.read_to_end(&mut sink)).await;
    anyhow::ensure!(read.is_ok(), "response stalled after {} bytes: {:?}", sink.len(), String::from_utf8_lossy(&sink));
    Ok(resumed)
}

async fn start_tern(
    args: &Args,
    dir: &Path,
    node: &str,
    backend: SocketAddr,
    redis: u16,
    sharing: bool,
) -> Result<(Child, SocketAddr, SocketAddr)> {
    let resumption = if sharing {
        format!(
            "[[redis]]\nname = \"shared\"\nurls = [\"redis://127.0.0.1:{redis}\"]\n\n[resumption]\nredis = \"shared\"\n\
             secret = \"failover-bench-secret-0123456789abcdef\"\nnode = \"{node}\"\n"
        )
    } else {
        String::new()
    };
    let config = format!(
        "[log]\naccess = false\nlevel = \"info\"\n\n[[certificate]]\nname = \"a\"\ncert = \"certs/a.test.crt\"\n\
         key = \"certs/a.test.key\"\n\n[[listener]]\nbind = \"127.0.0.1:0\"\nstrict = true\n\
         backend = \"http://{backend}\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n{resumption}"
    );
    let path = dir.join(format!("{node}.toml"));
    std::fs::write(&path, config)?;
    let ready = dir.join(format!("{node}.ready.json"));
    let _ = std::fs::remove_file(&ready);
    let mut child = Command::new(&args.tern)
        .arg("run")
        .arg("-c")
        .arg(&path)
        .arg("--ready-file")
        .arg(&ready)
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} (cargo build --release -p tern)", args.tern.display()))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    // Addresses come from the ready file tern writes once every listener is bound.
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(&ready) {
            break text;
        }
        if let Some(status) = child.try_wait()? {
            bail!("tern {node} exited ({status}) before it was ready");
        }
        anyhow::ensure!(std::time::Instant::now() < deadline, "tern {node} not ready after 30 s");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let json: serde_json::Value = serde_json::from_str(&text)?;
    let listener: SocketAddr =
        json["listeners"].as_object().and_then(|l| l.values().next()?.as_str()).context("no listener")?.parse()?;
    let admin: SocketAddr = json["admin"].as_str().context("no admin")?.parse()?;
    Ok((child, listener, admin))
}
