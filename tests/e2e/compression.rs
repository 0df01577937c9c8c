//! Certificate compression (RFC 8879): rustls clients that offer brotli, zlib or nothing, each counting the bytes
//! of the server's first flight (ServerHello to Finished), against tern with compression on and off. The chain is
//! a leaf and its CA, verified by the client as usual.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::compress::CertDecompressor;
use tern::config::CertCompression;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::support::*;

/// The name whose certificate file holds a two-certificate chain.
const CHAIN: &str = "chain.test";

/// A stream that counts the bytes read from it.
struct Counting {
    inner: TcpStream,
    read: Arc<AtomicU64>,
}

impl AsyncRead for Counting {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read.fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        poll
    }
}

impl AsyncWrite for Counting {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TLS 1.3 client trusting the PKI's CA, offering `decompressors`, never resuming (every handshake sends the
/// certificate).
fn client(pki: &Pki, decompressors: &[&'static dyn CertDecompressor]) -> Arc<rustls::ClientConfig> {
    let mut config = (*client_config(&pki.ca, &[b"http/1.1"], &[&rustls::version::TLS13])).clone();
    config.cert_decompressors = decompressors.to_vec();
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Bytes the server sent until the client's handshake was complete (the client speaks last, so that is the
/// server's whole first flight), after checking that the chain verified and the certificate is `CHAIN`'s.
async fn first_flight(server: &TestServer, pki: &Pki, client: &Arc<rustls::ClientConfig>) -> anyhow::Result<u64> {
    let read = Arc::new(AtomicU64::new(0));
    let tcp = Counting { inner: TcpStream::connect(server.addr).await?, read: read.clone() };
    let name = rustls::pki_types::ServerName::try_from(CHAIN)?;
    let stream = tokio_rustls::TlsConnector::from(client.clone()).connect(name, tcp).await?;
    let bytes = read.load(Ordering::Relaxed);
    let (_, tls) = stream.get_ref();
    assert_eq!(tls.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let chain = tls.peer_certificates().expect("handshake completed");
    assert_eq!((chain.len(), &chain[0]), (2, &pki.leaf(CHAIN)), "the whole chain, leaf first");
    Ok(bytes)
}

/// A PKI whose `CHAIN` certificate file holds the leaf and the CA certificate; default config otherwise, plus
/// `server_keys` in a `[server]` section.
async fn start(server_keys: &str) -> anyhow::Result<(Pki, TestServer)> {
    let pki = Pki::new(&["default.test", CHAIN])?;
    let leaf = std::fs::read_to_string(pki.certs().join(format!("{CHAIN}.crt")))?;
    std::fs::write(pki.certs().join(format!("{CHAIN}.crt")), leaf + &pki.ca.pem())?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let config = basic_config(&pki, backend, "default_certificate = \"default\"") + "\n[server]\n" + server_keys;
    let server = TestServer::start(&config, pki.dir.path()).await?;
    Ok((pki, server))
}

/// Signatures (ECDSA, DER) differ in length by a few bytes from one handshake to the next.
const SIGNATURE_SLACK: u64 = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_go_brotli_or_zlib_compressed_to_clients_that_offer_it_and_are_remembered() -> anyhow::Result<()> {
    let (pki, server) = start("").await?;
    let stats = &server.metrics.certificate_compression;
    let plain = first_flight(&server, &pki, &client(&pki, &[])).await?;
    assert_eq!(counter(&stats.misses), 0, "a client that offers nothing gets nothing compressed");
    let brotli = client(&pki, &[rustls::compress::BROTLI_DECOMPRESSOR]);
    let zlib = client(&pki, &[rustls::compress::ZLIB_DECOMPRESSOR]);
    let with_brotli = first_flight(&server, &pki, &brotli).await?;
    let with_zlib = first_flight(&server, &pki, &zlib).await?;
    let chain = (pki.leaf(CHAIN).len() + pki.ca.der().len()) as u64;
    println!(
        "first flight for a chain of {chain} DER bytes: {plain} bytes plain, {with_zlib} zlib, {with_brotli} brotli"
    );
    // The two certificates share their issuer's name, key identifiers and algorithm OIDs: ~20% goes (asserted: 1/8).
    for (algorithm, bytes) in [("brotli", with_brotli), ("zlib", with_zlib)] {
        assert!(bytes + chain / 8 < plain, "{algorithm}: {bytes} bytes, {plain} uncompressed (chain {chain})");
    }
    assert_eq!(stats.compressed.get(CertCompression::Brotli), 1);
    assert_eq!(stats.compressed.get(CertCompression::Zlib), 1);
    assert_eq!((counter(&stats.misses), counter(&stats.hits)), (2, 0), "one compression per algorithm");

    // The same chain again, by either algorithm: from the memo, byte for byte the same message.
    let again = first_flight(&server, &pki, &brotli).await?;
    assert!(again.abs_diff(with_brotli) <= SIGNATURE_SLACK, "{again} vs {with_brotli}");
    first_flight(&server, &pki, &zlib).await?;
    assert_eq!((counter(&stats.misses), counter(&stats.hits)), (2, 2));
    assert_eq!(stats.compressed.get(CertCompression::Brotli), 2);

    // A client offering both gets tern's first choice, brotli.
    let both = client(&pki, &[rustls::compress::ZLIB_DECOMPRESSOR, rustls::compress::BROTLI_DECOMPRESSOR]);
    let with_both = first_flight(&server, &pki, &both).await?;
    assert!(with_both.abs_diff(with_brotli) <= SIGNATURE_SLACK, "{with_both} vs {with_brotli}");
    assert_eq!(stats.compressed.get(CertCompression::Brotli), 3);
    assert_eq!(counter(&stats.failed), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_compression_off_certificates_go_uncompressed_even_to_clients_that_offer_it() -> anyhow::Result<()> {
    let (pki, server) = start("certificate_compression = []\n").await?;
    let plain = first_flight(&server, &pki, &client(&pki, &[])).await?;
    let offering = client(&pki, &[rustls::compress::BROTLI_DECOMPRESSOR, rustls::compress::ZLIB_DECOMPRESSOR]);
    let offered = first_flight(&server, &pki, &offering).await?;
    assert!(offered.abs_diff(plain) <= SIGNATURE_SLACK, "{offered} bytes offering compression, {plain} not");
    let stats = &server.metrics.certificate_compression;
    let compressed = stats.compressed.get(CertCompression::Brotli) + stats.compressed.get(CertCompression::Zlib);
    assert_eq!((compressed, counter(&stats.misses)), (0, 0));

    // Only zlib configured: a brotli-only client gets the certificate as it is, a zlib one compressed.
    let (pki, server) = start("certificate_compression = [\"zlib\"]\n").await?;
    let plain = first_flight(&server, &pki, &client(&pki, &[])).await?;
    let brotli_only = first_flight(&server, &pki, &client(&pki, &[rustls::compress::BROTLI_DECOMPRESSOR])).await?;
    let zlib = first_flight(&server, &pki, &client(&pki, &[rustls::compress::ZLIB_DECOMPRESSOR])).await?;
    assert!(brotli_only.abs_diff(plain) <= SIGNATURE_SLACK && zlib + 100 < plain, "{plain} {brotli_only} {zlib}");
    let stats = &server.metrics.certificate_compression;
    assert_eq!((stats.compressed.get(CertCompression::Brotli), stats.compressed.get(CertCompression::Zlib)), (0, 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compression_counters_are_exposed_on_the_admin_endpoint() -> anyhow::Result<()> {
    let (pki, server) = start("certificate_compression = [\"brotli\"]\n[admin]\nbind = \"127.0.0.1:0\"\n").await?;
    let brotli = client(&pki, &[rustls::compress::BROTLI_DECOMPRESSOR]);
    for _ in 0..3 {
        first_flight(&server, &pki, &brotli).await?;
    }
    let (_, text) = admin(server.admin_addr(), "GET", "/metrics", None).await?;
    assert_eq!(sample(&text, "tern_tls_certificates_compressed_total", &[("algorithm", "brotli")]), 3.0);
    assert_eq!(sample(&text, "tern_tls_certificates_compressed_total", &[("algorithm", "zlib")]), 0.0);
    assert_eq!(sample(&text, "tern_tls_certificate_compression_cache_total", &[("outcome", "miss")]), 1.0);
    assert_eq!(sample(&text, "tern_tls_certificate_compression_cache_total", &[("outcome", "hit")]), 2.0);
    Ok(())
}

/// Debian's headless Chromium, a client that is not tern's code, gets its certificate brotli-compressed (it offers
/// brotli only) and loads the page through tern.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_gets_the_certificate_brotli_compressed() -> anyhow::Result<()> {
    let (_pki, server) = start("[admin]\nbind = \"127.0.0.1:0\"\n").await?;
    let profile = tempfile::tempdir()?;
    let mut command = tokio::process::Command::new("chromium");
    command
        .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--ignore-certificate-errors", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(format!("--host-resolver-rules=MAP * 127.0.0.1:{}", server.addr.port()))
        .args(["--dump-dom", &format!("https://{CHAIN}/from-chromium")])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .map_err(|_| anyhow::anyhow!("chromium hung"))?
        .map_err(|e| anyhow::anyhow!("starting chromium (scripts/setup.sh test installs it): {e}"))?;
    let page = String::from_utf8_lossy(&output.stdout);
    // The echo backend answers with the request it saw.
    assert!(
        page.contains("/from-chromium"),
        "chromium loaded no page through tern: {page} {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let (_, text) = admin(server.admin_addr(), "GET", "/metrics", None).await?;
    let brotli = sample(&text, "tern_tls_certificates_compressed_total", &[("algorithm", "brotli")]);
    assert!(brotli >= 1.0, "chromium's handshakes were brotli-compressed: {brotli}");
    assert_eq!(sample(&text, "tern_tls_certificates_compressed_total", &[("algorithm", "zlib")]), 0.0);
    Ok(())
}
