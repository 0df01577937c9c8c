//! Certificate compression (RFC 8879): the bytes of tern's first flight (ServerHello to Finished) for a typical
//! 2.6 KB RSA chain, counted on the wire by a relay in front of tern, with compression on (brotli, zlib) and off,
//! for rustls clients offering nothing, zlib or brotli and for Debian's headless Chromium; then the CPU cost of
//! one compression: rustls's compressors at both levels, tern's memo on a miss and on a hit.
//!
//! ```text
//! scripts/setup.sh bench    # openssl, and chromium
//! cargo build --release -p tern-bench --bin cert-compression && target/release/cert-compression
//! ```
//! `--no-chromium` leaves the browser out.

/// The tern binary's allocator (host/src/main.rs says why): the memo's figures are the binary's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod chain;
mod cpu;
mod relay;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use rustls::compress::CertDecompressor;

#[derive(Debug, Parser)]
#[command(about = "Handshake bytes and CPU of certificate compression")]
struct Args {
    /// Skip the Chromium rows.
    #[arg(long)]
    no_chromium: bool,
    /// Compressions timed per CPU row.
    #[arg(long, default_value_t = 20_000)]
    rounds: usize,
    /// Distinct chains in the large memo (its hit cost, and the resident memory filling it takes).
    #[arg(long, default_value_t = 20_000)]
    memo_entries: usize,
}

/// A running tern and the relay in front of it.
struct Tern {
    relay: SocketAddr,
    log: relay::Log,
    metrics: Arc<tern::metrics::Metrics>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Tern {
    /// tern serving the chain as its one static certificate (for every name), `server_keys` in `[server]`.
    async fn start(dir: &Path, server_keys: &str) -> Result<Self> {
        let backend = tern_fixtures::spawn_echo_backend().await?;
        let text = format!(
            "[server]\n{server_keys}\n[[certificate]]\nname = \"chain\"\ncert = \"chain.crt\"\nkey = \"leaf.key\"\n\n\
             [[listener]]\nbind = \"127.0.0.1:0\"\ndefault_certificate = \"chain\"\nbackend = \"http://{backend}\"\n"
        );
        let path = dir.join("tern.toml");
        std::fs::write(&path, &text)?;
        let server = tern::Server::bind(tern::Config::from_toml(&text, &path)?).await?;
        let addr = server.local_addrs()[0].1;
        let metrics = server.metrics().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        let (relay, log) = relay::spawn(addr).await?;
        Ok(Self { relay, log, metrics, _stop: stop })
    }

    /// Waits for the relay to have logged `count` handshakes; returns them.
    async fn handshakes(&self, count: usize) -> Result<Vec<relay::Seen>> {
        for _ in 0..200 {
            let seen = self.log.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if seen.len() >= count {
                return Ok(seen);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("the relay saw fewer than {count} handshakes")
    }
}

/// One handshake of a rustls TLS 1.3 client offering `decompressors`, verifying the chain against `root`; the
/// relay's record of it.
async fn rustls_handshake(
    tern: &Tern,
    root: &rustls::pki_types::CertificateDer<'static>,
    decompressors: &[&'static dyn CertDecompressor],
) -> Result<relay::Seen> {
    let mut config = tern_bench::tls13_client_config(root.clone())?;
    config.cert_decompressors = decompressors.to_vec();
    let before = tern.log.lock().unwrap_or_else(|e| e.into_inner()).len();
    let tcp = tokio::net::TcpStream::connect(tern.relay).await?;
    let name = rustls::pki_types::ServerName::try_from(chain::NAMES[0])?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    let seen = tern.handshakes(before + 1).await?.swap_remove(before);
    drop(stream);
    Ok(seen)
}

/// Chromium's handshakes for the chain's name: one page load with `--dump-dom`, every host mapped to the relay.
async fn chromium(tern: &Tern, profile: &Path) -> Result<Vec<relay::Seen>> {
    let before = tern.log.lock().unwrap_or_else(|e| e.into_inner()).len();
    let mut command = tokio::process::Command::new("chromium");
    command
        .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--host-resolver-rules=MAP * 127.0.0.1:{}", tern.relay.port()))
        .args(["--dump-dom", &format!("https://{}/", chain::NAMES[0])])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), command.output()).await.context("chromium hung")??;
    if !String::from_utf8_lossy(&out.stdout).contains("<html") {
        bail!("chromium loaded no page: {}", String::from_utf8_lossy(&out.stderr));
    }
    let seen = tern.handshakes(before + 1).await?;
    Ok(seen[before..].iter().filter(|s| s.sni.as_deref() == Some(chain::NAMES[0])).cloned().collect())
}

fn algorithms(offered: &[u16]) -> String {
    let names: Vec<&str> = offered
        .iter()
        .map(|a| match a {
            1 => "zlib",
            2 => "brotli",
            3 => "zstd",
            _ => "other",
        })
        .collect();
    if names.is_empty() { "-".into() } else { names.join(",") }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let chain = chain::write(dir.path())?;
    let message = chain::certificate_message(&chain);
    println!(
        "chain: leaf {} B + intermediate {} B of DER = {} B; Certificate message {} B",
        chain[0].len(),
        chain[1].len(),
        chain[0].len() + chain[1].len(),
        message.len()
    );
    let root = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(dir.path().join("root.crt"))?
    };
    let on = Tern::start(dir.path(), "").await?;
    let off_dir = tempfile::tempdir()?;
    for file in ["chain.crt", "leaf.key"] {
        std::fs::copy(dir.path().join(file), off_dir.path().join(file))?;
    }
    let off = Tern::start(off_dir.path(), "certificate_compression = []").await?;

    println!("\nserver's first flight (ServerHello .. Finished), bytes on the wire:");
    println!("{:<34} {:<16} {:>14} {:>14} {:>8}", "client", "offers", "compression on", "off", "saved");
    let row = |client: &str, on: &relay::Seen, off: &relay::Seen| {
        let saved = off.first_flight as i64 - on.first_flight as i64;
        println!(
            "{client:<34} {:<16} {:>14} {:>14} {saved:>8}",
            algorithms(&on.offered),
            on.first_flight,
            off.first_flight
        );
    };
    for (label, decompressors) in [
        ("rustls 0.23, no compression", &[][..]),
        ("rustls 0.23, zlib", &[rustls::compress::ZLIB_DECOMPRESSOR][..]),
        ("rustls 0.23, brotli", &[rustls::compress::BROTLI_DECOMPRESSOR][..]),
    ] {
        let with = rustls_handshake(&on, &root, decompressors).await?;
        let without = rustls_handshake(&off, &root, decompressors).await?;
        row(label, &with, &without);
    }
    if !args.no_chromium {
        let version = std::process::Command::new("chromium")
            .arg("--version")
            .output()
            .context("chromium is not installed (scripts/setup.sh bench installs it; or pass --no-chromium)")?;
        let version = String::from_utf8_lossy(&version.stdout);
        let version = version.split(" built").next().unwrap_or_default().trim().to_string();
        let (with, without) = (chromium(&on, &dir.path().join("profile-on")).await?, {
            chromium(&off, &off_dir.path().join("profile-off")).await?
        });
        let (Some(first_on), Some(first_off)) = (with.first(), without.first()) else {
            bail!("chromium made no handshake for {}", chain::NAMES[0]);
        };
        row(&version, first_on, first_off);
        println!("  ({} and {} handshakes for the name; the first of each shown)", with.len(), without.len());
    }
    let stats = &on.metrics.certificate_compression;
    println!(
        "tern (compression on) counted: brotli {}, zlib {}, memo hits {}, misses {}",
        stats.compressed.get(tern::config::CertCompression::Brotli),
        stats.compressed.get(tern::config::CertCompression::Zlib),
        tern::metrics::get(&stats.hits),
        tern::metrics::get(&stats.misses)
    );
    let groups: Vec<String> = tern::crypto::provider()
        .kx_groups
        .iter()
        .map(|g| g.name())
        .filter(|&g| on.metrics.negotiated.group(g) > 0)
        .map(|g| format!("{g:?} {}", on.metrics.negotiated.group(g)))
        .collect();
    println!("key exchange groups negotiated (the ServerHello's key share): {}", groups.join(", "));
    cpu::report(&message, args.rounds, args.memo_entries)?;
    Ok(())
}
