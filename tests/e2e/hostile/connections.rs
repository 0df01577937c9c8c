//! What a client can hold after the handshake, and the bound that stops it.

use super::*;
use crate::support::*;
use bytes::Bytes;
use http_body_util::BodyExt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tern::failure::FailureKind;
use tern::plugin::Outcome;
use tern::watchdog::Expired;
use tern_fixtures::spawn_echo_backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_send_nothing_a_partial_head_or_only_the_h2_preface_are_closed_and_free_their_slot()
-> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let backend = spawn_echo_backend().await?;
    let config = basic_config(&pki, backend, "default_certificate = \"default\"")
        + &limits("max_connections = 3\nrequest_head_timeout = \"1s\"");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let mut silent = connect(server.addr, &pki.client(&[b"http/1.1"]), "a.test").await?;
    let mut partial = connect(server.addr, &pki.client(&[b"http/1.1"]), "a.test").await?;
    partial.write_all(b"GET / HTTP/1.1\r\nHost: a.te").await?;
    let mut preface = connect(server.addr, &pki.client(&[b"h2"]), "a.test").await?;
    assert_eq!(preface.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    preface.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    // All three slots are taken; a fourth client waits in the backlog until the watchdogs free them.
    let started = Instant::now();
    let fourth = tokio::spawn({
        let (addr, client) = (server.addr, pki.client(&[b"http/1.1"]));
        async move { get(connect(addr, &client, "a.test").await?, "a.test", "/").await }
    });
    for (what, stream) in [("silent", &mut silent), ("partial head", &mut partial), ("h2 preface", &mut preface)] {
        let closed = closed_within(stream, Duration::from_secs(5)).await;
        assert!(closed.is_some(), "{what}: connection still open after 5 s");
    }
    let (status, _, _) = tokio::time::timeout(Duration::from_secs(10), fourth).await???;
    assert_eq!(status, 200);
    println!("fourth client served {:?} after the slots were taken", started.elapsed());
    assert_eq!(eventually_equals(server.metrics.connections_timed_out.by(Expired::RequestHead), 3).await, 3);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_keepalive_timeout() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let config = basic_config(&pki, spawn_echo_backend().await?, "default_certificate = \"default\"")
        + &limits("keepalive_timeout = \"1s\"\nrequest_head_timeout = \"5s\"");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let mut stream = connect(server.addr, &pki.client(&[b"http/1.1"]), "a.test").await?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n").await?;
    let mut buf = vec![0u8; 4096];
    let n = stream.read(&mut buf).await?;
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    let closed = closed_within(&mut stream, Duration::from_secs(4)).await.expect("idle connection closed");
    assert!(closed < Duration::from_secs(4), "closed after {closed:?}");
    assert_eq!(eventually_equals(server.metrics.connections_timed_out.by(Expired::Idle), 1).await, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_cannot_open_unbounded_backend_connections() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let (backend, counts) = counting_backend(Duration::from_millis(300)).await?;
    let config = basic_config(&pki, backend, "default_certificate = \"default\"")
        + &limits("h2_max_concurrent_streams = 10")
        + "\n[proxy]\nmax_connections_per_backend = 8\nconnect_timeout = \"30s\"\n";
    let server = TestServer::start(&config, pki.dir.path()).await?;
    // Five HTTP/2 connections, 20 concurrent requests each: 100 requests at once.
    let mut requests = Vec::new();
    for _ in 0..5 {
        let stream = connect(server.addr, &pki.client(&[b"h2"]), "a.test").await?;
        let io = hyper_util::rt::TokioIo::new(stream);
        let (sender, conn) = hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        // One request first, so that the server's SETTINGS (its stream cap) are known before the burst.
        let warm = http::Request::get("https://a.test/warm").body(http_body_util::Empty::<Bytes>::new())?;
        assert_eq!(sender.clone().send_request(warm).await?.status(), 200);
        for i in 0..20 {
            let mut sender = sender.clone();
            requests.push(tokio::spawn(async move {
                let request =
                    http::Request::get(format!("https://a.test/{i}")).body(http_body_util::Empty::<Bytes>::new())?;
                let response = sender.send_request(request).await?;
                anyhow::Ok(response.status())
            }));
        }
    }
    let mut ok = 0;
    for request in requests {
        // (Sent before the server's SETTINGS arrived, a request beyond the stream cap is refused: h2 clients retry
        // those; the connection warm-up below avoids them.)
        if request.await?? == 200 {
            ok += 1;
        }
    }
    let max_open = counts.1.load(Ordering::SeqCst);
    println!("100 concurrent HTTP/2 requests: {ok} answered 200, at most {max_open} backend connections open");
    assert_eq!(ok, 100, "every request is served, queued behind the connection budget");
    assert!(max_open <= 8, "{max_open} backend connections open at once (budget 8)");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_a_large_response_is_cut_off() -> anyhow::Result<()> {
    const SIZE: usize = 64 << 20;
    let pki = Pki::new(&["default.test", "a.test"])?;
    let config = basic_config(&pki, spawn_echo_backend().await?, "default_certificate = \"default\"")
        + &limits("send_timeout = \"1s\"");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let mut stream = connect(server.addr, &pki.client(&[b"http/1.1"]), "a.test").await?;
    stream.write_all(format!("GET /bytes/{SIZE} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes()).await?;
    // Not reading: the socket buffers fill and tern's writes stall.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut read = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let drained = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
            if read >= SIZE {
                break;
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "connection neither closed nor finished");
    println!("read {read} of {SIZE} bytes before tern closed the stalled connection");
    assert!(read < SIZE, "the whole response was delivered: the stalled connection was never cut");
    assert_eq!(eventually_equals(server.metrics.connections_timed_out.by(Expired::Send), 1).await, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_chosen_names_and_errors_cannot_open_the_breaker() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "g0.test", "g1.test"])?;
    let backend = spawn_echo_backend().await?;
    // File-path plugin: names whose files cannot exist ("File name too long").
    let files =
        config_with(&pki, backend, FILE_PATH_PLUGIN, "breaker_threshold = 3", "default_certificate = \"default\"");
    let server = TestServer::start(&files, pki.dir.path()).await?;
    let client = pki.client(&[]);
    for i in 0..10 {
        let label = |c: char| std::iter::repeat_n(c, 61).collect::<String>();
        let name = format!("{i}{}.{}.{}.{}.test", label('a'), label('b'), label('c'), label('d'));
        assert!(name.len() >= 252 && name.len() <= 253, "{}", name.len());
        let stream = sni_verified_as(server.addr, &pki, &name, "default.test").await?;
        assert_eq!(served_leaf(&stream), pki.leaf("default.test"), "unknown long name gets the default");
    }
    let stats = server.plugin_stats();
    assert_eq!((stats.errors(), stats.count(Outcome::NotFound)), (0, 10), "a name that cannot be stored is not found");
    assert_eq!(served_leaf(&connect(server.addr, &client, "g0.test").await?), pki.leaf("g0.test"));
    drop(server);

    // A plugin that returns errors for client-chosen names: the errors fail those handshakes, nothing else.
    let chaos = config_with(&pki, backend, CHAOS_PLUGIN, "breaker_threshold = 3", "default_certificate = \"default\"");
    let server = TestServer::start(&chaos, pki.dir.path()).await?;
    for i in 0..10 {
        let err = connect(server.addr, &client, &format!("error.n{i}.test")).await.unwrap_err();
        assert_eq!(alert_of(&err), Some(REFUSED), "{err}");
    }
    assert_eq!(served_leaf(&connect(server.addr, &client, "g1.test").await?), pki.leaf("g1.test"));
    assert_eq!(server.plugin_stats().count(Outcome::CircuitOpen), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_upload_is_not_a_gateway_timeout_and_a_stalled_one_is_a_request_timeout() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let config = basic_config(&pki, spawn_echo_backend().await?, "default_certificate = \"default\"")
        + &limits("request_body_timeout = \"1500ms\"")
        + "\n[proxy]\nresponse_timeout = \"1s\"\n";
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let upload = |pause: Duration, chunks: usize| {
        let (addr, client) = (server.addr, pki.client(&[b"http/1.1"]));
        async move {
            let stream = connect(addr, &client, "a.test").await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(conn);
            let body = futures_util::stream::unfold(0, move |i| async move {
                if i == chunks {
                    return None;
                }
                tokio::time::sleep(pause).await;
                Some((Ok::<_, std::io::Error>(hyper::body::Frame::data(Bytes::from(vec![b'u'; 1000]))), i + 1))
            });
            let request = http::Request::post("/collect")
                .header("host", "a.test")
                .header("content-length", (chunks * 1000).to_string())
                .body(http_body_util::StreamBody::new(body))?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
        }
    };
    // 6 pieces 400 ms apart: 2.4 s of upload, longer than the backend's 1 s response timeout.
    let (status, body) = upload(Duration::from_millis(400), 6).await?;
    assert_eq!((status.as_u16(), body.as_str()), (200, "received 6000 bytes\n"));
    // A pause of 3 s between pieces exceeds the body timeout.
    let (status, _) = upload(Duration::from_secs(3), 2).await?;
    assert_eq!(status, 408);
    assert_eq!(counter(&server.metrics.request_body_timeouts), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused_counted_and_not_fetched_again() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test"])?;
    let (chain, key) = pki.ca.issue_valid_between(&["old.test"], (2020, 1, 1), (2021, 1, 1))?;
    std::fs::write(pki.certs().join("old.test.crt"), chain)?;
    std::fs::write(pki.certs().join("old.test.key"), key)?;
    let (chain, key) = pki.ca.issue_valid_between(&["future.test"], (2200, 1, 1), (2201, 1, 1))?;
    std::fs::write(pki.certs().join("future.test.crt"), chain)?;
    std::fs::write(pki.certs().join("future.test.key"), key)?;
    let server = start_default(&pki).await?;
    let client = pki.client(&[]);
    for name in ["old.test", "old.test", "old.test", "future.test"] {
        let err = connect(server.addr, &client, name).await.unwrap_err();
        assert_eq!(alert_of(&err), Some(REFUSED), "{name}: {err}");
    }
    assert_eq!(server.plugin_stats().calls(), 2, "the refused answer is cached briefly");
    assert_eq!(counter(server.metrics.handshake_failures.by(FailureKind::BadCertificate)), 4);
    assert_eq!(counter(&server.metrics.certificates_out_of_validity), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_another_host_than_the_connection_is_misdirected() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test", "b.test"])?;
    pki.issue_as("*.apps.test", &["*.apps.test"])?;
    let server = start_default(&pki).await?;
    for alpn in [&b"http/1.1"[..], b"h2"] {
        let client = pki.client(&[alpn]);
        let (status, _, _) = get(connect(server.addr, &client, "a.test").await?, "b.test", "/").await?;
        assert_eq!(status, 421, "{alpn:?}: Host b.test over a.test's connection");
        let (status, _, _) = get(connect(server.addr, &client, "a.test").await?, "A.test:443", "/").await?;
        assert_eq!(status, 200, "{alpn:?}: same host, other case and a port");
        let (status, _, _) = get(connect(server.addr, &client, "x.apps.test").await?, "y.apps.test", "/").await?;
        assert_eq!(status, 200, "{alpn:?}: a name the served wildcard covers (connection reuse)");
    }
    assert_eq!(counter(&server.metrics.misdirected_requests), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrades_are_not_forwarded_and_forwarded_gets_this_hop_appended() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let server = start_default(&pki).await?;
    // Keep-alive (or a tunnel, had the upgrade gone through): what arrives within 2 s.
    let text = raw_http1(
        &server,
        &pki,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
              HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nForwarded: for=192.0.2.7;proto=http\r\n\r\n",
    )
    .await?
    .to_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(!text.contains("upgrade: h2c") && !text.contains("http2-settings"), "{text}");
    assert!(text.contains("forwarded: for=192.0.2.7;proto=http, for=127.0.0.1;host=\"a.test\";proto=https"), "{text}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_closes_idle_connections_and_caps_them() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test"])?;
    let config = basic_config(&pki, spawn_echo_backend().await?, "default_certificate = \"default\"")
        + "\n[admin]\nbind = \"127.0.0.1:0\"\nmax_connections = 2\nrequest_head_timeout = \"1s\"\n";
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let admin = server.admin_addr();
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(tokio::net::TcpStream::connect(admin).await?);
    }
    idle[1].write_all(b"GET /healthz HTTP/1.1\r\nHost: x").await?;
    let probe = tokio::spawn(async move {
        let mut tcp = tokio::net::TcpStream::connect(admin).await?;
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").await?;
        let mut reply = String::new();
        tcp.read_to_string(&mut reply).await?;
        anyhow::Ok(reply)
    });
    for stream in &mut idle {
        assert!(closed_within(stream, Duration::from_secs(5)).await.is_some(), "idle admin connection still open");
    }
    let reply = tokio::time::timeout(Duration::from_secs(5), probe).await???;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    Ok(())
}
