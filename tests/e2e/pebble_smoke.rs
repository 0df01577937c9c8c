//! The Pebble harness itself (support/pebble.rs), before any ACME test leans on it: Pebble serves its directory over
//! HTTPS trusted through `directory_ca`, hands out its root and intermediate, the mock DNS answers as told, and a
//! restart is a new CA on the same address.

use std::net::IpAddr;
use std::time::Instant;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

use crate::support::pebble::{EXAMPLE_EAB, Pebble, PebbleOptions};
use crate::support::*;

/// Parses every certificate of a PEM text; at least one.
fn certificates(pem: &str) -> Vec<CertificateDer<'static>> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<_, _>>().expect("PEM parses");
    assert!(!certs.is_empty(), "no certificate in {pem}");
    certs
}

/// `openssl x509 -noout -subject` of a PEM certificate.
async fn subject(pem: &str) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("c.pem"), pem)?;
    let mut command = std::process::Command::new("openssl");
    command.args(["x509", "-noout", "-subject", "-in"]).arg(dir.path().join("c.pem"));
    let output = run_command(command).await?;
    anyhow::ensure!(output.status.success(), "openssl x509: {}", text(&output));
    Ok(text(&output))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_harness_serves_a_directory_its_root_and_mock_dns() -> anyhow::Result<()> {
    let started = Instant::now();
    let mut pebble = Pebble::start(PebbleOptions::new(free_port().await?, free_port().await?)).await?;
    println!("pebble up in {:?}: {}", started.elapsed(), pebble.directory_url());

    // The directory over HTTPS, trusting only the PEM file tern's `acme.ca` would name.
    let url = pebble.directory_url();
    let authority = url.strip_prefix("https://").and_then(|u| u.strip_suffix("/dir")).expect("https://HOST:PORT/dir");
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(&std::fs::read_to_string(pebble.directory_ca())?) {
        roots.add(cert)?;
    }
    let config = rustls::ClientConfig::builder_with_provider(tern::crypto::provider().clone())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let stream = connect(authority.parse()?, &std::sync::Arc::new(config), "127.0.0.1").await?;
    let (status, _, body) = get(stream, authority, "/dir").await?;
    assert_eq!(status, 200, "{body}");
    let directory: serde_json::Value = serde_json::from_str(&body)?;
    for key in ["newNonce", "newAccount", "newOrder", "revokeCert", "keyChange"] {
        assert!(directory[key].as_str().is_some_and(|u| u.starts_with("https://127.0.0.1:")), "{key} in {directory}");
    }
    println!("directory: {directory}");
    println!(
        "renewalInfo (ARI) offered: {}, profiles offered: {}",
        directory.get("renewalInfo").is_some(),
        directory["meta"].get("profiles").is_some()
    );

    // The root and intermediate issued certificates chain to: real certificates, the intermediate signed by the root.
    let root = pebble.roots_pem().await?;
    let root_der = certificates(&root).remove(0);
    rustls::RootCertStore::empty().add(root_der.clone())?;
    assert!(subject(&root).await?.contains("Pebble Root CA"), "{}", subject(&root).await?);
    let intermediate = pebble.intermediates_pem().await?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("root.pem"), &root)?;
    std::fs::write(dir.path().join("intermediate.pem"), &intermediate)?;
    let mut verify = std::process::Command::new("openssl");
    verify.arg("verify").arg("-CAfile").arg(dir.path().join("root.pem")).arg(dir.path().join("intermediate.pem"));
    let output = run_command(verify).await?;
    assert!(output.status.success(), "intermediate does not chain to the root: {}", text(&output));

    // The mock DNS: 127.0.0.1 for every name, no AAAA, and what set_a says for one name.
    let localhost: IpAddr = "127.0.0.1".parse()?;
    assert_eq!(pebble.lookup_a("first.test").await?, [localhost]);
    assert!(pebble.lookup_aaaa("first.test").await?.is_empty());
    pebble.set_a("second.test", "127.0.0.2").await?;
    assert_eq!(pebble.lookup_a("second.test").await?, ["127.0.0.2".parse::<IpAddr>()?]);
    assert_eq!(pebble.lookup_a("first.test").await?, [localhost]);
    pebble.clear_a("second.test").await?;
    assert_eq!(pebble.lookup_a("second.test").await?, [localhost]);
    pebble.set_a("second.test", "127.0.0.2").await?;

    // Killed, the CA is gone; restarted, it is a new CA at the same directory URL (the mock DNS kept its records).
    pebble.kill();
    assert!(!pebble.is_running());
    assert!(pebble.directory().await.is_err(), "directory still answers after kill");
    let restarted = Instant::now();
    pebble.restart().await?;
    println!("pebble restarted in {:?}", restarted.elapsed());
    assert_eq!(pebble.directory_url(), url);
    assert!(pebble.directory().await?["newOrder"].is_string());
    let new_root = certificates(&pebble.roots_pem().await?).remove(0);
    assert_ne!(new_root, root_der, "a restarted Pebble has a new root");
    assert_eq!(pebble.lookup_a("second.test").await?, ["127.0.0.2".parse::<IpAddr>()?]);
    // The management interface through the harness's own client; an unknown serial has no status.
    let management = pebble.management_url();
    let authority = management.strip_prefix("https://").expect("https://HOST:PORT");
    let stream = connect(authority.parse()?, &pebble.https_client(), "127.0.0.1").await?;
    let (status, _, body) = get(stream, authority, "/intermediates/0").await?;
    assert_eq!(status, 200, "{body}");
    assert!(certificates(&body).len() == 1);
    assert!(pebble.cert_status("0123456789abcdef").await.is_err());
    println!("smoke test done in {:?}", started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pebble_harness_passes_its_options_to_pebble() -> anyhow::Result<()> {
    let started = Instant::now();
    let options = PebbleOptions {
        validity: Some(90),
        nonce_reject: Some(0),
        authz_reuse: Some(100),
        eab: Some((EXAMPLE_EAB.0.to_string(), EXAMPLE_EAB.1.to_string())),
        ..PebbleOptions::new(free_port().await?, free_port().await?)
    };
    let pebble = Pebble::start(options).await?;
    assert_eq!(pebble.directory().await?["meta"]["externalAccountRequired"], true);
    // Pebble reports its settings only in its log.
    let logs = pebble.logs();
    for line in [
        "certificate validity period of 90 seconds",
        "reject 0% of good nonces",
        "authz reuse for each identifier 100% of the time",
        "Disabling random VA sleeps",
    ] {
        assert!(logs.contains(line), "{line:?} not in\n{logs}");
    }
    println!("pebble with options up and checked in {:?}", started.elapsed());
    Ok(())
}
