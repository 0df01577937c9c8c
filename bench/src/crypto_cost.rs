//! The handshake's crypto, ring against aws-lc-rs, on this machine: signing with the benchmark's RSA 2048 and
//! ECDSA P-256 keys, loading those keys (paid once per cache miss), and one X25519 key exchange. This is what
//! decided tern's crypto provider.
//!
//! ```text
//! cargo build --release -p tern-bench && target/release/crypto-cost
//! ```
//! (Generates the 1,000-host certificate sets under `target/bench-certs` if `tls-bench` has not.)

use std::time::Instant;

use anyhow::{Context, Result};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;

fn main() -> Result<()> {
    let certs = std::path::absolute("target/bench-certs")?;
    let mut keys = Vec::new();
    for (kind, label) in [(tern_bench::KeyKind::Rsa, "rsa2048"), (tern_bench::KeyKind::Ecdsa, "ecdsa-p256")] {
        let dir = certs.join(format!("{label}-1000"));
        let domain = format!("{label}.bench.test");
        tern_bench::generate(1000, &dir, &domain, kind)?;
        let pem = std::fs::read(dir.join(format!("host0.{domain}.key"))).context("reading a benchmark key")?;
        keys.push((label, pem));
    }
    let providers = [
        ("ring", rustls::crypto::ring::default_provider()),
        ("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider()),
    ];
    println!("{:<11} {:<10} {:>10} {:>10}", "key", "provider", "sign (us)", "load (us)");
    for (label, pem) in &keys {
        for (name, provider) in &providers {
            let (sign, load) = sign_and_load(provider, pem, if *label == "rsa2048" { 2000 } else { 20_000 })?;
            println!("{label:<11} {name:<10} {sign:>10.1} {load:>10.1}");
        }
    }
    for (name, provider) in &providers {
        let group = provider.kx_groups[0];
        let rounds = 5000;
        let started = Instant::now();
        for _ in 0..rounds {
            let ours = group.start().map_err(|e| anyhow::anyhow!("{e}"))?;
            let theirs = group.start().map_err(|e| anyhow::anyhow!("{e}"))?;
            let public = theirs.pub_key().to_vec();
            std::hint::black_box(ours.complete(&public).map_err(|e| anyhow::anyhow!("{e}"))?);
        }
        // Two key generations and one agreement per round: half of that is one side's work.
        let per_side = started.elapsed().as_secs_f64() * 1e6 / f64::from(rounds) / 2.0;
        println!("{:?} {name:<10} one side of a key exchange {per_side:.1} us", group.name());
    }
    Ok(())
}

/// Microseconds per signature (RSA-PSS-SHA256 or ECDSA-P256-SHA256) and per key load.
fn sign_and_load(provider: &CryptoProvider, pem: &[u8], signs: u32) -> Result<(f64, f64)> {
    let load =
        || provider.key_provider.load_private_key(PrivateKeyDer::from_pem_slice(pem)?).map_err(anyhow::Error::from);
    let key = load()?;
    let schemes = [rustls::SignatureScheme::RSA_PSS_SHA256, rustls::SignatureScheme::ECDSA_NISTP256_SHA256];
    let signer = key.choose_scheme(&schemes).context("no signing scheme")?;
    let message = [7u8; 200];
    for _ in 0..50 {
        signer.sign(&message)?;
    }
    let started = Instant::now();
    for _ in 0..signs {
        std::hint::black_box(signer.sign(&message)?);
    }
    let sign = started.elapsed().as_secs_f64() * 1e6 / f64::from(signs);
    let loads = 200;
    let started = Instant::now();
    for _ in 0..loads {
        std::hint::black_box(load()?);
    }
    Ok((sign, started.elapsed().as_secs_f64() * 1e6 / f64::from(loads)))
}
