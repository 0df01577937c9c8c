//! tern's side: two nodes (127.0.0.1:P and 127.0.0.2:P, P being Pebble's tlsPort) with the acme-gate plugin and
//! `[acme]` on one shared Redis; their start, their ACME counters and their stop.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::Args;

/// Seals ACME keys at rest in Redis (a benchmark value, not a secret).
const SECRET: &str = "acme-bench-secret-0123456789abcdef0123456789";

/// One running node.
#[derive(Debug)]
pub struct Node {
    pub name: &'static str,
    pub child: Child,
    pub admin: SocketAddr,
}

/// What the `[acme]` section of both nodes says, besides the CA and storage.
pub fn acme_settings(args: &Args) -> Value {
    json!({
        "challenge": "tls-alpn-01",
        "handshake_wait": format!("{}s", args.handshake_wait),
        "server.handshake_timeout": format!("{}s", args.handshake_wait + 2),
        "order_timeout": "60s",
        "orders_per_hour": 100_000,
        "orders_per_hour_per_domain": 100_000,
        "max_concurrent_orders": args.max_concurrent_orders,
        "max_pending": max_pending(args),
        "failure_backoff": "5s",
        "failure_backoff_max": "60s",
        "key_type": "ecdsa-p256",
    })
}

fn max_pending(args: &Args) -> usize {
    (2 * (args.names + args.sequential)).max(1000)
}

/// The config of one node.
fn config(
    args: &Args,
    work: &Path,
    bind: SocketAddr,
    redis: &str,
    directory: &str,
    ca: &Path,
    backend: SocketAddr,
) -> String {
    format!(
        r#"# Written by bench/src/acme/ (acme-bench).
[server]
handshake_timeout = "{handshake_timeout}s"

[log]
level = "info"
access = false

[[certificate]]
name = "fallback"
cert = "{work}/fallback.crt"
key = "{work}/fallback.key"
names = []

[[plugin]]
name = "gate"
path = "{plugin}"
settings.allow = ".allowed.test"

[[listener]]
name = "main"
bind = "{bind}"
plugin = "gate"
backend = "http://{backend}"
default_certificate = "fallback"

[[redis]]
name = "shared"
urls = ["{redis}"]

[acme]
directory = "{directory}"
ca = "{ca}"
redis = "shared"
secret = "{SECRET}"
challenge = "tls-alpn-01"
handshake_wait = "{handshake_wait}s"
order_timeout = "60s"
orders_per_hour = 100000
orders_per_hour_per_domain = 100000
max_concurrent_orders = {max_concurrent_orders}
max_pending = {max_pending}
failure_backoff = "5s"
failure_backoff_max = "60s"

[admin]
bind = "127.0.0.1:0"
"#,
        handshake_timeout = args.handshake_wait + 2,
        work = work.display(),
        plugin = args.plugin.display(),
        ca = ca.display(),
        handshake_wait = args.handshake_wait,
        max_concurrent_orders = args.max_concurrent_orders,
        max_pending = max_pending(args),
    )
}

/// Starts one node and waits until `/readyz` answers 200.
pub async fn start(
    args: &Args,
    work: &Path,
    name: &'static str,
    bind: SocketAddr,
    redis: &str,
    directory: &str,
    ca: &Path,
    backend: SocketAddr,
) -> Result<Node> {
    let path = work.join(format!("tern-{name}.toml"));
    std::fs::write(&path, config(args, work, bind, redis, directory, ca, backend))?;
    let ready = work.join(format!("tern-{name}.ready.json"));
    let child = Command::new(&args.tern)
        .args(["run", "-c"])
        .arg(&path)
        .arg("--ready-file")
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(work.join(format!("tern-{name}.log")))?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} (cargo build --release -p tern)", args.tern.display()))?;
    let mut node = Node { name, child, admin: "127.0.0.1:0".parse()? };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = node.child.try_wait()? {
            let log = std::fs::read_to_string(work.join(format!("tern-{name}.log"))).unwrap_or_default();
            bail!("tern {name} exited during start-up ({status}):\n{}", last_lines(&log, 20));
        }
        if let Ok(text) = std::fs::read_to_string(&ready) {
            let json: Value = serde_json::from_str(&text)?;
            node.admin = json["admin"].as_str().context("ready file: no admin address")?.parse()?;
            if matches!(admin_get(node.admin, "/readyz").await, Ok((200, _))) {
                return Ok(node);
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "tern {name} not ready within 120 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// SIGTERM, then up to 20 s for a clean exit; how it ended.
pub async fn stop(node: &mut Node) -> Result<String> {
    if let Some(status) = node.child.try_wait()? {
        return Ok(format!("had exited: {status}"));
    }
    let pid = node.child.id().context("tern has no pid")?;
    let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
    Ok(match tokio::time::timeout(Duration::from_secs(20), node.child.wait()).await {
        Ok(status) => status?.to_string(),
        Err(_) => {
            node.child.start_kill()?;
            node.child.wait().await?;
            "did not stop within 20 s of SIGTERM; killed".into()
        }
    })
}

/// One plain HTTP/1.1 GET to the admin API: (status, body).
pub async fn admin_get(admin: SocketAddr, path: &str) -> Result<(u16, String)> {
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(admin).await?;
        tcp.write_all(format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes()).await?;
        let mut text = String::new();
        tcp.read_to_string(&mut text).await?;
        anyhow::Ok(text)
    };
    let text = tokio::time::timeout(Duration::from_secs(10), exchange).await.context("admin request timed out")??;
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("admin: no status line")?;
    Ok((status, text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string()))
}

/// The ACME counters of one node's `/metrics`.
pub async fn counters(node: &Node) -> Result<Counters> {
    let (status, text) = admin_get(node.admin, "/metrics").await?;
    anyhow::ensure!(status == 200, "GET /metrics of tern {}: {status}", node.name);
    let sample = |series: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    Ok(Counters {
        issued: sample(r#"tern_acme_orders_total{outcome="issued"}"#),
        failed: sample(r#"tern_acme_orders_total{outcome="failed"}"#),
        waited_for_other: sample("tern_acme_waited_for_other_total"),
        served_after_wait: sample(r#"tern_acme_handshake_waits_total{outcome="served"}"#),
        wait_expired: sample(r#"tern_acme_handshake_waits_total{outcome="fallback"}"#),
        challenges: sample(r#"tern_acme_challenges_total{challenge="tls-alpn-01"}"#),
        refused_budget: sample(r#"tern_acme_orders_refused_total{reason="budget"}"#),
        refused_backoff: sample(r#"tern_acme_orders_refused_total{reason="backoff"}"#),
        refused_busy: sample(r#"tern_acme_orders_refused_total{reason="busy"}"#),
    })
}

/// `tern_acme_*` counters of one node (or their sum, or a difference over a phase).
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub issued: u64,
    pub failed: u64,
    pub waited_for_other: u64,
    pub served_after_wait: u64,
    pub wait_expired: u64,
    pub challenges: u64,
    pub refused_budget: u64,
    pub refused_backoff: u64,
    pub refused_busy: u64,
}

impl Counters {
    fn zip(self, other: Self, f: fn(u64, u64) -> u64) -> Self {
        Self {
            issued: f(self.issued, other.issued),
            failed: f(self.failed, other.failed),
            waited_for_other: f(self.waited_for_other, other.waited_for_other),
            served_after_wait: f(self.served_after_wait, other.served_after_wait),
            wait_expired: f(self.wait_expired, other.wait_expired),
            challenges: f(self.challenges, other.challenges),
            refused_budget: f(self.refused_budget, other.refused_budget),
            refused_backoff: f(self.refused_backoff, other.refused_backoff),
            refused_busy: f(self.refused_busy, other.refused_busy),
        }
    }

    pub fn plus(self, other: Self) -> Self {
        self.zip(other, u64::saturating_add)
    }

    pub fn minus(self, other: Self) -> Self {
        self.zip(other, u64::saturating_sub)
    }

    pub fn json(&self) -> Value {
        json!({
            "orders_issued": self.issued,
            "orders_failed": self.failed,
            "orders": self.issued + self.failed,
            "waited_for_other": self.waited_for_other,
            "handshake_waits_served": self.served_after_wait,
            "handshake_waits_expired": self.wait_expired,
            "tls_alpn_challenges_answered": self.challenges,
            "refused_budget": self.refused_budget,
            "refused_backoff": self.refused_backoff,
            "refused_busy": self.refused_busy,
        })
    }
}

/// The sum of both nodes' counters.
pub async fn fleet_counters(nodes: &[Node]) -> Result<(Counters, Vec<Counters>)> {
    let mut per_node = Vec::new();
    for node in nodes {
        per_node.push(counters(node).await?);
    }
    Ok((per_node.iter().fold(Counters::default(), |a, b| a.plus(*b)), per_node))
}

pub fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
