//! Which certificate a handshake gets: per SNI, wildcard, default, strict, without SNI, malformed SNI.

use tern::failure::FailureKind;
use tern::plugin::Outcome;
use tern_fixtures::spawn_echo_backend;

use crate::support::*;

const NAMES: [&str; 4] = ["a.example.test", "b.example.test", "*.wild.example.test", "default.test"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_names_get_distinct_certificates_over_tls12_and_tls13() -> anyhow::Result<()> {
    let pki = Pki::new(&NAMES)?;
    let server = start_default(&pki).await?;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let client = client_config(&pki.ca, &[], &[version]);
        for name in ["a.example.test", "b.example.test"] {
            let stream = connect(server.addr, &client, name).await?;
            assert_eq!(served_leaf(&stream), pki.leaf(name), "{name}");
            assert_eq!(stream.get_ref().1.protocol_version(), Some(version.version));
        }
    }
    assert_ne!(pki.leaf("a.example.test"), pki.leaf("b.example.test"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_file_serves_names_one_label_below() -> anyhow::Result<()> {
    let pki = Pki::new(&NAMES)?;
    let server = start_default(&pki).await?;
    let client = pki.client(&[]);
    let stream = connect(server.addr, &client, "shop.wild.example.test").await?;
    assert_eq!(served_leaf(&stream), pki.leaf("*.wild.example.test"));
    // Two labels below is not covered by the wildcard: the plugin finds nothing and the default is served,
    // which the client (verifying the real name) refuses.
    let err = connect(server.addr, &client, "a.shop.wild.example.test").await.unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_name_and_missing_sni_get_the_default_certificate() -> anyhow::Result<()> {
    let pki = Pki::new(&NAMES)?;
    let server = start_default(&pki).await?;
    let client = pki.client(&[]);
    // No SNI at all: the client verifies the default certificate's name, so success proves which one it got.
    let stream = handshake(server.addr, &client, None, "default.test").await?;
    assert_eq!(served_leaf(&stream), pki.leaf("default.test"));
    // An unknown SNI: sent as such, verified against the default certificate's name.
    let stream = sni_verified_as(server.addr, &pki, "nobody.example.test", "default.test").await?;
    assert_eq!(served_leaf(&stream), pki.leaf("default.test"));
    assert_eq!(counter(&server.metrics.default_served), 2);
    assert_eq!(
        server.plugin_stats().count(Outcome::NotFound),
        1,
        "the unknown name was asked once, then negatively cached"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_listener_refuses_unknown_names_and_missing_sni_with_an_alert() -> anyhow::Result<()> {
    let pki = Pki::new(&NAMES)?;
    let server =
        TestServer::start(&basic_config(&pki, spawn_echo_backend().await?, "strict = true"), pki.dir.path()).await?;
    let client = pki.client(&[]);
    let err = connect(server.addr, &client, "nobody.example.test").await.unwrap_err();
    assert_eq!(alert_of(&err), Some(REFUSED), "{err}");
    let err = handshake(server.addr, &client, None, "a.example.test").await.unwrap_err();
    assert_eq!(alert_of(&err), Some(REFUSED), "{err}");
    // Known names still work on the strict listener.
    connect(server.addr, &client, "a.example.test").await?;
    let failures = &server.metrics.handshake_failures;
    assert_eq!((counter(failures.by(FailureKind::UnknownName)), counter(failures.by(FailureKind::NoSni))), (1, 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_sni_is_refused_before_any_plugin_sees_it() -> anyhow::Result<()> {
    let pki = Pki::new(&NAMES)?;
    let server = start_default(&pki).await?;
    // openssl sends whatever it is given; rustls clients refuse to send these names at all.
    for bad in ["bad..name.test", "-leading.example.test", "under score.test", "a/../../etc.test"] {
        let mut openssl = std::process::Command::new("openssl");
        openssl.args(["s_client", "-connect", &server.addr.to_string(), "-servername", bad]);
        let output = run_command(openssl).await?;
        let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(text.contains("alert"), "{bad:?}: expected a TLS alert, got:\n{text}");
    }
    assert_eq!(server.plugin_stats().calls(), 0, "no malformed name may reach the plugin");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openssl_and_curl_see_the_right_certificate() -> anyhow::Result<()> {
    let pki = Pki::new(&NAMES)?;
    let server = start_default(&pki).await?;
    let ca_file = pki.path("ca.pem");
    std::fs::write(&ca_file, pki.ca.pem())?;
    for name in ["a.example.test", "b.example.test"] {
        let mut openssl = std::process::Command::new("openssl");
        openssl.args(["s_client", "-connect", &server.addr.to_string(), "-servername", name, "-verify_return_error"]);
        openssl.args(["-verify_hostname", name, "-CAfile"]).arg(&ca_file);
        let output = run_command(openssl).await?;
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(text.contains("Verify return code: 0 (ok)"), "{name}:\n{text}");
        assert!(text.contains(&format!("CN={name}")) || text.contains(&format!("CN = {name}")), "{name}:\n{text}");
    }
    let mut curl = std::process::Command::new("curl");
    curl.args(["-sS", "--cacert"]).arg(&ca_file);
    curl.args(["--resolve", &format!("b.example.test:{}:127.0.0.1", server.addr.port())]);
    curl.arg(format!("https://b.example.test:{}/from-curl", server.addr.port()));
    let output = run_command(curl).await?;
    let body = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "curl failed: {}", String::from_utf8_lossy(&output.stderr));
    assert!(body.starts_with("GET /from-curl"), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_listeners_in_one_process_keep_their_own_policies() -> anyhow::Result<()> {
    let pki = Pki::new(&NAMES)?;
    let backend = spawn_echo_backend().await?;
    let config = format!(
        "{}\n[[listener]]\nname = \"strict\"\nbind = \"127.0.0.1:0\"\nplugin = \"files\"\nstrict = true\nbackend = \"http://{backend}\"\n",
        basic_config(&pki, backend, "default_certificate = \"default\"")
    );
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let addr_of = |name: &str| server.addrs.iter().find(|(n, _)| n == name).map(|(_, a)| *a).expect("listener bound");
    let (lenient, strict) = (addr_of("main"), addr_of("strict"));
    assert_ne!(lenient, strict);
    let client = pki.client(&[]);
    for addr in [lenient, strict] {
        assert_eq!(served_leaf(&connect(addr, &client, "a.example.test").await?), pki.leaf("a.example.test"));
    }
    let stream = handshake(lenient, &client, None, "default.test").await?;
    assert_eq!(served_leaf(&stream), pki.leaf("default.test"));
    let err = handshake(strict, &client, None, "default.test").await.unwrap_err();
    assert_eq!(alert_of(&err), Some(REFUSED), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_deadline_covers_client_hello_selection_and_handshake() -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new(&["default.test", "slow.test", "a.example.test"])?;
    let config = config_with(&pki, spawn_echo_backend().await?, CHAOS_PLUGIN, "", "default_certificate = \"default\"");
    // The chaos plugin takes 1.5 s on slow.*, longer than the whole handshake may take; fast names have room to
    // spare even on a loaded machine.
    let server =
        TestServer::start(&format!("{config}\n[server]\nhandshake_timeout = \"700ms\"\n"), pki.dir.path()).await?;
    // A client that connects and never sends a ClientHello is disconnected.
    let mut silent = tokio::net::TcpStream::connect(server.addr).await?;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), silent.read(&mut buf)).await?;
    assert!(matches!(read, Ok(0) | Err(_)), "expected the server to close, got {read:?}");
    // A selection slower than the deadline ends the handshake too (the client sees the connection close).
    let err = connect(server.addr, &pki.client(&[]), "slow.test").await.unwrap_err();
    assert_eq!(alert_of(&err), None, "a timed-out handshake is closed, not refused: {err}");
    assert_eq!(eventually_equals(&server.metrics.handshakes_timeout, 2).await, 2);
    // Fast names are unaffected.
    connect(server.addr, &pki.client(&[]), "a.example.test").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_certificates_serve_their_names_without_the_plugin() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.example.test"])?;
    pki.issue_as("static", &["static.example.test", "*.static.example.test"])?;
    // Names omitted: served for every DNS name in the certificate, wildcard included.
    let config = format!(
        "[[certificate]]\nname = \"static\"\ncert = \"certs/static.crt\"\nkey = \"certs/static.key\"\n{}",
        basic_config(&pki, spawn_echo_backend().await?, "default_certificate = \"default\"")
    );
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let client = pki.client(&[]);
    for name in ["static.example.test", "www.static.example.test"] {
        assert_eq!(served_leaf(&connect(server.addr, &client, name).await?), pki.leaf("static"), "{name}");
    }
    assert_eq!(counter(&server.metrics.static_hits), 2);
    assert_eq!(server.plugin_stats().calls(), 0);
    // A static certificate listed for a name it does not cover is refused at start-up.
    let bad = config.replacen("key = \"certs/static.key\"", "key = \"certs/static.key\"\nnames = [\"other.test\"]", 1);
    let err = TestServer::start(&bad, pki.dir.path()).await.err().expect("start-up must fail");
    assert!(err.to_string().contains("certificate \"static\"") && err.to_string().contains("other.test"), "{err}");
    Ok(())
}
