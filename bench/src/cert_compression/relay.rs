//! A TCP relay in front of tern that measures each connection's handshake from the wire, whatever the client:
//! what its ClientHello offered (server name, certificate compression algorithms) and the bytes of the server's
//! first flight, counted until the client sends its first record after the ClientHello (its Finished, or the
//! change_cipher_spec before it): the client answers only once the whole flight has arrived.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// One relayed connection's handshake.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The server name the client sent.
    pub sni: Option<String>,
    /// Certificate compression algorithms offered (RFC 8879 code points: 1 zlib, 2 brotli, 3 zstd).
    pub offered: Vec<u16>,
    /// Bytes from the server before the client's second flight.
    pub first_flight: u64,
}

/// Handshakes seen so far, in the order they completed.
pub type Log = Arc<Mutex<Vec<Seen>>>;

/// Relays connections on a fresh loopback port to `target`; the log fills as handshakes finish.
pub async fn spawn(target: SocketAddr) -> Result<(SocketAddr, Log)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let log: Log = Arc::default();
    let seen = log.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                if let Ok(server) = TcpStream::connect(target).await {
                    relay(client, server, seen).await;
                }
            });
        }
    });
    Ok((addr, log))
}

async fn relay(client: TcpStream, server: TcpStream, log: Log) {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let from_server = Arc::new(AtomicU64::new(0));
    let counted = from_server.clone();
    let down = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = server_read.read(&mut buf).await {
            counted.fetch_add(n as u64, Ordering::SeqCst);
            if client_write.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = client_write.shutdown().await;
    });
    let mut buf = vec![0u8; 64 << 10];
    let mut hello = Vec::new();
    let mut done = false;
    while let Ok(n @ 1..) = client_read.read(&mut buf).await {
        if !done {
            hello.extend_from_slice(&buf[..n]);
            if let Some(mut seen) = second_flight_began(&hello) {
                seen.first_flight = from_server.load(Ordering::SeqCst);
                log.lock().unwrap_or_else(|e| e.into_inner()).push(seen);
                done = true;
            }
        }
        if server_write.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = server_write.shutdown().await;
    let _ = down.await;
}

/// Once `bytes` (everything the client sent) holds a record that is not a handshake record, what the first
/// handshake record's ClientHello offered.
fn second_flight_began(bytes: &[u8]) -> Option<Seen> {
    let mut at = 0;
    let mut first = None;
    while bytes.len() >= at + 5 {
        let len = usize::from(u16::from_be_bytes([bytes[at + 3], bytes[at + 4]]));
        if bytes[at] != 22 {
            return Some(first.map(client_hello).unwrap_or(Seen { sni: None, offered: Vec::new(), first_flight: 0 }));
        }
        let body = bytes.get(at + 5..at + 5 + len)?;
        first.get_or_insert(body);
        at += 5 + len;
    }
    None
}

/// The server name and compression algorithms of a ClientHello handshake message (in one record).
fn client_hello(message: &[u8]) -> Seen {
    let mut seen = Seen { sni: None, offered: Vec::new(), first_flight: 0 };
    let mut r = Reader(message);
    let parsed = (|| {
        (r.take(1)?[0] == 1).then_some(())?;
        r.take(3 + 2 + 32)?;
        let sid = usize::from(r.u8()?);
        r.take(sid)?;
        let suites = r.u16()?;
        r.take(suites)?;
        let methods = usize::from(r.u8()?);
        r.take(methods)?;
        let all = r.u16()?;
        let mut extensions = Reader(r.take(all)?);
        while !extensions.0.is_empty() {
            let kind = extensions.u16()?;
            let len = extensions.u16()?;
            let mut data = Reader(extensions.take(len)?);
            match kind {
                0 => {
                    data.take(3)?;
                    let len = data.u16()?;
                    seen.sni = Some(String::from_utf8_lossy(data.take(len)?).into_owned());
                }
                27 => {
                    let len = usize::from(data.u8()?);
                    let mut list = Reader(data.take(len)?);
                    while let Some(algorithm) = list.u16() {
                        seen.offered.push(u16::try_from(algorithm).unwrap_or(u16::MAX));
                    }
                }
                _ => {}
            }
        }
        Some(())
    })();
    let _ = parsed;
    seen
}

/// Big-endian reads from a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<usize> {
        let b = self.take(2)?;
        Some(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }
}
