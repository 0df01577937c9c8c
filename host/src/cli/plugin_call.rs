//! `tern plugin call`: one call of a plugin without a server, and what it returned (a plugin author's tool).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tern::config::{Grants, KvGrant, PluginSettings, defaults};
use tern::plugin::{self, RouteRequest, Selection};
use tern::sni::ServerName;

/// Options of `tern plugin call`.
#[derive(Debug, clap::Args)]
pub struct CallArgs {
    /// The plugin component (.wasm).
    plugin: PathBuf,
    /// The server name to select a certificate for.
    servername: String,
    /// The listener name the plugin is told (contract 0.2).
    #[arg(long, default_value = "cli")]
    listener: String,
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

/// The name of the store `--redis` grants.
const STORE: &str = "cli";

/// Runs `tern plugin call`; exits 1 when the call failed or its answer was refused.
pub async fn run(args: CallArgs) -> Result<()> {
    let name =
        ServerName::parse(&args.servername).map_err(|e| anyhow::anyhow!("server name {:?}: {e}", args.servername))?;
    let listener = args.listener.clone();
    let (settings, stores) = plugin_settings(args).await?;
    let runtime = plugin::PluginRuntime::new(settings.memory_limit.max(defaults::PLUGIN_MEMORY_LIMIT), 4)?;
    let compile_started = Instant::now();
    let loaded = plugin::load_all(&runtime, std::slice::from_ref(&settings), &stores).await?;
    let compiled_in = compile_started.elapsed();
    let plugin = loaded.into_iter().next().context("plugin did not load")?;
    let call_started = Instant::now();
    let answer = plugin.select(&name, &listener).await;
    let called_in = call_started.elapsed();
    println!("plugin:     {} (compiled in {compiled_in:.1?})", settings.path.display());
    println!("servername: {name}");
    println!("contract:   tern:plugin@{}", plugin.contract().version());
    println!("call took:  {called_in:.1?}");
    let memory = plugin.stats().peak_memory_bytes();
    if memory > 0 {
        println!("memory:     {:.1} MiB of linear memory", memory as f64 / f64::from(1 << 20));
    }
    if !print_answer(answer, &name) {
        std::process::exit(1);
    }
    Ok(())
}

/// The settings of a one-off plugin from the command line, with the store `--redis` names (checked to answer, so
/// that a store that is down is reported as such and not as a plugin that did not answer in time).
async fn plugin_settings(args: CallArgs) -> Result<(PluginSettings, tern::store::Stores)> {
    let mut settings = std::collections::BTreeMap::new();
    for pair in &args.settings {
        let Some((k, v)) = pair.split_once('=') else { bail!("--setting {pair:?}: expected KEY=VALUE") };
        settings.insert(k.to_string(), v.to_string());
    }
    let mut stores = tern::store::Stores::new();
    let mut kv = None;
    if let Some(url) = args.redis {
        let store = Arc::new(crate::redis_store(url.clone(), args.cluster));
        store.ping().await.with_context(|| format!("--redis {url}: the store does not answer"))?;
        stores.insert(STORE.into(), store);
        let prefixes = if args.kv_prefixes.is_empty() { vec![String::new()] } else { args.kv_prefixes };
        kv = Some(KvGrant { store: STORE.into(), prefixes });
    }
    let path = args.plugin;
    let name = path.file_stem().map_or_else(|| "plugin".into(), |s| s.to_string_lossy().into_owned());
    let mut plugin = PluginSettings::one_off(&name, &path);
    plugin.timeout = tern::config::parse_duration(&args.timeout).map_err(|e| anyhow::anyhow!("--timeout: {e}"))?;
    plugin.memory_limit = usize::try_from(
        tern::config::parse_size(&args.memory_limit).map_err(|e| anyhow::anyhow!("--memory-limit: {e}"))?,
    )?;
    plugin.settings = settings;
    plugin.grants = Grants { files: args.files, kv, ..Grants::default() };
    Ok((plugin, stores))
}

/// Prints the plugin's answer and whether serving would accept it; false when the call failed or it would not.
/// Routes and passthrough targets are shown as sent: whether they are granted depends on the server's config.
fn print_answer(answer: Result<Selection, plugin::PluginError>, name: &ServerName) -> bool {
    let (certificates, route, ttl) = match answer {
        Err(err) => {
            println!("result:     FAILED ({}): {err}", err.kind());
            return false;
        }
        Ok(Selection::NotFound) => {
            println!("result:     not-found (the listener's default certificate or strict alert applies)");
            return true;
        }
        Ok(Selection::Passthrough { target, ttl }) => {
            println!(
                "result:     passthrough to {target}, ttl hint {}",
                ttl.map_or("none".into(), |t| format!("{t:?}"))
            );
            println!("validation: the target must match the plugin's grants.routes.passthrough");
            return true;
        }
        Ok(Selection::Obtain { route, ttl }) => {
            println!(
                "result:     obtain (the host issues a certificate through [acme]), route {}, ttl hint {}",
                route.map_or("the listener's backend".into(), |r| format!("{r:?}")),
                ttl.map_or("none".into(), |t| format!("{t:?}"))
            );
            println!("validation: needs an [acme] section; the route must match the plugin's grants.routes");
            return true;
        }
        Ok(Selection::Serve { certificates, route, ttl }) => (certificates, route, ttl),
    };
    println!(
        "result:     found, {} certificate(s), ttl hint {}",
        certificates.len(),
        ttl.map_or("none".into(), |t| format!("{t:?}"))
    );
    match &route {
        None => println!("route:      the listener's backend"),
        Some(RouteRequest::Pool(pool)) => println!("route:      pool {pool:?} (must be in grants.routes.pools)"),
        Some(RouteRequest::Origin(url)) => match tern::route::parse_origin(url) {
            Ok(origin) => println!("route:      origin {origin} (must match grants.routes.origins)"),
            Err(err) => {
                println!("route:      REJECTED: {err}");
                return false;
            }
        },
    }
    // The same checks as serving (key matches leaf, leaf covers the name, valid now), for every member.
    let members = certificates.iter().map(|c| (c.chain.as_bytes(), c.key.as_bytes()));
    match tern::certs::validate_set(members, name) {
        Err(err) => {
            println!("validation: REJECTED: {err}");
            false
        }
        Ok(set) => {
            for (i, parsed) in set.iter().enumerate() {
                println!("certificate {}: {} key", i + 1, tern::certs::key_kind(&parsed.certified));
                println!("  subject alt names: {}", parsed.dns_names.join(", "));
                println!("  issuer:     {}", parsed.issuer);
                println!("  expires in: {}", humanize(parsed.remaining_validity()));
                println!("  key:        matches the leaf");
            }
            println!("validation: ok, covers {name}");
            true
        }
    }
}

fn humanize(d: Duration) -> String {
    let days = d.as_secs() / 86_400;
    if days > 0 { format!("{days} days") } else { format!("{:?}", d) }
}
