//! The floors of a proxied full handshake (issue 16): what a TLS 1.3 full handshake with one small request costs
//! a server that does nothing else. Two of them share the TLS config here: the minimal direct-answer server
//! (`tls-floor`: tokio + tokio-rustls over real sockets) and the in-memory handshake (rustls alone, no sockets,
//! server-side CPU only), which `tls-bench` and `crypto-cost` report beside tern.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, ensure};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, ConnectionCommon, ServerConfig, ServerConnection};

/// The floors' answer to every request: the bench backend's small 200, and the end of the connection.
pub const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\nok\n";

/// The longest request head the direct-answer server reads before it gives up on a connection.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Where `needle` first starts in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The `content-length` of an HTTP/1.1 message head (its first such header), if it has a valid one.
pub fn content_length(head: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(head).ok()?;
    let (_, value) = text
        .split("\r\n")
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))?;
    value.trim().parse().ok()
}

/// tern's crypto provider (aws-lc-rs) with the cipher suites in browsers' order: TLS 1.3 before TLS 1.2, and
/// AES-128-GCM first (Chrome, Firefox and Safari offer it first; rustls and OpenSSL clients offer AES-256 first).
/// The load client offers this order; every server here honours the client's order, so all negotiate the same.
pub fn browser_order_provider() -> Arc<CryptoProvider> {
    let mut provider = (**tern::crypto::provider()).clone();
    provider.cipher_suites.sort_by_key(|suite| {
        (matches!(suite, rustls::SupportedCipherSuite::Tls12(_)), !format!("{:?}", suite.suite()).contains("AES_128"))
    });
    Arc::new(provider)
}

/// The floor server's TLS: tern's provider, TLS 1.3 only, one fixed certificate, ALPN http/1.1 (what the load
/// client offers), and no resumption at all (no session cache, no tickets): every handshake is full, and nothing
/// is spent issuing tickets.
pub fn server_config(chain: &Path, key: &Path) -> Result<Arc<ServerConfig>> {
    let certs = CertificateDer::pem_file_iter(chain)
        .with_context(|| format!("reading {}", chain.display()))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key).with_context(|| format!("reading {}", key.display()))?;
    let mut config = ServerConfig::builder_with_provider(tern::crypto::provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The load client's TLS as the floors see it: browsers' suite order, X25519 first, ALPN http/1.1, no
/// certificate check (the client's CPU is not what is measured), no resumption.
pub fn client_config() -> Result<Arc<ClientConfig>> {
    let provider = browser_order_provider();
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(tern_fixtures::TestVerifier::accept_any(provider))
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What the in-memory floor measured.
#[derive(Debug, Clone)]
pub struct MemoryFloor {
    /// Server-side thread CPU per full handshake with its request and response, clock overhead subtracted (µs).
    pub server_us: f64,
    /// The same for the client side, which the other floors' load client pays (µs).
    pub client_us: f64,
    /// What one reading of the thread CPU clock costs (µs); two per handshake are subtracted from each side.
    pub clock_us: f64,
    pub handshakes: u32,
    /// Protocol version, cipher suite and key-exchange group of the last handshake.
    pub negotiated: String,
}

/// `handshakes` full TLS 1.3 handshakes in memory between rustls connections on this thread, each with one small
/// request and [`RESPONSE`], timing only the server's calls (connection set-up, reading, processing, writing,
/// close_notify and drop) on the thread CPU clock. CPU-bound for as long as it runs: call it off async workers.
pub fn memory_floor(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    name: &str,
    handshakes: u32,
) -> Result<MemoryFloor> {
    let name = ServerName::try_from(name.to_string())?;
    let request = format!("GET / HTTP/1.1\r\nhost: {}\r\nconnection: close\r\n\r\n", name.to_str());
    let mut negotiated = String::new();
    for _ in 0..handshakes.min(200) {
        exchange(server, client, &name, request.as_bytes(), &mut negotiated)?; // warm caches and allocator
    }
    let (mut server_ns, mut client_ns) = (0u64, 0u64);
    for _ in 0..handshakes {
        let (s, c) = exchange(server, client, &name, request.as_bytes(), &mut negotiated)?;
        server_ns += s;
        client_ns += c;
    }
    let clock_us = clock_overhead_us();
    let per = |ns: u64| (ns as f64 / 1e3 / f64::from(handshakes.max(1)) - 2.0 * clock_us).max(0.0);
    Ok(MemoryFloor { server_us: per(server_ns), client_us: per(client_ns), clock_us, handshakes, negotiated })
}

/// This thread's CPU time (user and system), in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// What one reading of the thread CPU clock costs, in µs (a system call on Linux, not the vDSO).
fn clock_overhead_us() -> f64 {
    let rounds = 20_000u32;
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(thread_cpu_ns());
    }
    started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds)
}

/// One connection: ClientHello → server flight → client Finished and request → server reads it, answers, closes
/// → client reads the answer. Returns the thread CPU of the server's part and of the client's part (ns).
fn exchange(
    server: &Arc<ServerConfig>,
    client: &Arc<ClientConfig>,
    name: &ServerName<'static>,
    request: &[u8],
    negotiated: &mut String,
) -> Result<(u64, u64)> {
    let mut to_server = Vec::with_capacity(4096);
    let mut to_client = Vec::with_capacity(4096);

    let t = thread_cpu_ns();
    let mut tls_client = ClientConnection::new(client.clone(), name.clone())?;
    flush(&mut tls_client, &mut to_server)?;
    let mut client_ns = thread_cpu_ns() - t;

    let t = thread_cpu_ns();
    let mut tls_server = ServerConnection::new(server.clone())?;
    deliver(&mut tls_server, &mut to_server)?;
    flush(&mut tls_server, &mut to_client)?;
    let mut server_ns = thread_cpu_ns() - t;

    let t = thread_cpu_ns();
    deliver(&mut tls_client, &mut to_client)?;
    ensure!(!tls_client.is_handshaking(), "the client did not finish its handshake");
    tls_client.writer().write_all(request)?;
    flush(&mut tls_client, &mut to_server)?;
    client_ns += thread_cpu_ns() - t;

    let t = thread_cpu_ns();
    deliver(&mut tls_server, &mut to_server)?;
    read_head(&mut tls_server)?;
    tls_server.writer().write_all(RESPONSE)?;
    tls_server.send_close_notify();
    flush(&mut tls_server, &mut to_client)?;
    drop(tls_server);
    server_ns += thread_cpu_ns() - t;

    let t = thread_cpu_ns();
    deliver(&mut tls_client, &mut to_client)?;
    let mut response = Vec::new();
    // The server's close_notify ends the plaintext: read_to_end returns Ok then.
    tls_client.reader().read_to_end(&mut response)?;
    ensure!(response.starts_with(b"HTTP/1.1 200"), "no 200 from the in-memory server");
    client_ns += thread_cpu_ns() - t;

    if negotiated.is_empty() {
        *negotiated = describe(&tls_client);
    }
    Ok((server_ns, client_ns))
}

/// Feeds every byte of `bytes` to `conn`, processing records as they come; empties `bytes`.
fn deliver<D>(conn: &mut ConnectionCommon<D>, bytes: &mut Vec<u8>) -> Result<()> {
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        conn.read_tls(&mut rest)?;
        conn.process_new_packets()?;
    }
    bytes.clear();
    Ok(())
}

/// Everything `conn` has to send, appended to `out`.
fn flush<D>(conn: &mut ConnectionCommon<D>, out: &mut Vec<u8>) -> Result<()> {
    while conn.wants_write() {
        conn.write_tls(out)?;
    }
    Ok(())
}

/// Reads the server's plaintext until the end of a request head (bounded by [`MAX_REQUEST_HEAD`]).
fn read_head(conn: &mut ServerConnection) -> Result<()> {
    let mut head = [0u8; 1024];
    let mut len = 0;
    while find(&head[..len], b"\r\n\r\n").is_none() {
        ensure!(len < head.len().min(MAX_REQUEST_HEAD), "request head too long");
        let n = conn.reader().read(&mut head[len..]).map_err(|e| anyhow!("reading the request: {e}"))?;
        ensure!(n > 0, "closed before the end of the request head");
        len += n;
    }
    Ok(())
}

/// Protocol version, cipher suite and key-exchange group of a finished handshake.
fn describe(conn: &ClientConnection) -> String {
    let show = |v: Option<String>| v.unwrap_or_else(|| "?".into());
    format!(
        "{} {} {}",
        show(conn.protocol_version().map(|v| format!("{v:?}"))),
        show(conn.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite()))),
        show(conn.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name()))),
    )
}

/// Microseconds per signature (RSA-PSS-SHA256 or ECDSA-P256-SHA256) of the key in `pem`, and per key load.
pub fn sign_and_load_us(provider: &CryptoProvider, pem: &[u8], signs: u32) -> Result<(f64, f64)> {
    let load =
        || provider.key_provider.load_private_key(PrivateKeyDer::from_pem_slice(pem)?).map_err(anyhow::Error::from);
    let key = load()?;
    let schemes = [rustls::SignatureScheme::RSA_PSS_SHA256, rustls::SignatureScheme::ECDSA_NISTP256_SHA256];
    let signer = key.choose_scheme(&schemes).context("no signing scheme")?;
    let message = [7u8; 200];
    for _ in 0..50 {
        signer.sign(&message)?;
    }
    let started = Instant::now();
    for _ in 0..signs {
        std::hint::black_box(signer.sign(&message)?);
    }
    let sign = started.elapsed().as_secs_f64() * 1e6 / f64::from(signs.max(1));
    let loads = 200;
    let started = Instant::now();
    for _ in 0..loads {
        std::hint::black_box(load()?);
    }
    Ok((sign, started.elapsed().as_secs_f64() * 1e6 / f64::from(loads)))
}

/// Microseconds of one side of a key exchange in the provider's first group (X25519): a key generation and an
/// agreement, approximated as half of two generations and one agreement.
pub fn kx_side_us(provider: &CryptoProvider, rounds: u32) -> Result<f64> {
    let group = provider.kx_groups[0];
    let started = Instant::now();
    for _ in 0..rounds {
        let ours = group.start().map_err(|e| anyhow!("{e}"))?;
        let theirs = group.start().map_err(|e| anyhow!("{e}"))?;
        let public = theirs.pub_key().to_vec();
        std::hint::black_box(ours.complete(&public).map_err(|e| anyhow!("{e}"))?);
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds.max(1)) / 2.0)
}
