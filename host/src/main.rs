//! The `tern` command line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use tern::config::{Config, Grants, PluginSettings, defaults};
use tern::plugin::{self, Selection};
use tern::sni::ServerName;

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
    Tickets(TicketsCommand),
    /// Run a self-contained demo: generated certificates, the file-path plugin, a built-in backend.
    Demo(tern::demo::DemoArgs),
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Call a plugin once, without a server, and print what it returned (a plugin author's debugging tool).
    Call(CallArgs),
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
        layout: tern::tools::Layout,
        /// Prefix put before every key.
        #[arg(long, default_value = "")]
        prefix: String,
    },
}

#[derive(Debug, Subcommand)]
enum TicketsCommand {
    /// Show the ticket-key slots every node accepts now: generation, maker, age, activation. No key bytes.
    Status {
        /// Config file of any node of the fleet (its [resumption] and [[redis]] sections are used).
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Force a rotation: a new key for the current slot, used by every node after --lead (they pull it first);
    /// tickets under older keys keep resuming for the ticket lifetime.
    Rotate {
        /// Config file of any node of the fleet.
        #[arg(short, long)]
        config: PathBuf,
        /// How long nodes get to pull the key before encrypting with it.
        #[arg(long, default_value = "2s")]
        lead: String,
    },
}

#[derive(Debug, clap::Args)]
struct CallArgs {
    /// The plugin component (.wasm).
    plugin: PathBuf,
    /// The server name to select a certificate for.
    servername: String,
    /// A plugin setting, as key=value; repeatable.
    #[arg(long = "setting", value_name = "KEY=VALUE")]
    settings: Vec<String>,
    /// Grant the plugin read-only access to this directory (mounted at /).
    #[arg(long)]
    files: Option<PathBuf>,
    /// Grant the plugin key-value reads from this Redis (redis://host:port).
    #[arg(long)]
    redis: Option<String>,
    /// With --redis: the URL is a Redis Cluster node.
    #[arg(long, requires = "redis")]
    cluster: bool,
    /// With --redis: a key prefix the plugin may read; repeatable; default: every key.
    #[arg(long = "kv-prefix", value_name = "PREFIX", requires = "redis")]
    kv_prefixes: Vec<String>,
    /// Deadline of the call.
    #[arg(long, default_value = "1s")]
    timeout: String,
    /// Memory cap of the instance.
    #[arg(long, default_value = "64MiB")]
    memory_limit: String,
}

fn main() -> std::process::ExitCode {
    match run_cli() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("{}", operator_message(&err));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error as an operator should read it: the message, then each cause once (a cause whose text the previous
/// line already carries is not repeated), and no backtrace (`RUST_BACKTRACE`, common on developer machines, would
/// add one to every configuration mistake).
fn operator_message(err: &anyhow::Error) -> String {
    let mut text = format!("error: {err}");
    let mut previous = err.to_string();
    for cause in err.chain().skip(1) {
        let line = cause.to_string();
        if !previous.contains(&line) {
            text.push_str(&format!("\n  caused by: {line}"));
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
            Command::Plugin(PluginCommand::Call(args)) => plugin_call(args).await,
            Command::Demo(args) => tern::demo::run(args).await,
            Command::Tickets(command) => tickets(command).await,
            Command::Certs(CertsCommand::Import { dir, redis, cluster, layout, prefix }) => {
                certs_import(dir, redis, cluster, layout, &prefix).await
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
    if !log.access
        && let Ok(directive) = "tern::access=off".parse()
    {
        filter = filter.add_directive(directive);
    }
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match log.format {
        tern::config::LogFormat::Json => builder.json().init(),
        tern::config::LogFormat::Text => builder.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).init(),
    }
}

async fn run(path: PathBuf, ready_file: Option<PathBuf>) -> Result<()> {
    let config = Config::load(&path)?;
    let started = Instant::now();
    let server = tern::Server::bind(config).await?;
    if let Some(ready_file) = ready_file {
        write_ready_file(&ready_file, &server.local_addrs()).await?;
    }
    tracing::info!(elapsed = ?started.elapsed(), "ready");
    server.run(shutdown_signal()).await;
    Ok(())
}

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
fn redis_store(url: String, cluster: bool) -> tern::store::RedisStore {
    tern::store::RedisStore::new(tern::config::RedisSettings {
        // Errors name the store: name it by its address.
        name: url.clone(),
        urls: vec![url],
        cluster,
        timeout: defaults::REDIS_TIMEOUT,
    })
}

async fn certs_import(
    dir: PathBuf,
    url: String,
    cluster: bool,
    layout: tern::tools::Layout,
    prefix: &str,
) -> Result<()> {
    let store = redis_store(url, cluster);
    let report = tern::tools::import_dir(&dir, &store, layout, prefix).await?;
    for (file, reason) in &report.skipped {
        println!("skipped {}: {reason}", file.display());
    }
    let rate = report.imported as f64 / report.write_time.as_secs_f64().max(1e-9);
    println!(
        "imported {} pair(s), skipped {}; validated in {:.2?}, written in {:.2?} ({rate:.0} pairs/s)",
        report.imported,
        report.skipped.len(),
        report.validate_time,
        report.write_time
    );
    if report.imported == 0 {
        bail!("nothing imported from {}: no valid <name>.crt / <name>.key pair", dir.display());
    }
    Ok(())
}

async fn check(path: PathBuf) -> Result<()> {
    let config = Config::load(&path)?;
    let certs = config.certificates.clone();
    tokio::task::spawn_blocking(move || tern::select::StaticCerts::load(&certs)).await??;
    let runtime = plugin::runtime_for(&config.plugins)?;
    let plugins = plugin::load_all(&runtime, &config.plugins, &tern::server::stores_for(&config)).await?;
    println!(
        "{}: ok ({} listener(s), {} certificate(s), {} plugin(s) compiled)",
        path.display(),
        config.listeners.len(),
        config.certificates.len(),
        plugins.len()
    );
    Ok(())
}

async fn plugin_call(args: CallArgs) -> Result<()> {
    let CallArgs { plugin: path, servername, settings: raw_settings, files, redis, cluster, kv_prefixes, .. } = args;
    let name = ServerName::parse(&servername).map_err(|e| anyhow::anyhow!("server name {servername:?}: {e}"))?;
    let mut settings = std::collections::BTreeMap::new();
    for pair in raw_settings {
        let Some((k, v)) = pair.split_once('=') else { bail!("--setting {pair:?}: expected KEY=VALUE") };
        settings.insert(k.to_string(), v.to_string());
    }
    let mut stores = plugin::Stores::new();
    let kv = redis.map(|url| {
        stores.insert("cli".into(), std::sync::Arc::new(redis_store(url, cluster)));
        let prefixes = if kv_prefixes.is_empty() { vec![String::new()] } else { kv_prefixes };
        tern::config::KvGrant { store: "cli".into(), prefixes }
    });
    let plugin_settings = PluginSettings {
        name: path.file_stem().map_or_else(|| "plugin".into(), |s| s.to_string_lossy().into_owned()),
        path: path.clone(),
        timeout: tern::config::parse_duration(&args.timeout).map_err(|e| anyhow::anyhow!("--timeout: {e}"))?,
        memory_limit: usize::try_from(
            tern::config::parse_size(&args.memory_limit).map_err(|e| anyhow::anyhow!("--memory-limit: {e}"))?,
        )?,
        max_concurrency: 1,
        max_calls_per_second: None,
        max_calls_per_second_per_client: None,
        breaker_threshold: 0,
        breaker_cooldown: Default::default(),
        settings,
        grants: Grants { files, kv, http: None },
        probe_names: Vec::new(),
        on_swap: Default::default(),
    };
    let runtime = plugin::PluginRuntime::new(plugin_settings.memory_limit.max(defaults::PLUGIN_MEMORY_LIMIT), 4)?;
    let compile_started = Instant::now();
    let loaded = plugin::load_all(&runtime, std::slice::from_ref(&plugin_settings), &stores).await?;
    let compiled_in = compile_started.elapsed();
    let plugin = loaded.into_iter().next().context("plugin did not load")?;
    let call_started = Instant::now();
    let answer = plugin.select(&name).await;
    let called_in = call_started.elapsed();
    println!("plugin:     {} (compiled in {compiled_in:.1?})", path.display());
    println!("servername: {name}");
    println!("call took:  {called_in:.1?}");
    let memory = plugin.stats().peak_memory_bytes.load(std::sync::atomic::Ordering::Relaxed);
    if memory > 0 {
        println!("memory:     {:.1} MiB of linear memory", memory as f64 / f64::from(1 << 20));
    }
    match answer {
        Err(err) => {
            println!("result:     FAILED ({}): {err}", err.kind());
            std::process::exit(1);
        }
        Ok(Selection::NotFound) => {
            println!("result:     not-found (the listener's default certificate or strict alert applies)")
        }
        Ok(Selection::Found { chain, key, ttl }) => {
            println!(
                "result:     found, {} bytes of chain, ttl hint {}",
                chain.len(),
                ttl.map_or("none".into(), |t| format!("{t:?}"))
            );
            // The same checks as serving (key matches leaf, leaf covers the name, valid now).
            match tern::certs::validate_answer(chain.as_bytes(), key.as_bytes(), &name) {
                Err(err) => {
                    println!("validation: REJECTED: {err}");
                    std::process::exit(1);
                }
                Ok(parsed) => {
                    println!("subject alt names: {}", parsed.dns_names.join(", "));
                    println!("issuer:     {}", parsed.issuer);
                    println!("expires in: {}", humanize(parsed.remaining_validity()));
                    println!("key:        matches the leaf");
                    println!("validation: ok, covers {name}");
                }
            }
        }
    }
    Ok(())
}

async fn tickets(command: TicketsCommand) -> Result<()> {
    let (path, lead) = match &command {
        TicketsCommand::Status { config } => (config, None),
        TicketsCommand::Rotate { config, lead } => {
            (config, Some(tern::config::parse_duration(lead).map_err(|e| anyhow::anyhow!("--lead: {e}"))?))
        }
    };
    let config = Config::load(path)?;
    let settings = &config.resumption;
    let Some(store_name) = &settings.store else {
        bail!("{}: [resumption] has no redis store: ticket keys are local to each node", path.display())
    };
    let stores = tern::server::stores_for(&config);
    let store = stores.get(store_name).cloned().context("the [resumption] store is not defined")?;
    let (keys, schedule) = tern::resumption::fleet_keys(settings, store).context("[resumption] has no secret")?;
    let now = tern::resumption::tickets::now_ms();
    let age = |ms: u64| {
        let secs = (now as i64 - ms as i64) / 1000;
        if secs >= 0 { format!("{secs}s ago") } else { format!("in {}s", -secs) }
    };
    if let Some(lead) = lead {
        let key = keys.rotate(&schedule, &format!("{}-cli", settings.node), lead).await?;
        println!(
            "rotated: slot {} generation {}, encrypting on every node {}",
            key.slot,
            key.generation,
            age(key.activate_ms)
        );
        return Ok(());
    }
    let current = schedule.slot_at(now);
    println!(
        "rotation every {:?}, tickets live {:?}: {} previous slot(s) + current + next accepted",
        settings.ticket_rotation, settings.ticket_lifetime, schedule.window
    );
    println!("{:>12} {:>4} {:>10}  {:<28} {:<14} {:<14} secret", "slot", "gen", "", "made by", "made", "active");
    let status = keys.status(&schedule).await?;
    for slot in schedule.accepted(now) {
        let label = match slot.cmp(&current) {
            std::cmp::Ordering::Less => "previous",
            std::cmp::Ordering::Equal => "CURRENT",
            std::cmp::Ordering::Greater => "next",
        };
        let mut any = false;
        for key in status.iter().filter(|k| k.slot == slot) {
            any = true;
            println!(
                "{:>12} {:>4} {:>10}  {:<28} {:<14} {:<14} {}",
                slot,
                key.generation,
                label,
                key.node,
                age(key.created_ms),
                age(key.activate_ms),
                if key.opens { "opens" } else { "DIFFERENT SECRET" }
            );
        }
        if !any {
            println!("{slot:>12} {:>4} {label:>10}  (no key yet)", "-");
        }
    }
    Ok(())
}

fn humanize(d: std::time::Duration) -> String {
    let days = d.as_secs() / 86_400;
    if days > 0 { format!("{days} days") } else { format!("{:?}", d) }
}
