//! TLS acceptance: read the ClientHello, choose the certificate asynchronously, then finish the handshake.
//!
//! rustls's `ResolvesServerCert` is synchronous and meant for selection without I/O, so the choice happens
//! before rustls resumes: [`LazyConfigAcceptor`] hands over the ClientHello, [`Selector::select`] may wait on a
//! plugin, and the `ServerConfig` that finishes the handshake carries a resolver that just returns the chosen
//! key. One template config per listener carries the session cache and ticketer of its resumption scope.

use std::sync::Arc;

use rustls::ServerConfig;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{Acceptor, ClientHello, ProducesTickets, ResolvesServerCert, StoresServerSessions};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::StartHandshake;
use tokio_rustls::server::TlsStream;

use crate::answer::{Choice, Served};
use crate::certs::ParsedCert;
use crate::coalesce::Coalescing;
use crate::route::Target;
use crate::select::{Policy, SelectError, Selector, Source};
use crate::sni::ServerName;

use crate::config::CipherSettings;
use crate::crypto::{SuitePreference, provider};

/// A listener's TLS settings, from which each handshake's config is cloned.
#[derive(Debug, Clone)]
pub struct TlsTemplate {
    base: Arc<ServerConfig>,
    /// `base` with ChaCha20-Poly1305 first, for clients that list it first (see [`SuitePreference`]).
    chacha_first: Option<Arc<ServerConfig>>,
    reject: Arc<ServerConfig>,
    /// Keeps the memo of compressed certificates alive (`base` reaches it only through a `Weak`).
    _compression: crate::compression::Compression,
}

impl TlsTemplate {
    /// TLS 1.2 and 1.3, the cipher suites and order of `ciphers`, the given ALPN protocols, client certificates
    /// if `client_verifier` asks for them, and the resumption state of the listener's scope: its session store
    /// and, unless tickets are off, its ticketer, with `tls13_tickets` TLS 1.3 tickets (or stateful session
    /// tickets) after each full handshake. Certificates go uncompressed until [`TlsTemplate::with_compression`].
    pub fn new(
        alpn: &[Vec<u8>],
        ciphers: &CipherSettings,
        client_verifier: Option<Arc<dyn ClientCertVerifier>>,
        sessions: Arc<dyn StoresServerSessions>,
        ticketer: Option<Arc<dyn ProducesTickets>>,
        tls13_tickets: usize,
    ) -> Result<Self, rustls::Error> {
        let preference = SuitePreference::new(ciphers);
        let build = |provider: &Arc<rustls::crypto::CryptoProvider>| -> Result<ServerConfig, rustls::Error> {
            let builder = ServerConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
            let builder = match &client_verifier {
                Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
                None => builder.with_no_client_auth(),
            };
            let mut config = builder.with_cert_resolver(Arc::new(NoCertificate));
            config.alpn_protocols = alpn.to_vec();
            config.session_storage = sessions.clone();
            if let Some(ticketer) = &ticketer {
                config.ticketer = ticketer.clone();
            }
            config.ignore_client_order = preference.server_decides;
            config.send_tls13_tickets = tls13_tickets;
            Ok(config)
        };
        let compression = crate::compression::Compression::off();
        let mut base = build(&preference.preferred)?;
        compression.apply(&mut base);
        let reject = Arc::new(base.clone());
        let chacha_first = match &preference.chacha_first {
            Some(provider) => {
                let mut config = build(provider)?;
                compression.apply(&mut config);
                Some(Arc::new(config))
            }
            None => None,
        };
        Ok(Self { base: Arc::new(base), chacha_first, reject, _compression: compression })
    }

    /// The same template compressing TLS 1.3 certificates as `compression` says (the server's one memo).
    pub fn with_compression(self, compression: &crate::compression::Compression) -> Self {
        let compressing = |config: &Arc<ServerConfig>| {
            let mut config = (**config).clone();
            compression.apply(&mut config);
            Arc::new(config)
        };
        Self {
            base: compressing(&self.base),
            chacha_first: self.chacha_first.as_ref().map(compressing),
            reject: self.reject,
            _compression: compression.clone(),
        }
    }

    /// The config that serves `key` to a client offering `offered` cipher suites (a clone of the template:
    /// ~0.1 µs, shares session state).
    pub(crate) fn serving(&self, key: Arc<CertifiedKey>, offered: &[rustls::CipherSuite]) -> Arc<ServerConfig> {
        let template = match &self.chacha_first {
            Some(chacha) if SuitePreference::client_prefers_chacha(offered) => chacha,
            _ => &self.base,
        };
        let mut config = (**template).clone();
        config.cert_resolver = Arc::new(Chosen(key));
        Arc::new(config)
    }
}

/// Outcome of a successful handshake.
#[derive(Debug)]
pub struct Accepted<IO = TcpStream> {
    /// The TLS stream, ready for HTTP (the tickets of a TLS 1.3 handshake may wait for its first write).
    pub stream: TlsStream<Coalescing<IO>>,
    /// The name the client asked for, normalised as selection saw it.
    pub servername: Option<ServerName>,
    /// Where the certificate came from.
    pub source: Source,
    /// The certificate served (the member of `served` the client's signature schemes chose).
    pub cert: Arc<ParsedCert>,
    /// The whole answer: every certificate of the set (a request may name any host one covers) and the route.
    pub served: Arc<Served>,
    /// The bytes read before the handshake went on: the ClientHello records (for its [`crate::ja4`] fingerprint).
    pub hello: Vec<u8>,
    /// From the first ClientHello read to the end of the handshake, certificate selection included.
    pub handshake: std::time::Duration,
}

/// A connection to forward untouched: the client's bytes so far (the ClientHello, and anything after it in the
/// same reads) and the target the plugin chose.
#[derive(Debug)]
pub struct Passthrough<IO = TcpStream> {
    /// The client connection, positioned after `hello`.
    pub io: IO,
    /// Every byte read from the client so far, to be replayed to the target first.
    pub hello: Vec<u8>,
    /// Where to.
    pub target: Arc<Target>,
    /// The name the client asked for.
    pub servername: Option<ServerName>,
    /// Where the answer came from.
    pub source: Source,
}

/// A handshake for which no certificate was chosen. The caller records it, then sends the alert, so that logs and
/// counters are settled before the client learns the outcome.
pub struct Refusal<IO = TcpStream> {
    start: StartHandshake<IO>,
    reject: Arc<ServerConfig>,
    /// The SNI as the client sent it.
    pub servername: Option<String>,
    /// Why nothing was chosen.
    pub error: SelectError,
}

impl<IO> std::fmt::Debug for Refusal<IO> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refusal").field("servername", &self.servername).field("error", &self.error).finish()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Refusal<IO> {
    /// Ends the handshake with a fatal alert: a config whose resolver finds nothing makes rustls send one, which
    /// the client sees instead of a bare EOF.
    pub async fn send_alert(self) {
        let _ = self.start.into_stream(self.reject).await;
    }
}

/// What became of a ClientHello.
// The accepted stream is moved once per handshake; boxing it would add an allocation to every handshake.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Outcome<IO = TcpStream> {
    /// Handshake completed.
    Accepted(Accepted<IO>),
    /// No certificate: to be recorded, then refused. Boxed: it holds the buffered ClientHello and is the rare path.
    Refused(Box<Refusal<IO>>),
    /// The plugin passes this name through to a TCP target.
    Passthrough(Box<Passthrough<IO>>),
    /// An ACME CA's TLS-ALPN-01 validation handshake for this name, answered and closed.
    Challenge(ServerName),
}

/// Bytes a ClientHello may take, across however many records (rustls's own limit on a handshake message is
/// 64 KiB; real ones are 0.5 to 2 KB, post-quantum key shares included). Past it the connection is refused.
const MAX_CLIENT_HELLO: usize = 64 << 10;

/// A handshake that failed in TLS itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The ClientHello could not be read (not TLS, malformed, or the client left). rustls has sent its alert.
    #[error("reading ClientHello: {0}")]
    Hello(std::io::Error),
    /// The handshake failed after selection.
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
}

/// Accepts one TLS connection on `io` (a TCP stream, or anything that reads and writes) from `client`. The caller
/// bounds it with the handshake deadline.
pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(
    mut io: IO,
    client: Option<std::net::IpAddr>,
    selector: &Selector,
    policy: &Policy,
    tls: &TlsTemplate,
) -> Result<Outcome<IO>, (Option<String>, HandshakeError)> {
    let started = std::time::Instant::now();
    let (accepted, hello) = read_client_hello(&mut io).await.map_err(|e| (None, HandshakeError::Hello(e)))?;
    let servername = accepted.client_hello().server_name().map(str::to_owned);
    if accepted.client_hello().alpn().is_some_and(|mut offered| offered.any(|p| p == ACME_TLS_ALPN)) {
        // Boxed, as rare paths are: a handshake's future is as large as its largest path, and it is copied whole.
        return Box::pin(answer_challenge(accepted, io, selector, servername, tls)).await;
    }
    // Selection succeeded, so a name that was sent parsed there; the same rule again.
    let parsed_name = || servername.as_deref().and_then(|raw| ServerName::parse(raw).ok());
    match selector.select_for(policy, servername.as_deref(), client).await {
        Ok((Choice::Serve(served), source)) => {
            let offered = accepted.client_hello();
            let cert = served.for_client(offered.signature_schemes()).clone();
            let config = tls.serving(cert.certified.clone(), offered.cipher_suites());
            let handshake = StartHandshake::from_parts(accepted, Coalescing::new(io)).into_stream(config);
            let stream = match handshake.into_fallible().await {
                Ok(stream) => stream,
                Err((e, mut io)) => {
                    // The alert rustls wrote, if any, is still held.
                    let _ = io.release().await;
                    return Err((servername.clone(), HandshakeError::Tls(e)));
                }
            };
            let stream =
                send_or_defer_tickets(stream).await.map_err(|e| (servername.clone(), HandshakeError::Tls(e)))?;
            let (servername, handshake) = (parsed_name(), started.elapsed());
            Ok(Outcome::Accepted(Accepted { stream, servername, source, cert, served, hello, handshake }))
        }
        Ok((Choice::Passthrough(target), source)) => {
            Ok(Outcome::Passthrough(Box::new(Passthrough { io, hello, target, servername: parsed_name(), source })))
        }
        Err(error) => {
            let start = StartHandshake::from_parts(accepted, io);
            Ok(Outcome::Refused(Box::new(Refusal { start, reject: tls.reject.clone(), servername, error })))
        }
    }
}

/// Ends a served handshake's write holding ([`Coalescing`]): over TLS 1.3 the tickets wait for the answer (for at
/// most [`crate::coalesce::TICKET_HOLD`] of waiting on a client that sends nothing); over TLS 1.2 the held bytes
/// are the server's Finished, which the client waits for: they go now.
async fn send_or_defer_tickets<IO: AsyncRead + AsyncWrite + Unpin>(
    mut stream: TlsStream<Coalescing<IO>>,
) -> std::io::Result<TlsStream<Coalescing<IO>>> {
    let (io, conn) = stream.get_mut();
    let defer = conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
    io.handshake_done(defer);
    if !defer {
        io.release().await?;
    }
    Ok(stream)
}

/// The ALPN protocol of TLS-ALPN-01 (RFC 8737).
const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// Answers an ACME CA's validation handshake with the challenge certificate an order published (in shared
/// storage, so any node answers for any node's order), then closes. No plugin is asked; a name no order is
/// validating is refused.
async fn answer_challenge<IO: AsyncRead + AsyncWrite + Unpin>(
    accepted: rustls::server::Accepted,
    io: IO,
    selector: &Selector,
    servername: Option<String>,
    tls: &TlsTemplate,
) -> Result<Outcome<IO>, (Option<String>, HandshakeError)> {
    let name = servername.as_deref().and_then(|raw| ServerName::parse(raw).ok());
    let key = match (selector.acme(), &name) {
        (Some(acme), Some(name)) => acme.challenge_key(name).await,
        _ => None,
    };
    let start = StartHandshake::from_parts(accepted, io);
    let (Some(key), Some(name)) = (key, name) else {
        let error = SelectError::NoChallenge { servername: servername.clone().unwrap_or_default() };
        return Ok(Outcome::Refused(Box::new(Refusal { start, reject: tls.reject.clone(), servername, error })));
    };
    let config = ServerConfig::builder_with_provider(provider().clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| (servername.clone(), HandshakeError::Tls(std::io::Error::other(e))))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Chosen(key)));
    let mut config = config;
    config.alpn_protocols = vec![ACME_TLS_ALPN.to_vec()];
    // A challenge certificate serves one validation: nothing to gain from compressing or remembering it.
    crate::compression::Compression::off().apply(&mut config);
    let mut stream = start.into_stream(Arc::new(config)).await.map_err(|e| (servername, HandshakeError::Tls(e)))?;
    let _ = stream.shutdown().await;
    Ok(Outcome::Challenge(name))
}

/// Reads until rustls has a whole ClientHello, keeping every byte read (a passthrough replays them). A
/// malformed hello gets rustls's alert.
async fn read_client_hello<IO: AsyncRead + AsyncWrite + Unpin>(
    io: &mut IO,
) -> std::io::Result<(rustls::server::Accepted, Vec<u8>)> {
    let mut acceptor = Acceptor::default();
    let mut seen = Vec::with_capacity(2048);
    loop {
        let start = seen.len();
        if start >= MAX_CLIENT_HELLO {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "ClientHello larger than 64 KiB"));
        }
        seen.resize((start + 4096).min(MAX_CLIENT_HELLO), 0);
        let n = io.read(&mut seen[start..]).await?;
        seen.truncate(start + n);
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut fresh = &seen[start..];
        while !fresh.is_empty() {
            if acceptor.read_tls(&mut fresh)? == 0 {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "ClientHello buffer full"));
            }
        }
        match acceptor.accept() {
            Ok(Some(accepted)) => return Ok((accepted, seen)),
            Ok(None) => {}
            Err((err, mut alert)) => {
                let mut bytes = Vec::new();
                let _ = alert.write(&mut bytes);
                let _ = io.write_all(&bytes).await;
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, err));
            }
        }
    }
}

/// Hands rustls the certificate chosen before the handshake resumed.
#[derive(Debug)]
struct Chosen(Arc<CertifiedKey>);

impl ResolvesServerCert for Chosen {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// The template's resolver, and the one that makes rustls refuse the handshake.
#[derive(Debug)]
struct NoCertificate;

impl ResolvesServerCert for NoCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        None
    }
}

/// A verifier for client certificates chaining to the CAs in `ca_pem`; `required` refuses clients without one.
pub(crate) fn client_verifier(ca_pem: &[u8], required: bool) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    let certs = rustls::pki_types::CertificateDer::pem_slice_iter(ca_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    for cert in certs {
        roots.add(cert).map_err(|e| format!("unusable CA certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no CA certificate in the file".into());
    }
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider().clone());
    let builder = if required { builder } else { builder.allow_unauthenticated() };
    builder.build().map_err(|e| e.to_string())
}
