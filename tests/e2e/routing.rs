//! Routes chosen by the plugin (contract 0.2, the file-path plugin's route files): tenants on their own backends
//! behind one listener, an `https` origin verified with the grant's CA, a passthrough name answered by a backend
//! that terminates TLS itself, a route outside the grants refused and not cached, certificate sets chosen by the
//! client's signature schemes, and a pool that loses a server under load.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Result;
use rustls::pki_types::pem::PemObject as _;
use tern_fixtures::TestCa;

use crate::support::*;

fn route(pki: &Pki, name: &str, line: &str) -> Result<()> {
    Ok(std::fs::write(pki.certs().join(format!("{name}.route")), format!("{line}\n"))?)
}

/// Everything the routing tests share: the PKI, the backends, and tern with the file-path plugin granted them.
struct Tenants {
    pki: Pki,
    server: TestServer,
    pass_ca: TestCa,
    _backends: Vec<Named>,
}

async fn tenants() -> Result<Tenants> {
    let pki = Pki::new(&[
        "default.test",
        "a.tenant.test",
        "b.tenant.test",
        "c.tenant.test",
        "secure.tenant.test",
        "untrusted.tenant.test",
        "denied.tenant.test",
        "*.shared.tenant.test",
    ])?;
    let origin_ca = TestCa::new("origin CA")?;
    std::fs::write(pki.path("origin-ca.pem"), origin_ca.pem())?;
    let pass_ca = TestCa::new("passthrough CA")?;
    let (alpha, bravo, listener) =
        (Named::start("alpha", None).await?, Named::start("bravo", None).await?, Named::start("listener", None).await?);
    let secure = Named::start("secure-origin", Some(server_tls(&origin_ca, &["localhost"])?)).await?;
    let stranger = Named::start("stranger", Some(server_tls(&TestCa::new("unknown CA")?, &["localhost"])?)).await?;
    let passthrough = Named::start("passthrough", Some(server_tls(&pass_ca, &["pass.tenant.test"])?)).await?;
    route(&pki, "a.tenant.test", &format!("origin http://127.0.0.1:{}", alpha.addr.port()))?;
    route(&pki, "b.tenant.test", &format!("origin http://{}/", bravo.addr))?;
    // One wildcard certificate, a route per tenant: the exact name's route applies.
    route(&pki, "t1.shared.tenant.test", &format!("origin http://127.0.0.1:{}", alpha.addr.port()))?;
    route(&pki, "secure.tenant.test", &format!("origin https://localhost:{}", secure.addr.port()))?;
    route(&pki, "untrusted.tenant.test", &format!("origin https://localhost:{}", stranger.addr.port()))?;
    route(&pki, "denied.tenant.test", "origin http://10.1.2.3:80")?;
    route(&pki, "pass.tenant.test", &format!("passthrough {}", passthrough.addr))?;
    let grants = format!(
        "grants.routes = {{ origins = [\"http://127.0.0.1:{}\", \"http://127.0.0.1:{}\", \"https://localhost:*\"], \
         passthrough = [\"127.0.0.1:{}\"], origin_ca = \"origin-ca.pem\" }}",
        alpha.addr.port(),
        bravo.addr.port(),
        passthrough.addr.port()
    );
    let config = config_with(&pki, listener.addr, FILE_PATH_PLUGIN, &grants, "default_certificate = \"default\"")
        + "\n[admin]\nbind = \"127.0.0.1:0\"\n";
    let server = TestServer::start(&config, pki.dir.path()).await?;
    Ok(Tenants { pki, server, pass_ca, _backends: vec![alpha, bravo, listener, secure, stranger, passthrough] })
}

async fn body_of(t: &Tenants, name: &str) -> Result<(http::StatusCode, String)> {
    let stream = connect(t.server.addr, &t.pki.client(&[b"http/1.1"]), name).await?;
    let (status, _, body) = get(stream, name, "/").await?;
    Ok((status, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_behind_one_listener_reach_the_backends_their_plugin_answers_name() -> Result<()> {
    let t = tenants().await?;
    for (name, want) in [
        ("a.tenant.test", "alpha a.tenant.test"),
        ("b.tenant.test", "bravo b.tenant.test"),
        ("c.tenant.test", "listener c.tenant.test"),
        ("a.tenant.test", "alpha a.tenant.test"),
        ("t1.shared.tenant.test", "alpha t1.shared.tenant.test"),
        ("t2.shared.tenant.test", "listener t2.shared.tenant.test"),
    ] {
        let (status, body) = body_of(&t, name).await?;
        assert_eq!((status.as_u16(), body.as_str()), (200, want), "{name}");
    }
    // The route is part of the cached answer: one plugin call per name, and the admin lookup shows it.
    assert_eq!(t.server.plugin_stats().count(tern::plugin::Outcome::Found), 5);
    let (_, lookup) = admin(t.server.admin_addr(), "GET", "/cache/lookup?name=a.tenant.test", None).await?;
    let lookup: serde_json::Value = serde_json::from_str(&lookup)?;
    let answer = &lookup["cached"][0];
    assert_eq!(answer["listener"], "main", "{lookup}");
    assert!(answer["route"].as_str().is_some_and(|r| r.starts_with("http://127.0.0.1:")), "{lookup}");
    assert_eq!(answer["certificates"][0]["key"], "ECDSA", "{lookup}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_origin_is_verified_against_the_grants_ca() -> Result<()> {
    let t = tenants().await?;
    let (status, body) = body_of(&t, "secure.tenant.test").await?;
    assert_eq!((status.as_u16(), body.as_str()), (200, "secure-origin secure.tenant.test"));
    // Same grant, an origin whose certificate that CA did not issue: tern refuses to talk to it.
    let (status, _) = body_of(&t, "untrusted.tenant.test").await?;
    assert_eq!(status.as_u16(), 502);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_origin_ca_is_a_start_up_error_naming_the_key_and_the_file() -> Result<()> {
    let pki = Pki::new(&["default.test"])?;
    std::fs::write(pki.path("not-a-ca.pem"), "not PEM at all")?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    for (file, why) in [("not-a-ca.pem", "no CA certificate"), ("missing.pem", "No such file")] {
        let grants = format!("grants.routes = {{ origins = [\"https://*:*\"], origin_ca = \"{file}\" }}");
        let config = config_with(&pki, backend, FILE_PATH_PLUGIN, &grants, "default_certificate = \"default\"");
        let Err(err) = TestServer::start(&config, pki.dir.path()).await else { anyhow::bail!("{file} was accepted") };
        let err = format!("{err:#}");
        assert!(err.contains("grants.routes.origin_ca") && err.contains(file) && err.contains(why), "{err}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_pool_is_verified_against_its_ca() -> Result<()> {
    let pki = Pki::new(&["default.test", "tls-pool.tenant.test", "bad-pool.tenant.test"])?;
    let pool_ca = TestCa::new("pool CA")?;
    std::fs::write(pki.path("pool-ca.pem"), pool_ca.pem())?;
    let good = Named::start("tls-server", Some(server_tls(&pool_ca, &["localhost"])?)).await?;
    let stranger = Named::start("stranger", Some(server_tls(&TestCa::new("unknown CA")?, &["localhost"])?)).await?;
    route(&pki, "tls-pool.tenant.test", "pool secure")?;
    route(&pki, "bad-pool.tenant.test", "pool other")?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let config = config_with(
        &pki,
        backend,
        FILE_PATH_PLUGIN,
        "grants.routes = { pools = [\"secure\", \"other\"] }",
        "default_certificate = \"default\"",
    ) + &format!(
        "\n[[upstream]]\nname = \"secure\"\nservers = [\"localhost:{}\"]\ntls = true\nca = \"pool-ca.pem\"\n\
         \n[[upstream]]\nname = \"other\"\nservers = [\"localhost:{}\"]\ntls = true\nca = \"pool-ca.pem\"\n",
        good.addr.port(),
        stranger.addr.port()
    );
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let client = pki.client(&[b"http/1.1"]);
    let (status, body) = body_for(server.addr, &client, "tls-pool.tenant.test").await?;
    assert_eq!((status.as_u16(), body.as_str()), (200, "tls-server tls-pool.tenant.test"));
    let (status, _) = body_for(server.addr, &client, "bad-pool.tenant.test").await?;
    assert_eq!(status.as_u16(), 502, "a server whose certificate the pool's CA did not issue is refused");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_origins_get_http2_by_alpn_only_where_granted() -> Result<()> {
    let pki = Pki::new(&["default.test", "h2.tenant.test"])?;
    let origin_ca = TestCa::new("origin CA")?;
    std::fs::write(pki.path("origin-ca.pem"), origin_ca.pem())?;
    // An origin that picks HTTP/2 when the client offers it by ALPN, HTTP/1.1 otherwise.
    let mut tls = (*server_tls(&origin_ca, &["localhost"])?).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let origin = Named::start("h2-origin", Some(Arc::new(tls))).await?;
    route(&pki, "h2.tenant.test", &format!("origin https://localhost:{}", origin.addr.port()))?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    for (h2, want) in [(true, "HTTP/2.0"), (false, "HTTP/1.1")] {
        let grants = format!(
            "grants.routes = {{ origins = [\"https://localhost:*\"], origin_ca = \"origin-ca.pem\", origin_h2 = {h2} }}"
        );
        let config = config_with(&pki, backend, FILE_PATH_PLUGIN, &grants, "default_certificate = \"default\"");
        let server = TestServer::start(&config, pki.dir.path()).await?;
        let stream = connect(server.addr, &pki.client(&[b"http/1.1"]), "h2.tenant.test").await?;
        let (status, headers, body) = get(stream, "h2.tenant.test", "/").await?;
        assert_eq!(status.as_u16(), 200, "origin_h2 = {h2}: {body}");
        assert_eq!(headers.get("x-seen-version").and_then(|v| v.to_str().ok()), Some(want), "origin_h2 = {h2}");
        assert!(body.starts_with("h2-origin "), "{body}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_name_reaches_the_backend_that_terminates_tls_itself() -> Result<()> {
    let t = tenants().await?;
    // The client trusts only the passthrough backend's CA: the handshake is with that backend, not with tern.
    let client = client_config(&t.pass_ca, &[b"http/1.1"], &[&rustls::version::TLS13, &rustls::version::TLS12]);
    for _ in 0..2 {
        let stream = connect(t.server.addr, &client, "pass.tenant.test").await?;
        let issuer = x509_issuer(&served_leaf(&stream));
        assert!(issuer.contains("passthrough CA"), "{issuer}");
        let (status, _, body) = get(stream, "pass.tenant.test", "/").await?;
        assert_eq!((status.as_u16(), body.as_str()), (200, "passthrough pass.tenant.test"));
    }
    let (_, metrics) = admin(t.server.admin_addr(), "GET", "/metrics", None).await?;
    assert_eq!(sample(&metrics, "tern_passthrough_connections_total", &[("outcome", "forwarded")]), 2.0);
    assert_eq!(t.server.plugin_stats().count(tern::plugin::Outcome::Found), 1, "the passthrough answer is cached");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_outside_the_grants_fails_the_handshake_and_is_not_cached() -> Result<()> {
    let t = tenants().await?;
    let client = t.pki.client(&[b"http/1.1"]);
    for attempt in 1..=2u64 {
        let err = connect(t.server.addr, &client, "denied.tenant.test").await.expect_err("a denied route is refused");
        assert!(alert_of(&err).is_some(), "a TLS alert, not a bare close: {err}");
        let failures = t.server.metrics.handshake_failures.by(tern::failure::FailureKind::BadRoute);
        assert_eq!(eventually_equals(failures, attempt).await, attempt);
        assert_eq!(t.server.plugin_stats().count(tern::plugin::Outcome::Found), attempt, "asked again: not cached");
    }
    let (_, metrics) = admin(t.server.admin_addr(), "GET", "/metrics", None).await?;
    assert_eq!(sample(&metrics, "tern_handshakes_total", &[("outcome", "bad_route")]), 2.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_set_serves_rsa_to_clients_that_cannot_verify_ecdsa() -> Result<()> {
    let t = tenants().await?;
    let rsa = rsa_key().await?;
    let (chain, key) = t.pki.ca.issue_with_key(&["dual.tenant.test"], &rsa)?;
    std::fs::write(t.pki.certs().join("dual.tenant.test.crt.rsa"), chain)?;
    std::fs::write(t.pki.certs().join("dual.tenant.test.key.rsa"), key)?;
    t.pki.issue_as("dual.tenant.test", &["dual.tenant.test"])?;

    let default = connect(t.server.addr, &t.pki.client(&[b"http/1.1"]), "dual.tenant.test").await?;
    assert_eq!(served_leaf(&default), t.pki.leaf("dual.tenant.test"), "a default client gets the ECDSA member");
    let rsa_only = rsa_only_client(&t.pki)?;
    let stream = connect(t.server.addr, &rsa_only, "dual.tenant.test").await?;
    let leaf = served_leaf(&stream);
    let want = rustls::pki_types::CertificateDer::from_pem_slice(&std::fs::read(
        t.pki.certs().join("dual.tenant.test.crt.rsa"),
    )?)?;
    assert_eq!(leaf, want, "a client offering only RSA signature schemes gets the RSA member");
    assert_eq!(t.server.plugin_stats().count(tern::plugin::Outcome::Found), 1, "one cached answer serves both");
    Ok(())
}

fn x509_issuer(der: &rustls::pki_types::CertificateDer<'_>) -> String {
    // The issuer's common name appears in the DER as plain text: enough to tell two test CAs apart.
    String::from_utf8_lossy(der.as_ref()).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_keeps_answering_when_a_server_dies_and_takes_it_back_when_it_returns() -> Result<()> {
    let pki = Pki::new(&["default.test", "pooled.tenant.test"])?;
    let servers =
        [Named::start("one", None).await?, Named::start("two", None).await?, Named::start("three", None).await?];
    route(&pki, "pooled.tenant.test", "pool blue")?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let list = servers.iter().map(|s| format!("\"{}\"", s.addr)).collect::<Vec<_>>().join(", ");
    let config = config_with(
        &pki,
        backend,
        FILE_PATH_PLUGIN,
        "grants.routes = { pools = [\"blue\"] }",
        "default_certificate = \"default\"",
    ) + &format!(
        "\n[admin]\nbind = \"127.0.0.1:0\"\n\n[[upstream]]\nname = \"blue\"\nservers = [{list}]\n\
             max_fails = 1\nfail_timeout = \"60s\"\nretries = 2\n\
             health_check = {{ path = \"/healthz\", interval = \"100ms\", timeout = \"1s\", rise = 1, fall = 1 }}\n"
    );
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let load = |n: usize| statuses(server.addr, pki.client(&[b"http/1.1"]), "pooled.tenant.test", n);
    assert!(load(30).await?.iter().all(|s| *s == 200));
    let [one, two, three] = servers;
    assert!(one.hits() >= 5 && two.hits() >= 5 && three.hits() >= 5, "round robin over all three");

    // Kill one server while requests keep coming: every request still succeeds (a connect failure moves the
    // request to another server), and the server is taken out.
    let during = tokio::spawn(load(40));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let (two_addr, two_hits) = two.stop().await;
    let during = during.await??;
    assert!(during.iter().all(|s| *s == 200), "no failed request while a server died: {during:?}");
    let admin_addr = server.admin_addr();
    let is_up = move |addr: SocketAddr, want: f64| pool_server_up(admin_addr, "blue", addr, want);
    eventually("the dead server is reported down", || is_up(two_addr, 0.0)).await?;
    let before = two_hits.load(Ordering::Relaxed);
    assert!(load(12).await?.iter().all(|s| *s == 200));
    assert_eq!(two_hits.load(Ordering::Relaxed), before, "no traffic to a server that is down");

    // Another dies while no request is sent: only the active check can notice.
    let three_addr = three.addr;
    let (_, three_hits) = three.stop().await;
    eventually("the health check takes out a server that died idle", || is_up(three_addr, 0.0)).await?;
    let before = three_hits.load(Ordering::Relaxed);
    assert!(load(6).await?.iter().all(|s| *s == 200), "the last server answers everything");
    assert_eq!(three_hits.load(Ordering::Relaxed), before);

    // Bring both back on the same addresses: the health checks return them to the rotation.
    let two = Named::start_on("two", two_addr, None, two_hits).await?;
    let three = Named::start_on("three", three_addr, None, three_hits).await?;
    eventually("the returning server is reported up", || is_up(two_addr, 1.0)).await?;
    eventually("the other returning server is reported up", || is_up(three_addr, 1.0)).await?;
    let (two_before, three_before) = (two.hits(), three.hits());
    assert!(load(12).await?.iter().all(|s| *s == 200));
    assert!(two.hits() > two_before && three.hits() > three_before, "traffic reaches the returned servers");
    let (_, metrics) = admin(admin_addr, "GET", "/metrics", None).await?;
    // A request in flight when the server died fails as a reset, later ones as connect errors; which come first
    // is timing (one failure takes the server out), but the failures are counted against the dead server.
    let errors = |kind: &str| {
        sample(&metrics, "tern_upstream_errors_total", &[("server", &two_addr.to_string()), ("kind", kind)])
    };
    assert!(errors("connect") + errors("reset") >= 1.0, "the failures were counted against the dead server");
    let latency = format!("tern_upstream_response_seconds_count{{pool=\"blue\",server=\"{two_addr}\"}} ");
    let answered = metrics.lines().find_map(|l| l.strip_prefix(&latency)).and_then(|v| v.parse::<u64>().ok());
    assert!(answered.is_some_and(|n| n >= 2), "per-server latency histogram: {answered:?}");
    drop(one);
    Ok(())
}

/// Statuses of `n` requests for `name`, each over a fresh connection (spread round robin by a pool).
async fn statuses(addr: SocketAddr, client: Arc<rustls::ClientConfig>, name: &str, n: usize) -> Result<Vec<u16>> {
    let mut statuses = Vec::with_capacity(n);
    for _ in 0..n {
        let stream = connect(addr, &client, name).await?;
        statuses.push(get(stream, name, "/").await?.0.as_u16());
    }
    Ok(statuses)
}

/// Whether `tern_upstream_up` of a pool's server is `want` now.
async fn pool_server_up(admin_addr: SocketAddr, pool: &str, server: SocketAddr, want: f64) -> Result<bool> {
    let (_, metrics) = admin(admin_addr, "GET", "/metrics", None).await?;
    Ok(sample(&metrics, "tern_upstream_up", &[("pool", pool), ("server", &server.to_string())]) == want)
}
