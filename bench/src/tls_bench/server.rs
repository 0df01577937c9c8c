//! A server under test: its processes, their CPU time and memory, its start (pinned under `--pin`) and its end.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use tokio::process::{Child, Command};

use crate::args::Args;
use crate::cert_api::CertApi;
use crate::client::{Client, Verify};
use crate::configs::{FLOOR_DIRECT, FLOOR_PROXY, fleet_node, nginx_config, tern_config};
use crate::peers::{caddy_config, haproxy_config, haproxy_crt_list, write_haproxy_pems};
use crate::{Bench, Setup};

/// A server under test: its processes (nginx: master and workers) and the listener.
pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    /// The certificate API it asks (tern-http, caddy-http): its requests and CPU are reported per phase.
    pub api: Option<CertApi>,
}

impl Server {
    /// The server's processes: the child and its children (nginx's workers).
    pub fn pids(&self) -> Vec<u32> {
        let Some(pid) = self.child.id() else { return Vec::new() };
        let mut pids = vec![pid];
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            pids.extend(children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
        pids
    }

    pub fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().filter_map(|p| tern_bench::cpu_seconds(p).ok()).sum()
    }

    /// `cpu_seconds` and what the server's processes that exited since it started used (nginx's old workers after
    /// a reload, counted into the master's children time when it reaps them).
    pub fn cpu_seconds_with_exited(&self) -> f64 {
        let exited = self.child.id().and_then(|pid| tern_bench::reaped_children_cpu_seconds(pid).ok());
        self.cpu_seconds() + exited.unwrap_or(0.0)
    }

    /// (RSS, PSS) in MiB over all processes.
    pub fn memory_mib(&self) -> (f64, f64) {
        let mut rss = 0.0;
        let mut pss = 0.0;
        for pid in self.pids() {
            if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
                for line in text.lines() {
                    let value = |l: &str| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok());
                    if line.starts_with("Rss:") {
                        rss += value(line).unwrap_or(0.0) / 1024.0;
                    } else if line.starts_with("Pss:") {
                        pss += value(line).unwrap_or(0.0) / 1024.0;
                    }
                }
            }
        }
        (rss, pss)
    }
}

impl Drop for Server {
    /// nginx workers outlive a killed master: kill every process of the server, and wait until they are gone
    /// (reaped, memory freed) so that the next configuration's start-up is not measured against a dying one.
    fn drop(&mut self) {
        let pids = self.pids();
        if pids.is_empty() {
            return;
        }
        let _ = std::process::Command::new("kill").arg("-9").args(pids.iter().map(u32::to_string)).status();
        // Gone or a zombie (its memory already freed) both count as dead; `try_wait` reaps the direct child.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline
            && pids.iter().any(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
            })
        {
            std::thread::sleep(Duration::from_millis(5));
            let _ = self.child.try_wait();
        }
    }
}

/// HAProxy's Runtime API socket of a node of the propagation benchmark (`work` is the node's folder).
pub fn haproxy_socket(work: &std::path::Path) -> std::path::PathBuf {
    work.join("haproxy.sock")
}

/// (client cores, server core) for `--pin`: the last core serves, the others load.
pub fn pinned_cores() -> Result<(String, String)> {
    let cores = std::thread::available_parallelism()?.get();
    anyhow::ensure!(cores >= 2, "--pin needs at least 2 cores");
    Ok((format!("0-{}", cores - 2), (cores - 1).to_string()))
}

/// A server process, pinned to the server core under `--pin` (nginx's workers inherit the affinity).
fn server_command(args: &Args, program: &std::ffi::OsStr) -> Command {
    match pinned_cores() {
        Ok((_, server)) if args.pin => {
            let mut command = Command::new("taskset");
            command.args(["-c", &server]).arg(program);
            command
        }
        _ => Command::new(program),
    }
}

/// Starts one configuration and waits for its first successful (verified) handshake; returns the start-up time.
pub async fn start_server(bench: &Bench<'_>, config: &str, setup: &Setup) -> Result<(Server, f64)> {
    let Bench { args, work, backend, redis_url, api, fleet } = *bench;
    let port = tokio::net::TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    if config.starts_with("tern-routed") {
        // Before the clock starts: writing the route files is set-up, not start-up.
        crate::configs::write_routes(setup, backend)?;
    }
    if config.starts_with("haproxy") {
        write_haproxy_pems(setup)?; // the set's files in HAProxy's format (chain and key in one PEM): set-up too
    }
    let set = setup.dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let log = || std::fs::File::create(work.join(format!("{config}.log")));
    let started = Instant::now();
    let child = match config {
        "tern-static"
        | "tern-static-b"
        | "tern-file"
        | "tern-redis"
        | "tern-static-idle-plugin"
        | "tern-routed"
        | "tern-routed-unique"
        | "tern-http" => {
            let path = work.join(format!("{config}.toml"));
            let (as_config, binary) = match config {
                "tern-static-b" => ("tern-static", &args.tern_b),
                other => (other, &args.tern),
            };
            let mut text = tern_config(as_config, setup, addr, backend, redis_url, &api.tern_template(&set));
            if let Some(fleet) = fleet {
                text = fleet_node(&text, fleet.cache_ttl);
            }
            std::fs::write(&path, text)?;
            server_command(args, binary.as_os_str())
                .args(["run", "-c"])
                .arg(&path)
                .stderr(log()?)
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()?
        }
        "nginx-static" | "nginx-var" => {
            let prefix = work.join(config);
            std::fs::create_dir_all(prefix.join("logs"))?;
            let conf = prefix.join("nginx.conf");
            std::fs::write(&conf, nginx_config(config, setup, addr, backend, &prefix))?;
            server_command(args, "nginx".as_ref())
                .arg("-p")
                .arg(&prefix)
                .arg("-c")
                .arg(&conf)
                .args(["-g", "daemon off;"])
                .stderr(log()?)
                .kill_on_drop(true)
                .spawn()?
        }
        // Caddy's home, data and config folders in the work folder: nothing of the machine's Caddy is touched.
        "caddy-files" | "caddy-http" => {
            let home = work.join(config);
            std::fs::create_dir_all(&home)?;
            let path = home.join("caddy.json");
            let admin = fleet.map(|f| f.caddy_admin);
            let text = caddy_config(config, setup, addr, backend, &home.join("data"), &api.caddy_url(&set), admin);
            std::fs::write(&path, text)?;
            server_command(args, "caddy".as_ref())
                .args(["run", "--config"])
                .arg(&path)
                .env("HOME", &home)
                .env("XDG_DATA_HOME", home.join("data"))
                .env("XDG_CONFIG_HOME", home.join("config"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log()?)
                .kill_on_drop(true)
                .spawn()?
        }
        // The minimal direct-answer server: the first name's certificate for every name (the load client does not
        // verify; the verified start-up handshake asks for that name).
        FLOOR_DIRECT | FLOOR_PROXY => {
            let name = &setup.names[0];
            let mut command = server_command(args, args.floor.as_os_str());
            if config == FLOOR_PROXY {
                command.arg("--backend").arg(backend.to_string());
            }
            command
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--cert")
                .arg(setup.dir.join(format!("{name}.crt")))
                .arg("--key")
                .arg(setup.dir.join(format!("{name}.key")))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log()?)
                .kill_on_drop(true)
                .spawn()?
        }
        // In the foreground (`-db`): one process, its threads.
        "haproxy-crtlist" => {
            let list = work.join("haproxy-crt-list.txt");
            std::fs::write(&list, haproxy_crt_list(setup))?;
            let path = work.join("haproxy.cfg");
            let socket = fleet.map(|_| haproxy_socket(work));
            std::fs::write(&path, haproxy_config(addr, backend, &list, socket.as_deref()))?;
            server_command(args, "haproxy".as_ref())
                .args(["-db", "-f"])
                .arg(&path)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log()?)
                .kill_on_drop(true)
                .spawn()?
        }
        other => bail!("unknown configuration {other}"),
    };
    let api = matches!(config, "tern-http" | "caddy-http").then(|| api.clone());
    let mut server = Server { child, addr, api };
    let client = Client::new(&setup.dir)?;
    // Start-up: until a handshake (and request) for a known name succeeds. tern-routed-unique routes every name to
    // an origin of its own that nothing listens on: its handshakes are what it is measured by.
    let deadline = Instant::now() + Duration::from_secs_f64(args.start_timeout);
    loop {
        let ready = if config == "tern-routed-unique" {
            client.handshake_only(addr, &setup.names[0]).await.is_ok()
        } else {
            client.visit(addr, &setup.names[0], Verify::Yes, false).await.is_ok()
        };
        if ready {
            break;
        }
        if let Some(status) = server.child.try_wait()? {
            let log = std::fs::read_to_string(work.join(format!("{config}.log"))).unwrap_or_default();
            let last: Vec<&str> = log.lines().rev().take(3).collect();
            bail!("{config} exited ({status}): {}", last.into_iter().rev().collect::<Vec<_>>().join(" | "));
        }
        anyhow::ensure!(Instant::now() < deadline, "did not start within {} s", args.start_timeout);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let startup = started.elapsed().as_secs_f64();
    Ok((server, startup))
}
