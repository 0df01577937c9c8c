//! CPU per compression of one Certificate message: rustls's compressors at both levels, and tern's memo on a
//! miss and on a hit (in a small memo and in a large one: the lookup does not grow with it), and the resident
//! memory that filling the large one cost.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use rustls::compress::{BROTLI_COMPRESSOR, CertCompressor, CompressionLevel, ZLIB_COMPRESSOR};
use tern::compression::Compression;
use tern::config::{CertCompression, CompressionSettings};

/// Microseconds per call of `compress` on `rounds` inputs made by `input(i)` just before each call (rustls too
/// encodes the message afresh for every handshake, so the copy is part of the cost), and the last output's size.
fn time(
    compressor: &dyn CertCompressor,
    rounds: usize,
    input: impl Fn(usize) -> Vec<u8>,
    level: CompressionLevel,
) -> Result<(f64, usize)> {
    let mut size = 0;
    let started = Instant::now();
    for i in 0..rounds {
        size = std::hint::black_box(compressor.compress(input(i), level).ok().context("compression failed")?).len();
    }
    Ok((started.elapsed().as_secs_f64() * 1e6 / rounds as f64, size))
}

/// `message` itself, or (`distinct`) with the round's number written into its middle: a different chain each time.
fn variant(message: &[u8], distinct: bool) -> impl Fn(usize) -> Vec<u8> + '_ {
    move |i| {
        let mut input = message.to_vec();
        if distinct {
            let at = input.len() / 2;
            input[at..at + 8].copy_from_slice(&(i as u64).to_be_bytes());
        }
        input
    }
}

/// Prints the table.
pub fn report(message: &[u8], rounds: usize, memo_entries: usize) -> Result<()> {
    println!("\nCPU per compression of the {}-byte Certificate message ({rounds} rounds each):", message.len());
    println!("{:<44} {:>10} {:>8}", "", "us/call", "bytes");
    for (label, compressor, level) in [
        ("brotli quality 4 (rustls Interactive)", BROTLI_COMPRESSOR, CompressionLevel::Interactive),
        ("brotli quality 11 (rustls Amortized)", BROTLI_COMPRESSOR, CompressionLevel::Amortized),
        ("zlib level 6 (rustls Interactive)", ZLIB_COMPRESSOR, CompressionLevel::Interactive),
        ("zlib level 9 (rustls Amortized)", ZLIB_COMPRESSOR, CompressionLevel::Amortized),
    ] {
        let rounds = if level == CompressionLevel::Amortized { rounds / 10 } else { rounds }.max(10);
        let (micros, size) = time(compressor, rounds, variant(message, false), level)?;
        println!("{label:<44} {micros:>10.1} {size:>8}");
    }
    let settings = |entries: u64| CompressionSettings {
        algorithms: vec![CertCompression::Brotli, CertCompression::Zlib],
        cache_entries: entries,
        cache_bytes: entries * 2600,
    };
    for algorithm in [CertCompression::Brotli, CertCompression::Zlib] {
        let memo = Compression::new(&settings(1000), Arc::default());
        let compressor = memo.compressor(algorithm).context("configured")?;
        let name = algorithm.label();
        let (miss, _) = time(compressor, rounds.min(1000), variant(message, true), CompressionLevel::Interactive)?;
        println!("{:<44} {miss:>10.1}", format!("tern {name}, memo miss (digest, compress, insert)"));
        time(compressor, 1, variant(message, false), CompressionLevel::Interactive)?;
        let (hit, size) = time(compressor, rounds, variant(message, false), CompressionLevel::Interactive)?;
        println!("{:<44} {hit:>10.2} {size:>8}", format!("tern {name}, memo hit (digest, lookup, copy)"));
    }
    let big = memo_entries;
    let memo = Compression::new(&settings(big as u64), Arc::default());
    let compressor = memo.compressor(CertCompression::Zlib).context("configured")?;
    let (filled, before) = (Instant::now(), resident_mib());
    time(compressor, big, variant(message, true), CompressionLevel::Interactive)?;
    let (entries, bytes) = memo.memo_size();
    let grown = resident_mib() - before;
    let (hit, _) = time(compressor, rounds, variant(message, true), CompressionLevel::Interactive)?;
    println!(
        "{:<44} {hit:>10.2}   ({entries} entries, {} MiB weighted, filled in {:.1} s; resident +{grown} MiB)",
        format!("tern zlib, memo hit among {big} chains"),
        bytes >> 20,
        filled.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, std::hint::black_box(message)));
    }
    let digest = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;
    println!("{:<44} {digest:>10.2}", "  of which SHA-256 of the message (the key)");
    Ok(())
}

/// The process's resident memory (Linux), MiB: filling the memo shows what the allocator keeps.
fn resident_mib() -> i64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    statm.split_whitespace().nth(1).and_then(|pages| pages.parse::<i64>().ok()).map_or(0, |pages| pages * 4 / 1024)
}
