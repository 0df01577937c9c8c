//! What handshakes negotiated (cipher suite, key-exchange group), as tern counts it, held against what the client
//! saw: a TLS 1.3 client and a TLS 1.2 client.

use rustls::NamedGroup;
use tern_fixtures::spawn_echo_backend;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cipher_suites_and_key_exchange_groups_are_counted_as_negotiated() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let admin = "\n[admin]\nbind = \"127.0.0.1:0\"\n";
    let config = basic_config(&pki, spawn_echo_backend().await?, "default_certificate = \"default\"") + admin;
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let tls12 = client_config(&pki.ca, &[], &[&rustls::version::TLS12]);
    let mut seen = Vec::new();
    for client in [pki.client(&[]), tls12] {
        let stream = connect(server.addr, &client, "a.test").await?;
        let tls = stream.get_ref().1;
        seen.push((
            tls.negotiated_cipher_suite().expect("done").suite(),
            tls.negotiated_key_exchange_group().expect("done").name(),
        ));
        // A request through the connection: by its answer the server has counted the handshake.
        assert_eq!(get(stream, "a.test", "/").await?.0, 200);
    }
    assert_ne!(seen[1].1, NamedGroup::X25519MLKEM768, "TLS 1.2 has no hybrid group");
    assert_ne!(seen[0].0, seen[1].0, "TLS 1.3 and 1.2 suites differ");
    let negotiated = &server.metrics.negotiated;
    for (suite, group) in &seen {
        let with_group = seen.iter().filter(|(_, g)| g == group).count() as u64;
        assert_eq!((negotiated.suite(*suite), negotiated.group(*group)), (1, with_group), "{suite:?} {group:?}");
    }
    let (_, text) = crate::support::admin(server.admin_addr(), "GET", "/metrics", None).await?;
    let group = seen[1].1.as_str().expect("a named group");
    let both = if seen[0].1 == seen[1].1 { 2.0 } else { 1.0 };
    assert_eq!(sample(&text, "tern_tls_key_exchange_groups_total", &[("group", group)]), both);
    let suite = seen[1].0.as_str().expect("a named suite");
    assert_eq!(sample(&text, "tern_tls_cipher_suites_total", &[("suite", suite)]), 1.0);
    Ok(())
}

/// A TLS 1.3 + 1.2 client offering `order` (rustls's suite names, most preferred first) and nothing else.
fn offering(pki: &Pki, order: &[rustls::CipherSuite]) -> std::sync::Arc<rustls::ClientConfig> {
    let base = tern::crypto::provider();
    let suites = order.iter().map(|c| *base.cipher_suites.iter().find(|s| s.suite() == *c).expect("known")).collect();
    let provider = std::sync::Arc::new(rustls::crypto::CryptoProvider { cipher_suites: suites, ..(**base).clone() });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der()).expect("CA parses");
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    std::sync::Arc::new(config)
}

/// The suite a handshake with `client` negotiates (after a request, so the connection is whole).
async fn negotiated(server: &TestServer, client: &std::sync::Arc<rustls::ClientConfig>) -> anyhow::Result<CipherSuite> {
    let stream = connect(server.addr, client, "a.test").await?;
    let suite = stream.get_ref().1.negotiated_cipher_suite().expect("done").suite();
    assert_eq!(get(stream, "a.test", "/").await?.0, 200);
    Ok(suite)
}

use rustls::CipherSuite;
use rustls::CipherSuite::{
    TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 as ECDSA_AES128, TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384 as ECDSA_AES256,
    TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256 as ECDSA_CHACHA, TLS13_AES_128_GCM_SHA256 as AES128,
    TLS13_AES_256_GCM_SHA384 as AES256, TLS13_CHACHA20_POLY1305_SHA256 as CHACHA,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_order_wins_except_for_clients_that_put_chacha20_first() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let backend = spawn_echo_backend().await?;
    let server = TestServer::start(&basic_config(&pki, backend, "strict = true"), pki.dir.path()).await?;
    // AES-128-GCM first on a CPU with AES instructions (every machine this suite runs on; ChaCha20 otherwise).
    let preferred = if tern::crypto::aes_hardware() { (AES128, ECDSA_AES128) } else { (CHACHA, ECDSA_CHACHA) };
    // OpenSSL's default order: AES-256 first.
    let aes256_first = offering(&pki, &[AES256, CHACHA, AES128, ECDSA_AES256, ECDSA_CHACHA, ECDSA_AES128]);
    assert_eq!(negotiated(&server, &aes256_first).await?, preferred.0);
    let tls12_only = offering(&pki, &[ECDSA_AES256, ECDSA_CHACHA, ECDSA_AES128]);
    assert_eq!(negotiated(&server, &tls12_only).await?, preferred.1);
    // A client without AES instructions says so by listing ChaCha20 first, and gets it over either version.
    let chacha_first = offering(&pki, &[CHACHA, AES128, AES256, ECDSA_CHACHA, ECDSA_AES128]);
    assert_eq!(negotiated(&server, &chacha_first).await?, CHACHA);
    assert_eq!(negotiated(&server, &offering(&pki, &[ECDSA_CHACHA, ECDSA_AES128])).await?, ECDSA_CHACHA);

    // An independent client: OpenSSL 3 offers TLS_AES_256_GCM_SHA384 first by default.
    let ca = pki.path("ca.pem");
    std::fs::write(&ca, pki.ca.pem())?;
    let mut command = std::process::Command::new("openssl");
    command.args(["s_client", "-connect", &server.addr.to_string(), "-servername", "a.test", "-tls1_3", "-brief"]);
    command.arg("-CAfile").arg(&ca);
    let said = text(&run_command(command).await?);
    let expected = if tern::crypto::aes_hardware() { "TLS_AES_128_GCM_SHA256" } else { "TLS_CHACHA20_POLY1305_SHA256" };
    assert!(said.contains(&format!("Ciphersuite: {expected}")), "{said}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cipher_order_client_follows_the_client_and_cipher_suites_limit_what_is_negotiated() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let backend = spawn_echo_backend().await?;
    let aes256_first = offering(&pki, &[AES256, CHACHA, AES128, ECDSA_AES256, ECDSA_AES128]);
    let config = basic_config(&pki, backend, "strict = true") + "\n[server]\ncipher_order = \"client\"\n";
    let server = TestServer::start(&config, pki.dir.path()).await?;
    assert_eq!(negotiated(&server, &aes256_first).await?, AES256);
    drop(server);

    let suites = "\n[server]\ncipher_suites = [\"TLS_AES_256_GCM_SHA384\", \"TLS13_CHACHA20_POLY1305_SHA256\"]\n";
    let server = TestServer::start(&(basic_config(&pki, backend, "strict = true") + suites), pki.dir.path()).await?;
    assert_eq!(negotiated(&server, &offering(&pki, &[AES128, CHACHA, AES256])).await?, AES256);
    assert_eq!(negotiated(&server, &offering(&pki, &[CHACHA, AES128, AES256])).await?, CHACHA);
    let refused = connect(server.addr, &offering(&pki, &[AES128, ECDSA_AES128]), "a.test").await;
    assert!(refused.is_err(), "a client offering only suites the config leaves out was served");
    Ok(())
}

/// testssl.sh (Debian's 3.0, on OpenSSL 3) asks the question its report flags ("no cipher order configured"): with
/// the server order it sees one, and its own client (AES-256 first) is given AES-128-GCM over TLS 1.3. testssl 3.0
/// checks the order of TLS 1.2 suites only; the TLS 1.3 pick is what it negotiated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testssl_sees_a_server_cipher_order() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let backend = spawn_echo_backend().await?;
    let server =
        TestServer::start(&basic_config(&pki, backend, "default_certificate = \"default\""), pki.dir.path()).await?;
    let mut command = std::process::Command::new("testssl");
    command.args(["--quiet", "--color", "0", "--warnings", "off", "--server-preference"]);
    command.arg(server.addr.to_string());
    let said = text(&run_command(command).await?);
    let said: String = said.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(said.contains("Has server cipher order? yes"), "{said}");
    let expected = if tern::crypto::aes_hardware() { "TLS_AES_128_GCM_SHA256" } else { "TLS_CHACHA20_POLY1305_SHA256" };
    assert!(said.contains(&format!("Negotiated cipher {expected}")), "{said}");
    let tls12 = if tern::crypto::aes_hardware() {
        "TLSv1.2: ECDHE-ECDSA-AES128-GCM-SHA256"
    } else {
        "TLSv1.2: ECDHE-ECDSA-CHACHA20"
    };
    assert!(said.contains(tls12), "{said}");
    Ok(())
}
