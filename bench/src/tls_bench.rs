//! tern against itself (dynamic via the file plugin, dynamic via the Redis plugin, static preload) and against
//! nginx (preload, and `ssl_certificate $ssl_server_name`), side by side in one run, for N host certificates.
//!
//! ```text
//! cargo build --release -p tern -p tern-bench
//! target/release/tls-bench --sizes 1000,10000,100000          # writes results/<time>/ and results/latest/
//! python3 bench/plot.py results/latest                         # PNG plots (matplotlib; see bench/plot.sh)
//! ```
//!
//! Per configuration and N: time from start to the first successful handshake, RSS and PSS after start and after
//! load, full-handshake throughput (one small request per connection, SNI drawn per connection, uniform and Zipf)
//! at two concurrency levels, p50/p99 handshake latency, server CPU-seconds per 1,000 handshakes, cold (first
//! handshake per name) vs warm latency, keep-alive requests/s, and resumed vs full throughput. Client and servers
//! share this machine's cores: the client's own CPU time is reported beside the server's, and configurations are
//! compared as ratios taken in the same run.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

#[derive(Debug, Parser)]
struct Args {
    /// Numbers of hosts (ECDSA P-256).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    sizes: Vec<usize>,
    /// Numbers of hosts also run with RSA 2048 certificates.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    rsa_sizes: Vec<usize>,
    /// Seconds per load phase.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
    /// Concurrency levels of the full-handshake phases.
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    concurrency: Vec<usize>,
    /// Configurations to run (tern-file, tern-redis, tern-static, nginx-static, nginx-var).
    #[arg(long, value_delimiter = ',', default_value = "tern-static,tern-file,tern-redis,nginx-static,nginx-var")]
    configs: Vec<String>,
    /// The tern binary.
    #[arg(long, default_value = "target/release/tern")]
    tern: PathBuf,
    /// Where certificate sets are kept between runs.
    #[arg(long, default_value = "target/bench-certs")]
    certs: PathBuf,
    /// Results folder (a timestamped subfolder and `latest` are written).
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Do not install nginx from Debian packages when it is missing (skip the nginx rows instead).
    #[arg(long)]
    no_install: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let work = tempfile::tempdir()?;
    let machine = machine_info(&args).await;
    println!("{machine}");
    let nginx = nginx_available(&args).await;
    let backend = spawn_backend().await?;
    let (_redis, redis_port) = tern_bench::start_redis(work.path()).await?;
    let redis_url = format!("redis://127.0.0.1:{redis_port}");
    let mut rows = Vec::new();
    let mut sets: Vec<(usize, tern_bench::KeyKind)> =
        args.sizes.iter().map(|&n| (n, tern_bench::KeyKind::Ecdsa)).collect();
    sets.extend(args.rsa_sizes.iter().map(|&n| (n, tern_bench::KeyKind::Rsa)));
    for (n, kind) in sets {
        let key = if kind == tern_bench::KeyKind::Rsa { "rsa2048" } else { "ecdsa-p256" };
        // Absolute: configs resolve relative paths against their own folder.
        let dir = std::path::absolute(&args.certs)?.join(format!("{key}-{n}"));
        let started = Instant::now();
        let domain = format!("{key}.bench.test");
        if tern_bench::generate(n, &dir, &domain, kind)? {
            println!("generated {n} {key} certificates in {:.1?}", started.elapsed());
        }
        let names: Arc<Vec<String>> = Arc::new((0..n).map(|i| format!("host{i}.{domain}")).collect());
        // The Redis plugin's layout, under a per-set prefix.
        let prefix = format!("{key}-{n}:");
        let import = std::process::Command::new(&args.tern)
            .args(["certs", "import"])
            .arg(&dir)
            .args(["--redis", &redis_url, "--prefix", &prefix])
            .output()?;
        anyhow::ensure!(import.status.success(), "certs import: {}", String::from_utf8_lossy(&import.stderr));
        for config in &args.configs {
            if config.starts_with("nginx") && !nginx {
                continue;
            }
            let setup = Setup { n, key, dir: dir.clone(), names: names.clone(), prefix: prefix.clone() };
            match run_config(&args, work.path(), config, &setup, backend, &redis_url).await {
                Ok(row) => {
                    print_row(&row);
                    rows.push(row);
                }
                Err(err) => println!("{config} n={n} {key}: FAILED: {err:#}"),
            }
        }
    }
    write_results(&args, &machine, &rows)?;
    Ok(())
}

struct Setup {
    n: usize,
    key: &'static str,
    dir: PathBuf,
    names: Arc<Vec<String>>,
    prefix: String,
}

/// A server under test: its processes (nginx: master and workers) and the listener.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn pids(&self) -> Vec<u32> {
        let Some(pid) = self.child.id() else { return Vec::new() };
        let mut pids = vec![pid];
        if let Ok(children) = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")) {
            pids.extend(children.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
        pids
    }

    fn cpu_seconds(&self) -> f64 {
        self.pids().into_iter().filter_map(|p| tern_bench::cpu_seconds(p).ok()).sum()
    }

    /// (RSS, PSS) in MiB over all processes.
    fn memory_mib(&self) -> (f64, f64) {
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
    /// nginx workers outlive a killed master: kill every process of the server.
    fn drop(&mut self) {
        let pids: Vec<String> = self.pids().iter().map(u32::to_string).collect();
        if !pids.is_empty() {
            let _ = std::process::Command::new("kill").arg("-9").args(&pids).status();
        }
    }
}

async fn run_config(
    args: &Args,
    work: &Path,
    config: &str,
    setup: &Setup,
    backend: SocketAddr,
    redis_url: &str,
) -> Result<serde_json::Value> {
    let port = tokio::net::TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let started = Instant::now();
    let child = match config {
        "tern-static" | "tern-file" | "tern-redis" => {
            let path = work.join(format!("{config}.toml"));
            std::fs::write(&path, tern_config(config, setup, addr, backend, redis_url))?;
            Command::new(&args.tern)
                .args(["run", "-c"])
                .arg(&path)
                .stderr(std::fs::File::create(work.join(format!("{config}.log")))?)
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()?
        }
        "nginx-static" | "nginx-var" => {
            let prefix = work.join(config);
            std::fs::create_dir_all(prefix.join("logs"))?;
            let conf = prefix.join("nginx.conf");
            std::fs::write(&conf, nginx_config(config, setup, addr, backend, &prefix))?;
            Command::new("nginx")
                .arg("-p")
                .arg(&prefix)
                .arg("-c")
                .arg(&conf)
                .args(["-g", "daemon off;"])
                .stderr(std::fs::File::create(work.join(format!("{config}.log")))?)
                .kill_on_drop(true)
                .spawn()?
        }
        other => bail!("unknown configuration {other}"),
    };
    let mut server = Server { child, addr };
    let client = Client::new(&setup.dir)?;
    // Start-up: until a handshake for a known name succeeds.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if client.visit(addr, &setup.names[0], Verify::Yes, false).await.is_ok() {
            break;
        }
        if let Some(status) = server.child.try_wait()? {
            let log = std::fs::read_to_string(work.join(format!("{config}.log"))).unwrap_or_default();
            bail!("{config} exited ({status}): {}", log.lines().take(3).collect::<Vec<_>>().join(" | "));
        }
        anyhow::ensure!(Instant::now() < deadline, "{config} did not serve within 600 s");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let startup = started.elapsed().as_secs_f64();
    let (rss_start, pss_start) = server.memory_mib();

    // Cold vs warm: 200 names never asked before, one at a time, verified; then the same names again.
    let sample: Vec<String> = setup.names.iter().rev().take(200.min(setup.n - 1)).cloned().collect();
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for pass in [&mut cold, &mut warm] {
        for name in &sample {
            let t = Instant::now();
            client.visit(addr, name, Verify::Yes, false).await.with_context(|| name.to_string())?;
            pass.push(t.elapsed());
        }
    }

    // Full handshakes, one request each: uniform over N at each concurrency, Zipf at the highest, and a warmed
    // hot set of 1,000 names (cache hits for the dynamic configurations).
    let hot: Arc<Vec<String>> = Arc::new(setup.names.iter().take(1000).cloned().collect());
    for name in hot.iter() {
        client.visit(addr, name, Verify::No, false).await?;
    }
    let mut phases = serde_json::Map::new();
    let top = *args.concurrency.iter().max().unwrap_or(&64);
    let mut plan: Vec<(String, Arc<Vec<String>>, Draw, usize)> =
        args.concurrency.iter().map(|&c| (format!("uniform_c{c}"), setup.names.clone(), Draw::Uniform, c)).collect();
    plan.push((format!("zipf_c{top}"), setup.names.clone(), Draw::Zipf, top));
    plan.push((format!("hot_c{top}"), hot.clone(), Draw::Uniform, top));
    for (label, names, draw, concurrency) in plan {
        let phase = load(&client, &server, names, draw, concurrency, args.seconds, Mode::Full).await?;
        phases.insert(label, phase);
    }
    let resumed = load(&client, &server, hot.clone(), Draw::Uniform, top, args.seconds, Mode::Resumed).await?;
    let keepalive = load(&client, &server, hot.clone(), Draw::Uniform, top, args.seconds, Mode::KeepAlive).await?;
    let (rss_after, pss_after) = server.memory_mib();
    let full_rate = phases[&format!("hot_c{top}")]["rate"].as_f64().unwrap_or(0.0);
    Ok(json!({
        "config": config,
        "n": setup.n,
        "key": setup.key,
        "startup_s": startup,
        "rss_start_mib": rss_start,
        "pss_start_mib": pss_start,
        "rss_after_mib": rss_after,
        "pss_after_mib": pss_after,
        "cold_p50_ms": percentile(&mut cold, 0.5),
        "cold_p99_ms": percentile(&mut cold, 0.99),
        "warm_p50_ms": percentile(&mut warm, 0.5),
        "warm_p99_ms": percentile(&mut warm, 0.99),
        "phases": phases,
        "resumed": resumed,
        "resumed_over_full": resumed["rate"].as_f64().unwrap_or(0.0) / full_rate.max(1e-9),
        "top_concurrency": top,
        "keepalive": keepalive,
    }))
}

fn tern_config(config: &str, setup: &Setup, addr: SocketAddr, backend: SocketAddr, redis_url: &str) -> String {
    let dir = setup.dir.display();
    let mut text = format!(
        "[log]\nlevel = \"warn\"\naccess = false\n\n[cache]\nmax_entries = {}\n\n",
        (setup.n + 1000).max(100_000)
    );
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/wasm32-wasip2/release");
    match config {
        "tern-static" => {
            for name in setup.names.iter() {
                text += &format!(
                    "[[certificate]]\nname = \"{name}\"\ncert = \"{dir}/{name}.crt\"\nkey = \"{dir}/{name}.key\"\n"
                );
            }
            text += &format!("\n[[listener]]\nbind = \"{addr}\"\nstrict = true\nbackend = \"http://{backend}\"\n");
        }
        "tern-file" => {
            text += &format!(
                "[[plugin]]\nname = \"files\"\npath = \"{}\"\ngrants.files = \"{dir}\"\n\n\
                 [[listener]]\nbind = \"{addr}\"\nplugin = \"files\"\nstrict = true\nbackend = \"http://{backend}\"\n",
                plugins.join("file_path.wasm").display()
            );
        }
        _ => {
            let prefix = &setup.prefix;
            text += &format!(
                "[[redis]]\nname = \"certs\"\nurls = [\"{redis_url}\"]\n\n\
                 [[plugin]]\nname = \"redis\"\npath = \"{}\"\n\
                 settings = {{ cert_key = \"{prefix}{{name}}.crt\", key_key = \"{prefix}{{name}}.key\" }}\n\
                 grants.kv = {{ redis = \"certs\", prefixes = [\"{prefix}\"] }}\n\n\
                 [[listener]]\nbind = \"{addr}\"\nplugin = \"redis\"\nstrict = true\nbackend = \"http://{backend}\"\n",
                plugins.join("redis_plugin.wasm").display()
            );
        }
    }
    text
}

fn nginx_config(config: &str, setup: &Setup, addr: SocketAddr, backend: SocketAddr, prefix: &Path) -> String {
    let dir = setup.dir.display();
    let mut text = format!(
        "user root;\nworker_processes 2;\npid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log warn;\n\
         worker_rlimit_nofile 65536;\nevents {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  server_names_hash_max_size 1048576;\n  server_names_hash_bucket_size 128;\n\
         ssl_protocols TLSv1.2 TLSv1.3;\n  ssl_session_cache shared:SSL:50m;\n  ssl_session_tickets on;\n\
         upstream backend {{ server {backend}; keepalive 64; }}\n",
        prefix = prefix.display()
    );
    let location =
        "location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }";
    match config {
        "nginx-static" => {
            for (i, name) in setup.names.iter().enumerate() {
                let default = if i == 0 { " default_server" } else { "" };
                text += &format!(
                    "  server {{ listen {addr} ssl{default}; server_name {name}; \
                     ssl_certificate {dir}/{name}.crt; ssl_certificate_key {dir}/{name}.key; {location} }}\n"
                );
            }
        }
        _ => {
            text += &format!(
                "  server {{ listen {addr} ssl default_server; server_name _; \
                 ssl_certificate {dir}/$ssl_server_name.crt; ssl_certificate_key {dir}/$ssl_server_name.key; {location} }}\n"
            );
        }
    }
    text + "}\n"
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verify {
    Yes,
    No,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Full,
    Resumed,
    KeepAlive,
}

#[derive(Clone, Copy)]
enum Draw {
    Uniform,
    Zipf,
}

/// TLS client configs: verifying, not verifying (load phases: the client's CPU is precious), resuming.
#[derive(Clone)]
struct Client {
    verifying: Arc<rustls::ClientConfig>,
    fast: Arc<rustls::ClientConfig>,
    resuming: Arc<rustls::ClientConfig>,
}

impl Client {
    fn new(dir: &Path) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from_pem_file(dir.join("ca.crt"))?)?;
        let provider = tern::tls::provider().clone();
        let base =
            rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let mut verifying = base.clone().with_root_certificates(roots).with_no_client_auth();
        verifying.resumption = rustls::client::Resumption::disabled();
        verifying.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut fast = verifying.clone();
        fast.dangerous().set_certificate_verifier(Arc::new(AcceptAll(provider)));
        let mut resuming = fast.clone();
        resuming.resumption = rustls::client::Resumption::in_memory_sessions(4096);
        Ok(Self { verifying: Arc::new(verifying), fast: Arc::new(fast), resuming: Arc::new(resuming) })
    }

    /// One connection, one request; returns whether it resumed.
    async fn visit(&self, addr: SocketAddr, name: &str, verify: Verify, resume: bool) -> Result<(bool, Duration)> {
        let config = match (verify, resume) {
            (Verify::Yes, _) => self.verifying.clone(),
            (Verify::No, false) => self.fast.clone(),
            (Verify::No, true) => self.resuming.clone(),
        };
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let started = Instant::now();
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string())?;
        let mut tls = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(config).connect(server_name, tcp),
        )
        .await
        .context("handshake timed out")??;
        let handshake = started.elapsed();
        let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        tls.write_all(format!("GET / HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n").as_bytes()).await?;
        tls.flush().await?;
        let mut response = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut response)).await;
        anyhow::ensure!(response.starts_with(b"HTTP/1.1 200"), "no 200 for {name}");
        Ok((resumed, handshake))
    }
}

#[derive(Debug)]
struct AcceptAll(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAll {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Runs `concurrency` workers for `seconds`; returns rate, latency percentiles, server and client CPU.
async fn load(
    client: &Client,
    server: &Server,
    names: Arc<Vec<String>>,
    draw: Draw,
    concurrency: usize,
    seconds: f64,
    mode: Mode,
) -> Result<serde_json::Value> {
    let zipf = Arc::new(match draw {
        Draw::Zipf => Some(zipf_cdf(names.len(), 1.0)),
        Draw::Uniform => None,
    });
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let resumed = Arc::new(AtomicU64::new(0));
    let server_cpu = server.cpu_seconds();
    let client_cpu = tern_bench::cpu_seconds(std::process::id())?;
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    let clients = Arc::new(client.clone());
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (names, zipf, done, errors, resumed, clients) =
            (names.clone(), zipf.clone(), done.clone(), errors.clone(), resumed.clone(), clients.clone());
        let addr = server.addr;
        workers.push(tokio::spawn(async move {
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (w as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407);
            let mut latencies = Vec::new();
            while Instant::now() < until {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let index = match zipf.as_ref() {
                    Some(cdf) => {
                        let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
                        cdf.partition_point(|&c| c < u).min(names.len() - 1)
                    }
                    None => (rng % names.len() as u64) as usize,
                };
                let name = &names[index];
                if mode == Mode::KeepAlive {
                    match keepalive(addr, &clients.fast, name, until).await {
                        Ok(n) => {
                            done.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(_) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    continue;
                }
                match clients.visit(addr, name, Verify::No, mode == Mode::Resumed).await {
                    Ok((r, t)) => {
                        done.fetch_add(1, Ordering::Relaxed);
                        resumed.fetch_add(u64::from(r), Ordering::Relaxed);
                        latencies.push(t);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let server_cpu = server.cpu_seconds() - server_cpu;
    let client_cpu = tern_bench::cpu_seconds(std::process::id())? - client_cpu;
    let done = done.load(Ordering::Relaxed);
    Ok(json!({
        "concurrency": concurrency,
        "count": done,
        "errors": errors.load(Ordering::Relaxed),
        "resumed": resumed.load(Ordering::Relaxed),
        "rate": done as f64 / elapsed,
        "p50_ms": percentile(&mut latencies, 0.5),
        "p99_ms": percentile(&mut latencies, 0.99),
        "server_cpu_s_per_1k": server_cpu * 1000.0 / (done.max(1) as f64),
        "server_cpu_share": server_cpu / elapsed,
        "client_cpu_share": client_cpu / elapsed,
    }))
}

/// One TLS connection, requests until `until`; returns how many answered.
async fn keepalive(addr: SocketAddr, config: &Arc<rustls::ClientConfig>, name: &str, until: Instant) -> Result<u64> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(config.clone()).connect(server_name, tcp).await?;
    let request = format!("GET / HTTP/1.1\r\nhost: {name}\r\n\r\n");
    let mut count = 0;
    let mut buf = vec![0u8; 16 * 1024];
    while Instant::now() < until {
        tls.write_all(request.as_bytes()).await?;
        tls.flush().await?;
        // The backend's answer is small and has a content-length; read until its end.
        let mut got = Vec::new();
        loop {
            let n = tls.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "closed");
            got.extend_from_slice(&buf[..n]);
            if let Some(end) = find(&got, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                    .unwrap_or(0);
                if got.len() >= end + 4 + length {
                    break;
                }
            }
        }
        count += 1;
    }
    Ok(count)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn zipf_cdf(n: usize, s: f64) -> Vec<f64> {
    let mut cdf = Vec::with_capacity(n);
    let mut total = 0.0;
    for k in 1..=n {
        total += 1.0 / (k as f64).powf(s);
        cdf.push(total);
    }
    for c in &mut cdf {
        *c /= total;
    }
    cdf
}

fn percentile(values: &mut [Duration], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort();
    values[((values.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3
}

/// A minimal HTTP/1.1 backend answering every request with a small 200 (keep-alive), on its own thread's runtime.
async fn spawn_backend() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::spawn(move || {
        runtime.block_on(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else { continue };
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let mut buf = vec![0u8; 8192];
                    let mut pending = Vec::new();
                    loop {
                        let Ok(n) = tcp.read(&mut buf).await else { return };
                        if n == 0 {
                            return;
                        }
                        pending.extend_from_slice(&buf[..n]);
                        while let Some(end) = find(&pending, b"\r\n\r\n") {
                            pending.drain(..end + 4);
                            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-type: text/plain\r\n\r\nok\n";
                            if tcp.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
    });
    Ok(addr)
}

async fn nginx_available(args: &Args) -> bool {
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

async fn machine_info(args: &Args) -> String {
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
        "machine: {cpu}, {cores} cores, {memory:.1} GiB; {}; {}; {}; {}; client and servers share the cores",
        version(&args.tern.to_string_lossy(), "--version"),
        version("nginx", "-v"),
        version("openssl", "version"),
        version("redis-server", "--version"),
    )
}

fn print_row(row: &serde_json::Value) {
    let top = &row["top_concurrency"];
    let hot = &row["phases"][format!("hot_c{top}")];
    let uniform = &row["phases"][format!("uniform_c{top}")];
    println!(
        "{:<13} n={:<7} {:<10} start {:>7.2}s rss {:>7.1}MiB pss {:>7.1}MiB | hot {:>6.0}/s p50 {:>5.2} p99 {:>6.2}ms cpu/1k {:.3}s | uniform {:>6.0}/s | cold p99 {:.2}ms warm p99 {:.2}ms | resumed x{:.2} | keep-alive {:.0} req/s",
        row["config"].as_str().unwrap_or(""),
        row["n"],
        row["key"].as_str().unwrap_or(""),
        row["startup_s"].as_f64().unwrap_or(0.0),
        row["rss_start_mib"].as_f64().unwrap_or(0.0),
        row["pss_start_mib"].as_f64().unwrap_or(0.0),
        hot["rate"].as_f64().unwrap_or(0.0),
        hot["p50_ms"].as_f64().unwrap_or(0.0),
        hot["p99_ms"].as_f64().unwrap_or(0.0),
        hot["server_cpu_s_per_1k"].as_f64().unwrap_or(0.0),
        uniform["rate"].as_f64().unwrap_or(0.0),
        row["cold_p99_ms"].as_f64().unwrap_or(0.0),
        row["warm_p99_ms"].as_f64().unwrap_or(0.0),
        row["resumed_over_full"].as_f64().unwrap_or(0.0),
        row["keepalive"]["rate"].as_f64().unwrap_or(0.0),
    );
}

fn write_results(args: &Args, machine: &str, rows: &[serde_json::Value]) -> Result<()> {
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let json = json!({ "machine": machine, "seconds_per_phase": args.seconds, "rows": rows });
    let mut md = format!("Machine: {machine}\n\n");
    md += "| config | N | key | start (s) | RSS (MiB) | PSS (MiB) | hot full hs/s | p50 / p99 (ms) | server CPU-s / 1k | uniform hs/s (c=max) | zipf hs/s | cold p50 / p99 (ms) | warm p50 / p99 (ms) | resumed ÷ full | keep-alive req/s |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for row in rows {
        let top = &row["top_concurrency"];
        let pick = |prefix: &str| row["phases"][format!("{prefix}_c{top}")].clone();
        let (hot, uniform, zipf) = (pick("hot"), pick("uniform"), pick("zipf"));
        let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
        md += &format!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} / {:.2} | {:.3} | {:.0} | {:.0} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} | {:.0} |\n",
            row["config"].as_str().unwrap_or(""),
            row["n"],
            row["key"].as_str().unwrap_or(""),
            f(&row["startup_s"]),
            f(&row["rss_start_mib"]),
            f(&row["pss_start_mib"]),
            f(&hot["rate"]),
            f(&hot["p50_ms"]),
            f(&hot["p99_ms"]),
            f(&hot["server_cpu_s_per_1k"]),
            f(&uniform["rate"]),
            f(&zipf["rate"]),
            f(&row["cold_p50_ms"]),
            f(&row["cold_p99_ms"]),
            f(&row["warm_p50_ms"]),
            f(&row["warm_p99_ms"]),
            f(&row["resumed_over_full"]),
            f(&row["keepalive"]["rate"]),
        );
    }
    for folder in [args.out.join(stamp.to_string()), args.out.join("latest")] {
        std::fs::create_dir_all(&folder)?;
        std::fs::write(folder.join("results.json"), serde_json::to_string_pretty(&json)?)?;
        std::fs::write(folder.join("results.md"), &md)?;
    }
    println!(
        "\n{md}\nwritten to {} and {}",
        args.out.join(stamp.to_string()).display(),
        args.out.join("latest").display()
    );
    Ok(())
}
