//! The tern process under test: its start on a written config, admin requests, signals and graceful stop.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::args::Args;
use crate::setup::{Setup, Workspace, quiet_port};

/// tern running under the soak, with its addresses and config.
#[derive(Debug)]
pub struct Tern {
    pub child: Child,
    pub pid: u32,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub setup: Setup,
    pub config_path: PathBuf,
}

/// tern: one listener behind the Redis plugin, default certificate for unknown names, admin, invalidation; returns
/// once it is ready.
pub async fn start_tern(tern: &Path, workspace: &Workspace, redis_url: &str, probe: &str, args: &Args) -> Result<Tern> {
    let (dir, out, seed) = (&workspace.dir, &workspace.out, workspace.seed);
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let listen: SocketAddr = format!("127.0.0.1:{}", quiet_port(seed ^ 0x9e37)?).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", quiet_port(seed ^ 0x7f4a)?).parse()?;
    let setup = Setup {
        dir: dir.clone(),
        redis_url: redis_url.to_string(),
        backend,
        listen,
        admin,
        probe: probe.to_string(),
        cache_ttl: args.cache_ttl,
        max_stale: args.max_stale,
    };
    let config_path = dir.join("tern.toml");
    setup.write_config(&config_path, "plugin-a.wasm")?;
    std::fs::copy(&config_path, out.join("tern.toml"))?;
    let mut child = Command::new(tern)
        .args(["run", "-c"])
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(out.join("tern.log"))?)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", tern.display()))?;
    let pid = child.id().context("tern has no pid")?;
    wait_ready(&mut child, admin).await?;
    println!("tern {} (pid {pid}) on {listen}, admin {admin}, redis {redis_url}, backend {backend}", tern.display());
    Ok(Tern { child, pid, listen, admin, setup, config_path })
}

/// Graceful stop: SIGTERM, then tern should exit 0 within its shutdown grace; returns how it ended.
pub async fn stop_tern(child: &mut Child, pid: u32) -> Result<String> {
    Ok(match child.try_wait()? {
        Some(status) => format!("already exited: {status}"),
        None => {
            signal(pid, "TERM")?;
            match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
                Ok(status) => status.map_or_else(|e| format!("wait failed: {e}"), |s| s.to_string()),
                Err(_) => {
                    child.start_kill()?;
                    child.wait().await?;
                    "did not stop within 20 s of SIGTERM; killed".to_string()
                }
            }
        }
    })
}

pub fn signal(pid: u32, name: &str) -> Result<()> {
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
pub async fn admin_request(admin: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
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
