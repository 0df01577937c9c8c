//! Helpers shared by the benchmark programs.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tern_fixtures::TestCa;
use tokio::process::{Child, Command};

mod tern_process;
pub use tern_process::TernProcess;

pub mod floor;

/// Key type of generated host certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyKind {
    /// ECDSA P-256, a fresh key per host.
    Ecdsa,
    /// RSA 2048: one key (made by `openssl genpkey`) shared by every host; handshake cost is the same.
    Rsa,
}

/// Writes `count` host certificates `host<i>.<domain>.crt|.key` and `ca.crt` into `dir`, on every core; a directory
/// that already holds this set is reused.
pub fn generate(count: usize, dir: &Path, domain: &str, kind: KeyKind) -> Result<bool> {
    let marker = dir.join(".complete");
    let label = format!("{count} {domain} {kind:?}");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(label.as_str()) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca = TestCa::new("tern bench CA")?;
    std::fs::write(dir.join("ca.crt"), ca.pem())?;
    let rsa = match kind {
        KeyKind::Ecdsa => None,
        KeyKind::Rsa => {
            let out = std::process::Command::new("openssl")
                .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
                .output()
                .context("openssl genpkey")?;
            anyhow::ensure!(out.status.success(), "openssl genpkey failed");
            Some(rcgen::KeyPair::from_pem(&String::from_utf8(out.stdout)?)?)
        }
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (ca, rsa) = (&ca, &rsa);
                scope.spawn(move || -> Result<()> {
                    for i in (t..count).step_by(threads) {
                        let name = format!("host{i}.{domain}");
                        let (chain, key) = match rsa {
                            Some(key) => ca.issue_with_key(&[&name], key)?,
                            None => ca.issue(&[&name])?,
                        };
                        std::fs::write(dir.join(format!("{name}.crt")), chain)?;
                        std::fs::write(dir.join(format!("{name}.key")), key)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
        }
        Ok(())
    })?;
    std::fs::write(&marker, label)?;
    Ok(true)
}

/// A TLS 1.3-only client config trusting `root` alone, with no resumption (tern's provider: aws-lc-rs).
pub fn tls13_client_config(root: rustls::pki_types::CertificateDer<'static>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root)?;
    let mut config = rustls::ClientConfig::builder_with_provider(tern::crypto::provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

/// Starts `redis-server` on a free loopback port, nothing persisted; killed when the child is dropped.
pub async fn start_redis(dir: &Path) -> Result<(Child, u16)> {
    let port = tokio::net::TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("redis-server (scripts/setup.sh test installs it)")?;
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return Ok((child, port));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("redis-server did not start")
}

/// utime + stime of a process, in seconds (from `/proc/<pid>/stat`).
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// cutime + cstime of a process, in seconds: what its children used that it has waited for (reaped).
pub fn reaped_children_cpu_seconds(pid: u32) -> Result<f64> {
    stat_seconds(&format!("/proc/{pid}/stat"), 13)
}

/// utime + stime of one thread of this process, in seconds (from `/proc/self/task/<tid>/stat`; `/proc/<tid>/stat`
/// would count the whole process).
pub fn thread_cpu_seconds(tid: u32) -> Result<f64> {
    stat_cpu_seconds(&format!("/proc/self/task/{tid}/stat"))
}

/// utime + stime, in seconds, of a stat(5) file.
fn stat_cpu_seconds(path: &str) -> Result<f64> {
    stat_seconds(path, 11)
}

/// The sum of two adjacent clock-tick fields of a stat(5) file, in seconds; `index` counts after the
/// parenthesised command name (utime + stime, fields 14 and 15 of stat(5): 11; cutime + cstime, 16 and 17: 13).
fn stat_seconds(path: &str, index: usize) -> Result<f64> {
    let stat = std::fs::read_to_string(path)?;
    let fields: Vec<&str> = stat.rsplit_once(')').context("stat format")?.1.split_whitespace().collect();
    let field = |i: usize| fields.get(i).context("stat format").and_then(|f| Ok(f.parse::<f64>()?));
    Ok((field(index)? + field(index + 1)?) / 100.0)
}

/// A tern admin endpoint's Prometheus text (`GET /metrics`).
pub async fn scrape(admin: std::net::SocketAddr) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(admin).await?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").await?;
    let mut body = String::new();
    tcp.read_to_string(&mut body).await?;
    Ok(body)
}

/// The value of the sample written exactly `series` (its name, and its labels if it has any); 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
}
