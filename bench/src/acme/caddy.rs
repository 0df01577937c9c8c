//! Caddy's side: Debian's Caddy (installed when missing) with on-demand TLS against the same kind of Pebble, its
//! `ask` endpoint, its start and stop, and what its storage and log say about the orders it made.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::tern_nodes::last_lines;

/// Whether `caddy` runs; installs Debian's package when it does not (unless `no_install`).
pub async fn available(no_install: bool) -> bool {
    let present = || std::process::Command::new("caddy").arg("version").output().is_ok_and(|o| o.status.success());
    if present() {
        return true;
    }
    if no_install {
        println!("caddy not installed: Caddy rows skipped");
        return false;
    }
    println!("installing caddy from Debian packages");
    apt_install_caddy().await;
    if !present() {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status().await;
        apt_install_caddy().await;
    }
    // Debian enables the packaged service (port 80, /etc/caddy/Caddyfile); it is not what is measured.
    let _ = Command::new("sh").args(["-c", "service caddy stop >/dev/null 2>&1 || true"]).status().await;
    present()
}

async fn apt_install_caddy() {
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-qq", "caddy"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .await;
}

/// The `ask` endpoint: 200 for names under `.allowed.test` (the acme-gate plugin's policy on tern), 403 otherwise.
/// Counts the questions.
pub async fn spawn_ask_server() -> Result<(SocketAddr, Arc<AtomicU64>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let asked = Arc::new(AtomicU64::new(0));
    let counter = asked.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else { continue };
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                counter.fetch_add(1, Ordering::Relaxed);
                let text = String::from_utf8_lossy(&head);
                let target = text.split_whitespace().nth(1).unwrap_or("");
                let domain = target.split_once("domain=").map_or("", |(_, d)| d.split('&').next().unwrap_or(""));
                let domain = domain.to_ascii_lowercase();
                let allowed = domain == "allowed.test" || domain.ends_with(".allowed.test");
                let status = if allowed { "200 OK" } else { "403 Forbidden" };
                let response = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                let _ = tcp.write_all(response.as_bytes()).await;
            });
        }
    });
    Ok((addr, asked))
}

/// The Caddyfile: the global options of the brief (on-demand TLS with `ask`, Pebble as the only CA, its HTTPS
/// root, Pebble's validation ports as Caddy's ports, storage in the work folder, no admin API, no trust store
/// changes), TLS-ALPN-01 only (as tern), loopback only.
pub fn caddyfile(
    work: &Path,
    https_port: u16,
    http_port: u16,
    directory: &str,
    ca: &Path,
    ask: SocketAddr,
    level: &str,
) -> String {
    format!(
        "# Written by bench/src/acme/ (acme-bench).
{{
	admin off
	skip_install_trust
	default_bind 127.0.0.1
	http_port {http_port}
	https_port {https_port}
	acme_ca {directory}
	acme_ca_root {ca}
	storage file_system {{
		root {storage}
	}}
	on_demand_tls {{
		ask http://{ask}/allowed
	}}
	log {{
		output stderr
		format json
		level {level}
	}}
}}

https:// {{
	tls {{
		on_demand
		issuer acme {{
			disable_http_challenge
		}}
	}}
	respond \"ok\"
}}
",
        ca = ca.display(),
        storage = work.join("caddy-storage").display(),
    )
}

/// A running Caddy.
#[derive(Debug)]
pub struct Caddy {
    pub child: Child,
    pub listen: SocketAddr,
    pub log: PathBuf,
    pub storage: PathBuf,
}

/// Writes the Caddyfile, starts `caddy run` with its home, data and config folders in `work`, and waits until its
/// HTTPS port accepts connections.
pub async fn start(
    work: &Path,
    https_port: u16,
    http_port: u16,
    directory: &str,
    ca: &Path,
    ask: SocketAddr,
    level: &str,
) -> Result<Caddy> {
    let path = work.join("Caddyfile");
    std::fs::write(&path, caddyfile(work, https_port, http_port, directory, ca, ask, level))?;
    let home = work.join("caddy-home");
    std::fs::create_dir_all(&home)?;
    let log = work.join("caddy.log");
    let mut child = Command::new("caddy")
        .args(["run", "--adapter", "caddyfile", "--config"])
        .arg(&path)
        .env("HOME", &home)
        .env("XDG_DATA_HOME", home.join("data"))
        .env("XDG_CONFIG_HOME", home.join("config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .kill_on_drop(true)
        .spawn()
        .context("starting caddy")?;
    let listen: SocketAddr = format!("127.0.0.1:{https_port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("caddy exited during start-up ({status}):\n{}", last_lines(&std::fs::read_to_string(&log)?, 20));
        }
        if tokio::net::TcpStream::connect(listen).await.is_ok() {
            return Ok(Caddy { child, listen, log, storage: work.join("caddy-storage") });
        }
        anyhow::ensure!(Instant::now() < deadline, "caddy not listening on {listen} within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, then up to 20 s; how it ended.
pub async fn stop(caddy: &mut Caddy) -> Result<String> {
    if let Some(status) = caddy.child.try_wait()? {
        return Ok(format!("had exited: {status}"));
    }
    let pid = caddy.child.id().context("caddy has no pid")?;
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    Ok(match tokio::time::timeout(Duration::from_secs(20), caddy.child.wait()).await {
        Ok(status) => status?.to_string(),
        Err(_) => {
            caddy.child.start_kill()?;
            caddy.child.wait().await?;
            "did not stop within 20 s of SIGTERM; killed".into()
        }
    })
}

/// Certificates in Caddy's storage (`certificates/<issuer>/<name>/<name>.crt`).
pub fn stored_certificates(storage: &Path) -> usize {
    fn walk(dir: &Path) -> usize {
        let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
        entries
            .flatten()
            .map(|e| {
                let path = e.path();
                if path.is_dir() { walk(&path) } else { usize::from(path.extension().is_some_and(|x| x == "crt")) }
            })
            .sum()
    }
    walk(&storage.join("certificates"))
}

/// Log messages of Caddy's (JSON lines) counted by `msg`, from line `from` on; and the number of lines read.
pub fn log_messages(log: &Path, from: usize) -> (BTreeMap<String, u64>, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut counts = BTreeMap::new();
    let mut lines = 0;
    for line in text.lines() {
        lines += 1;
        if lines <= from {
            continue;
        }
        let Ok(entry) = serde_json::from_str::<Value>(line) else { continue };
        let msg = entry["msg"].as_str().unwrap_or("").to_string();
        let key = match entry["challenge_type"].as_str() {
            Some(kind) => format!("{msg} ({kind})"),
            None => msg,
        };
        *counts.entry(key).or_insert(0) += 1;
    }
    (counts, lines)
}

/// What Caddy's log says about orders: successes, failed attempts, waits on its internal rate limiter, and every
/// message count for the record.
pub fn orders_from_log(counts: &BTreeMap<String, u64>) -> Value {
    let count = |msg: &str| counts.iter().filter(|(k, _)| k.starts_with(msg)).map(|(_, v)| v).sum::<u64>();
    json!({
        "certificates_obtained": count("certificate obtained successfully"),
        "obtain_attempts": count("obtaining certificate"),
        "failed_attempts": count("could not get certificate from issuer"),
        "waited_on_internal_rate_limiter": count("waiting on internal rate limiter"),
        "messages": counts,
    })
}

/// `caddy version`.
pub fn version() -> String {
    std::process::Command::new("caddy")
        .arg("version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "not installed".into())
}
