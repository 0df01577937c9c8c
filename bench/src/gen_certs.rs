//! Generates N host certificates (ECDSA P-256, or RSA 2048 with `--key rsa`) under one local CA into a directory, as `<name>.crt` /
//! `<name>.key`, using every core. Reuses the directory when it already holds a set of that size.
//!
//! `cargo run --release -p tern-bench --bin gen-certs -- --count 100000 --dir target/bench-certs/100k`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;

#[derive(Debug, Parser)]
struct Args {
    /// How many host certificates.
    #[arg(long)]
    count: usize,
    /// Where to write them (and `ca.crt`).
    #[arg(long)]
    dir: PathBuf,
    /// Host names are `host<i>.<domain>`.
    #[arg(long, default_value = "bench.test")]
    domain: String,
    /// Key type.
    #[arg(long, value_enum, default_value = "ecdsa")]
    key: tern_bench::KeyKind,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let started = Instant::now();
    if tern_bench::generate(args.count, &args.dir, &args.domain, args.key)? {
        println!("{}: {} certificates in {:.1?}", args.dir.display(), args.count, started.elapsed());
    } else {
        println!("{}: {} certificates already there", args.dir.display(), args.count);
    }
    Ok(())
}
