//! The machine and its tools: its description, nginx, Caddy and HAProxy (installed when missing), the client's
//! pinning (`--pin`).

use std::process::Stdio;

use anyhow::Result;
use tokio::process::Command;

use crate::args::Args;
use crate::server::pinned_cores;

/// Under `--pin`: this program (the load client) on every core but the last.
pub fn pin_client() -> Result<()> {
    let (client, server) = pinned_cores()?;
    let status = std::process::Command::new("taskset")
        .args(["-a", "-c", "-p", &client, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "taskset could not pin the client");
    println!("pinned: client on cpu {client}, servers on cpu {server}");
    Ok(())
}

/// Which peer servers this run has (each installed from Debian packages when missing, unless `--no-install`).
#[derive(Clone, Copy, Debug)]
pub struct Peers {
    pub nginx: bool,
    pub caddy: bool,
    pub haproxy: bool,
}

impl Peers {
    /// Finds (or installs) the peers that `--configs` names; the others count as absent.
    pub async fn find(args: &Args) -> Self {
        let wanted = |prefix: &str| args.configs.iter().any(|c| c.starts_with(prefix));
        let nginx = wanted("nginx") && available(args, "nginx", "-v", &["nginx-light", "nginx"]).await;
        let caddy = wanted("caddy") && available(args, "caddy", "version", &["caddy"]).await;
        let haproxy = wanted("haproxy") && available(args, "haproxy", "-v", &["haproxy"]).await;
        Self { nginx, caddy, haproxy }
    }

    /// Whether configuration `config` can run (tern's always can).
    pub fn runs(&self, config: &str) -> bool {
        match config.split('-').next() {
            Some("nginx") => self.nginx,
            Some("caddy") => self.caddy,
            Some("haproxy") => self.haproxy,
            _ => true,
        }
    }
}

/// Whether `program` runs (`program version_arg` succeeds); when it does not, installs the first of `packages`
/// that makes it run (after `apt-get update` if none did), then stops the service Debian may have started with
/// it: the packaged service listens on :80 or :443 and is not what is measured.
async fn available(args: &Args, program: &str, version_arg: &str, packages: &[&str]) -> bool {
    let present = || std::process::Command::new(program).arg(version_arg).output().is_ok_and(|o| o.status.success());
    if present() {
        return true;
    }
    if args.no_install {
        println!("{program} not installed: {program} rows skipped");
        return false;
    }
    println!("installing {program} from Debian packages");
    for update in [false, true] {
        if update {
            let _ = Command::new("apt-get").args(["update", "-qq"]).status().await;
        }
        for package in packages {
            let _ = Command::new("apt-get")
                .args(["install", "-y", "-qq", package])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .await;
            if present() {
                break;
            }
        }
        if present() {
            break;
        }
    }
    let stop = format!("service {program} stop >/dev/null 2>&1 || true");
    let _ = Command::new("sh").args(["-c", &stop]).status().await;
    present()
}

pub async fn machine_info(args: &Args) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse::<f64>().unwrap_or(0.0))
        })
        .unwrap_or(0.0)
        / 1024.0
        / 1024.0;
    let version = |cmd: &str, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| {
                let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                text.lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_else(|_| "not installed".into())
    };
    format!(
        "machine: {cpu}, {cores} cores, {memory:.1} GiB; {}; {}; caddy {}; {}; {}; {}; {}; client offers TLS_AES_128_GCM_SHA256 first (as browsers do), X25519",
        version(&args.tern.to_string_lossy(), "--version"),
        version("nginx", "-v"),
        version("caddy", "version"),
        version("haproxy", "-v"),
        version("openssl", "version"),
        version("redis-server", "--version"),
        if args.pin {
            "servers pinned to the last core, the client to the others"
        } else {
            "client and servers share the cores"
        },
    )
}
