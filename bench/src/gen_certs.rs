//! Generates N host certificates (ECDSA P-256) under one local CA into a directory, as `<name>.crt` /
//! `<name>.key`, using every core. Reuses the directory when it already holds a set of that size.
//!
//! `cargo run --release -p tern-bench --bin gen-certs -- --count 100000 --dir target/bench-certs/100k`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use tern::demo::TestCa;

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
}

fn main() -> Result<()> {
    let args = Args::parse();
    let marker = args.dir.join(".complete");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(&format!("{} {}", args.count, args.domain)) {
        println!("{}: {} certificates already there", args.dir.display(), args.count);
        return Ok(());
    }
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let started = Instant::now();
    let ca = TestCa::new("tern bench CA")?;
    std::fs::write(args.dir.join("ca.crt"), ca.pem())?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (ca, args) = (&ca, &args);
                scope.spawn(move || -> Result<()> {
                    for i in (t..args.count).step_by(threads) {
                        let name = format!("host{i}.{}", args.domain);
                        let (chain, key) = ca.issue(&[&name])?;
                        std::fs::write(args.dir.join(format!("{name}.crt")), chain)?;
                        std::fs::write(args.dir.join(format!("{name}.key")), key)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker.join().map_err(|_| anyhow::anyhow!("a generator thread panicked"))??;
        }
        Ok(())
    })?;
    std::fs::write(&marker, format!("{} {}", args.count, args.domain))?;
    println!("{}: {} certificates in {:.1?} ({threads} threads)", args.dir.display(), args.count, started.elapsed());
    Ok(())
}
