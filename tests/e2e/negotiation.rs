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
