//! What a connection refused by an admission limit costs tern, next to one it accepts and one full TLS handshake.
//! A release `tern run` with `address_concurrent = 1`: one idle connection from each of `--addresses` source
//! addresses (127.20.0.1, 127.20.1.1, ...: one per /24, drawn from loopback's 127.0.0.0/8) takes each address's
//! slot, then a flood of `--refused` connections from those addresses is refused right after accept. For
//! comparison, from an exempt address: connections that send nothing and reset (accept, spawn, a ClientHello read
//! that ends at once), and full TLS 1.3 handshakes (ECDSA P-256, X25519, no request).
//!
//! ```text
//! cargo build --release -p tern -p tern-bench --bin admission-cost
//! target/release/admission-cost --addresses 1024 --refused 50000 --handshakes 5000
//! ```
//!
//! Reports tern's own CPU (utime + stime from `/proc/<pid>/stat`, 10 ms ticks) per connection of each kind; the
//! client runs on the same cores, so wall-clock rates are the client's as much as tern's. Loopback only, bounded in
//! connections and in time (`--phase-limit` per phase). The last line is the result as JSON.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use clap::Parser;
use futures_util::StreamExt;
use tern_bench::{metric, scrape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Debug, Parser)]
struct Args {
    /// Source addresses the flood comes from, one per /24 (at most 60,000).
    #[arg(long, default_value_t = 1024)]
    addresses: u32,
    /// Connections in the flood (every one refused).
    #[arg(long, default_value_t = 50_000)]
    refused: usize,
    /// Accepted connections that send nothing, from an exempt address.
    #[arg(long, default_value_t = 50_000)]
    empty: usize,
    /// Full TLS handshakes, from an exempt address.
    #[arg(long, default_value_t = 5_000)]
    handshakes: usize,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The longest one phase may take.
    #[arg(long, default_value = "120", value_parser = |s: &str| s.parse().map(Duration::from_secs))]
    phase_limit: Duration,
    /// The tern binary.
    #[arg(long, default_value = "target/release/tern")]
    tern: PathBuf,
}

/// One measured phase.
struct Phase {
    name: &'static str,
    connections: usize,
    /// Connections that did not end as the phase expects (served instead of refused, failed handshakes...).
    unexpected: usize,
    cpu_seconds: f64,
    wall: Duration,
}

impl Phase {
    fn micros_per_connection(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.connections.max(1) as f64
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    ensure!((1..=60_000).contains(&args.addresses), "--addresses: 1 to 60000");
    let dir = tempfile::tempdir()?;
    let ca = tern_fixtures::TestCa::new("admission bench CA")?;
    let (chain, key) = ca.issue(&["a.test"])?;
    std::fs::write(dir.path().join("a.crt"), chain)?;
    std::fs::write(dir.path().join("a.key"), key)?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let mut tern = tern_bench::TernProcess::start(&args.tern, dir.path(), &config(backend)).await?;
    let (pid, addr, admin) = (tern.pid, tern.listener, tern.admin);
    let sources: Vec<Ipv4Addr> =
        (0..args.addresses).map(|i| Ipv4Addr::new(127, 20 + (i / 256) as u8, i as u8, 1)).collect();
    println!(
        "admission-cost: {} addresses, {} refused, {} empty, {} handshakes, {} in flight, tern {}",
        args.addresses,
        args.refused,
        args.empty,
        args.handshakes,
        args.concurrency,
        args.tern.display()
    );

    // Each address takes its one slot with a connection that stays open (and silent) for the whole run.
    let mut holders = Vec::with_capacity(sources.len());
    for source in &sources {
        holders.push(connect_from(*source, addr).await.with_context(|| format!("holding a slot from {source}"))?);
    }
    let deadline = Instant::now() + args.phase_limit;
    while metric(&scrape(admin).await?, "tern_admission_tracked{listener=\"main\",table=\"address\"}")
        < f64::from(args.addresses)
    {
        ensure!(Instant::now() < deadline, "tern did not admit every holder in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let idle_before = tern_bench::cpu_seconds(pid)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = tern_bench::cpu_seconds(pid)? - idle_before;

    let refused = measure(pid, "refused (address_concurrent)", args.refused, args.concurrency, args.phase_limit, |i| {
        refused_from(sources[i % sources.len()], addr)
    })
    .await?;
    let counted =
        metric(&scrape(admin).await?, "tern_admission_refused_total{listener=\"main\",limit=\"address_concurrent\"}");
    let empty = measure(pid, "accepted, no bytes, reset", args.empty, args.concurrency, args.phase_limit, |_| {
        empty_from(Ipv4Addr::LOCALHOST, addr)
    })
    .await?;
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der())?;
        roots
    };
    let mut client = rustls::ClientConfig::builder_with_provider(tern::crypto::provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Full handshakes only: nothing to resume from.
    client.resumption = rustls::client::Resumption::disabled();
    let client = Arc::new(client);
    let handshakes =
        measure(pid, "full TLS 1.3 handshake", args.handshakes, args.concurrency, args.phase_limit, |_| {
            handshake(client.clone(), addr)
        })
        .await?;
    drop(holders);
    let _ = tern.child.start_kill();

    println!("tern idle: {:.1} ms CPU per second", idle * 1e3);
    println!(
        "{:<30} {:>11} {:>10} {:>12} {:>14} {:>9} {:>11}",
        "connection", "connections", "unexpected", "tern CPU (s)", "tern µs / conn", "wall (s)", "conn / s"
    );
    for phase in [&refused, &empty, &handshakes] {
        println!(
            "{:<30} {:>11} {:>10} {:>12.2} {:>14.1} {:>9.2} {:>11.0}",
            phase.name,
            phase.connections,
            phase.unexpected,
            phase.cpu_seconds,
            phase.micros_per_connection(),
            phase.wall.as_secs_f64(),
            phase.connections as f64 / phase.wall.as_secs_f64().max(1e-9)
        );
    }
    if counted as usize != args.refused - refused.unexpected {
        println!("note: tern counted {counted} refusals for {} refused connections", args.refused - refused.unexpected);
    }
    let ratio = handshakes.micros_per_connection() / refused.micros_per_connection().max(1e-9);
    println!("a full handshake costs tern {ratio:.1}x a refused connection");
    let result = serde_json::json!({
        "addresses": args.addresses,
        "idle_cpu_ms_per_s": idle * 1e3,
        "refused": { "connections": refused.connections, "unexpected": refused.unexpected, "counted": counted,
                     "cpu_s": refused.cpu_seconds, "us_per_connection": refused.micros_per_connection() },
        "empty": { "connections": empty.connections, "unexpected": empty.unexpected,
                   "cpu_s": empty.cpu_seconds, "us_per_connection": empty.micros_per_connection() },
        "handshake": { "connections": handshakes.connections, "unexpected": handshakes.unexpected,
                       "cpu_s": handshakes.cpu_seconds, "us_per_connection": handshakes.micros_per_connection() },
        "handshake_over_refused": ratio,
    });
    println!("{result}");
    Ok(())
}

/// Runs `count` connections made by `one(i)`, `concurrency` at a time, and measures tern's CPU over them.
async fn measure<F, Fut>(
    pid: u32,
    name: &'static str,
    count: usize,
    concurrency: usize,
    limit: Duration,
    one: F,
) -> Result<Phase>
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let before = tern_bench::cpu_seconds(pid)?;
    let started = Instant::now();
    let run = futures_util::stream::iter(0..count).map(one).buffer_unordered(concurrency).collect::<Vec<_>>();
    let outcomes = tokio::time::timeout(limit, run).await.with_context(|| format!("{name}: over {limit:?}"))?;
    let wall = started.elapsed();
    // Let tern finish closing the last connections before reading its clock.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu_seconds = tern_bench::cpu_seconds(pid)? - before;
    let mut unexpected = 0;
    for outcome in outcomes {
        match outcome {
            Ok(true) => {}
            Ok(false) => unexpected += 1,
            Err(err) => {
                if unexpected == 0 {
                    eprintln!("{name}: {err:#}");
                }
                unexpected += 1;
            }
        }
    }
    Ok(Phase { name, connections: count, unexpected, cpu_seconds, wall })
}

/// A TCP connection from `source`.
async fn connect_from(source: Ipv4Addr, to: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    Ok(tokio::time::timeout(Duration::from_secs(10), socket.connect(to)).await.context("connect stalled")??)
}

/// True if tern closed the connection without sending a byte (a refusal); the reset may already end the connect.
async fn refused_from(source: Ipv4Addr, to: SocketAddr) -> Result<bool> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let mut tcp = match tokio::time::timeout(Duration::from_secs(10), socket.connect(to)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::ConnectionReset => return Ok(true),
        Ok(Err(err)) => return Err(err.into()),
        Err(_) => bail!("{source}: connect stalled"),
    };
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => Ok(true),
        Ok(Ok(_)) => Ok(false),
        Err(_) => bail!("{source}: neither refused nor answered in 10 s"),
    }
}

/// Connects and resets at once, sending nothing (the client leaves no TIME_WAIT behind).
async fn empty_from(source: Ipv4Addr, to: SocketAddr) -> Result<bool> {
    let tcp = connect_from(source, to).await?;
    tcp.set_zero_linger()?;
    drop(tcp);
    Ok(true)
}

/// One full handshake, then close_notify and close.
async fn handshake(client: Arc<rustls::ClientConfig>, to: SocketAddr) -> Result<bool> {
    let tcp = connect_from(Ipv4Addr::LOCALHOST, to).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("a.test")?;
    let connect = tokio_rustls::TlsConnector::from(client).connect(name, tcp);
    let mut tls = tokio::time::timeout(Duration::from_secs(10), connect).await.context("handshake stalled")??;
    let _ = tls.shutdown().await;
    Ok(true)
}

/// A `tern run` config with one listener (`main`) limiting each address to one open connection; loopback's
/// 127.0.0.0/16 exempt (the comparison clients), the flood's 127.20.0.0/14 not.
fn config(backend: SocketAddr) -> String {
    format!(
        "[log]\naccess = false\nlevel = \"warn\"\n\n[server]\nhandshake_timeout = \"10m\"\n\n\
         [[certificate]]\nname = \"a\"\ncert = \"a.crt\"\nkey = \"a.key\"\n\n\
         [[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\nstrict = true\nbackend = \"http://{backend}\"\n\n\
         [listener.admission]\nexempt = [\"127.0.0.0/16\"]\naddress_concurrent = 1\n\
         address_new_per_second = 1000000\nprefix_new_per_second = 1000000\nprefix_concurrent = 10000000\n\n\
         [admin]\nbind = \"127.0.0.1:0\"\n"
    )
}
