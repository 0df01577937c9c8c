//! The benchmark's command line.

use std::path::PathBuf;

use clap::Parser;

#[derive(Debug, Parser)]
pub struct Args {
    /// Numbers of hosts (ECDSA P-256; 0: none).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    pub sizes: Vec<usize>,
    /// Numbers of hosts also run with RSA 2048 certificates (0: none).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub rsa_sizes: Vec<usize>,
    /// Seconds per load phase.
    #[arg(long, default_value_t = 4.0)]
    pub seconds: f64,
    /// Concurrency levels of the full-handshake phases.
    #[arg(long, value_delimiter = ',', default_value = "8,64")]
    pub concurrency: Vec<usize>,
    /// Configurations to run (tern-file, tern-redis, tern-static, tern-http: the http-api plugin, nginx-static,
    /// nginx-var, caddy-files: Caddy loading N files, caddy-http: Caddy's `get_certificate http` against the same
    /// API as tern-http, haproxy-crtlist: a crt-list of N lines; tern-routed: a route per name, tern-routed-unique:
    /// an origin per name; diagnostic: tern-static-idle-plugin; tern-static-b: tern-static with `--tern-b`; floor-direct: the minimal direct-answer server
    /// `tls-floor`, one fixed certificate, no proxy, no resumption; floor-proxy: the same server proxying the
    /// request unchanged to the backend over pooled connections, the least a TLS-terminating proxy does).
    #[arg(long, value_delimiter = ',', default_value = "tern-static,tern-file,tern-redis,nginx-static,nginx-var")]
    pub configs: Vec<String>,
    /// The tern binary.
    #[arg(long, default_value = "target/release/tern")]
    pub tern: PathBuf,
    /// A second tern binary, for an A/B of two builds: configuration `tern-static-b` is tern-static run with it,
    /// and joins the floors' interleaved rounds beside tern-static.
    #[arg(long, default_value = "target/release/tern-b")]
    pub tern_b: PathBuf,
    /// The minimal server of `floor-direct` and `floor-proxy`.
    #[arg(long, default_value = "target/release/tls-floor")]
    pub floor: PathBuf,
    /// Full handshakes of the in-memory floor per certificate set (rustls alone, no sockets, server-side CPU
    /// only; 0: not measured).
    #[arg(long, default_value_t = 20_000)]
    pub memory_floor_handshakes: u32,
    /// Run `perf` on every configuration's server during an extra hot-set phase (after the measured ones, so
    /// that perf's cost stays out of them), writing into this folder as `<config>-<n>-<key>.<perf subcommand>`.
    #[arg(long)]
    pub perf: Option<PathBuf>,
    /// Seconds of the `--perf` phase.
    #[arg(long, default_value_t = 8.0)]
    pub perf_seconds: f64,
    /// perf's subcommand and options for `--perf` (`-p`, `-o` and the duration are added), e.g.
    /// `stat -e raw_syscalls:sys_enter,sched:sched_switch`.
    #[arg(long, default_value = "record -F 499 --call-graph dwarf,32768", allow_hyphen_values = true)]
    pub perf_args: String,
    /// Where certificate sets are kept between runs.
    #[arg(long, default_value = "target/bench-certs")]
    pub certs: PathBuf,
    /// Results folder (a timestamped subfolder and `latest` are written).
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// Rounds of the interleaved cache-hit comparison (tern dynamic vs tern static, all running at once).
    #[arg(long, default_value_t = 10)]
    pub ab_rounds: usize,
    /// Seconds per configuration and round of the interleaved comparison.
    #[arg(long, default_value_t = 1.5)]
    pub ab_seconds: f64,
    /// With tern-routed-unique: measure memory with every name of the set cached (one handshake per name), against
    /// tern-file.
    #[arg(long)]
    pub memory_all: bool,
    /// Pin the servers to the last core and this program (the load client) to the others, instead of letting
    /// the scheduler share all cores between them.
    #[arg(long)]
    pub pin: bool,
    /// Do not install nginx, Caddy or HAProxy from Debian packages when missing (skip their rows instead).
    #[arg(long)]
    pub no_install: bool,
    /// Seconds a server may take from its start to its first served request; one that takes longer is reported as
    /// "did not start within" this, and the run goes on.
    #[arg(long, default_value_t = 600.0)]
    pub start_timeout: f64,
    /// Sizes N at which tern (tern-file, else tern-static) is compared with every peer server in interleaved rounds
    /// (all up at once, `--ab-rounds` × `--ab-seconds`, cache hits / preloaded names).
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    pub peer_sizes: Vec<usize>,
    /// Instead of the measurements above: certificate-change propagation. For each N of `--sizes` and each of
    /// tern-redis, nginx-static, haproxy-crtlist and caddy-files in `--configs`, two nodes under load; a name's
    /// certificate is replaced `--updates` times and the time until a fresh handshake on both nodes shows it is
    /// measured, with the update's CPU and the handshakes that failed meanwhile.
    #[arg(long)]
    pub propagation: bool,
    /// Certificate changes per system and N (`--propagation`).
    #[arg(long, default_value_t = 3)]
    pub updates: usize,
    /// Seconds an update may take to show on every node before it counts as not propagated (`--propagation`).
    #[arg(long, default_value_t = 600.0)]
    pub update_timeout: f64,
    /// Load connections per node while updates propagate (full handshakes with a request, uniform over N).
    #[arg(long, default_value_t = 4)]
    pub propagation_concurrency: usize,
    /// Reload nginx and Caddy nodes one at a time, the next once the previous serves the new certificate (halves
    /// the memory a reload adds at once; `--propagation`).
    #[arg(long)]
    pub rolling: bool,
    /// tern's `cache.ttl` in the fleet (seconds): the bound when no invalidation is published.
    #[arg(long, default_value_t = 20)]
    pub fleet_ttl: u32,
}
