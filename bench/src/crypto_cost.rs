//! The handshake's crypto, ring against aws-lc-rs, on this machine: signing with the benchmark's RSA 2048 and
//! ECDSA P-256 keys, loading those keys (paid once per cache miss), and one X25519 key exchange. This is what
//! decided tern's crypto provider. Then the whole server side of a full TLS 1.3 handshake with one small request,
//! in memory with tern's provider (the in-memory floor `tls-bench` reports too), for each key type.
//!
//! ```text
//! cargo build --release -p tern-bench && target/release/crypto-cost
//! ```
//! (Generates the 1,000-host certificate sets under `target/bench-certs` if `tls-bench` has not.)

use anyhow::{Context, Result};
use tern_bench::floor;

fn main() -> Result<()> {
    let certs = std::path::absolute("target/bench-certs")?;
    let mut keys = Vec::new();
    for (kind, label) in [(tern_bench::KeyKind::Rsa, "rsa2048"), (tern_bench::KeyKind::Ecdsa, "ecdsa-p256")] {
        let dir = certs.join(format!("{label}-1000"));
        let domain = format!("{label}.bench.test");
        tern_bench::generate(1000, &dir, &domain, kind)?;
        let name = format!("host0.{domain}");
        let pem = std::fs::read(dir.join(format!("{name}.key"))).context("reading a benchmark key")?;
        keys.push((label, dir, name, pem));
    }
    let providers = [
        ("ring", rustls::crypto::ring::default_provider()),
        ("aws-lc-rs", rustls::crypto::aws_lc_rs::default_provider()),
    ];
    println!("{:<11} {:<10} {:>10} {:>10}", "key", "provider", "sign (us)", "load (us)");
    for (label, _, _, pem) in &keys {
        for (name, provider) in &providers {
            let signs = if *label == "rsa2048" { 2000 } else { 20_000 };
            let (sign, load) = floor::sign_and_load_us(provider, pem, signs)?;
            println!("{label:<11} {name:<10} {sign:>10.1} {load:>10.1}");
        }
    }
    for (name, provider) in &providers {
        let per_side = floor::kx_side_us(provider, 5000)?;
        println!("{:?} {name:<10} one side of a key exchange {per_side:.1} us", provider.kx_groups[0].name());
    }
    println!("what a cache miss adds to the handshake, by key (tern's provider; median of 200 fresh keys):");
    for (label, dir, name, pem) in &keys {
        let chain = std::fs::read(dir.join(format!("{name}.crt")))?;
        let miss = miss_path(&chain, pem, name, 200)?;
        println!(
            "{label:<11} validate_answer (PEM, key load, checks) {:.1} us; first signature with the new key {:.1} us, \
             later ones {:.1} us",
            miss.validate_us, miss.first_sign_us, miss.later_sign_us
        );
    }
    let client = floor::client_config()?;
    for (label, dir, name, _) in &keys {
        let server = floor::server_config(&dir.join(format!("{name}.crt")), &dir.join(format!("{name}.key")))?;
        let m = floor::memory_floor(&server, &client, name, 5000)?;
        println!(
            "{label:<11} aws-lc-rs  full handshake + request in memory: server {:.1} us, client {:.1} us ({}; {} handshakes, {:.2} us clock reads subtracted per side)",
            m.server_us,
            m.client_us,
            m.negotiated,
            m.handshakes,
            2.0 * m.clock_us
        );
    }
    Ok(())
}

/// Medians over `rounds` of the steps a cache miss adds for one certificate: `tern::certs::validate_answer` (what the
/// host does with a plugin's PEM), the first signature with the key it loaded (aws-lc sets up its Montgomery and
/// blinding state on first use) and a later one.
struct Miss {
    validate_us: f64,
    first_sign_us: f64,
    later_sign_us: f64,
}

fn miss_path(chain: &[u8], key: &[u8], name: &str, rounds: usize) -> Result<Miss> {
    let name = tern::sni::ServerName::parse(name).map_err(|e| anyhow::anyhow!("{e}"))?;
    let schemes = [rustls::SignatureScheme::RSA_PSS_SHA256, rustls::SignatureScheme::ECDSA_NISTP256_SHA256];
    let message = [7u8; 200];
    let (mut validate, mut first, mut later) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let started = std::time::Instant::now();
        let parsed = tern::certs::validate_answer(chain, key, &name).map_err(|e| anyhow::anyhow!("{e}"))?;
        validate.push(started.elapsed().as_secs_f64() * 1e6);
        let signer = parsed.certified.key.choose_scheme(&schemes).context("no signing scheme")?;
        for times in [&mut first, &mut later] {
            let started = std::time::Instant::now();
            std::hint::black_box(signer.sign(&message)?);
            times.push(started.elapsed().as_secs_f64() * 1e6);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok(Miss {
        validate_us: median(&mut validate),
        first_sign_us: median(&mut first),
        later_sign_us: median(&mut later),
    })
}
