//! Admission limits right after accept (`[listener.admission]`): one address, or one /24, over its rate of new
//! connections or its count of open ones is closed before a byte of TLS is read, while everyone else is served.
//! Clients bind their own loopback addresses (127.0.0.2, 127.0.1.5, ...) so that tern tells them apart; the tests
//! set `exempt = []`, since loopback is exempt by default.

use super::*;
use tern_fixtures::spawn_echo_backend;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The common config (file plugin, default certificate, listener `main`) with an admin listener and the given
/// `[listener.admission]` keys after `exempt = []`; `more` is appended (another listener, say).
fn config(pki: &Pki, backend: SocketAddr, admission: &str, more: &str) -> String {
    let listener = format!("default_certificate = \"default\"\n\n[listener.admission]\nexempt = []\n{admission}\n");
    format!("{}\n{more}\n[admin]\nbind = \"127.0.0.1:0\"\n", basic_config(pki, backend, &listener))
}

/// A TLS handshake for `a.test` over `tcp`, within 5 s.
async fn tls_over(tcp: TcpStream, pki: &Pki) -> anyhow::Result<TlsStream<TcpStream>> {
    let name = rustls::pki_types::ServerName::try_from("a.test")?;
    let connect = tokio_rustls::TlsConnector::from(pki.client(&[b"http/1.1"])).connect(name, tcp);
    Ok(tokio::time::timeout(Duration::from_secs(5), connect).await??)
}

/// A handshake from the loopback address `source`; `Err` if tern closed the connection before TLS.
async fn from(source: &str, addr: SocketAddr, pki: &Pki) -> anyhow::Result<TlsStream<TcpStream>> {
    tls_over(tcp_from(source, addr).await?, pki).await
}

/// Whether tern closed the connection without a TLS answer (an admission refusal), rather than serving it.
async fn refused(source: &str, addr: SocketAddr, pki: &Pki) -> bool {
    match from(source, addr, pki).await {
        Ok(_) => false,
        Err(err) => {
            let alert = err.downcast_ref::<std::io::Error>().and_then(alert_of);
            assert!(alert.is_none(), "{source}: a TLS alert, not a refusal before TLS: {err:#}");
            true
        }
    }
}

/// `tern_admission_refused_total{listener, limit}` from the admin endpoint.
async fn refusals(admin_addr: SocketAddr, listener: &str, limit: &str) -> anyhow::Result<f64> {
    let (status, text) = admin(admin_addr, "GET", "/metrics", None).await?;
    anyhow::ensure!(status == 200, "metrics: {status}");
    Ok(sample(&text, "tern_admission_refused_total", &[("listener", listener), ("limit", limit)]))
}

/// (a) and (e), on a real `tern run` process: the rate of one address, counted in metrics, logged at a sampled
/// rate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_over_its_rate_is_refused_before_tls_while_another_network_is_served() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let text = config(&pki, spawn_echo_backend().await?, "address_new_per_second = 1\naddress_burst = 5", "");
    let path = pki.path("tern.toml");
    std::fs::write(&path, text)?;
    let tern = TernProcess::start(&path).await?;
    let admin_addr = tern.admin.expect("admin configured");
    // The burst, then a flood from the same address: refused, but for the one token a second it earns meanwhile.
    let started = Instant::now();
    for i in 0..5 {
        let stream = from("127.0.0.2", tern.addr, &pki).await;
        assert!(stream.is_ok(), "handshake {i} of the burst: {:?}", stream.err());
    }
    let mut refused_count = 0;
    for _ in 0..200 {
        refused_count += u64::from(refused("127.0.0.2", tern.addr, &pki).await);
    }
    let earned = started.elapsed().as_secs() + 1;
    assert!(refused_count >= 200 - earned, "{refused_count} of 200 refused over {:?}", started.elapsed());
    // Another /24 is served at once, while the flooding address is still refused.
    assert!(from("127.0.1.5", tern.addr, &pki).await.is_ok(), "127.0.1.5 was refused");
    assert!(refused("127.0.0.2", tern.addr, &pki).await);
    refused_count += 1;
    assert_eq!(refusals(admin_addr, "main", "address_rate").await?, refused_count as f64);
    assert_eq!(refusals(admin_addr, "main", "address_concurrent").await?, 0.0);
    let (_, metrics) = admin(admin_addr, "GET", "/metrics", None).await?;
    let tracked = sample(&metrics, "tern_admission_tracked", &[("listener", "main"), ("table", "address")]);
    assert_eq!(tracked, 2.0, "127.0.0.2 and 127.0.1.5");
    // Logged at most once a second: 200 refusals in about a second make one or two lines, not 200.
    let lines = |log: &LogLines| {
        log.lock().unwrap().iter().filter(|l| l.contains("admission limit")).cloned().collect::<Vec<_>>()
    };
    let logged = lines(&tern.log).len();
    assert!((1..=earned as usize + 1).contains(&logged), "{logged} lines for {refused_count} refusals");
    // A second later the next refusal is logged again; each line counts the refusals it stands for.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    while !refused("127.0.0.2", tern.addr, &pki).await {} // the second's token lets one through first
    let deadline = Instant::now() + Duration::from_secs(5);
    while lines(&tern.log).len() == logged && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lines = lines(&tern.log);
    let last = lines.last().cloned().unwrap_or_default();
    assert!(last.contains("client=127.0.0.2") && last.contains("limit=\"address_rate\""), "{last}");
    let suppressed = |line: &String| -> u64 {
        line.split("suppressed=").nth(1).and_then(|s| s.split(' ').next()?.parse().ok()).expect("suppressed=N")
    };
    let stood_for: u64 = lines.iter().map(|line| 1 + suppressed(line)).sum();
    assert!(lines.len() > logged && suppressed(&last) > 0, "{lines:?}");
    assert_eq!(stood_for as f64, refusals(admin_addr, "main", "address_rate").await?, "every refusal in one line");
    Ok(())
}

/// (b): open connections of one address; a connection's hold lasts as long as it is proxied, and closing one
/// frees its slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_hold_more_than_its_concurrent_connections() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let server =
        TestServer::start(&config(&pki, spawn_echo_backend().await?, "address_concurrent = 3", ""), pki.dir.path())
            .await?;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(from("127.0.0.2", server.addr, &pki).await?);
    }
    assert!(refused("127.0.0.2", server.addr, &pki).await, "a fourth connection from 127.0.0.2");
    let neighbour = from("127.0.0.3", server.addr, &pki).await;
    assert!(neighbour.is_ok(), "the same /24 is under its own (prefix) limit: {:?}", neighbour.err());
    // The held connections are served, and still count while a request goes through.
    let (status, _, _) = get(held.pop().expect("three held"), "a.test", "/").await?;
    assert_eq!(status, 200);
    // That connection's response is done and the client dropped it: once tern sees the close, the slot is free.
    let deadline = Instant::now() + Duration::from_secs(5);
    let again = loop {
        match from("127.0.0.2", server.addr, &pki).await {
            Ok(stream) => break stream,
            Err(err) => anyhow::ensure!(Instant::now() < deadline, "the slot was never freed: {err:#}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    held.push(again);
    assert!(refused("127.0.0.2", server.addr, &pki).await, "three held again");
    assert!(refusals(server.admin_addr(), "main", "address_concurrent").await? >= 2.0);
    assert_eq!(refusals(server.admin_addr(), "main", "address_rate").await?, 0.0);
    Ok(())
}

/// (c): many addresses of one /24 together, on the open-connection limit (listener `main`) and on the rate
/// (listener `rate`, configured on its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_of_one_prefix_together_trip_the_prefix_limits() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let backend = spawn_echo_backend().await?;
    let rate_listener = format!(
        "[[listener]]\nname = \"rate\"\nbind = \"127.0.0.1:0\"\nplugin = \"files\"\nbackend = \"http://{backend}\"\n\
         default_certificate = \"default\"\n\n[listener.admission]\nexempt = []\nprefix_new_per_second = 1\n\
         prefix_burst = 4\n"
    );
    let server =
        TestServer::start(&config(&pki, backend, "prefix_concurrent = 4", &rate_listener), pki.dir.path()).await?;
    let rate_addr = server.addrs.iter().find(|(name, _)| name == "rate").expect("listener rate").1;
    let mut held = Vec::new();
    for host in 1..=4 {
        held.push(from(&format!("127.0.2.{host}"), server.addr, &pki).await?);
    }
    assert!(refused("127.0.2.5", server.addr, &pki).await, "a fifth address of 127.0.2.0/24");
    assert!(from("127.0.3.1", server.addr, &pki).await.is_ok(), "another /24");
    // On `rate`: a burst of 4 for the whole /24, one a second after.
    let started = Instant::now();
    let mut refused_count = 0;
    for host in 1..=12 {
        refused_count += u64::from(refused(&format!("127.0.4.{host}"), rate_addr, &pki).await);
    }
    let earned = started.elapsed().as_secs() + 1;
    assert!(refused_count >= 8 - earned, "{refused_count} of 12 addresses in one /24 refused");
    assert!(from("127.0.5.1", rate_addr, &pki).await.is_ok(), "another /24");
    let admin_addr = server.admin_addr();
    assert_eq!(refusals(admin_addr, "main", "prefix_concurrent").await?, 1.0);
    assert_eq!(refusals(admin_addr, "rate", "prefix_rate").await?, refused_count as f64);
    assert_eq!(refusals(admin_addr, "rate", "address_rate").await?, 0.0, "each address made one connection");
    assert_eq!(refusals(admin_addr, "main", "prefix_rate").await?, 0.0, "the listeners count apart");
    Ok(())
}

/// HAProxy in front of `tern`, sending PROXY protocol v2; returns it (killed on drop) and its address.
async fn haproxy_v2_in_front_of(tern: SocketAddr) -> anyhow::Result<(crate::support::haproxy::HaProxy, SocketAddr)> {
    let port = free_port().await?;
    let config = format!(
        "global\n  maxconn 200\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  \
         timeout server 30s\n\nfrontend clients\n  bind 127.0.0.1:{port}\n  default_backend tern\n\n\
         backend tern\n  server tern {tern} send-proxy-v2\n"
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    Ok((crate::support::haproxy::HaProxy::start(&config, &[addr]).await?, addr))
}

/// (d): behind a load balancer, the limits count the client from the PROXY header, not the balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_the_limits_count_the_client_from_the_proxy_header() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let text = config(&pki, spawn_echo_backend().await?, "address_concurrent = 2", "")
        .replace("[listener.admission]", "proxy_protocol = { trusted = [\"127.0.0.1\"] }\n\n[listener.admission]");
    let server = TestServer::start(&text, pki.dir.path()).await?;
    let (_haproxy, front) = haproxy_v2_in_front_of(server.addr).await?;
    let held = [from("127.0.0.2", front, &pki).await?, from("127.0.0.2", front, &pki).await?];
    assert!(refused("127.0.0.2", front, &pki).await, "a third connection of 127.0.0.2 through HAProxy");
    // HAProxy (127.0.0.1) carries three connections now: counted by its address, this one would be refused.
    let other = from("127.0.1.3", front, &pki).await;
    assert!(other.is_ok(), "another client through the same balancer: {:?}", other.err());
    assert_eq!(refusals(server.admin_addr(), "main", "address_concurrent").await?, 1.0);
    drop(held);
    Ok(())
}

/// Bad `[listener.admission]` values are refused naming the file and the key.
#[test]
fn bad_admission_settings_name_the_file_and_the_key() {
    let listener =
        "[[listener]]\nname = \"main\"\nbind = \"127.0.0.1:0\"\nstrict = true\nbackend = \"http://127.0.0.1:1\"\n";
    let path = std::path::Path::new("admission-test.toml");
    for (keys, key, message) in [
        ("address_burst = 0", "listener \"main\".admission.address_burst", "between 1 and"),
        ("prefix_concurrent = 0", "listener \"main\".admission.prefix_concurrent", "between 1 and"),
        ("address_new_per_second = 2000000", "listener \"main\".admission.address_new_per_second", "1000000"),
        ("exempt = [\"10.0.0.0/33\"]", "listener \"main\".admission.exempt", "prefix length"),
        ("max_tracked = 10", "listener \"main\".admission.max_tracked", "between 64"),
    ] {
        let err = tern::Config::from_toml(&format!("{listener}\n[listener.admission]\n{keys}\n"), path)
            .expect_err(keys)
            .to_string();
        assert!(
            err.starts_with("admission-test.toml: ") && err.contains(key) && err.contains(message),
            "{keys}: {err}"
        );
    }
    let config = tern::Config::from_toml(listener, path).expect("defaults");
    let admission = &config.listeners[0].admission;
    assert_eq!(
        (admission.address.new_per_second, admission.address.burst, admission.address.concurrent),
        (200, 400, 256)
    );
    assert_eq!(
        (admission.prefix.new_per_second, admission.prefix.burst, admission.prefix.concurrent),
        (1000, 2000, 1024)
    );
    assert_eq!(admission.exempt.len(), 2, "loopback, both families");
    assert!(admission.exempt[0].contains("127.0.0.2".parse().expect("address")));
}
