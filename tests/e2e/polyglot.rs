//! Plugins in three languages — the shipped Rust Redis plugin and the JavaScript (componentize-js) and Python
//! (componentize-py) examples — select the same certificates for the same names, fail the same way on bad data,
//! and run under `tern plugin call`.

use std::net::SocketAddr;
use tern::plugin::Outcome;

use anyhow::Context;

use crate::redis_support::RedisServer;
use crate::support::*;

const JS_PLUGIN: &str = env!("TERN_PLUGIN_JS_REDIS");
const PY_PLUGIN: &str = env!("TERN_PLUGIN_PY_REDIS");

const LANGUAGES: [(&str, &str); 3] = [("rust", REDIS_PLUGIN), ("javascript", JS_PLUGIN), ("python", PY_PLUGIN)];

/// One plugin and one listener per language, all reading `cert:<name>.crt|.key|.ttl` from the same Redis.
fn config(backend: SocketAddr, redis: &str) -> String {
    let mut text = format!(
        "[[certificate]]\nname = \"default\"\ncert = \"certs/default.test.crt\"\nkey = \"certs/default.test.key\"\n\
         names = []\n\n[[redis]]\nname = \"certs\"\nurls = [\"{redis}\"]\n"
    );
    for (language, path) in LANGUAGES {
        text += &format!(
            "\n[[plugin]]\nname = \"{language}\"\npath = \"{path}\"\ntimeout = \"5s\"\n\
             settings = {{ cert_key = \"cert:{{name}}.crt\", key_key = \"cert:{{name}}.key\", ttl_key = \"cert:{{name}}.ttl\" }}\n\
             grants.kv = {{ redis = \"certs\", prefixes = [\"cert:\"] }}\n\n\
             [[listener]]\nname = \"{language}\"\nbind = \"127.0.0.1:0\"\nplugin = \"{language}\"\n\
             default_certificate = \"default\"\nbackend = \"http://{backend}\"\n"
        );
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_javascript_and_python_plugins_select_the_same_certificates() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let pki = Pki::new(&["default.test", "a.poly.test", "b.poly.test", "c.poly.test", "*.wild.poly.test"])?;
    for file in ["a.poly.test", "b.poly.test", "c.poly.test", "*.wild.poly.test"] {
        for (suffix, ext) in [("crt", "crt"), ("key", "key")] {
            let pem = std::fs::read_to_string(pki.certs().join(format!("{file}.{ext}")))?;
            let reply = redis.command(&["SET", &format!("cert:{file}.{suffix}"), &pem]).await?;
            anyhow::ensure!(reply.contains("OK"), "{reply}");
        }
    }
    redis.command(&["SET", "cert:a.poly.test.ttl", "30"]).await?;
    // Bad data every language must refuse the same way: a TTL that is not a number.
    redis.command(&["SET", "cert:c.poly.test.ttl", "soon"]).await?;

    let server =
        TestServer::start(&config(tern_fixtures::spawn_echo_backend().await?, &redis.url()), pki.dir.path()).await?;
    let client = pki.client(&[b"http/1.1"]);
    for (language, _) in LANGUAGES {
        let addr = server.addrs.iter().find(|(n, _)| n == language).map(|(_, a)| *a).expect("listener bound");
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
        let stats = server.plugins.iter().find(|(n, _)| n == language).expect("plugin loaded").1.stats();
        assert_eq!(stats.count(Outcome::Found), 3, "{language}: a, b and the wildcard");
        assert_eq!(stats.count(Outcome::NotFound), 1, "{language}: nobody");
        assert_eq!(stats.errors(), 1, "{language}: the bad TTL");
        assert_eq!(stats.traps(), 0, "{language}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_and_python_plugins_run_under_tern_plugin_call() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let pki = Pki::new(&["a.poly.test"])?;
    for ext in ["crt", "key"] {
        let pem = std::fs::read_to_string(pki.certs().join(format!("a.poly.test.{ext}")))?;
        redis.command(&["SET", &format!("a.poly.test.{ext}"), &pem]).await?;
    }
    let url = redis.url();
    for plugin in [JS_PLUGIN, PY_PLUGIN] {
        let found = text(&run_command(tern(&["plugin", "call", plugin, "a.poly.test", "--redis", &url])).await?);
        assert!(found.contains("validation: ok, covers a.poly.test"), "{plugin}:\n{found}");
    }
    Ok(())
}
