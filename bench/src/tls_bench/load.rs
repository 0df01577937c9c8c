//! One load phase: workers drawing names (uniform or Zipf), full, resumed or keep-alive, and what they measure.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::find;
use crate::client::{Client, Verify};
use crate::server::Server;
use tern_bench::floor::content_length;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Full,
    Resumed,
    KeepAlive,
}

#[derive(Clone, Copy)]
pub enum Draw {
    Uniform,
    Zipf,
}

/// What the workers of one phase count together.
#[derive(Default)]
struct Counts {
    done: AtomicU64,
    errors: AtomicU64,
    resumed: AtomicU64,
}

/// One worker of a phase: what it asks for, where, until when, and where it counts.
#[derive(Clone)]
struct Worker {
    client: Arc<Client>,
    addr: SocketAddr,
    names: Arc<Vec<String>>,
    zipf: Arc<Option<Vec<f64>>>,
    mode: Mode,
    until: Instant,
    counts: Arc<Counts>,
}

/// Runs `concurrency` workers for `seconds`; returns rate, latency percentiles, server and client CPU.
pub async fn load(
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
    let counts = Arc::new(Counts::default());
    let server_cpu = server.cpu_seconds();
    let client_cpu = tern_bench::cpu_seconds(std::process::id())?;
    let api = server.api.as_ref().map(|api| (api.requests(), api.cpu_seconds()));
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(seconds);
    let worker = Worker {
        client: Arc::new(client.clone()),
        addr: server.addr,
        names,
        zipf,
        mode,
        until,
        counts: counts.clone(),
    };
    let workers: Vec<_> = (0..concurrency).map(|w| tokio::spawn(worker.clone().run(w))).collect();
    let mut latencies = Vec::new();
    for worker in workers {
        latencies.extend(worker.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let server_cpu = server.cpu_seconds() - server_cpu;
    let client_cpu = tern_bench::cpu_seconds(std::process::id())? - client_cpu;
    let done = counts.done.load(Ordering::Relaxed);
    let mut phase = json!({
        "concurrency": concurrency,
        "count": done,
        "errors": counts.errors.load(Ordering::Relaxed),
        "resumed": counts.resumed.load(Ordering::Relaxed),
        "rate": done as f64 / elapsed,
        "p50_ms": percentile(&mut latencies, 0.5),
        "p99_ms": percentile(&mut latencies, 0.99),
        "server_cpu_s_per_1k": server_cpu * 1000.0 / (done.max(1) as f64),
        "server_cpu_share": server_cpu / elapsed,
        "client_cpu_share": client_cpu / elapsed,
    });
    // The certificate API's part (tern-http, caddy-http): its CPU is neither the server's nor the client's.
    if let (Some(api), Some((requests, cpu))) = (&server.api, api) {
        let per_1k = 1000.0 / done.max(1) as f64;
        phase["api_requests_per_handshake"] = json!((api.requests() - requests) as f64 * per_1k / 1000.0);
        phase["api_cpu_s_per_1k"] = json!((api.cpu_seconds() - cpu) * per_1k);
    }
    Ok(phase)
}

/// A load worker's own xorshift64 sequence, for drawing names (not for anything secret).
pub struct Draws(u64);

impl Draws {
    /// Worker `w`'s sequence: distinct per worker, the same on every run.
    pub fn for_worker(w: usize) -> Self {
        Self(0x9E37_79B9_7F4A_7C15u64 ^ (w as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407))
    }

    pub fn draw(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

impl Worker {
    /// Connections until `until`, worker `w`'s own sequence of names; returns the handshake latencies.
    async fn run(self, w: usize) -> Vec<Duration> {
        let Worker { client, addr, names, zipf, mode, until, counts } = self;
        let mut draws = Draws::for_worker(w);
        let mut latencies = Vec::new();
        while Instant::now() < until {
            let rng = draws.draw();
            let index = match zipf.as_ref() {
                Some(cdf) => {
                    let u = (rng >> 11) as f64 / (1u64 << 53) as f64;
                    cdf.partition_point(|&c| c < u).min(names.len() - 1)
                }
                None => (rng % names.len() as u64) as usize,
            };
            let name = &names[index];
            if mode == Mode::KeepAlive {
                // A server may close a connection after some requests (nginx: `keepalive_requests`, 1,000
                // by default); the answered requests still count, and the worker reconnects.
                if keepalive(addr, &client.fast, name, until, &counts.done).await.is_err() {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
                continue;
            }
            match client.visit(addr, name, Verify::No, mode == Mode::Resumed).await {
                Ok((r, t)) => {
                    counts.done.fetch_add(1, Ordering::Relaxed);
                    counts.resumed.fetch_add(u64::from(r), Ordering::Relaxed);
                    latencies.push(t);
                }
                Err(_) => {
                    counts.errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        latencies
    }
}

/// One TLS connection, requests until `until` or until the server closes it; each answer is counted in `done`.
async fn keepalive(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    name: &str,
    until: Instant,
    done: &AtomicU64,
) -> Result<()> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(config.clone()).connect(server_name, tcp).await?;
    let request = format!("GET / HTTP/1.1\r\nhost: {name}\r\n\r\n");
    let mut buf = vec![0u8; 16 * 1024];
    while Instant::now() < until {
        tls.write_all(request.as_bytes()).await?;
        tls.flush().await?;
        // The backend's answer is small and has a content-length; read until its end.
        let mut got = Vec::new();
        loop {
            let n = tls.read(&mut buf).await?;
            if n == 0 && got.is_empty() {
                return Ok(()); // closed between requests
            }
            anyhow::ensure!(n > 0, "closed mid-response");
            got.extend_from_slice(&buf[..n]);
            if let Some(end) = find(&got, b"\r\n\r\n") {
                let length = content_length(&got[..end]).unwrap_or(0);
                if got.len() >= end + 4 + length {
                    break;
                }
            }
        }
        let closing = String::from_utf8_lossy(&got).to_ascii_lowercase().contains("connection: close");
        done.fetch_add(1, Ordering::Relaxed);
        if closing {
            return Ok(());
        }
    }
    Ok(())
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

pub fn percentile(values: &mut [Duration], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort();
    values[((values.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1e3
}
