//! The machine and its tools: its description, nginx (installed when missing), the client's pinning (`--pin`).

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

pub async fn nginx_available(args: &Args) -> bool {
    let present = || std::process::Command::new("nginx").arg("-v").output().is_ok_and(|o| o.status.success());
    if present() {
        return true;
    }
    if args.no_install {
        println!("nginx not installed: nginx rows skipped");
        return false;
    }
    println!("installing nginx from Debian packages");
    let _ = Command::new("apt-get")
        .args(["install", "-y", "-qq", "nginx-light"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .await;
    if !present() {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status().await;
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "nginx"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .await;
    }
    // Debian starts the packaged service; it listens on :80 and is not what we measure.
    let _ = Command::new("sh").args(["-c", "service nginx stop >/dev/null 2>&1 || true"]).status().await;
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
        "machine: {cpu}, {cores} cores, {memory:.1} GiB; {}; {}; {}; {}; {}; client offers TLS_AES_128_GCM_SHA256 first (as browsers do), X25519",
        version(&args.tern.to_string_lossy(), "--version"),
        version("nginx", "-v"),
        version("openssl", "version"),
        version("redis-server", "--version"),
        if args.pin {
            "servers pinned to the last core, the client to the others"
        } else {
            "client and servers share the cores"
        },
    )
}
