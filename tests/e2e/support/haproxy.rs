//! Debian's HAProxy as a peer of tern (in front of it sending PROXY protocol, or behind it accepting it).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;

/// An HAProxy process, killed on drop.
pub struct HaProxy {
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl HaProxy {
    /// Starts HAProxy with `config` (its whole configuration file) and returns once it listens on every address
    /// in `listens`.
    pub async fn start(config: &str, listens: &[SocketAddr]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let binary = ["/usr/sbin/haproxy", "haproxy"]
            .into_iter()
            .find(|b| std::path::Path::new(b).is_file())
            .unwrap_or("haproxy");
        let child = tokio::process::Command::new(binary)
            .args(["-db", "-f"])
            .arg(&path)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting haproxy (scripts/setup.sh test installs it): {e}"))?;
        let haproxy = Self { child, _dir: dir };
        for addr in listens {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while tokio::net::TcpStream::connect(addr).await.is_err() {
                anyhow::ensure!(tokio::time::Instant::now() < deadline, "haproxy did not listen on {addr}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(haproxy)
    }
}
