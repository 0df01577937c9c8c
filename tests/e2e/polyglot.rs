//! Plugins in three languages — the shipped Rust Redis plugin and the JavaScript (componentize-js, and the same
//! source built with componentize-qjs) and Python (componentize-py) examples — select the same certificates for the same names, fail the same way on bad data,
//! and run under `tern plugin call`. The examples are built against contract 0.2; their frozen 0.1 sources
//! (`tests/fixtures/contract-0.1`, built against 0.1) must keep doing all of that through the same host. The 0.2
//! examples also route: a route stored beside the certificate in Redis sends the name's traffic where it says.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tern::plugin::{Contract, Outcome};
use tern_fixtures::TestCa;

use crate::redis_support::RedisServer;
use crate::support::*;

const JS_PLUGIN: &str = env!("TERN_PLUGIN_JS_REDIS");
const PY_PLUGIN: &str = env!("TERN_PLUGIN_PY_REDIS");
const JS_PLUGIN_V0_1: &str = env!("TERN_PLUGIN_JS_REDIS_V0_1");
const PY_PLUGIN_V0_1: &str = env!("TERN_PLUGIN_PY_REDIS_V0_1");
const QJS_PLUGIN: &str = env!("TERN_PLUGIN_JS_REDIS_QJS");

/// (plugin and listener name, component, the contract it was built against: `None` for the Rust plugin, which
/// speaks whichever contract the plugins workspace builds it for).
const LANGUAGES: [(&str, &str, Option<Contract>); 6] = [
    ("rust", REDIS_PLUGIN, None),
    ("javascript", JS_PLUGIN, Some(Contract::V0_2)),
    ("javascript-quickjs", QJS_PLUGIN, Some(Contract::V0_2)),
    ("python", PY_PLUGIN, Some(Contract::V0_2)),
    ("javascript-0.1", JS_PLUGIN_V0_1, Some(Contract::V0_1)),
    ("python-0.1", PY_PLUGIN_V0_1, Some(Contract::V0_1)),
];

/// The examples built against contract 0.2, the ones that can answer routes.
const ROUTING: [(&str, &str); 3] =
    [("javascript", JS_PLUGIN), ("javascript-quickjs", QJS_PLUGIN), ("python", PY_PLUGIN)];

/// Held by each test of this file for its whole run. A JavaScript or Python component takes 12 to 18 MB of Wasm to
/// compile (at every server start and every `tern plugin call`), and one compilation already keeps every core
/// busy: one test at a time, so that a `tern plugin call` does not run past its time limit while another test's
/// server compiles its plugins.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Every key under `cert:`, the only prefix granted: the settings the examples had under contract 0.1. Their route
/// key, not set, must lie beside the certificate, inside the grant (a key outside it fails the whole MGET).
const PREFIXED_KEYS: &str = "settings = { cert_key = \"cert:{name}.crt\", key_key = \"cert:{name}.key\", \
     ttl_key = \"cert:{name}.ttl\" }\n\
     grants.kv = { redis = \"certs\", prefixes = [\"cert:\"] }";

/// A static default certificate, the Redis `certs`, and one plugin and one listener (same name) per entry of
/// `plugins`; `plugin_keys` go into every plugin's table.
fn config(backend: SocketAddr, redis: &str, plugins: &[(&str, &str)], plugin_keys: &str) -> String {
    let mut text = format!(
        "[[certificate]]\nname = \"default\"\ncert = \"certs/default.test.crt\"\nkey = \"certs/default.test.key\"\n\
         names = []\n\n[[redis]]\nname = \"certs\"\nurls = [\"{redis}\"]\n"
    );
    for (name, path) in plugins {
        text += &format!(
            "\n[[plugin]]\nname = \"{name}\"\npath = \"{path}\"\ntimeout = \"5s\"\n{plugin_keys}\n\n\
             [[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nplugin = \"{name}\"\n\
             default_certificate = \"default\"\nbackend = \"http://{backend}\"\n"
        );
    }
    text
}

/// Stores the certificate and key written under `file` at `<prefix><file>.crt` and `.key`.
async fn store_certificate(redis: &RedisServer, pki: &Pki, prefix: &str, file: &str) -> Result<()> {
    for ext in ["crt", "key"] {
        let pem = std::fs::read_to_string(pki.certs().join(format!("{file}.{ext}")))?;
        let reply = redis.command(&["SET", &format!("{prefix}{file}.{ext}"), &pem]).await?;
        anyhow::ensure!(reply.contains("OK"), "{reply}");
    }
    Ok(())
}

fn listener_addr(server: &TestServer, name: &str) -> SocketAddr {
    server.addrs.iter().find(|(n, _)| n == name).map(|(_, a)| *a).expect("listener bound")
}

fn plugin_slot<'a>(server: &'a TestServer, name: &str) -> &'a tern::plugin::PluginSlot {
    server.plugins.iter().find(|(n, _)| n == name).expect("plugin loaded").1.as_ref()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_javascript_and_python_plugins_select_the_same_certificates() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await?;
    let pki = Pki::new(&["default.test", "a.poly.test", "b.poly.test", "c.poly.test", "*.wild.poly.test"])?;
    for file in ["a.poly.test", "b.poly.test", "c.poly.test", "*.wild.poly.test"] {
        store_certificate(&redis, &pki, "cert:", file).await?;
    }
    redis.command(&["SET", "cert:a.poly.test.ttl", "30"]).await?;
    // Bad data every language must refuse the same way: a TTL that is not a number.
    redis.command(&["SET", "cert:c.poly.test.ttl", "soon"]).await?;

    let plugins = LANGUAGES.map(|(name, path, _)| (name, path));
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let server = TestServer::start(&config(backend, &redis.url(), &plugins, PREFIXED_KEYS), pki.dir.path()).await?;
    let client = pki.client(&[b"http/1.1"]);
    for (language, _, contract) in LANGUAGES {
        let slot = plugin_slot(&server, language);
        if let Some(contract) = contract {
            assert_eq!(slot.current().contract(), contract, "{language}: built against the wrong contract");
        }
        let addr = listener_addr(&server, language);
        for (sni, file) in [
            ("a.poly.test", "a.poly.test"),
            ("b.poly.test", "b.poly.test"),
            ("x.wild.poly.test", "*.wild.poly.test"),
            ("nobody.poly.test", "default.test"),
        ] {
            let verify_as = if file == "default.test" { file } else { sni };
            let stream = sni_verified_as(addr, &pki, sni, verify_as).await.context(format!("{language} {sni}"))?;
            assert_eq!(served_leaf(&stream), pki.leaf(file), "{language}: {sni}");
            let (status, _, _) = get(stream, sni, "/").await?;
            assert_eq!(status, 200, "{language}: {sni}");
        }
        let refused = connect(addr, &client, "c.poly.test").await.expect_err("bad TTL must fail the handshake");
        assert_eq!(alert_of(&refused), Some(REFUSED), "{language}: {refused}");
        let stats = slot.stats();
        assert_eq!(stats.count(Outcome::Found), 3, "{language}: a, b and the wildcard");
        assert_eq!(stats.count(Outcome::NotFound), 1, "{language}: nobody");
        assert_eq!(stats.errors(), 1, "{language}: the bad TTL");
        assert_eq!(stats.traps(), 0, "{language}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_and_python_plugins_route_names_by_the_route_stored_beside_the_certificate() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await?;
    let files = ["origin.route.test", "pool.route.test", "plain.route.test", "bad.route.test", "*.wild.route.test"];
    let pki = Pki::new(&[&["default.test"][..], &files].concat())?;
    // The default layout: `<name>.crt`, `<name>.key` and, beside them, `<name>.route`.
    for file in files {
        store_certificate(&redis, &pki, "", file).await?;
    }
    let pass_ca = TestCa::new("passthrough CA")?;
    let (origin, pooled, wild, listener) = (
        Named::start("origin", None).await?,
        Named::start("pooled", None).await?,
        Named::start("wild", None).await?,
        Named::start("listener", None).await?,
    );
    let pass = Named::start("passthrough", Some(server_tls(&pass_ca, &["pass.route.test"])?)).await?;
    for (name, route) in [
        ("origin.route.test", format!("origin http://127.0.0.1:{}", origin.addr.port())),
        ("pool.route.test", "# the first line that is not a comment counts\n\npool blue\n".into()),
        ("*.wild.route.test", format!("origin http://127.0.0.1:{}", wild.addr.port())),
        // No certificate stored for this one: tern does not terminate its TLS.
        ("pass.route.test", format!("passthrough 127.0.0.1:{}", pass.addr.port())),
        ("bad.route.test", "teleport 127.0.0.1:1".into()),
    ] {
        redis.command(&["SET", &format!("{name}.route"), &route]).await?;
    }
    let plugin_keys = format!(
        "grants.kv = {{ redis = \"certs\", prefixes = [\"\"] }}\n\
         grants.routes = {{ origins = [\"http://127.0.0.1:{}\", \"http://127.0.0.1:{}\"], pools = [\"blue\"], \
         passthrough = [\"127.0.0.1:{}\"] }}",
        origin.addr.port(),
        wild.addr.port(),
        pass.addr.port()
    );
    let toml = config(listener.addr, &redis.url(), &ROUTING, &plugin_keys)
        + &format!("\n[[upstream]]\nname = \"blue\"\nservers = [\"{}\"]\n", pooled.addr);
    let server = TestServer::start(&toml, pki.dir.path()).await?;
    let client = pki.client(&[b"http/1.1"]);
    let pass_client = client_config(&pass_ca, &[b"http/1.1"], &[&rustls::version::TLS13, &rustls::version::TLS12]);
    for (language, _) in ROUTING {
        let addr = listener_addr(&server, language);
        for (sni, file, want) in [
            ("origin.route.test", "origin.route.test", "origin origin.route.test"),
            ("pool.route.test", "pool.route.test", "pooled pool.route.test"),
            ("x.wild.route.test", "*.wild.route.test", "wild x.wild.route.test"),
            ("plain.route.test", "plain.route.test", "listener plain.route.test"),
            // Again: the route is part of the cached answer.
            ("origin.route.test", "origin.route.test", "origin origin.route.test"),
        ] {
            let stream = connect(addr, &client, sni).await.context(format!("{language} {sni}"))?;
            assert_eq!(served_leaf(&stream), pki.leaf(file), "{language}: {sni}");
            let (status, _, body) = get(stream, sni, "/").await?;
            assert_eq!((status.as_u16(), body.as_str()), (200, want), "{language}: {sni}");
        }
        // Passthrough: the client's handshake is with the backend (it trusts only the backend's CA), not tern.
        let stream = connect(addr, &pass_client, "pass.route.test").await.context(format!("{language} pass"))?;
        let (status, _, body) = get(stream, "pass.route.test", "/").await?;
        assert_eq!((status.as_u16(), body.as_str()), (200, "passthrough pass.route.test"), "{language}");
        // A route line the plugin does not know fails the handshake, and the plugin says why.
        let refused = connect(addr, &client, "bad.route.test").await.expect_err("an unknown route must fail");
        assert_eq!(alert_of(&refused), Some(REFUSED), "{language}: {refused}");
        let slot = plugin_slot(&server, language);
        let name = tern::sni::ServerName::parse("bad.route.test").map_err(|e| anyhow::anyhow!("{e}"))?;
        let why = slot.current().select(&name, language).await.expect_err("an unknown route is an error").to_string();
        assert!(
            why.contains("route of bad.route.test: expected `pool NAME`, `origin URL` or `passthrough HOST:PORT`, got")
                && why.contains("teleport 127.0.0.1:1"),
            "{language}: {why}"
        );
        let stats = slot.stats();
        assert_eq!(stats.count(Outcome::Found), 5, "{language}: origin, pool, wildcard, plain and passthrough");
        assert_eq!(stats.errors(), 2, "{language}: the unknown route, twice");
        assert_eq!(stats.traps(), 0, "{language}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_and_python_plugins_run_under_tern_plugin_call() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let redis = RedisServer::start().await?;
    let pki = Pki::new(&["a.poly.test"])?;
    store_certificate(&redis, &pki, "", "a.poly.test").await?;
    let url = redis.url();
    for (plugin, version) in [
        (JS_PLUGIN, "0.2.0"),
        (QJS_PLUGIN, "0.2.0"),
        (PY_PLUGIN, "0.2.0"),
        (JS_PLUGIN_V0_1, "0.1.0"),
        (PY_PLUGIN_V0_1, "0.1.0"),
    ] {
        let found = text(&run_command(tern(&["plugin", "call", plugin, "a.poly.test", "--redis", &url])).await?);
        assert!(found.contains(&format!("contract:   tern:plugin@{version}\n")), "{plugin}:\n{found}");
        assert!(found.contains("validation: ok, covers a.poly.test"), "{plugin}:\n{found}");
    }
    Ok(())
}
