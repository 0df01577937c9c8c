//! The minimal direct-answer TLS server: the floor tern's proxied full handshake is measured against (issue 16).
//! A tokio multi-thread runtime (as many workers as tern's: tokio's default, one per available core) and
//! tokio-rustls on tern's provider, one fixed certificate, TLS 1.3 only, no resumption (no tickets, no session
//! cache). Each connection: the handshake, one HTTP/1.1 request head read (bounded), a fixed small answer,
//! close_notify, close. No proxy, no selection, no logs, no metrics: what is left is TLS, sockets and the runtime.
//!
//! With `--backend`, it is the least a TLS-terminating proxy can do instead (`floor-proxy`): the request head goes
//! as it came, unparsed and unchanged, over a pooled keep-alive TCP connection to the backend, and the backend's
//! answer (its head and a `content-length` body) comes back as it is. No header is added or checked, nothing but
//! the framing is parsed: what is left is TLS, sockets, the runtime and the proxy round trip itself.
//!
//! ```text
//! target/release/tls-floor --listen 127.0.0.1:8443 --cert host0.crt --key host0.key [--backend 127.0.0.1:8080]
//! ```
//! `tls-bench` runs it as the configurations `floor-direct` and `floor-proxy`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use tern_bench::floor::{MAX_REQUEST_HEAD, RESPONSE, content_length, find, server_config};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc; // tern's allocator, so that allocation costs the same

/// Connections served at once at most; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16_384;

/// How long one connection may take, handshake and request included.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr,
    /// The certificate chain (PEM) served to every client, whatever name it asks for.
    #[arg(long)]
    cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Proxy every request to this HTTP/1.1 backend over pooled keep-alive connections instead of answering it.
    #[arg(long)]
    backend: Option<SocketAddr>,
    /// Runtime worker threads (default: tokio's, as tern's runtime: one per core this process may run on).
    #[arg(long)]
    workers: Option<usize>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let config = server_config(&args.cert, &args.key)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(workers) = args.workers {
        runtime.worker_threads(workers.max(1));
    }
    // The accept loop on a worker, as tern's listeners: the thread that blocks here only waits.
    let acceptor = TlsAcceptor::from(config);
    let backend = args.backend.map(|addr| Arc::new(Backend { addr, idle: Mutex::new(Vec::new()) }));
    runtime.enable_all().build()?.block_on(async move { tokio::spawn(serve(args.listen, acceptor, backend)).await? })
}

/// The backend of `floor-proxy` and its idle keep-alive connections (newest last).
struct Backend {
    addr: SocketAddr,
    idle: Mutex<Vec<TcpStream>>,
}

/// Idle backend connections kept at most (as tern's `proxy.max_idle_per_backend`).
const MAX_IDLE: usize = 256;

impl Backend {
    /// Sends `head` on an idle connection (a fresh one if none, or if the idle one had gone) and reads the answer
    /// into `answer`: its head and a `content-length` body. The connection is kept for the next request.
    async fn exchange(&self, head: &[u8], answer: &mut Vec<u8>) -> std::io::Result<()> {
        let idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
        let reused = idle.is_some();
        let mut tcp = match idle {
            Some(tcp) => tcp,
            None => self.connect().await?,
        };
        let result = match Self::round_trip(&mut tcp, head, answer).await {
            Err(_) if reused => {
                // A kept connection the backend had closed: once more on a fresh one.
                answer.clear();
                tcp = self.connect().await?;
                Self::round_trip(&mut tcp, head, answer).await
            }
            other => other,
        };
        result?;
        let mut idle = self.idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(tcp);
        }
        Ok(())
    }

    async fn connect(&self) -> std::io::Result<TcpStream> {
        let tcp = TcpStream::connect(self.addr).await?;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    async fn round_trip(tcp: &mut TcpStream, head: &[u8], answer: &mut Vec<u8>) -> std::io::Result<()> {
        tcp.write_all(head).await?;
        let end = read_head(tcp, answer).await?.ok_or(std::io::ErrorKind::UnexpectedEof)?;
        let body = content_length(&answer[..end]).ok_or(std::io::ErrorKind::InvalidData)?;
        while answer.len() < end + body {
            if tcp.read_buf(answer).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(())
    }
}

/// Reads into `buf` until it holds a whole HTTP head, at most [`MAX_REQUEST_HEAD`] bytes in all, and returns where
/// the head ends (past its `\r\n\r\n`), or `None` if the peer closed first. A longer head is `InvalidData`.
async fn read_head<R: AsyncRead + Unpin>(reader: &mut R, buf: &mut Vec<u8>) -> std::io::Result<Option<usize>> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            return Ok(Some(end + 4));
        }
        if buf.len() >= MAX_REQUEST_HEAD {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        let mut chunk = (&mut *reader).take((MAX_REQUEST_HEAD - buf.len()) as u64);
        if chunk.read_buf(buf).await? == 0 {
            return Ok(None);
        }
    }
}

/// Accepts until killed; each connection on a task of its own, at most [`MAX_CONNECTIONS`] at once.
async fn serve(addr: SocketAddr, acceptor: TlsAcceptor, backend: Option<Arc<Backend>>) -> Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = slots.clone().acquire_owned().await?;
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(_) => {
                // Out of descriptors or a connection reset before accept: try again shortly.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let backend = backend.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, answer(&acceptor, tcp, backend.as_deref())).await;
            drop(permit);
        });
    }
}

/// One connection: handshake, request head, the fixed answer (or the backend's), close_notify.
async fn answer(acceptor: &TlsAcceptor, tcp: TcpStream, backend: Option<&Backend>) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut tls = acceptor.accept(tcp).await?;
    let mut head = Vec::with_capacity(1024);
    if read_head(&mut tls, &mut head).await?.is_none() {
        return Ok(()); // closed before a whole request
    }
    match backend {
        None => tls.write_all(RESPONSE).await?,
        Some(backend) => {
            let mut answer = Vec::with_capacity(1024);
            backend.exchange(&head, &mut answer).await?;
            tls.write_all(&answer).await?;
        }
    }
    tls.shutdown().await
}
