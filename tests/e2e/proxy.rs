//! The reverse proxy: HTTP/1.1 and HTTP/2 with forwarding headers, streaming bodies, WebSocket upgrades, 502.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_and_h2_are_proxied_with_forwarding_headers() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "app.test"])?;
    let server = start_default(&pki).await?;
    for (alpn, want_h2) in [(&b"h2"[..], true), (&b"http/1.1"[..], false)] {
        let stream = connect(server.addr, &pki.client(&[alpn]), "app.test").await?;
        assert_eq!(stream.get_ref().1.alpn_protocol() == Some(b"h2"), want_h2);
        let (status, _, body) = get(stream, "app.test", "/some/path?q=1").await?;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("GET /some/path?q=1 HTTP/1.1\n"), "{body}");
        for line in
            ["host: app.test", "x-forwarded-for: 127.0.0.1", "x-forwarded-proto: https", "x-forwarded-host: app.test"]
        {
            assert!(body.lines().any(|l| l == line), "missing {line:?} (h2: {want_h2}) in:\n{body}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_bodies_stream_without_buffering() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "app.test"])?;
    let server = start_default(&pki).await?;
    let mut stream = connect(server.addr, &pki.client(&[b"http/1.1"]), "app.test").await?;
    // Send the first chunk only; the echoed chunk must come back before the request body is finished, which is
    // impossible for a proxy that buffers whole bodies (the test would hang and time out).
    stream.write_all(b"POST /echo HTTP/1.1\r\nhost: app.test\r\ntransfer-encoding: chunked\r\n\r\n").await?;
    stream.write_all(b"10\r\nfirst-chunk-1234\r\n").await?;
    stream.flush().await?;
    let seen = read_until(&mut stream, b"first-chunk-1234").await?;
    assert!(seen.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&seen));
    stream.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await?;
    read_until(&mut stream, b"second").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_passes_through() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "app.test"])?;
    let server = start_default(&pki).await?;
    let mut stream = connect(server.addr, &pki.client(&[b"http/1.1"]), "app.test").await?;
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nhost: app.test\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
              sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await?;
    let head = read_until(&mut stream, b"\r\n\r\n").await?;
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    // After the switch, bytes flow both ways untouched.
    for message in [&b"\x81\x05hello"[..], b"\x81\x05again"] {
        stream.write_all(message).await?;
        let echoed = read_until(&mut stream, message).await?;
        assert!(echoed.ends_with(message));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_work_on_pool_and_origin_routes() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "pooled.test", "origin.test"])?;
    let (pooled, origin) = (tern_fixtures::spawn_echo_backend().await?, tern_fixtures::spawn_echo_backend().await?);
    // The listener's own backend refuses connections: an upgrade that works went along the plugin's route.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    std::fs::write(pki.certs().join("pooled.test.route"), "pool ws\n")?;
    std::fs::write(pki.certs().join("origin.test.route"), format!("origin http://{origin}\n"))?;
    let grants = format!("grants.routes = {{ pools = [\"ws\"], origins = [\"http://{origin}\"] }}");
    let config = config_with(&pki, closed, FILE_PATH_PLUGIN, &grants, "default_certificate = \"default\"")
        + &format!("\n[[upstream]]\nname = \"ws\"\nservers = [\"{pooled}\"]\n");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    for name in ["pooled.test", "origin.test"] {
        let mut stream = connect(server.addr, &pki.client(&[b"http/1.1"]), name).await?;
        let request = format!(
            "GET /ws HTTP/1.1\r\nhost: {name}\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\
             sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await?;
        let head = String::from_utf8_lossy(&read_until(&mut stream, b"\r\n\r\n").await?).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{name}: {head}");
        stream.write_all(b"\x81\x05hello").await?;
        assert!(read_until(&mut stream, b"\x81\x05hello").await?.ends_with(b"\x81\x05hello"), "{name}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_backend_gives_502_not_a_hang() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "app.test"])?;
    // A port that was free a moment ago: nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let server =
        TestServer::start(&basic_config(&pki, closed, "default_certificate = \"default\""), pki.dir.path()).await?;
    for alpn in [&b"h2"[..], b"http/1.1"] {
        let started = Instant::now();
        let stream = connect(server.addr, &pki.client(&[alpn]), "app.test").await?;
        let (status, _, body) = tokio::time::timeout(Duration::from_secs(10), get(stream, "app.test", "/")).await??;
        assert_eq!(status, 502, "{body}");
        println!("502 after {:?}", started.elapsed());
    }
    Ok(())
}

async fn read_until(stream: &mut (impl AsyncReadExt + Unpin), needle: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(10), async {
        while !seen.windows(needle.len()).any(|w| w == needle) {
            let n = stream.read(&mut buf).await?;
            anyhow::ensure!(n > 0, "connection closed before {:?} arrived", String::from_utf8_lossy(needle));
            seen.extend_from_slice(&buf[..n]);
        }
        Ok(())
    })
    .await??;
    Ok(seen)
}
