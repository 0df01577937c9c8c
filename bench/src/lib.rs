//! Helpers shared by the benchmark programs.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::process::{Child, Command};

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
