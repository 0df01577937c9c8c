//! What the server's cipher order saves: tern's CPU per full TLS 1.3 handshake (plus one small proxied request)
//! for a client that offers TLS_AES_256_GCM_SHA384 first, as OpenSSL 3 and curl do, with `cipher_order =
//! "client"` (AES-256-GCM with SHA-384 is negotiated) and with the default server order (AES-128-GCM with
//! SHA-256). Two `tern run` processes with the same certificate (ECDSA P-256) and backend; rounds alternate
//! between them (the first of each pair swapping) so the machine's noise falls on both, and each round gives one
//! ratio.
//!
//! ```text
//! cargo build --release -p tern -p tern-bench --bin tern --bin cipher-order
//! target/release/cipher-order --rounds 10 --handshakes 2000
//! ```
//!
//! tern's CPU is utime + stime from `/proc/<pid>/stat` (10 ms ticks) over a round. Loopback only, bounded in
//! handshakes and in time (`--round-limit`). Every handshake's negotiated suite is checked; the last line is the
//! result as JSON.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use clap::Parser;
use futures_util::StreamExt;
use rustls::CipherSuite;
use tern_bench::{TernProcess, metric, scrape};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Parser)]
struct Args {
    /// Rounds; each runs `--handshakes` against both servers.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Handshakes per server per round.
    #[arg(long, default_value_t = 2000)]
    handshakes: usize,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The longest one round against one server may take.
    #[arg(long, default_value = "120", value_parser = |s: &str| s.parse().map(Duration::from_secs))]
    round_limit: Duration,
    /// The tern binary.
    #[arg(long, default_value = "target/release/tern")]
    tern: PathBuf,
}

/// One of the two servers.
struct Server {
    label: &'static str,
    process: TernProcess,
    expected: CipherSuite,
    micros: Vec<f64>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let dir = dir.path();
    let ca = tern_fixtures::TestCa::new("cipher order bench CA")?;
    let (chain, key) = ca.issue(&["a.test"])?;
    std::fs::write(dir.join("a.crt"), chain)?;
    std::fs::write(dir.join("a.key"), key)?;
    let backend = backend_thread()?;
    let mut servers = Vec::new();
    for (label, order, expected) in [
        ("cipher_order = \"client\"", "client", CipherSuite::TLS13_AES_256_GCM_SHA384),
        ("cipher_order = \"server\"", "server", CipherSuite::TLS13_AES_128_GCM_SHA256),
    ] {
        let config = config(dir, backend, order);
        let process = TernProcess::start(&args.tern, &dir.join(order), &config).await?;
        servers.push(Server { label, process, expected, micros: Vec::new() });
    }
    ensure!(tern::crypto::aes_hardware(), "this CPU has no AES instructions: the server order prefers ChaCha20");
    let client = aes256_first_client(&ca)?;
    println!(
        "cipher-order: {} rounds x {} handshakes per server, {} in flight, client offers AES-256-GCM, ChaCha20, \
         AES-128-GCM (OpenSSL's order), X25519, ECDSA P-256",
        args.rounds, args.handshakes, args.concurrency
    );
    for round in 0..args.rounds {
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let server = &mut servers[i];
            let cpu = run_round(server, &client, &args).await.with_context(|| server.label)?;
            server.micros.push(cpu);
        }
        println!(
            "round {round:>2}: client order {:>6.1} µs, server order {:>6.1} µs, ratio {:.3}",
            servers[0].micros[round],
            servers[1].micros[round],
            servers[1].micros[round] / servers[0].micros[round]
        );
    }
    let ratios: Vec<f64> = (0..args.rounds).map(|r| servers[1].micros[r] / servers[0].micros[r]).collect();
    for server in &servers {
        let text = scrape(server.process.admin).await?;
        let suite = server.expected.as_str().unwrap_or_default();
        let counted = metric(&text, &format!("tern_tls_cipher_suites_total{{suite=\"{suite}\"}}"));
        println!(
            "{:<26} median {:>6.1} µs per handshake (min {:.1}, max {:.1}); tern counted {counted} x {suite}",
            server.label,
            median(&server.micros),
            server.micros.iter().copied().fold(f64::INFINITY, f64::min),
            server.micros.iter().copied().fold(0.0, f64::max),
        );
    }
    let (low, high) = ratios.iter().fold((f64::INFINITY, 0.0f64), |(l, h), r| (l.min(*r), h.max(*r)));
    println!("server order / client order: median {:.3} (range {low:.3} to {high:.3})", median(&ratios));
    let result = serde_json::json!({
        "rounds": args.rounds,
        "handshakes_per_round": args.handshakes,
        "client_order_us": servers[0].micros,
        "server_order_us": servers[1].micros,
        "ratio_median": median(&ratios),
        "ratio_min": low,
        "ratio_max": high,
    });
    println!("{result}");
    Ok(())
}

/// `--handshakes` connections against `server`, each checked for the suite it should negotiate: tern's CPU
/// per connection in µs.
async fn run_round(server: &Server, client: &Arc<rustls::ClientConfig>, args: &Args) -> Result<f64> {
    let pid = server.process.pid;
    let before = tern_bench::cpu_seconds(pid)?;
    let (addr, expected) = (server.process.listener, server.expected);
    let run = futures_util::stream::iter(0..args.handshakes)
        .map(|_| one_request(client.clone(), addr))
        .buffer_unordered(args.concurrency)
        .collect::<Vec<_>>();
    let outcomes = tokio::time::timeout(args.round_limit, run).await.context("round over its limit")?;
    // Let tern finish closing the last connections before reading its clock.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cpu = tern_bench::cpu_seconds(pid)? - before;
    for outcome in outcomes {
        let suite = outcome.map_err(|e| anyhow::anyhow!("a connection: {e:#}"))?;
        ensure!(suite == expected, "negotiated {suite:?}, expected {expected:?}");
    }
    Ok(cpu * 1e6 / args.handshakes as f64)
}

/// A full handshake, one `GET /` through tern to the backend, its whole answer, then close: the negotiated suite.
async fn one_request(client: Arc<rustls::ClientConfig>, to: SocketAddr) -> Result<CipherSuite> {
    let tcp = tokio::net::TcpStream::connect(to).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::try_from("a.test")?;
    let limit = Duration::from_secs(10);
    let connect = tokio_rustls::TlsConnector::from(client).connect(name, tcp);
    let mut tls = tokio::time::timeout(limit, connect).await.context("handshake stalled")??;
    let work = async {
        let suite = tls.get_ref().1.negotiated_cipher_suite().context("no suite")?.suite();
        tls.write_all(b"GET / HTTP/1.1\r\nhost: a.test\r\nconnection: close\r\n\r\n").await?;
        tls.flush().await?;
        let mut answer = Vec::with_capacity(1024);
        // The answer ends at EOF; whether close_notify came first does not matter here.
        let _ = tls.read_to_end(&mut answer).await;
        ensure!(answer.starts_with(b"HTTP/1.1 200"), "answer: {}", String::from_utf8_lossy(&answer));
        Ok(suite)
    };
    tokio::time::timeout(limit, work).await.context("request stalled after the handshake")?
}

/// TLS 1.3 only, no resumption, suites in OpenSSL 3's default order.
fn aes256_first_client(ca: &tern_fixtures::TestCa) -> Result<Arc<rustls::ClientConfig>> {
    let base = tern::crypto::provider();
    let order = [
        CipherSuite::TLS13_AES_256_GCM_SHA384,
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        CipherSuite::TLS13_AES_128_GCM_SHA256,
    ];
    let suites = order.iter().filter_map(|c| base.cipher_suites.iter().copied().find(|s| s.suite() == *c)).collect();
    let provider = Arc::new(rustls::crypto::CryptoProvider { cipher_suites: suites, ..(**base).clone() });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

fn config(dir: &Path, backend: SocketAddr, order: &str) -> String {
    let dir = dir.display();
    format!(
        "[log]\naccess = false\nlevel = \"debug\"\n\n[server]\ncipher_order = \"{order}\"\n\n\
         [[certificate]]\nname = \"a\"\ncert = \"{dir}/a.crt\"\nkey = \"{dir}/a.key\"\n\n\
         [[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\nstrict = true\nbackend = \"http://{backend}\"\n\n\
         [admin]\nbind = \"127.0.0.1:0\"\n"
    )
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The echo backend on its own thread and runtime, apart from the load client.
fn backend_thread() -> Result<SocketAddr> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime,
            Err(err) => return drop(tx.send(Err(err.to_string()))),
        };
        runtime.block_on(async move {
            let _ = tx.send(tern_fixtures::spawn_echo_backend().await.map_err(|e| e.to_string()));
            std::future::pending::<()>().await
        })
    });
    rx.recv()?.map_err(anyhow::Error::msg)
}
