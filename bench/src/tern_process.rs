//! A `tern run` child process of a benchmark: started from a config text, ready when its ready file says where
//! it listens, killed when dropped.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tokio::process::{Child, Command};

/// A running `tern run`.
#[derive(Debug)]
pub struct TernProcess {
    pub child: Child,
    pub pid: u32,
    /// The address of the listener named `main`.
    pub listener: SocketAddr,
    /// The admin API.
    pub admin: SocketAddr,
}

impl TernProcess {
    /// Writes `config` to `dir/tern.toml` and runs `tern` on it (its log in `dir/tern.log`), waiting up to 30 s for
    /// it to be ready. The config must name a listener `main` and an `[admin]` section.
    pub async fn start(tern: &Path, dir: &Path, config: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("tern.toml");
        std::fs::write(&path, config)?;
        let ready = dir.join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let mut child = Command::new(tern)
            .arg("run")
            .arg("-c")
            .arg(&path)
            .arg("--ready-file")
            .arg(&ready)
            .stderr(Stdio::from(std::fs::File::create(dir.join("tern.log"))?))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} (cargo build --release -p tern)", tern.display()))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let text = loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                break text;
            }
            if let Some(status) = child.try_wait()? {
                bail!("tern exited ({status}) before it was ready");
            }
            ensure!(Instant::now() < deadline, "tern not ready after 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let json: serde_json::Value = serde_json::from_str(&text)?;
        let listener = json["listeners"]["main"].as_str().context("no listener named main")?.parse()?;
        let admin = json["admin"].as_str().context("no admin address")?.parse()?;
        let pid = child.id().context("tern running")?;
        Ok(Self { child, pid, listener, admin })
    }
}
