//! Certificates on demand against a real ACME server (Debian's Pebble, with its default 5% `badNonce`
//! rejections left on): issuance through TLS-ALPN-01 and HTTP-01 for names the plugin permits, no order for
//! names it refuses, one order for two nodes sharing Redis (the CA's validation answered by the node that did not
//! order), renewal without a failed handshake, a CA outage that leaves the old certificate serving, a restart
//! that serves the stored certificate, and a flood of permitted names bounded by the budget.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;

use crate::redis_support::RedisServer;
use crate::support::pebble::{Pebble, PebbleOptions};
use crate::support::*;

const ACME_GATE: &str = env!("TERN_PLUGIN_ACME_GATE");
const SECRET: &str = "0123456789abcdef0123456789abcdef-acme-test";

/// A client that trusts only Pebble's root (fetched from its management interface).
async fn pebble_client(pebble: &Pebble) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(pebble.roots_pem().await?.as_bytes()) {
        roots.add(root?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// One tern node: the acme-gate plugin permitting `*.allowed.test`, a default certificate for everything else,
/// a listener at `bind`, and `[acme]` with `acme_keys` added.
fn node_config(
    directory: &str,
    ca: &std::path::Path,
    backend: SocketAddr,
    bind: SocketAddr,
    acme_keys: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[[certificate]]
name = "default"
cert = "certs/default.test.crt"
key = "certs/default.test.key"
names = []

[[plugin]]
name = "gate"
path = "{ACME_GATE}"
settings.allow = ".allowed.test"

[[listener]]
name = "main"
bind = "{bind}"
plugin = "gate"
backend = "http://{backend}"
default_certificate = "default"

[acme]
directory = "{directory}"
ca = "{ca}"
secret = "{SECRET}"
handshake_wait = "8s"
order_timeout = "20s"
{acme_keys}

[admin]
bind = "127.0.0.1:0"
{extra}
"#,
        ca = ca.display(),
    )
}

fn acme_metrics(server: &TestServer) -> &tern::acme::AcmeMetrics {
    &server.selector.acme().expect("[acme] configured").metrics
}

/// Handshakes `name` until the served certificate is not `default` (the first handshake may get the default
/// while the order runs); the leaf served.
async fn issued_leaf(
    addr: SocketAddr,
    client: &Arc<rustls::ClientConfig>,
    name: &str,
) -> Result<CertificateDer<'static>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match connect(addr, client, name).await {
            Ok(stream) => return Ok(served_leaf(&stream)),
            // Verification against Pebble's root fails while the default certificate is served.
            Err(err) if Instant::now() < deadline => {
                tracing::debug!(%err, "not issued yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(err) => bail!("{name}: no Pebble certificate within 30 s: {err}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_alpn_issuance_on_demand_only_for_permitted_names_and_kept_across_a_restart() -> Result<()> {
    let pki = Pki::new(&["default.test"])?;
    let port = free_port().await?;
    let pebble = Pebble::start(PebbleOptions::new(port, free_port().await?)).await?;
    let client = pebble_client(&pebble).await?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let bind: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let storage = format!("directory_path = \"{}\"", pki.path("acme").display());
    let config = node_config(&pebble.directory_url(), pebble.directory_ca(), backend, bind, &storage, "");
    let server = TestServer::start(&config, pki.dir.path()).await?;

    // Verified by a client trusting only Pebble's root: the chain tern serves is the CA's.
    let started = Instant::now();
    let stream = connect(bind, &client, "shop.allowed.test").await.context("first handshake of a permitted name")?;
    println!("on-demand issuance (TLS-ALPN-01): first handshake served after {:?}", started.elapsed());
    let leaf = served_leaf(&stream);
    let (status, _, body) = get(stream, "shop.allowed.test", "/hello").await?;
    assert_eq!(status, 200, "{body}");
    let metrics = acme_metrics(&server);
    assert_eq!(counter(&metrics.orders_issued), 1);
    assert!(counter(&metrics.challenges_tls_alpn) >= 1, "the CA validated through tern's own handshake path");
    assert_eq!(leaf, served_leaf(&connect(bind, &client, "shop.allowed.test").await?), "served from memory");

    // A name the plugin refuses: the default certificate, and no order.
    let refused = sni_verified_as(bind, &pki, "shop.elsewhere.test", "default.test").await?;
    assert_eq!(served_leaf(&refused), pki.leaf("default.test"));
    assert_eq!(counter(&metrics.orders_issued) + counter(&metrics.orders_failed), 1, "no order for a refused name");

    // A validation handshake for a name no order validates is refused, and costs no order.
    let mut probe = (*client).clone();
    probe.alpn_protocols = vec![b"acme-tls/1".to_vec()];
    assert!(connect(bind, &Arc::new(probe), "idle.allowed.test").await.is_err());
    let refused = tern::failure::FailureKind::NoChallenge;
    assert_eq!(counter(server.metrics.handshake_failures.by(refused)), 1);

    // A restarted node serves the stored certificate without a new order.
    drop(server);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let server = TestServer::start(&config, pki.dir.path()).await?;
    assert_eq!(leaf, served_leaf(&connect(bind, &client, "shop.allowed.test").await?));
    let metrics = acme_metrics(&server);
    assert_eq!(counter(&metrics.orders_issued) + counter(&metrics.orders_failed), 0, "no order after a restart");

    // Operator tools, through the node's admin API: list (never keys), renew now, revoke at the CA.
    let admin = server.admin_addr().to_string();
    let listed = run_command(tern(&["acme", "list", "--admin", &admin])).await?;
    let listed_text = text(&listed);
    assert!(listed.status.success() && listed_text.contains("shop.allowed.test"), "{listed_text}");
    assert!(listed_text.contains("Pebble") && !listed_text.contains("PRIVATE"), "{listed_text}");
    let renewed = run_command(tern(&["acme", "renew", "shop.allowed.test", "--admin", &admin])).await?;
    assert!(renewed.status.success(), "{}", text(&renewed));
    let renewed_leaf = served_leaf(&connect(bind, &client, "shop.allowed.test").await?);
    assert_ne!(renewed_leaf, leaf, "the renewed certificate serves at once");
    assert_eq!(counter(&metrics.renewals_ok), 1);
    let revoked = run_command(tern(&["acme", "revoke", "shop.allowed.test", "--admin", &admin])).await?;
    assert!(revoked.status.success(), "{}", text(&revoked));
    assert_eq!(pebble.cert_status(&serial_hex(&renewed_leaf).await?).await?["Status"], "Revoked");
    let listed = text(&run_command(tern(&["acme", "list", "--admin", &admin])).await?);
    assert!(listed.contains("0 certificate(s)"), "{listed}");
    Ok(())
}

/// The serial of a certificate in hex, as Pebble's management interface takes it (openssl reads it).
async fn serial_hex(leaf: &CertificateDer<'_>) -> Result<String> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("leaf.der");
    std::fs::write(&path, leaf.as_ref())?;
    let mut openssl = std::process::Command::new("openssl");
    openssl.args(["x509", "-inform", "DER", "-noout", "-serial", "-in"]).arg(&path);
    let output = run_command(openssl).await?;
    let serial = String::from_utf8(output.stdout)?;
    let serial = serial.trim().strip_prefix("serial=").context("openssl printed no serial")?;
    Ok(serial.trim_start_matches('0').to_ascii_lowercase())
}

/// Sends one plain HTTP/1.1 request and returns the response head and body as text.
async fn plain_http(addr: SocketAddr, host: &str, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut response)).await??;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http01_issuance_through_the_plain_http_listener_which_redirects_everything_else() -> Result<()> {
    let pki = Pki::new(&["default.test"])?;
    let (port, http_port) = (free_port().await?, free_port().await?);
    let pebble = Pebble::start(PebbleOptions::new(port, http_port)).await?;
    let client = pebble_client(&pebble).await?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let bind: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    // RSA keys, and a name listed in the config: obtained at start-up without the plugin, which does not permit it.
    let acme = format!(
        "directory_path = \"{}\"\nchallenge = \"http-01\"\nkey_type = \"rsa-2048\"\nnames = [\"listed.example.test\"]",
        pki.path("acme").display()
    );
    let http = format!("[[http_listener]]\nname = \"plain\"\nbind = \"127.0.0.1:{http_port}\"\nhttps_port = {port}");
    let server = TestServer::start(
        &node_config(&pebble.directory_url(), pebble.directory_ca(), backend, bind, &acme, &http),
        pki.dir.path(),
    )
    .await?;

    let started = Instant::now();
    let leaf = issued_leaf(bind, &client, "blog.allowed.test").await?;
    println!("on-demand issuance (HTTP-01): served after {:?}", started.elapsed());
    assert!(!leaf.is_empty());
    let listed = issued_leaf(bind, &client, "listed.example.test").await?;
    assert_ne!(listed, leaf);
    let metrics = acme_metrics(&server);
    assert_eq!(eventually_equals(&metrics.orders_issued, 2).await, 2);
    assert!(counter(&metrics.challenges_http) >= 1, "the CA fetched the key authorization from the HTTP listener");
    assert_eq!(counter(&metrics.challenges_tls_alpn), 0);

    let http_addr: SocketAddr = format!("127.0.0.1:{http_port}").parse()?;
    let redirect = plain_http(http_addr, "blog.allowed.test:80", "/cart?item=7").await?;
    assert!(redirect.starts_with("HTTP/1.1 308"), "{redirect}");
    let location = format!("location: https://blog.allowed.test:{port}/cart?item=7");
    assert!(redirect.to_ascii_lowercase().contains(&location), "{redirect}");
    let junk = plain_http(http_addr, "bad host\r\nx: y", "/").await?;
    assert!(junk.starts_with("HTTP/1.1 400"), "{junk}");
    let unknown = plain_http(http_addr, "blog.allowed.test", "/.well-known/acme-challenge/nosuchtoken").await?;
    assert!(unknown.starts_with("HTTP/1.1 404"), "{unknown}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sharing_redis_make_one_order_per_name_and_answer_each_others_challenges() -> Result<()> {
    let pki = Pki::new(&["default.test"])?;
    let redis = RedisServer::start().await?;
    let port = free_port().await?;
    let pebble = Pebble::start(PebbleOptions::new(port, free_port().await?)).await?;
    let client = pebble_client(&pebble).await?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let shared = format!("redis = \"shared\"\n\n[[redis]]\nname = \"shared\"\nurls = [\"{}\"]", redis.url());
    // Node B on another loopback address, same port: Pebble reaches whichever the name resolves to.
    let (a_bind, b_bind): (SocketAddr, SocketAddr) =
        (format!("127.0.0.1:{port}").parse()?, format!("127.0.0.2:{port}").parse()?);
    let b_dir = tempfile::tempdir()?;
    std::fs::create_dir_all(b_dir.path().join("certs"))?;
    for file in ["default.test.crt", "default.test.key"] {
        std::fs::copy(pki.certs().join(file), b_dir.path().join("certs").join(file))?;
    }
    let a = TestServer::start(
        &node_config(&pebble.directory_url(), pebble.directory_ca(), backend, a_bind, &shared, ""),
        pki.dir.path(),
    )
    .await?;
    let b = TestServer::start(
        &node_config(&pebble.directory_url(), pebble.directory_ca(), backend, b_bind, &shared, ""),
        b_dir.path(),
    )
    .await?;

    // A orders; the CA's validation goes to B, which answers from the challenge A published in Redis.
    pebble.set_a("one.allowed.test", "127.0.0.2").await?;
    let leaf_a = served_leaf(&connect(a_bind, &client, "one.allowed.test").await?);
    assert_eq!(counter(&acme_metrics(&a).orders_issued), 1);
    assert_eq!(counter(&acme_metrics(&b).orders_issued), 0);
    assert!(counter(&acme_metrics(&b).challenges_tls_alpn) >= 1, "B answered A's challenge");
    assert_eq!(counter(&acme_metrics(&a).challenges_tls_alpn), 0);
    let leaf_b = served_leaf(&connect(b_bind, &client, "one.allowed.test").await?);
    assert_eq!(leaf_a, leaf_b, "B serves the certificate A obtained, without an order");
    assert_eq!(counter(&acme_metrics(&b).orders_issued), 0);

    // Concurrent first handshakes on both nodes: exactly one order between them.
    let (on_a, on_b) =
        tokio::join!(connect(a_bind, &client, "two.allowed.test"), connect(b_bind, &client, "two.allowed.test"));
    let (leaf_a, leaf_b) = (served_leaf(&on_a?), served_leaf(&on_b?));
    assert_eq!(leaf_a, leaf_b, "both nodes serve the same certificate");
    let orders = |s: &TestServer| counter(&acme_metrics(s).orders_issued) + counter(&acme_metrics(s).orders_failed);
    assert_eq!(orders(&a) + orders(&b), 2, "one order for one.allowed.test, one for two.allowed.test");
    assert!(counter(&acme_metrics(&a).waited_for_other) + counter(&acme_metrics(&b).waited_for_other) >= 1);

    // Keys are sealed at rest: the stored record holds no PEM private key.
    let stored = redis.command(&["GET", "tern:acme:{two.allowed.test}:cert"]).await?;
    assert!(stored.contains("BEGIN CERTIFICATE") && !stored.contains("PRIVATE KEY"), "{stored}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_replaces_the_certificate_without_a_failed_handshake_and_a_failing_ca_keeps_the_old_one() -> Result<()>
{
    let pki = Pki::new(&["default.test"])?;
    let port = free_port().await?;
    let mut options = PebbleOptions::new(port, free_port().await?);
    options.validity = Some(40);
    let mut pebble = Pebble::start(options).await?;
    let client = pebble_client(&pebble).await?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let bind: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    // Due with half the lifetime left (after ~20 s); looked for every second; a failure waits a second.
    let acme = format!(
        "directory_path = \"{}\"\nrenewal_window = 0.5\nrenew_check_interval = \"1s\"\nfailure_backoff = \"1s\"\nfailure_backoff_max = \"2s\"",
        pki.path("acme").display()
    );
    let server = TestServer::start(
        &node_config(&pebble.directory_url(), pebble.directory_ca(), backend, bind, &acme, ""),
        pki.dir.path(),
    )
    .await?;
    let first = served_leaf(&connect(bind, &client, "renew.allowed.test").await?);
    let metrics = acme_metrics(&server);

    // Handshakes every 200 ms until the certificate changes: none may fail.
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut handshakes = 0;
    let second = loop {
        let leaf =
            served_leaf(&connect(bind, &client, "renew.allowed.test").await.context("handshake during renewal")?);
        handshakes += 1;
        if leaf != first {
            break leaf;
        }
        if Instant::now() > deadline {
            bail!("not renewed within 45 s ({} renewals failed)", counter(&metrics.renewals_failed));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("renewed after {handshakes} handshakes, none failed");
    assert_eq!(counter(&metrics.renewals_ok), 1);

    // The CA goes away: the renewal of the second certificate fails, and it keeps serving.
    pebble.kill();
    let deadline = Instant::now() + Duration::from_secs(45);
    while counter(&metrics.renewals_failed) == 0 {
        if Instant::now() > deadline {
            bail!("no failed renewal within 45 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(second, served_leaf(&connect(bind, &client, "renew.allowed.test").await?), "the old certificate serves");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_permitted_names_is_bounded_by_the_order_budget_and_never_fails_a_handshake_eab_account()
-> Result<()> {
    let pki = Pki::new(&["default.test"])?;
    let port = free_port().await?;
    // A CA that requires External Account Binding.
    let mut options = PebbleOptions::new(port, free_port().await?);
    let (kid, hmac) = crate::support::pebble::EXAMPLE_EAB;
    options.eab = Some((kid.to_string(), hmac.to_string()));
    let pebble = Pebble::start(options).await?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let bind: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let acme = format!(
        "directory_path = \"{}\"\norders_per_hour_per_domain = 3\nhandshake_wait = \"1ms\"\neab_kid = \"{kid}\"\neab_hmac = \"{hmac}\"",
        pki.path("acme").display()
    );
    let config = node_config(&pebble.directory_url(), pebble.directory_ca(), backend, bind, &acme, "")
        .replace("handshake_wait = \"8s\"\n", "");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    for i in 0..30 {
        let name = format!("junk{i}.allowed.test");
        let stream = sni_verified_as(bind, &pki, &name, "default.test").await.context("flood handshake")?;
        assert_eq!(served_leaf(&stream), pki.leaf("default.test"), "the fallback while nothing is issued");
    }
    let metrics = acme_metrics(&server);
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(&metrics.orders_issued) + counter(&metrics.orders_failed) + counter(&metrics.refused_budget) < 30 {
        if Instant::now() > deadline {
            bail!("orders still running after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(counter(&metrics.orders_issued) + counter(&metrics.orders_failed), 3, "the budget allows 3 per hour");
    assert_eq!(counter(&metrics.refused_budget), 27);
    assert_eq!(counter(server.metrics.handshake_failures.by(tern::failure::FailureKind::AcmePending)), 0);
    // Refused names are refused from memory for a while: handshaking them again reads no storage, counts nothing.
    // (The three issued names now serve Pebble's certificate, which this client does not trust.)
    let mut defaults = 0;
    for i in 0..30 {
        defaults +=
            usize::from(sni_verified_as(bind, &pki, &format!("junk{i}.allowed.test"), "default.test").await.is_ok());
    }
    // (An order Pebble failed leaves its name in backoff, on the default certificate too.)
    assert_eq!(defaults, 30 - counter(&metrics.orders_issued) as usize);
    assert_eq!(counter(&metrics.refused_budget), 27);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_is_down_fails_the_order_cleanly_backs_off_and_recovers_with_a_new_account() -> Result<()> {
    let pki = Pki::new(&["default.test"])?;
    let port = free_port().await?;
    let mut pebble = Pebble::start(PebbleOptions::new(port, free_port().await?)).await?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let bind: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let acme = format!(
        "directory_path = \"{}\"\nfailure_backoff = \"2s\"\nfailure_backoff_max = \"2s\"",
        pki.path("acme").display()
    );
    let server = TestServer::start(
        &node_config(&pebble.directory_url(), pebble.directory_ca(), backend, bind, &acme, ""),
        pki.dir.path(),
    )
    .await?;
    let metrics = acme_metrics(&server);
    // An account exists at the CA, then the CA goes away.
    let old_client = pebble_client(&pebble).await?;
    let before = issued_leaf(bind, &old_client, "before.allowed.test").await?;
    pebble.kill();

    // The order fails at once (connection refused): the fallback serves; further handshakes inside the backoff
    // start no order.
    for _ in 0..3 {
        let stream = sni_verified_as(bind, &pki, "during.allowed.test", "default.test").await?;
        assert_eq!(served_leaf(&stream), pki.leaf("default.test"));
    }
    assert_eq!(counter(&metrics.orders_failed), 1, "one failed order, then backoff");
    assert!(counter(&metrics.refused_backoff) >= 1);
    // Other names keep being served meanwhile.
    assert_eq!(before, served_leaf(&connect(bind, &old_client, "before.allowed.test").await?));
    assert_eq!(counter(&metrics.orders_issued), 1);

    // The CA comes back as a new CA (Pebble keeps nothing): it does not know the account; tern makes a new one.
    pebble.restart().await?;
    let client = pebble_client(&pebble).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(stream) = connect(bind, &client, "during.allowed.test").await {
            assert!(!served_leaf(&stream).is_empty());
            break;
        }
        if Instant::now() > deadline {
            bail!("no certificate within 30 s of the CA's return ({} orders failed)", counter(&metrics.orders_failed));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(counter(&metrics.orders_issued), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_that_never_answers_holds_nothing_past_the_order_timeout() -> Result<()> {
    let pki = Pki::new(&["default.test"])?;
    // Accepts connections and never says a word.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let directory = format!("https://127.0.0.1:{}/dir", silent.local_addr()?.port());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            open.push(tcp);
        }
    });
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let bind: SocketAddr = "127.0.0.1:0".parse()?;
    let acme = format!("directory_path = \"{}\"", pki.path("acme").display());
    let config = node_config(&directory, &pki.path("certs/default.test.crt"), backend, bind, &acme, "")
        .replace("handshake_wait = \"8s\"", "handshake_wait = \"300ms\"")
        .replace("order_timeout = \"20s\"", "order_timeout = \"2s\"");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let metrics = acme_metrics(&server);
    let started = Instant::now();
    let stream = sni_verified_as(server.addr, &pki, "hang.allowed.test", "default.test").await?;
    assert_eq!(served_leaf(&stream), pki.leaf("default.test"), "the fallback after acme.handshake_wait");
    assert!(started.elapsed() < Duration::from_secs(2), "the handshake waited {:?}", started.elapsed());
    assert_eq!(counter(&metrics.wait_expired), 1);
    // The order gives up at acme.order_timeout, counted as failed, and the name backs off.
    assert_eq!(eventually_equals(&metrics.orders_failed, 1).await, 1);
    sni_verified_as(server.addr, &pki, "hang.allowed.test", "default.test").await?;
    assert_eq!(counter(&metrics.orders_failed), 1, "backing off");
    held.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_holds_acme_state_with_each_names_keys_in_one_slot() -> Result<()> {
    let pki = Pki::new(&["default.test"])?;
    let cluster = crate::redis_support::RedisCluster::start().await?;
    let port = free_port().await?;
    let pebble = Pebble::start(PebbleOptions::new(port, free_port().await?)).await?;
    let client = pebble_client(&pebble).await?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let bind: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let urls: Vec<String> = cluster.urls().iter().map(|u| format!("\"{u}\"")).collect();
    let store =
        format!("redis = \"cluster\"\n\n[[redis]]\nname = \"cluster\"\ncluster = true\nurls = [{}]", urls.join(", "));
    let config = node_config(&pebble.directory_url(), pebble.directory_ca(), backend, bind, &store, "");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    // The lock and the fenced write (one Lua script over the name's lock and record) need both keys in one slot.
    for name in ["a.allowed.test", "b.allowed.test", "c.allowed.test"] {
        connect(bind, &client, name).await.with_context(|| format!("{name} on a cluster"))?;
    }
    assert_eq!(counter(&acme_metrics(&server).orders_issued), 3);
    let (status, listed) = admin(server.admin_addr(), "GET", "/acme/certificates", None).await?;
    assert_eq!(status, 200, "{listed}");
    assert!(["a", "b", "c"].iter().all(|n| listed.contains(&format!("{n}.allowed.test"))), "{listed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_obtain_answer_without_an_acme_section_gets_the_fallback_and_is_counted() -> Result<()> {
    let pki = Pki::new(&["default.test"])?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let config = format!(
        "[[certificate]]\nname = \"default\"\ncert = \"certs/default.test.crt\"\nkey = \"certs/default.test.key\"\n\
         names = []\n\n[[plugin]]\nname = \"gate\"\npath = \"{ACME_GATE}\"\nsettings.allow = \".allowed.test\"\n\n\
         [[listener]]\nname = \"lenient\"\nbind = \"127.0.0.1:0\"\nplugin = \"gate\"\nbackend = \"http://{backend}\"\n\
         default_certificate = \"default\"\n\n[[listener]]\nname = \"strict\"\nbind = \"127.0.0.1:0\"\n\
         plugin = \"gate\"\nbackend = \"http://{backend}\"\nstrict = true\n"
    );
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let lenient = sni_verified_as(server.addrs[0].1, &pki, "shop.allowed.test", "default.test").await?;
    assert_eq!(served_leaf(&lenient), pki.leaf("default.test"));
    let strict = sni_verified_as(server.addrs[1].1, &pki, "shop.allowed.test", "default.test").await;
    assert!(strict.is_err(), "a strict listener refuses the name");
    let failed = server.metrics.handshake_failures.by(tern::failure::FailureKind::AcmeFailed);
    assert_eq!(eventually_equals(failed, 1).await, 1);
    Ok(())
}
