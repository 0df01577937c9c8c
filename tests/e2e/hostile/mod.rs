//! Hostile clients: what an internet client can do to tern after (and during) the handshake, and the bound that
//! stops it. Each test here failed on the code before its fix.
//!
//! `connections.rs`: what a client can hold after the handshake (idle connections, streams, uploads, slow reads,
//! the breaker, the admin listener); `floods.rs`: floods and malformed input (huge names, memory bombs, HTTP/2
//! floods, trickled hellos, ambiguous framing, descriptor exhaustion, name floods against the rate cap);
//! `admission.rs`: per-address and per-prefix limits on new and open connections, before TLS.

mod admission;
mod connections;
mod floods;

use crate::support::*;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Reads until the peer closes (or errors), at most `limit`; returns how long that took.
async fn closed_within(stream: &mut (impl tokio::io::AsyncRead + Unpin), limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return started.elapsed(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

fn limits(keys: &str) -> String {
    format!("\n[server]\n{keys}\n")
}

/// A backend that answers every request after `delay` and counts the connections it has open at once.
async fn counting_backend(delay: Duration) -> anyhow::Result<(SocketAddr, Arc<(AtomicUsize, AtomicUsize)>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let counts = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
    let shared = counts.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counts = shared.clone();
            tokio::spawn(async move {
                let open = counts.0.fetch_add(1, Ordering::SeqCst) + 1;
                counts.1.fetch_max(open, Ordering::SeqCst);
                let service = hyper::service::service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(http::Response::new(http_body_util::Full::new(
                        Bytes::from_static(b"slow\n"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
                counts.0.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Ok((addr, counts))
}

/// Sends `head` raw over a fresh HTTP/1.1 connection; returns the status line and whatever else came back.
async fn raw_http1(server: &TestServer, pki: &Pki, head: &[u8]) -> anyhow::Result<String> {
    let mut stream = connect(server.addr, &pki.client(&[b"http/1.1"]), "a.test").await?;
    stream.write_all(head).await?;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            reply.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    Ok(String::from_utf8_lossy(&reply).into_owned())
}
