//! Real Redis for the tests: `redis-server` processes on free loopback ports, standalone or as a 3-master cluster,
//! killed when dropped.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

use crate::support::free_port;

/// One `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
    cluster: bool,
}

impl RedisServer {
    /// A standalone server, ready for commands.
    pub async fn start() -> Result<Self> {
        Self::spawn(false).await
    }

    async fn spawn(cluster: bool) -> Result<Self> {
        let mut server = RedisServer { port: free_port().await?, child: None, dir: tempfile::tempdir()?, cluster };
        server.launch().await?;
        Ok(server)
    }

    async fn launch(&mut self) -> Result<()> {
        let mut command = Command::new("redis-server");
        command.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        command.arg("--dir").arg(self.dir.path());
        if self.cluster {
            command.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"]);
            command.args(["--cluster-config-file", &format!("nodes-{}.conf", self.port)]);
        }
        command.stdout(std::process::Stdio::null()).kill_on_drop(true);
        self.child = Some(command.spawn().context("starting redis-server (is it installed? see scripts/setup.sh)")?);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if self.command(&["PING"]).await.is_ok_and(|r| r.contains("PONG")) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("redis-server on port {} did not come up", self.port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would).
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts the server again on the same port (its data is gone: nothing is persisted).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        self.launch().await
    }

    /// Sends one inline command and returns the raw reply text.
    pub async fn command(&self, args: &[&str]) -> Result<String> {
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let mut request = format!("*{}\r\n", args.len());
        for arg in args {
            request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
        }
        tcp.write_all(request.as_bytes()).await?;
        let mut reply = vec![0u8; 64 * 1024];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut reply)).await??;
        Ok(String::from_utf8_lossy(&reply[..n]).into_owned())
    }
}

/// Three masters, no replicas, slots spread by `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start() -> Result<Self> {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(RedisServer::spawn(true).await?);
        }
        let mut create = std::process::Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for node in &nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        create.args(["--cluster-replicas", "0", "--cluster-yes"]);
        let output = crate::support::run_command(create).await?;
        anyhow::ensure!(output.status.success(), "cluster create: {}", String::from_utf8_lossy(&output.stdout));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        for node in &nodes {
            while !node.command(&["CLUSTER", "INFO"]).await?.contains("cluster_state:ok") {
                anyhow::ensure!(tokio::time::Instant::now() < deadline, "cluster did not become ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(Self { nodes })
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}
