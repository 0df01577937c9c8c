//! Backends for routing tests (servers that name themselves, over TLS or not) and clients that tell the members
//! of a certificate set apart.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tern_fixtures::TestCa;
use tokio::net::TcpListener;

use super::{Pki, client_config, connect, get, run_command, served_leaf};

/// A backend that answers every request with `<name> <host>` and counts them; stops (connections included)
/// when dropped or stopped.
pub struct Named {
    pub addr: SocketAddr,
    hits: Arc<AtomicU64>,
    tasks: tokio::task::JoinSet<()>,
}

impl Named {
    pub async fn start(name: &'static str, tls: Option<Arc<rustls::ServerConfig>>) -> Result<Self> {
        Self::start_on(name, "127.0.0.1:0".parse()?, tls, Arc::default()).await
    }

    pub async fn start_on(
        name: &'static str,
        addr: SocketAddr,
        tls: Option<Arc<rustls::ServerConfig>>,
        hits: Arc<AtomicU64>,
    ) -> Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let mut tasks = tokio::task::JoinSet::new();
        let counted = hits.clone();
        tasks.spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (tls, hits) = (tls.clone(), counted.clone());
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let host = req.headers().get("host").and_then(|h| h.to_str().ok()).map(str::to_string);
                        let host = host.or_else(|| req.uri().authority().map(|a| a.to_string())).unwrap_or_default();
                        let version = format!("{:?}", req.version());
                        if req.uri().path() != "/healthz" {
                            hits.fetch_add(1, Ordering::Relaxed);
                        }
                        async move {
                            let mut response = http::Response::new(Full::new(Bytes::from(format!("{name} {host}"))));
                            response.headers_mut().insert("x-seen-version", version.parse().expect("ASCII"));
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let builder = hyper::server::conn::http1::Builder::new();
                    let _ = match tls {
                        None => builder.serve_connection(TokioIo::new(tcp), service).await,
                        Some(tls) => match tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await {
                            // An origin that negotiated HTTP/2 by ALPN speaks it.
                            Ok(stream) if stream.get_ref().1.alpn_protocol() == Some(b"h2") => {
                                let h2 = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
                                let _ = h2.serve_connection(TokioIo::new(stream), service).await;
                                return;
                            }
                            Ok(stream) => builder.serve_connection(TokioIo::new(stream), service).await,
                            Err(_) => return,
                        },
                    };
                });
            }
        });
        Ok(Self { addr, hits, tasks })
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Stops accepting and closes every open connection, as a crashed server would.
    pub async fn stop(mut self) -> (SocketAddr, Arc<AtomicU64>) {
        self.tasks.shutdown().await;
        (self.addr, self.hits.clone())
    }
}

/// A TLS server config for `names`, issued by `ca`, with HTTP/1.1 ALPN.
pub fn server_tls(ca: &TestCa, names: &[&str]) -> Result<Arc<rustls::ServerConfig>> {
    let (chain, key) = ca.issue(names)?;
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(chain.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes())?;
    let mut config = rustls::ServerConfig::builder_with_provider(tern::crypto::provider().clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// An RSA 2048 key from `openssl genpkey` (rcgen cannot generate RSA keys).
pub async fn rsa_key() -> Result<rcgen::KeyPair> {
    let mut command = std::process::Command::new("openssl");
    command.args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]);
    let out = run_command(command).await?;
    anyhow::ensure!(out.status.success(), "openssl genpkey failed");
    Ok(rcgen::KeyPair::from_pem(std::str::from_utf8(&out.stdout)?)?)
}

/// A client whose provider verifies only RSA signatures, so it offers only RSA signature schemes.
pub fn rsa_only_client(pki: &Pki) -> Result<Arc<rustls::ClientConfig>> {
    let mut provider = (**tern::crypto::provider()).clone();
    let all = provider.signature_verification_algorithms;
    let rsa: Vec<_> =
        all.mapping.iter().filter(|(scheme, _)| format!("{scheme:?}").starts_with("RSA")).cloned().collect();
    provider.signature_verification_algorithms =
        rustls::crypto::WebPkiSupportedAlgorithms { all: all.all, mapping: Box::leak(rsa.into_boxed_slice()) };
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der())?;
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One GET of `/` for `name` over a fresh connection: status and body.
pub async fn body_for(
    addr: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<(http::StatusCode, String)> {
    let stream = connect(addr, client, name).await?;
    let (status, _, body) = get(stream, name, "/").await?;
    Ok((status, body))
}

/// Each `(name, body)`: a request for `name` gets `body` (backends that name themselves tell the routes apart);
/// then `dual` serves its own (ECDSA) leaf to a default client and the leaf of `rsa_chain` to an RSA-only one.
pub async fn assert_routes_and_rsa_member(
    addr: SocketAddr,
    pki: &Pki,
    routes: &[(&str, &str)],
    dual: &str,
    rsa_chain: &str,
) -> Result<()> {
    let client = pki.client(&[b"http/1.1"]);
    for (name, want) in routes {
        let (status, body) = body_for(addr, &client, name).await?;
        assert_eq!((status.as_u16(), body.as_str()), (200, *want), "{name}");
    }
    assert_eq!(served_leaf(&connect(addr, &client, dual).await?), pki.leaf(dual));
    let stream = connect(addr, &rsa_only_client(pki)?, dual).await?;
    assert_eq!(served_leaf(&stream), leaf_of(rsa_chain), "a client offering only RSA schemes gets the RSA member");
    Ok(())
}

/// The leaf certificate DER of a PEM chain.
pub fn leaf_of(chain: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(chain.as_bytes()).expect("PEM written by rcgen")
}

/// A client that trusts only `ca` (a passthrough backend's) gets `passthrough <name>` for `name`: the handshake was
/// with that backend, not with tern.
pub async fn assert_passed_through(addr: SocketAddr, ca: &TestCa, name: &str) -> Result<()> {
    let client = client_config(ca, &[b"http/1.1"], &[&rustls::version::TLS13, &rustls::version::TLS12]);
    let (status, body) = body_for(addr, &client, name).await?;
    assert_eq!((status.as_u16(), body.as_str()), (200, format!("passthrough {name}").as_str()));
    Ok(())
}
