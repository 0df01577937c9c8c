//! What the JA4 fingerprint costs per handshake: `tern::ja4::of_records` on a real ClientHello (a rustls client on
//! tern's crypto provider: 279 bytes, 10 suites, 12 extensions), in a timing loop. tern computes it only when
//! `log.access_fields` lists `ja4` or a listener sets `ja4_header`.
//!
//! ```text
//! cargo build --release -p tern-bench && target/release/ja4-cost
//! ```

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};

fn main() -> Result<()> {
    let hello = client_hello()?;
    let ja4 = tern::ja4::of_records(&hello).context("the client's hello has a fingerprint")?;
    println!("ClientHello: {} bytes, JA4 {ja4}", hello.len());
    for _ in 0..10_000 {
        std::hint::black_box(tern::ja4::of_records(std::hint::black_box(&hello)));
    }
    for round in 1..=3 {
        let rounds = 200_000u32;
        let started = Instant::now();
        for _ in 0..rounds {
            std::hint::black_box(tern::ja4::of_records(std::hint::black_box(&hello)));
        }
        let ns = started.elapsed().as_secs_f64() * 1e9 / f64::from(rounds);
        println!("run {round}: {ns:.0} ns per handshake");
    }
    Ok(())
}

/// The first flight of a rustls client (TLS 1.3 and 1.2, ALPN h2 and http/1.1, SNI), as it goes on the wire.
fn client_hello() -> Result<Vec<u8>> {
    let provider = tern::crypto::provider().clone();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("www.example.com")?;
    let mut client = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut hello = Vec::new();
    while client.wants_write() {
        client.write_tls(&mut hello)?;
    }
    Ok(hello)
}
