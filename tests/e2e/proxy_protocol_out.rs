//! PROXY protocol out: tern sends a v2 header first on every connection to a backend that asks for one
//! (`listener.backend_proxy_protocol`, `upstream.proxy_protocol`). Checked against Debian's HAProxy behind tern
//! (`bind ... accept-proxy`, which reports what it parsed in response headers) and against a small upstream here
//! that parses the header with the `ppp` crate and tells which of its connections answered. Clients connect from
//! 127.0.0.2 so that the client address in a header can be told from tern's own (127.0.0.1).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;

/// HAProxy in `mode http` in front of the echo backend, with two frontends: `pp` takes PROXY protocol
/// (`accept-proxy`) and reports what the header said in response headers (`x-pp-src`, `x-pp-dst`,
/// `x-pp-authority`); `plain` takes none. Both answer `/healthz` themselves with 204. Returns (pp, plain).
async fn haproxy_behind_tern() -> Result<(crate::support::haproxy::HaProxy, SocketAddr, SocketAddr)> {
    let echo = tern_fixtures::spawn_echo_backend().await?;
    let (pp, plain) = (free_port().await?, free_port().await?);
    let frontend = |name: &str, port: u16, accept: &str| {
        format!(
            "frontend {name}\n  bind 127.0.0.1:{port}{accept}\n  http-request return status 204 if {{ path /healthz }}\n  \
             http-response set-header x-pp-src %[src]:%[src_port]\n  http-response set-header x-pp-dst %[dst]:%[dst_port]\n  \
             http-response set-header x-pp-authority %[fc_pp_authority]\n  default_backend echo\n\n"
        )
    };
    let config = format!(
        "global\n  maxconn 200\n\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  \
         timeout server 30s\n\n{}{}backend echo\n  server echo {echo}\n",
        frontend("pp", pp, " accept-proxy"),
        frontend("plain", plain, ""),
    );
    let (pp, plain): (SocketAddr, SocketAddr) =
        (format!("127.0.0.1:{pp}").parse()?, format!("127.0.0.1:{plain}").parse()?);
    let haproxy = crate::support::haproxy::HaProxy::start(&config, &[pp, plain]).await?;
    Ok((haproxy, pp, plain))
}

/// One PROXY protocol header as the upstream below parsed it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    source: SocketAddr,
    destination: SocketAddr,
    alpn: Option<String>,
    authority: Option<String>,
}

/// An HTTP/1.1 upstream that requires a PROXY protocol v2 header (parsed with `ppp`) on each connection (then TLS,
/// if it has a config), numbers its connections, and answers with the connection's number and what its header said.
struct PpUpstream {
    addr: SocketAddr,
    headers: Arc<Mutex<Vec<Seen>>>,
    closed: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

impl PpUpstream {
    async fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (headers, closed) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicUsize::new(0)));
        let (seen, ended) = (headers.clone(), closed.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (seen, ended, tls) = (seen.clone(), ended.clone(), tls.clone());
                tokio::spawn(async move {
                    let _ = serve_one(tcp, seen, tls).await;
                    ended.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Self { addr, headers, closed, _task: task })
    }

    /// The headers received so far, one per accepted connection.
    fn headers(&self) -> Vec<Seen> {
        self.headers.lock().unwrap().clone()
    }
}

/// Reads exactly one v2 header off `tcp` (refusing the connection without one), then serves HTTP/1.1 on the rest
/// (over TLS with `tls`: the header comes before the TLS bytes).
async fn serve_one(
    mut tcp: TcpStream,
    seen: Arc<Mutex<Vec<Seen>>>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<()> {
    let mut header = vec![0u8; 16];
    tcp.read_exact(&mut header).await?;
    anyhow::ensure!(header.starts_with(b"\r\n\r\n\0\r\nQUIT\n"), "no PROXY protocol v2 signature");
    let length = usize::from(u16::from_be_bytes([header[14], header[15]]));
    header.resize(16 + length, 0);
    tcp.read_exact(&mut header[16..]).await?;
    let parsed = ppp::v2::Header::try_from(header.as_slice()).map_err(|e| anyhow::anyhow!("not a v2 header: {e:?}"))?;
    anyhow::ensure!(parsed.command == ppp::v2::Command::Proxy, "a request connection says PROXY, not LOCAL");
    let (source, destination) = match parsed.addresses {
        ppp::v2::Addresses::IPv4(a) => (
            SocketAddr::from((a.source_address, a.source_port)),
            SocketAddr::from((a.destination_address, a.destination_port)),
        ),
        other => anyhow::bail!("expected IPv4 addresses, got {other:?}"),
    };
    let tlv = |kind: u8| {
        parsed
            .tlvs()
            .filter_map(Result::ok)
            .find(|t| t.kind == kind)
            .map(|t| String::from_utf8_lossy(&t.value).into_owned())
    };
    let this = Seen { source, destination, alpn: tlv(0x01), authority: tlv(0x02) };
    let number = {
        let mut seen = seen.lock().unwrap();
        seen.push(this.clone());
        seen.len()
    };
    let service = hyper::service::service_fn(move |_req: http::Request<hyper::body::Incoming>| {
        let body = format!("connection {number} {this:?}");
        async move { Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(body)))) }
    });
    let http = hyper::server::conn::http1::Builder::new();
    match tls {
        None => http.serve_connection(TokioIo::new(tcp), service).await?,
        Some(tls) => {
            let stream = tokio_rustls::TlsAcceptor::from(tls).accept(tcp).await?;
            http.serve_connection(TokioIo::new(stream), service).await?
        }
    }
    Ok(())
}

/// A client connection to tern that sends several requests (HTTP/2 if ALPN chose it).
enum KeepAlive {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
}

impl KeepAlive {
    /// Connects from `from` to `to` with `sni` (none: no SNI, verified as `default.test`); returns the client's
    /// own address too.
    async fn open(
        from: &str,
        to: SocketAddr,
        config: &Arc<rustls::ClientConfig>,
        sni: Option<&str>,
    ) -> Result<(Self, SocketAddr)> {
        let tcp = tcp_from(from, to).await?;
        let local = tcp.local_addr()?;
        let mut config = (**config).clone();
        config.enable_sni = sni.is_some();
        let name = rustls::pki_types::ServerName::try_from(sni.unwrap_or("default.test").to_string())?;
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        let sender = if h2 {
            let (sender, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Self::H2(sender)
        } else {
            let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Self::H1(sender)
        };
        Ok((sender, local))
    }

    /// One GET of `/` for `host`: status, headers, body.
    async fn get(&mut self, host: &str) -> Result<(StatusCode, HeaderMap, String)> {
        let response = match self {
            Self::H1(sender) => {
                sender.ready().await?;
                let request = http::Request::get("/").header("host", host).body(Empty::new())?;
                sender.send_request(request).await?
            }
            Self::H2(sender) => {
                sender.send_request(http::Request::get(format!("https://{host}/")).body(Empty::new())?).await?
            }
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await.context("reading the response body")?.to_bytes();
        Ok((parts.status, parts.headers, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// A response header as text ("" when missing).
fn header<'a>(headers: &'a HeaderMap, name: &str) -> &'a str {
    headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

fn route(pki: &Pki, name: &str, line: &str) -> Result<()> {
    Ok(std::fs::write(pki.certs().join(format!("{name}.route")), format!("{line}\n"))?)
}

/// (a) HAProxy behind the listener's backend reads the client's address, the address it connected to and the
/// SNI from the header tern sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_behind_tern_reads_the_client_address_and_sni_from_its_header() -> Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let (_haproxy, pp, _) = haproxy_behind_tern().await?;
    let listener_keys = "default_certificate = \"default\"\nbackend_proxy_protocol = \"v2\"";
    let server = TestServer::start(&basic_config(&pki, pp, listener_keys), pki.dir.path()).await?;
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let (mut client, from) =
            KeepAlive::open("127.0.0.2", server.addr, &pki.client(&[alpn]), Some("a.test")).await?;
        let (status, headers, body) = client.get("a.test").await?;
        assert_eq!(status, 200, "{body}");
        assert_eq!(header(&headers, "x-pp-src"), from.to_string(), "HAProxy's src is the client, port included");
        assert_eq!(header(&headers, "x-pp-dst"), server.addr.to_string(), "its dst is what the client connected to");
        assert_eq!(header(&headers, "x-pp-authority"), "a.test", "PP2_TYPE_AUTHORITY is the SNI");
        assert!(body.contains("x-forwarded-for: 127.0.0.2"), "the request itself reached the echo backend: {body}");
    }
    Ok(())
}

/// (b) The header's destination is tern's address of the client connection, its ALPN TLV the protocol the client
/// negotiated, and a client without SNI gets no authority TLV.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_carries_the_negotiated_alpn_and_the_destination() -> Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let upstream = PpUpstream::start(None).await?;
    let listener_keys = "default_certificate = \"default\"\nbackend_proxy_protocol = \"v2\"";
    let server = TestServer::start(&basic_config(&pki, upstream.addr, listener_keys), pki.dir.path()).await?;
    let mut want = Vec::new();
    for (alpn, sni) in [("h2", Some("a.test")), ("http/1.1", Some("a.test")), ("http/1.1", None)] {
        let config = pki.client(&[alpn.as_bytes()]);
        let (mut client, from) = KeepAlive::open("127.0.0.2", server.addr, &config, sni).await?;
        let (status, _, body) = client.get(sni.unwrap_or("default.test")).await?;
        assert_eq!(status, 200, "{body}");
        want.push(Seen {
            source: from,
            destination: server.addr,
            alpn: Some(alpn.to_string()),
            authority: sni.map(str::to_string),
        });
    }
    assert_eq!(upstream.headers(), want);
    Ok(())
}

/// (c) On a pool with `proxy_protocol`, one client connection's requests reuse its upstream connection, and
/// another client connection (even from the same address) never gets it: it opens its own, with its own header.
/// A client connection's upstream connections close with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_never_share_an_upstream_connection() -> Result<()> {
    let pki = Pki::new(&["default.test", "pooled.test"])?;
    route(&pki, "pooled.test", "pool pp")?;
    let upstream = PpUpstream::start(None).await?;
    let config =
        config_with(
            &pki,
            tern_fixtures::spawn_echo_backend().await?,
            FILE_PATH_PLUGIN,
            "grants.routes = { pools = [\"pp\"] }",
            "default_certificate = \"default\"",
        ) + &format!("\n[[upstream]]\nname = \"pp\"\nservers = [\"{}\"]\nproxy_protocol = \"v2\"\n", upstream.addr);
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let client = pki.client(&[b"http/1.1"]);
    let connection_of = |body: &str| body.split(' ').nth(1).unwrap_or_default().to_string();

    let (mut a, a_from) = KeepAlive::open("127.0.0.2", server.addr, &client, Some("pooled.test")).await?;
    let mut a_connections = Vec::new();
    for _ in 0..3 {
        let (status, _, body) = a.get("pooled.test").await?;
        assert_eq!(status, 200, "{body}");
        a_connections.push(connection_of(&body));
    }
    assert_eq!(a_connections, ["1", "1", "1"], "keep-alive requests of one client reuse its upstream connection");

    let (mut b, b_from) = KeepAlive::open("127.0.0.2", server.addr, &client, Some("pooled.test")).await?;
    for _ in 0..2 {
        let (_, _, body) = b.get("pooled.test").await?;
        assert_eq!(connection_of(&body), "2", "another client connection gets its own upstream connection: {body}");
    }
    let (_, _, body) = a.get("pooled.test").await?;
    assert_eq!(connection_of(&body), "1", "and the first keeps its own");
    let sources: Vec<_> = upstream.headers().iter().map(|s| s.source).collect();
    assert_eq!(sources, [a_from, b_from], "one header per upstream connection, each naming its client");
    assert!(upstream.headers().iter().all(|s| s.authority.as_deref() == Some("pooled.test")));

    // A client that leaves takes its upstream connection with it (it would carry nobody else's requests).
    drop(a);
    let closed = upstream.closed.clone();
    eventually("the departed client's upstream connection closes", || {
        let closed = closed.clone();
        async move { Ok(closed.load(Ordering::SeqCst) == 1) }
    })
    .await?;
    let (_, _, body) = b.get("pooled.test").await?;
    assert_eq!(connection_of(&body), "2", "the remaining client keeps its connection");
    assert_eq!(upstream.headers().len(), 2);
    Ok(())
}

/// (d) Health checks of a pool with `proxy_protocol` send a `LOCAL` header: HAProxy with `accept-proxy` answers
/// them and the server stays up, while a server that takes no PROXY protocol fails them (so the checks do run
/// and do send a header). Requests through the pool reach HAProxy with the client's header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_send_local_headers_that_haproxy_accepts() -> Result<()> {
    let pki = Pki::new(&["default.test", "pooled.test"])?;
    route(&pki, "pooled.test", "pool pp")?;
    let (_haproxy, pp, plain) = haproxy_behind_tern().await?;
    let check = "health_check = { path = \"/healthz\", interval = \"100ms\", timeout = \"1s\", expected_status = 204, \
                 rise = 1, fall = 1 }";
    let config = config_with(
        &pki,
        tern_fixtures::spawn_echo_backend().await?,
        FILE_PATH_PLUGIN,
        "grants.routes = { pools = [\"pp\", \"plain\"] }",
        "default_certificate = \"default\"",
    ) + &format!(
        "\n[admin]\nbind = \"127.0.0.1:0\"\n\n[[upstream]]\nname = \"pp\"\nservers = [\"{pp}\"]\nproxy_protocol = \"v2\"\n\
         {check}\n\n[[upstream]]\nname = \"plain\"\nservers = [\"{plain}\"]\nproxy_protocol = \"v2\"\n{check}\n"
    );
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let admin_addr = server.admin_addr();
    let up = move |pool: &'static str, addr: SocketAddr| async move {
        let (_, metrics) = admin(admin_addr, "GET", "/metrics", None).await?;
        Ok::<_, anyhow::Error>(sample(&metrics, "tern_upstream_up", &[("pool", pool), ("server", &addr.to_string())]))
    };
    // `fall = 1`: one refused check takes a server out, so the plain frontend goes down at its first check.
    eventually(
        "the server without accept-proxy fails its checks",
        || async move { Ok(up("plain", plain).await? == 0.0) },
    )
    .await?;
    // Twenty more check intervals: the accept-proxy server never failed one.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(up("pp", pp).await?, 1.0, "HAProxy accepted every LOCAL-headed check");
    let (mut client, from) =
        KeepAlive::open("127.0.0.2", server.addr, &pki.client(&[b"h2"]), Some("pooled.test")).await?;
    let (status, headers, body) = client.get("pooled.test").await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&headers, "x-pp-src"), from.to_string());
    assert_eq!(header(&headers, "x-pp-authority"), "pooled.test");
    assert_eq!(up("pp", pp).await?, 1.0);
    Ok(())
}

/// A TLS pool with `proxy_protocol` gets the header as the first bytes, before its TLS handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_pool_gets_the_header_before_the_handshake() -> Result<()> {
    let pki = Pki::new(&["default.test", "secure.test"])?;
    route(&pki, "secure.test", "pool secure")?;
    let pool_ca = tern_fixtures::TestCa::new("pool CA")?;
    std::fs::write(pki.path("pool-ca.pem"), pool_ca.pem())?;
    let upstream = PpUpstream::start(Some(server_tls(&pool_ca, &["localhost"])?)).await?;
    let config = config_with(
        &pki,
        tern_fixtures::spawn_echo_backend().await?,
        FILE_PATH_PLUGIN,
        "grants.routes = { pools = [\"secure\"] }",
        "default_certificate = \"default\"",
    ) + &format!(
        "\n[[upstream]]\nname = \"secure\"\nservers = [\"localhost:{}\"]\ntls = true\nca = \"pool-ca.pem\"\n\
         proxy_protocol = \"v2\"\n",
        upstream.addr.port()
    );
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let (mut client, from) =
        KeepAlive::open("127.0.0.2", server.addr, &pki.client(&[b"http/1.1"]), Some("secure.test")).await?;
    let (status, _, body) = client.get("secure.test").await?;
    assert_eq!(status, 200, "{body}");
    let want = Seen {
        source: from,
        destination: server.addr,
        alpn: Some("http/1.1".into()),
        authority: Some("secure.test".into()),
    };
    assert_eq!(upstream.headers(), [want]);
    Ok(())
}
