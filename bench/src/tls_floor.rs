//! The minimal direct-answer TLS server: the floor tern's proxied full handshake is measured against (issue 16).
//! A tokio multi-thread runtime (as many workers as tern's: tokio's default, one per available core) and
//! tokio-rustls on tern's provider, one fixed certificate, TLS 1.3 only, no resumption (no tickets, no session
//! cache). Each connection: the handshake, one HTTP/1.1 request head read (bounded), a fixed small answer,
//! close_notify, close. No proxy, no selection, no logs, no metrics: what is left is TLS, sockets and the runtime.
//!
//! ```text
//! target/release/tls-floor --listen 127.0.0.1:8443 --cert host0.crt --key host0.key
//! ```
//! `tls-bench` runs it as the configuration `floor-direct`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use clap::Parser;
use tern_bench::floor::{MAX_REQUEST_HEAD, RESPONSE, find, server_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    runtime.enable_all().build()?.block_on(async move { tokio::spawn(serve(args.listen, acceptor)).await? })
}

/// Accepts until killed; each connection on a task of its own, at most [`MAX_CONNECTIONS`] at once.
async fn serve(addr: SocketAddr, acceptor: TlsAcceptor) -> Result<()> {
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
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, answer(&acceptor, tcp)).await;
            drop(permit);
        });
    }
}

/// One connection: handshake, request head, the fixed answer, close_notify.
async fn answer(acceptor: &TlsAcceptor, tcp: TcpStream) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let mut tls = acceptor.accept(tcp).await?;
    let mut head = Vec::with_capacity(1024);
    while find(&head, b"\r\n\r\n").is_none() {
        if head.len() >= MAX_REQUEST_HEAD {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        let mut chunk = (&mut tls).take((MAX_REQUEST_HEAD - head.len()) as u64);
        if chunk.read_buf(&mut head).await? == 0 {
            return Ok(()); // closed before a whole request
        }
    }
    tls.write_all(RESPONSE).await?;
    tls.shutdown().await
}
