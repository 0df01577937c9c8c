//! The HTTP backend every server under test proxies to.

use std::net::SocketAddr;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal HTTP/1.1 backend answering every request with a small 200 (keep-alive), on its own thread's runtime.
pub async fn spawn_backend() -> Result<SocketAddr> {
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

pub use tern_bench::floor::find;
