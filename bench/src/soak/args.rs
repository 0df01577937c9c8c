//! The soak's command line, its checks, and the plan it prints before the clock starts.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Parser;

#[derive(Debug, Parser)]
#[command(about = "Soak tern under mixed load with Redis outages, plugin swaps and certificate churn")]
pub struct Args {
    /// How long the load runs (after set-up and warm-up).
    #[arg(long, default_value_t = 30.0)]
    pub minutes: f64,
    /// The tern binary (default target/release/tern, else target/debug/tern).
    #[arg(long)]
    pub tern: Option<PathBuf>,
    /// The Redis plugin component.
    #[arg(long, default_value = "plugins/target/wasm32-wasip2/release/redis_plugin.wasm")]
    pub plugin: PathBuf,
    /// Output folder (default bench/results/soak-<unix time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Certificates generated and imported into Redis.
    #[arg(long, default_value_t = 500)]
    pub certs: usize,
    /// Hot names (the first of the certificates), warmed before the clock starts.
    #[arg(long, default_value_t = 200)]
    pub hot: usize,
    /// Hot handshakes (each with one GET) per second.
    #[arg(long, default_value_t = 100.0)]
    pub hot_rate: f64,
    /// Hot connections in flight at most.
    #[arg(long, default_value_t = 4)]
    pub hot_clients: usize,
    /// Random-name handshakes per second.
    #[arg(long, default_value_t = 200.0)]
    pub flood_rate: f64,
    /// Random-name connections in flight at most.
    #[arg(long, default_value_t = 16)]
    pub flood_clients: usize,
    /// Seconds between Redis outages (±20 %); the first comes after half of it.
    #[arg(long, default_value_t = 150.0)]
    pub redis_every: f64,
    /// Shortest outage, seconds.
    #[arg(long, default_value_t = 20.0)]
    pub redis_down_min: f64,
    /// Longest outage, seconds.
    #[arg(long, default_value_t = 40.0)]
    pub redis_down_max: f64,
    /// Seconds between plugin swaps.
    #[arg(long, default_value_t = 60.0)]
    pub swap_every: f64,
    /// Seconds between certificate re-issues.
    #[arg(long, default_value_t = 5.0)]
    pub churn_every: f64,
    /// Seconds between samples.
    #[arg(long, default_value_t = 10.0)]
    pub sample_every: f64,
    /// tern's `cache.ttl`, seconds.
    #[arg(long, default_value_t = 20)]
    pub cache_ttl: u64,
    /// tern's `cache.max_stale`, seconds (must outlast an outage).
    #[arg(long, default_value_t = 300)]
    pub max_stale: u64,
    /// Seed of the random choices (default: the clock).
    #[arg(long)]
    pub seed: Option<u64>,
}

impl Args {
    /// Checks the options and that the binaries exist; returns the tern binary to run.
    pub fn check(&self) -> Result<PathBuf> {
        anyhow::ensure!(self.hot > 0 && self.hot <= self.certs, "--hot must be 1..=--certs");
        anyhow::ensure!(self.redis_down_min <= self.redis_down_max, "--redis-down-min > --redis-down-max");
        let tern = match &self.tern {
            Some(path) => path.clone(),
            None if Path::new("target/release/tern").exists() => PathBuf::from("target/release/tern"),
            None => PathBuf::from("target/debug/tern"),
        };
        anyhow::ensure!(tern.exists(), "{} missing (cargo build -p tern)", tern.display());
        anyhow::ensure!(
            self.plugin.exists(),
            "{} missing (cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml)",
            self.plugin.display()
        );
        Ok(tern)
    }

    /// The line that says what is about to run.
    pub fn print_plan(&self, seed: u64) {
        let minutes = self.minutes;
        println!(
            "running {minutes} min: hot {}/s (≤{} in flight), flood {}/s (≤{}), redis outage every ~{}s for {}–{}s, \
             swap every {}s, churn every {}s, cache ttl {}s, max_stale {}s, seed {seed}",
            self.hot_rate,
            self.hot_clients,
            self.flood_rate,
            self.flood_clients,
            self.redis_every,
            self.redis_down_min,
            self.redis_down_max,
            self.swap_every,
            self.churn_every,
            self.cache_ttl,
            self.max_stale,
        );
    }
}
