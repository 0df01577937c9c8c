//! The soak's own redis-server: started (from its RDB file), saved and killed, and connections to it.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

use crate::IO_LIMIT;
use crate::setup::{Workspace, quiet_port};

#[derive(Debug)]
pub struct Redis {
    pub port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Redis {
    /// Redis, below the ephemeral port range so no outgoing connection takes its port while it is down; its data
    /// in the scratch folder, its log in the output folder.
    pub async fn launch(workspace: &Workspace) -> Result<Self> {
        let redis_dir = workspace.dir.join("redis");
        std::fs::create_dir_all(&redis_dir)?;
        let mut redis = Redis {
            port: quiet_port(workspace.seed)?,
            dir: redis_dir,
            log: workspace.out.join("redis.log"),
            child: None,
        };
        redis.start().await?;
        Ok(redis)
    }

    /// Starts redis-server (loading its RDB file if there is one) and waits until it answers PING.
    pub async fn start(&mut self) -> Result<()> {
        for attempt in 0..20 {
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
            let mut child = Command::new("redis-server")
                .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--dbfilename", "soak.rdb", "--dir"])
                .arg(&self.dir)
                .stdout(log.try_clone()?)
                .stderr(log)
                .kill_on_drop(true)
                .spawn()
                .context("redis-server (scripts/setup.sh test installs it)")?;
            let url = format!("redis://127.0.0.1:{}", self.port);
            for _ in 0..500 {
                if child.try_wait()?.is_some() {
                    break;
                }
                let ping = async {
                    let mut conn = redis_conn(&url).await?;
                    anyhow::Ok(redis::cmd("PING").query_async::<String>(&mut conn).await?)
                };
                if matches!(tokio::time::timeout(Duration::from_secs(1), ping).await, Ok(Ok(_))) {
                    self.child = Some(child);
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            eprintln!("redis-server did not start on port {} (attempt {}), retrying", self.port, attempt + 1);
            let _ = child.start_kill();
            let _ = child.wait().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        bail!("redis-server would not start on port {}", self.port)
    }

    /// SAVE (so the restart has every certificate, churned ones included), then SIGKILL.
    pub async fn save_and_kill(&mut self) -> Result<()> {
        let url = format!("redis://127.0.0.1:{}", self.port);
        let save = async {
            let mut conn = redis_conn(&url).await?;
            redis::cmd("SAVE").query_async::<()>(&mut conn).await?;
            anyhow::Ok(())
        };
        tokio::time::timeout(IO_LIMIT, save).await.context("SAVE timed out")??;
        let mut child = self.child.take().context("redis is not running")?;
        child.start_kill()?;
        child.wait().await?;
        Ok(())
    }
}

pub async fn redis_conn(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(url)?;
    Ok(tokio::time::timeout(Duration::from_secs(2), client.get_multiplexed_async_connection())
        .await
        .context("redis connect timed out")??)
}
