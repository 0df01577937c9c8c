//! PROXY protocol in, with the real peer: Debian's HAProxy in front of tern, sending `send-proxy-v2` and
//! `send-proxy` (v1). Clients connect from their own loopback addresses (127.0.0.2, 127.0.0.3) so that the client
//! address tern reports can be told from HAProxy's (127.0.0.1).

use std::net::SocketAddr;
use std::sync::Arc;

use tern::proxy_protocol::Refused;
use tern_fixtures::spawn_echo_backend;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::*;

/// HAProxy forwarding TCP to `tern`: one frontend per PROXY protocol version; returns (v2 address, v1 address).
async fn haproxy_in_front_of(
    tern: SocketAddr,
) -> anyhow::Result<(crate::support::haproxy::HaProxy, SocketAddr, SocketAddr)> {
    let (v2, v1) = (free_port().await?, free_port().await?);
    let config = format!(
        "global\n  maxconn 200\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  \
         timeout server 30s\n\nfrontend v2\n  bind 127.0.0.1:{v2}\n  default_backend tern_v2\n\n\
         frontend v1\n  bind 127.0.0.1:{v1}\n  default_backend tern_v1\n\n\
         backend tern_v2\n  server tern {tern} send-proxy-v2\n\nbackend tern_v1\n  server tern {tern} send-proxy\n"
    );
    let (v2, v1): (SocketAddr, SocketAddr) = (format!("127.0.0.1:{v2}").parse()?, format!("127.0.0.1:{v1}").parse()?);
    let haproxy = crate::support::haproxy::HaProxy::start(&config, &[v2, v1]).await?;
    Ok((haproxy, v2, v1))
}

/// What the backend saw as the client address of a request made over `tcp`.
async fn forwarded_for(tcp: TcpStream, client: &Arc<rustls::ClientConfig>) -> anyhow::Result<String> {
    let name = rustls::pki_types::ServerName::try_from("a.test")?;
    let tls = tokio_rustls::TlsConnector::from(client.clone()).connect(name, tcp).await?;
    let (status, _, body) = get(tls, "a.test", "/").await?;
    anyhow::ensure!(status == 200, "status {status}: {body}");
    let line = body.lines().find_map(|l| l.strip_prefix("x-forwarded-for: ")).unwrap_or_default();
    Ok(line.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_tells_tern_the_client_address_and_no_one_else_can() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let listener_keys = "default_certificate = \"default\"\nproxy_protocol = { trusted = [\"127.0.0.1\"] }";
    let config = basic_config(&pki, spawn_echo_backend().await?, listener_keys);
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let (_haproxy, v2, v1) = haproxy_in_front_of(server.addr).await?;
    let client = pki.client(&[b"http/1.1"]);
    // Through HAProxy, with either version, the backend sees the client, not HAProxy.
    assert_eq!(forwarded_for(tcp_from("127.0.0.2", v2).await?, &client).await?, "127.0.0.2", "v2");
    assert_eq!(forwarded_for(tcp_from("127.0.0.2", v1).await?, &client).await?, "127.0.0.2", "v1");
    // A client that is not a trusted peer is served as itself...
    assert_eq!(forwarded_for(tcp_from("127.0.0.3", server.addr).await?, &client).await?, "127.0.0.3");
    // ... but may not claim another address.
    let mut forged = tcp_from("127.0.0.3", server.addr).await?;
    forged.write_all(b"PROXY TCP4 198.51.100.9 127.0.0.1 4000 443\r\n").await?;
    assert!(forwarded_for(forged, &client).await.is_err(), "a forged header from an untrusted peer is refused");
    // A trusted peer must send the header.
    assert!(forwarded_for(tcp_from("127.0.0.1", server.addr).await?, &client).await.is_err());
    let refused = &server.metrics.proxy_protocol_refused;
    assert_eq!((refused.get(Refused::Untrusted), refused.get(Refused::Missing)), (1, 1));
    assert_eq!(counter(&server.metrics.handshakes_ok), 3, "refused connections never reach TLS");
    Ok(())
}
