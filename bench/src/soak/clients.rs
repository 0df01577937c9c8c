//! The soak's TLS clients: their configs, a connection, a verified handshake with one GET, and the warm-up.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::IO_LIMIT;

/// TLS client configs: one verifying against the soak CA, one accepting anything (the flood checks the leaf).
#[derive(Debug, Clone)]
pub struct Clients {
    pub verify: Arc<rustls::ClientConfig>,
    pub any: Arc<rustls::ClientConfig>,
}

impl Clients {
    pub fn new(ca: &tern_fixtures::TestCa) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der())?;
        let provider = tern::crypto::provider().clone();
        let mut verify = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Full handshakes every time: resumption would skip certificate selection.
        verify.resumption = rustls::client::Resumption::disabled();
        verify.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut any = verify.clone();
        any.dangerous().set_certificate_verifier(tern_fixtures::TestVerifier::accept_any(provider));
        Ok(Self { verify: Arc::new(verify), any: Arc::new(any) })
    }
}

/// Warm-up: every hot name once, verified, so the hot set is cached before the clock starts.
pub async fn warm_up(clients: &Clients, listen: SocketAddr, hot: &[String]) -> Result<()> {
    let warm = Instant::now();
    let mut warm_set = JoinSet::new();
    let permits = Arc::new(Semaphore::new(8));
    for name in hot {
        let name = name.clone();
        let (client, permit) = (clients.verify.clone(), permits.clone().acquire_owned().await?);
        warm_set.spawn(async move {
            let result = handshake(client, listen, &name).await;
            drop(permit);
            result.with_context(|| format!("warming {name}"))
        });
    }
    while let Some(joined) = warm_set.join_next().await {
        joined??;
    }
    println!("warmed {} hot names in {:.1?}", hot.len(), warm.elapsed());
    Ok(())
}

pub type Tls = tokio_rustls::client::TlsStream<TcpStream>;

pub async fn connect(config: Arc<rustls::ClientConfig>, addr: SocketAddr, name: &str) -> Result<Tls> {
    let tcp = tokio::time::timeout(IO_LIMIT, TcpStream::connect(addr)).await.context("connect timed out")??;
    tcp.set_nodelay(true)?;
    let server_name = rustls::pki_types::ServerName::try_from(name.to_string())?;
    let tls = tokio::time::timeout(IO_LIMIT, tokio_rustls::TlsConnector::from(config).connect(server_name, tcp))
        .await
        .context("handshake timed out")??;
    Ok(tls)
}

pub fn leaf(tls: &Tls) -> Option<CertificateDer<'static>> {
    tls.get_ref().1.peer_certificates()?.first().map(|c| c.clone().into_owned())
}

/// A verified handshake and one GET; the leaf served.
pub async fn handshake(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    name: &str,
) -> Result<CertificateDer<'static>> {
    let mut tls = connect(config, addr, name).await?;
    let leaf = leaf(&tls).context("no peer certificate")?;
    get(&mut tls, name).await?;
    Ok(leaf)
}

pub async fn get(tls: &mut Tls, name: &str) -> Result<()> {
    tls.write_all(format!("GET /soak HTTP/1.1\r\nhost: {name}\r\nconnection: close\r\n\r\n").as_bytes()).await?;
    tls.flush().await?;
    let mut response = Vec::new();
    let read = tokio::time::timeout(IO_LIMIT, tls.read_to_end(&mut response)).await;
    match read {
        Err(_) => bail!("response timed out after {} bytes", response.len()),
        // A peer that closes without close_notify after a complete response is fine here.
        Ok(Err(err)) if response.is_empty() => Err(err.into()),
        Ok(_) => {
            let line = response.split(|b| *b == b'\n').next().unwrap_or_default();
            anyhow::ensure!(response.starts_with(b"HTTP/1.1 200"), "status {:?}", String::from_utf8_lossy(line).trim());
            Ok(())
        }
    }
}
