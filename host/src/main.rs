//! The `tern` command line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use tern::config::{Config, defaults};
use tern::plugin;
use tern::sni::ServerName;

/// mimalloc, not glibc's malloc. Each certificate compression (RFC 8879) makes and drops a few hundred KiB of
/// brotli or zlib state while the compression memo keeps small, long-lived allocations; glibc (its mmap threshold
/// rising after each large free) served the states from the heap and put the memo's allocations into the freed
/// blocks, so filling the memo with 20,000 chains took 5.7 GiB resident for 49 MiB of entries, and 100,000 ran a
/// 24 GiB machine out of memory. mimalloc keeps small and large allocations apart: +55 MiB for the same fill, and a
/// brotli compression in 75 µs (fixing glibc's threshold instead cost 378 µs: a fresh mapping per compression).
/// Measured by `cert-compression` (bench/), which uses the same allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The subcommands that are more than a few lines, one module each.
mod cli {
    pub mod acme;
    pub mod demo;
    pub mod import;
    pub mod plugin_call;
    pub mod tickets;
}

/// A TLS terminator whose certificates are chosen per handshake by a sandboxed WebAssembly plugin.
#[derive(Debug, Parser)]
#[command(name = "tern", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server from a config file.
    Run {
        /// Config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
        /// Once every listener is bound, write their addresses here as JSON
        /// (`{"listeners": {"NAME": "IP:PORT", ...}, "admin": "IP:PORT" or null}`), for supervisors and tests.
        #[arg(long, value_name = "PATH")]
        ready_file: Option<PathBuf>,
    },
    /// Validate a config file: settings, static certificates, and plugins (compiled and linked).
    Check {
        /// Config file (TOML).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Plugin tools.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Certificate store tools.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Session-ticket keys shared through Redis (`[resumption] redis`).
    #[command(subcommand)]
    Tickets(cli::tickets::TicketsCommand),
    /// Certificates obtained through ACME, on a running node (through its admin API).
    #[command(subcommand)]
    Acme(cli::acme::AcmeCommand),
    /// Run a self-contained demo: generated certificates, the file-path plugin, a built-in backend.
    Demo(cli::demo::DemoArgs),
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Call a plugin once, without a server, and print what it returned (a plugin author's debugging tool).
    Call(cli::plugin_call::CallArgs),
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Tell every tern node subscribed to the channel to drop its cached answers for these names
    /// (`*.parent` drops every name one label below parent).
    Invalidate {
        /// Server names or `*.parent` patterns.
        #[arg(required = true)]
        names: Vec<String>,
        /// Redis URL (redis://host:port); with --cluster, any node of the cluster.
        #[arg(long)]
        redis: String,
        /// The URL is a Redis Cluster node.
        #[arg(long)]
        cluster: bool,
        /// The channel the nodes subscribe to (`[invalidation] channel`).
        #[arg(long, default_value = defaults::INVALIDATION_CHANNEL)]
        channel: String,
    },
    /// Load a directory of <name>.crt / <name>.key pairs into Redis in the Redis plugin's layout. Every pair is
    /// validated first (key matches certificate, certificate covers <name>); invalid pairs are skipped and listed.
    Import {
        /// Directory holding the pairs (wildcards as *.<parent>.crt / .key).
        dir: PathBuf,
        /// Redis URL (redis://host:port); with --cluster, any node of the cluster.
        #[arg(long)]
        redis: String,
        /// The URL is a Redis Cluster node.
        #[arg(long)]
        cluster: bool,
        /// Key layout: `keys` (<prefix><name>.crt / .key) or `hash` (<prefix><name> with fields crt, key).
        #[arg(long, value_enum, default_value = "keys")]
        layout: cli::import::Layout,
        /// Prefix put before every key.
        #[arg(long, default_value = "")]
        prefix: String,
    },
}

fn main() -> std::process::ExitCode {
    // mimalloc advises transparent huge pages for its arenas (`MADV_HUGEPAGE`), so every 2 MiB region a thread's
    // heap touches becomes resident whole: tern with a plugin held 88-94 MiB RSS at start, 43-63 MiB of it huge
    // pages, against 36-41 MiB without them. THP is turned off for the process here (Linux; before any thread
    // starts); `TERN_THP=on` keeps it.
    #[cfg(target_os = "linux")]
    if std::env::var_os("TERN_THP").is_none_or(|v| v != "on") {
        let _ = rustix::thread::disable_transparent_huge_pages(true);
    }
    if let Ok(exe) = std::env::current_exe() {
        let _ = STARTED_AS.set((exe, std::env::args_os().skip(1).collect()));
    }
    match run_cli() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{}", operator_message(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error as an operator should read it: one line, the message then each cause once, joined by ": " (a cause
/// whose text the previous one already carries is not repeated), and no backtrace (`RUST_BACKTRACE`, common on
/// developer machines, would add one to every configuration mistake).
fn operator_message(err: &anyhow::Error) -> String {
    let mut text = format!("error: {err}");
    let mut previous = err.to_string();
    for cause in err.chain().skip(1) {
        let line = cause.to_string();
        if !previous.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        previous = line;
    }
    text
}

fn run_cli() -> Result<()> {
    let cli = Cli::parse();
    // `run` logs as its config says; every other command logs text at info.
    let log = match &cli.command {
        Command::Run { config, .. } => Config::load(config)?.log,
        _ => tern::config::LogSettings::default(),
    };
    init_logging(&log);
    tern::crypto::provider(); // installs tern's crypto provider as the process default before anything asks
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Run { config, ready_file } => run(config, ready_file).await,
            Command::Check { config } => check(config).await,
            Command::Plugin(PluginCommand::Call(args)) => cli::plugin_call::run(args).await,
            Command::Demo(args) => cli::demo::run(args).await,
            Command::Acme(command) => cli::acme::run(command).await,
            Command::Tickets(command) => cli::tickets::run(command).await,
            Command::Certs(CertsCommand::Import { dir, redis, cluster, layout, prefix }) => {
                cli::import::run(dir, redis, cluster, layout, &prefix).await
            }
            Command::Certs(CertsCommand::Invalidate { names, redis, cluster, channel }) => {
                certs_invalidate(names, redis, cluster, &channel).await
            }
        }
    })
}

fn init_logging(log: &tern::config::LogSettings) {
    let text = std::env::var("TERN_LOG").unwrap_or_else(|_| log.level.clone());
    let mut filter = tracing_subscriber::EnvFilter::new(&text);
    // rustls logs what clients send (a rejected 60 KB server name, whole): an unauthenticated client must not
    // write that much log per handshake. tern logs each refusal itself, clipped; name rustls in the filter
    // (e.g. `TERN_LOG=info,rustls=debug`) to see its lines anyway.
    if !text.contains("rustls") {
        for quiet in ["rustls=off", "tokio_rustls=off"] {
            if let Ok(directive) = quiet.parse() {
                filter = filter.add_directive(directive);
            }
        }
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match log.format {
        tern::config::LogFormat::Json => builder.json().init(),
        tern::config::LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
    }
    // The access log has its own fields, format and writer thread (`tern::access`).
    if let Err(err) = tern::access::install(log) {
        tracing::warn!(error = %err, "no access log: its writer thread did not start");
    }
}

async fn run(path: PathBuf, ready_file: Option<PathBuf>) -> Result<()> {
    use tern::handover::{Inherited, Successor, notify_systemd};
    let config = Config::load(&path)?;
    let upgrade_timeout = config.server.upgrade_timeout;
    let started = Instant::now();
    // Started by an upgrade: the old process hands over its listening sockets; else systemd may have passed some.
    let successor = Successor::from_env().context("taking over from the old process")?;
    let inherited = match &successor {
        Some(successor) => successor.receive().await.context("taking over from the old process")?,
        None => Inherited::from_systemd(),
    };
    let bound = tern::Server::bind_inheriting(config, &inherited).await;
    let server = match bound.with_context(|| format!("{}: cannot start", path.display())) {
        Ok(server) => server,
        Err(err) => {
            if let Some(successor) = successor {
                successor.failed(&operator_message(&err)).await;
            }
            return Err(err);
        }
    };
    if let Some(ready_file) = ready_file {
        write_ready_file(&ready_file, &server.local_addrs()).await?;
    }
    let sockets = server.listening_sockets().context("listening sockets")?;
    match successor {
        Some(successor) => {
            successor.ready().await?;
            notify_systemd(&format!("MAINPID={}\nREADY=1", std::process::id()));
        }
        None => notify_systemd("READY=1"),
    }
    tracing::info!(elapsed = ?started.elapsed(), "ready");
    server.run(until_stopped(sockets, upgrade_timeout)).await;
    Ok(())
}

/// Returns on SIGTERM or Ctrl-C, or once a binary upgrade (SIGUSR2) has a successor serving on this process's
/// listening `sockets`; a failed upgrade is logged and this process goes on.
async fn until_stopped(sockets: Vec<(String, std::os::fd::OwnedFd)>, upgrade_timeout: std::time::Duration) {
    let upgrades = async {
        let usr2 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2());
        let (Ok(mut usr2), Some((exe, args))) = (usr2, STARTED_AS.get()) else {
            return std::future::pending().await;
        };
        while usr2.recv().await.is_some() {
            tracing::info!(binary = %exe.display(), "upgrade: starting the new binary");
            match tern::handover::start_successor(exe, args, &sockets, upgrade_timeout).await {
                Ok(pid) => {
                    tracing::info!(pid, "upgrade: the new process serves; this one stops accepting and drains");
                    return;
                }
                Err(err) => tracing::error!(error = %err, "upgrade failed; this process goes on serving"),
            }
        }
    };
    tokio::select! {
        () = shutdown_signal() => tern::handover::notify_systemd("STOPPING=1"),
        () = upgrades => {}
    }
}

/// The binary this process was started from and its arguments, read at start (the file may be replaced later:
/// that is the point of an upgrade).
static STARTED_AS: std::sync::OnceLock<(PathBuf, Vec<std::ffi::OsString>)> = std::sync::OnceLock::new();

/// Writes the bound addresses as JSON, atomically (a reader never sees half a file).
async fn write_ready_file(path: &std::path::Path, addrs: &[(String, std::net::SocketAddr)]) -> Result<()> {
    let listeners: serde_json::Map<String, serde_json::Value> = addrs
        .iter()
        .filter(|(name, _)| name != "admin")
        .map(|(name, addr)| (name.clone(), serde_json::Value::String(addr.to_string())))
        .collect();
    let admin = addrs.iter().find(|(name, _)| name == "admin").map(|(_, addr)| addr.to_string());
    let json = serde_json::json!({ "listeners": listeners, "admin": admin });
    let partial = path.with_extension("partial");
    tokio::fs::write(&partial, serde_json::to_vec_pretty(&json)?)
        .await
        .with_context(|| format!("--ready-file {}", partial.display()))?;
    tokio::fs::rename(&partial, path).await.with_context(|| format!("--ready-file {}", path.display()))?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutting down");
}

async fn certs_invalidate(names: Vec<String>, url: String, cluster: bool, channel: &str) -> Result<()> {
    for name in &names {
        let plain = name.strip_prefix("*.").unwrap_or(name);
        ServerName::parse(plain)
            .map_err(|e| anyhow::anyhow!("{name:?} is not a server name or *.parent pattern: {e}"))?;
    }
    let store = redis_store(url, cluster);
    for name in &names {
        let receivers = store.publish(channel, &name.to_ascii_lowercase()).await?;
        println!("invalidated {name}: received by {receivers} node(s)");
    }
    Ok(())
}

/// A store for a one-off command-line operation.
pub(crate) fn redis_store(url: String, cluster: bool) -> tern::store::RedisStore {
    tern::store::RedisStore::new(tern::config::RedisSettings {
        // Errors name the store: name it by its address.
        name: url.clone(),
        urls: vec![url],
        cluster,
        timeout: defaults::REDIS_TIMEOUT,
    })
}

async fn check(path: PathBuf) -> Result<()> {
    let config = Config::load(&path)?;
    let certs = config.certificates.clone();
    let plugins = async {
        tokio::task::spawn_blocking(move || tern::select::StaticCerts::load(&certs)).await??;
        if let Some(acme) = &config.acme {
            tern::acme::preflight(acme)
                .await
                .map_err(|(key, path, message)| anyhow::anyhow!("{key} {}: {message}", path.display()))?;
        }
        let runtime = plugin::runtime_for(&config.plugins, config.server.plugin_keep_resident)?;
        anyhow::Ok(plugin::load_all(&runtime, &config.plugins, &tern::server::stores_for(&config)).await?)
    }
    .await
    .with_context(|| format!("{}: not usable", path.display()))?;
    println!(
        "{}: ok ({} listener(s), {} certificate(s), {} plugin(s) compiled)",
        path.display(),
        config.listeners.len(),
        config.certificates.len(),
        plugins.len()
    );
    Ok(())
}
