//! The HTTP certificate API that tern's http-api plugin (`tern-http`) and Caddy's `get_certificate http` manager
//! (`caddy-http`) both ask, with the same data: the files of a certificate set, read per request on a thread of
//! its own (so its CPU time is measured apart from the load client's).
//!
//! - `GET /v1/<set>/certs/<name>`: tern's shape, `200` with JSON `{"chain": PEM, "key": PEM}`, or `404`.
//! - `GET /caddy/<set>?server_name=<name>&...`: Caddy's shape, `200` with one PEM body (chain, then key), or `204`
//!   (Caddy's documented "not managing this name").
//!
//! `<set>` is a folder under the certificate root (`ecdsa-p256-1000`). Names and sets are checked to be plain
//! labels, so a request never reads outside the root.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::find;

/// The running API: where it listens, how many requests it answered, and the thread that answers them.
#[derive(Clone, Debug)]
pub struct CertApi {
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
    /// The answering thread's id (its CPU time is `/proc/self/task/<tid>/stat`).
    tid: u32,
}

impl CertApi {
    /// Starts the API over the certificate sets under `root`, on a thread (and single-threaded runtime) of its own.
    pub fn spawn(root: PathBuf) -> Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let requests = Arc::new(AtomicU64::new(0));
        let counter = requests.clone();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new().name("cert-api".into()).spawn(move || {
            let _ = tid_tx.send(thread_id());
            runtime.block_on(serve(listener, Arc::new(root), counter));
        })?;
        let tid = tid_rx.recv().context("cert-api thread")?.context("reading /proc/thread-self")?;
        Ok(Self { addr, requests, tid })
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// CPU-seconds the answering thread used so far.
    pub fn cpu_seconds(&self) -> f64 {
        tern_bench::thread_cpu_seconds(self.tid).unwrap_or(0.0)
    }

    /// tern's http-api plugin `url_template` for a set.
    pub fn tern_template(&self, set: &str) -> String {
        format!("http://{}/v1/{set}/certs/{{name}}", self.addr)
    }

    /// Caddy's `get_certificate http` URL for a set (Caddy appends `?server_name=...`).
    pub fn caddy_url(&self, set: &str) -> String {
        format!("http://{}/caddy/{set}", self.addr)
    }
}

/// This thread's id, from `/proc/thread-self` (`<pid>/task/<tid>`).
fn thread_id() -> Option<u32> {
    std::fs::read_link("/proc/thread-self").ok()?.file_name()?.to_str()?.parse().ok()
}

/// Accepts connections until the process ends; each is served with keep-alive.
async fn serve(listener: std::net::TcpListener, root: Arc<PathBuf>, requests: Arc<AtomicU64>) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else { return };
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        tokio::spawn(connection(tcp, root.clone(), requests.clone()));
    }
}

/// One client connection: requests (pipelined or not) until it closes; a head over 8 KiB closes it.
async fn connection(mut tcp: tokio::net::TcpStream, root: Arc<PathBuf>, requests: Arc<AtomicU64>) {
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
            let head = String::from_utf8_lossy(&pending[..end]).into_owned();
            pending.drain(..end + 4);
            requests.fetch_add(1, Ordering::Relaxed);
            let target = head.split_whitespace().nth(1).unwrap_or("");
            let (status, kind, body) = answer(&root, target);
            let reply = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-type: {kind}\r\n\r\n", body.len());
            if tcp.write_all(reply.as_bytes()).await.is_err() || tcp.write_all(&body).await.is_err() {
                return;
            }
        }
        if pending.len() > 8192 {
            return;
        }
    }
}

/// Status line, content type and body for a request target.
fn answer(root: &Path, target: &str) -> (&'static str, &'static str, Vec<u8>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let mut parts = path.trim_start_matches('/').splitn(4, '/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("v1"), Some(set), Some("certs"), Some(name)) => match files(root, set, name) {
            Some((chain, key)) => {
                let body = serde_json::json!({ "chain": chain, "key": key }).to_string().into_bytes();
                ("200 OK", "application/json", body)
            }
            None => ("404 Not Found", "text/plain", Vec::new()),
        },
        (Some("caddy"), Some(set), None, None) => {
            let name = query.split('&').find_map(|p| p.strip_prefix("server_name=")).unwrap_or("");
            match files(root, set, name) {
                Some((chain, key)) => ("200 OK", "application/x-pem-file", format!("{chain}{key}").into_bytes()),
                None => ("204 No Content", "text/plain", Vec::new()),
            }
        }
        _ => ("404 Not Found", "text/plain", Vec::new()),
    }
}

/// The chain and key PEM of `name` in set `set`, if both are plain labels and the files exist.
fn files(root: &Path, set: &str, name: &str) -> Option<(String, String)> {
    let plain = |s: &str| {
        !s.is_empty() && !s.starts_with('.') && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    if !plain(set) || !plain(name) || name.contains("..") {
        return None;
    }
    let dir = root.join(set);
    let chain = std::fs::read_to_string(dir.join(format!("{name}.crt"))).ok()?;
    let key = std::fs::read_to_string(dir.join(format!("{name}.key"))).ok()?;
    Some((chain, key))
}
