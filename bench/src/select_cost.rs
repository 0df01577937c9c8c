//! The one step where a cache-hit handshake differs from a handshake on tern's static preload: choosing the
//! certificate. Both are timed in-process, on the same hot set, without network or TLS, so the difference is
//! measured to the nanosecond instead of being lost in the noise of handshake rates on two shared cores.
//!
//! ```text
//! cargo build --release -p tern-bench && target/release/select-cost --names 1000 --rounds 20
//! ```
//!
//! Prints ns per selection for a static lookup and for a cache hit behind the file plugin (and the Redis plugin
//! when `--redis` is given), and what the difference is worth against a full handshake's server CPU
//! (`--handshake-us`, e.g. from `tls-bench`).

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use tern::select::{Policy, Source};

#[derive(Debug, Parser)]
struct Args {
    /// Hot set size (names selected round-robin).
    #[arg(long, default_value_t = 1000)]
    names: usize,
    /// Rounds over the hot set per measurement; measurements alternate between the two paths.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Alternating measurements per path.
    #[arg(long, default_value_t = 10)]
    repeats: usize,
    /// Server CPU per full handshake to weigh the difference against, in microseconds.
    #[arg(long, default_value_t = 250.0)]
    handshake_us: f64,
    /// Where the certificate set is kept between runs.
    #[arg(long, default_value = "target/bench-certs")]
    certs: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = std::path::absolute(&args.certs)?.join(format!("ecdsa-p256-{}", args.names));
    let domain = "ecdsa-p256.bench.test";
    tern_bench::generate(args.names, &dir, domain, tern_bench::KeyKind::Ecdsa)?;
    let names: Vec<String> = (0..args.names).map(|i| format!("host{i}.{domain}")).collect();
    let work = tempfile::tempdir()?;

    let statics = server(work.path(), "static.toml", &static_config(&dir, &names)).await?;
    let static_policy = Policy { listener: "bench".into(), plugin: None, default: None };
    let files = server(work.path(), "files.toml", &file_config(&dir)).await?;
    let slot = files.plugin("files").context("the file plugin is configured")?.clone();
    let file_policy = Policy { listener: "bench".into(), plugin: Some(slot), default: None };
    // Warm the cache: every hot name once through the plugin.
    for name in &names {
        let (_, source) = files.selector().select(&file_policy, Some(name)).await?;
        anyhow::ensure!(source == Source::Plugin, "{name}: expected a plugin call, got {source:?}");
    }

    let mut static_ns = Vec::new();
    let mut hit_ns = Vec::new();
    for _ in 0..args.repeats {
        static_ns.push(time(&statics, &static_policy, &names, args.rounds, Source::Static).await?);
        hit_ns.push(time(&files, &file_policy, &names, args.rounds, Source::CacheHit).await?);
    }
    let (s, h) = (median(&mut static_ns), median(&mut hit_ns));
    println!(
        "select-cost: {} names, {} rounds x {} repeats (median of repeats)",
        args.names, args.rounds, args.repeats
    );
    println!(
        "  static preload lookup   {s:>8.0} ns per handshake (repeats {:.0}..{:.0})",
        static_ns[0],
        static_ns[static_ns.len() - 1]
    );
    println!(
        "  file plugin cache hit   {h:>8.0} ns per handshake (repeats {:.0}..{:.0})",
        hit_ns[0],
        hit_ns[hit_ns.len() - 1]
    );
    let extra = (h - s) / 1000.0;
    println!(
        "  difference {extra:.2} us = {:.2} % of a {:.0} us handshake: cache-hit throughput >= {:.4} x static (CPU-bound)",
        100.0 * extra / args.handshake_us,
        args.handshake_us,
        args.handshake_us / (args.handshake_us + extra.max(0.0)),
    );
    Ok(())
}

async fn server(dir: &Path, file: &str, text: &str) -> Result<tern::Server> {
    let path = dir.join(file);
    std::fs::write(&path, text)?;
    Ok(tern::Server::bind(tern::Config::from_toml(text, &path)?).await?)
}

fn static_config(dir: &Path, names: &[String]) -> String {
    let dir = dir.display();
    let mut text = String::from("[log]\nlevel = \"warn\"\n\n");
    for name in names {
        text +=
            &format!("[[certificate]]\nname = \"{name}\"\ncert = \"{dir}/{name}.crt\"\nkey = \"{dir}/{name}.key\"\n");
    }
    text + "\n[[listener]]\nbind = \"127.0.0.1:0\"\nstrict = true\nbackend = \"http://127.0.0.1:9\"\n"
}

fn file_config(dir: &Path) -> String {
    let plugin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/wasm32-wasip2/release/file_path.wasm");
    format!(
        "[log]\nlevel = \"warn\"\n\n[[plugin]]\nname = \"files\"\npath = \"{}\"\ngrants.files = \"{}\"\n\n\
         [[listener]]\nbind = \"127.0.0.1:0\"\nplugin = \"files\"\nstrict = true\nbackend = \"http://127.0.0.1:9\"\n",
        plugin.display(),
        dir.display()
    )
}

/// Mean ns per `select` over `rounds` passes of the hot set, checking every answer's source.
async fn time(server: &tern::Server, policy: &Policy, names: &[String], rounds: usize, want: Source) -> Result<f64> {
    let selector = server.selector();
    let started = Instant::now();
    for _ in 0..rounds {
        for name in names {
            let (cert, source) = selector.select(policy, Some(name)).await?;
            anyhow::ensure!(source == want, "{name}: {source:?}, expected {want:?}");
            std::hint::black_box(&cert);
        }
    }
    Ok(started.elapsed().as_nanos() as f64 / (rounds * names.len()) as f64)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
