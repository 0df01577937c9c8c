//! The load client's TLS configs and one connection with one request.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    Yes,
    No,
}

/// TLS client configs: verifying, not verifying (load phases: the client's CPU is precious), resuming.
#[derive(Clone)]
pub struct Client {
    pub verifying: Arc<rustls::ClientConfig>,
    pub fast: Arc<rustls::ClientConfig>,
    pub resuming: Arc<rustls::ClientConfig>,
}

impl Client {
    pub fn new(dir: &Path) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from_pem_file(dir.join("ca.crt"))?)?;
        // Cipher suites in browsers' order (AES-128-GCM first); every server here honours the client's order, so
        // all of them negotiate the same suite; X25519 is the key exchange throughout.
        let provider = tern_bench::floor::browser_order_provider();
        let base =
            rustls::ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let mut verifying = base.clone().with_root_certificates(roots).with_no_client_auth();
        verifying.resumption = rustls::client::Resumption::disabled();
        verifying.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut fast = verifying.clone();
        fast.dangerous().set_certificate_verifier(tern_fixtures::TestVerifier::accept_any(provider));
        let mut resuming = fast.clone();
        // rustls remembers size ÷ 8 servers (8 TLS 1.3 tickets each): room for 8,192 names, above the hot set.
        resuming.resumption = rustls::client::Resumption::in_memory_sessions(65_536);
        Ok(Self { verifying: Arc::new(verifying), fast: Arc::new(fast), resuming: Arc::new(resuming) })
    }

    /// A new connection to `addr` and a TLS handshake for `name` with `config`, within 10 s.
    async fn handshake(
        config: &Arc<rustls::ClientConfig>,
        addr: SocketAddr,
        name: &str,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let server_name = rustls::pki_types::ServerName::try_from(name.to_string())?;
        let connect = tokio_rustls::TlsConnector::from(config.clone()).connect(server_name, tcp);
        Ok(tokio::time::timeout(Duration::from_secs(10), connect).await.context("handshake timed out")??)
    }

    /// A verified handshake for `name` and nothing else (configurations whose routes lead nowhere reachable).
    pub async fn handshake_only(&self, addr: SocketAddr, name: &str) -> Result<()> {
        Self::handshake(&self.verifying, addr, name).await?;
        Ok(())
    }

    /// The leaf certificate a fresh (never resumed, not verified) handshake for `name` is given.
    pub async fn leaf(&self, addr: SocketAddr, name: &str) -> Result<rustls::pki_types::CertificateDer<'static>> {
        let tls = Self::handshake(&self.fast, addr, name).await?;
        let leaf = tls.get_ref().1.peer_certificates().and_then(|chain| chain.first()).context("no certificate")?;
        Ok(leaf.clone().into_owned())
    }

    /// What a verified handshake for `name` negotiates: protocol version, cipher suite and key-exchange group.
    pub async fn negotiated(&self, addr: SocketAddr, name: &str) -> Result<String> {
        let tls = Self::handshake(&self.verifying, addr, name).await?;
        let connection = tls.get_ref().1;
        let show = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        Ok(format!(
            "{} {} {}",
            show(connection.protocol_version().map(|v| format!("{v:?}"))),
            show(connection.negotiated_cipher_suite().map(|s| format!("{:?}", s.suite()))),
            show(connection.negotiated_key_exchange_group().map(|g| format!("{:?}", g.name()))),
        ))
    }

    /// One connection, one request; returns whether it resumed, and how long the handshake took.
    pub async fn visit(&self, addr: SocketAddr, name: &str, verify: Verify, resume: bool) -> Result<(bool, Duration)> {
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
