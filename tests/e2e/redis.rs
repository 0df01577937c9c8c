//! Certificates from Redis: the Redis plugin through the host's kv capability, standalone and cluster,
//! `tern certs import`, grants, and Redis going away.

use std::time::{Duration, Instant};
use tern::failure::FailureKind;
use tern::plugin::Outcome;

use tern_fixtures::{TestCa, spawn_echo_backend};

use crate::redis_support::{RedisCluster, RedisServer};
use crate::support::*;

/// A tern config using the Redis plugin over `urls`, reading keys under `cert:`.
fn redis_config(pki: &Pki, backend: std::net::SocketAddr, urls: &[String], cluster: bool, settings: &str) -> String {
    let urls = urls.iter().map(|u| format!("{u:?}")).collect::<Vec<_>>().join(", ");
    let plugin_keys = format!(
        "settings = {{ cert_key = \"cert:{{name}}.crt\", key_key = \"cert:{{name}}.key\"{settings} }}\n\
         grants.kv = {{ redis = \"certs\", prefixes = [\"cert:\"] }}\n\
         [[redis]]\nname = \"certs\"\nurls = [{urls}]\ncluster = {cluster}\n"
    );
    // The kv grant replaces the files grant of the common config.
    config_with(pki, backend, REDIS_PLUGIN, &plugin_keys, "default_certificate = \"default\"").replacen(
        &format!("grants.files = \"{}\"", pki.certs().display()),
        "",
        1,
    )
}

async fn import(pki: &Pki, extra: &[&str]) -> anyhow::Result<String> {
    let dir = pki.certs().to_string_lossy().into_owned();
    let mut args = vec!["certs", "import", &dir, "--prefix", "cert:"];
    args.extend_from_slice(extra);
    let output = run_command(tern(&args)).await?;
    anyhow::ensure!(output.status.success(), "certs import failed: {}", text(&output));
    Ok(text(&output))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_plugin_serves_each_name_its_certificate_after_certs_import() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let pki = Pki::new(&["default.test", "a.example.test", "b.example.test", "*.wild.example.test"])?;
    // A pair that must be skipped: b's certificate filed under another name.
    std::fs::copy(pki.certs().join("b.example.test.crt"), pki.certs().join("liar.example.test.crt"))?;
    std::fs::copy(pki.certs().join("b.example.test.key"), pki.certs().join("liar.example.test.key"))?;
    let report = import(&pki, &["--redis", &redis.url()]).await?;
    assert!(report.contains("imported 4 pair(s), skipped 1"), "{report}");
    assert!(report.contains("liar.example.test.crt: certificate does not cover liar.example.test"), "{report}");

    let config = redis_config(&pki, spawn_echo_backend().await?, &[redis.url()], false, "");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let client = pki.client(&[]);
    for (sni, file) in [
        ("a.example.test", "a.example.test"),
        ("b.example.test", "b.example.test"),
        ("x.wild.example.test", "*.wild.example.test"),
    ] {
        assert_eq!(served_leaf(&connect(server.addr, &client, sni).await?), pki.leaf(file), "{sni}");
    }
    // Unknown names get the default certificate; the liar pair was never imported.
    let stream = handshake(server.addr, &client, None, "default.test").await?;
    assert_eq!(served_leaf(&stream), pki.leaf("default.test"));
    assert!(connect(server.addr, &client, "liar.example.test").await.is_err());
    let stats = server.plugin_stats();
    assert_eq!((stats.count(Outcome::Found), stats.errors()), (3, 0));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_layout_with_a_stored_ttl_expires_from_the_cache() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let pki = Pki::new(&["default.test", "h.example.test"])?;
    let chain = std::fs::read_to_string(pki.certs().join("h.example.test.crt"))?;
    let key = std::fs::read_to_string(pki.certs().join("h.example.test.key"))?;
    let reply = redis.command(&["HSET", "cert:h.example.test", "crt", &chain, "key", &key, "ttl", "1"]).await?;
    assert!(reply.starts_with(":3"), "{reply}");
    let settings = ", layout = \"hash\", hash_key = \"cert:{name}\"";
    let server = TestServer::start(
        &redis_config(&pki, spawn_echo_backend().await?, &[redis.url()], false, settings),
        pki.dir.path(),
    )
    .await?;
    let client = pki.client(&[]);
    connect(server.addr, &client, "h.example.test").await?;
    connect(server.addr, &client, "h.example.test").await?;
    assert_eq!(server.plugin_stats().calls(), 1, "second handshake within the TTL is a cache hit");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    connect(server.addr, &client, "h.example.test").await?;
    // Past its TTL the entry is served at once and refreshed in the background (stale-while-revalidate): wait for
    // that call, which may start after the handshake returns.
    let refreshed = tokio::time::Instant::now() + Duration::from_secs(2);
    while server.plugin_stats().calls() < 2 && tokio::time::Instant::now() < refreshed {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(server.plugin_stats().calls(), 2, "the stored 1 s TTL must expire the entry");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_outside_the_granted_prefixes_are_refused_to_the_plugin() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let pki = Pki::new(&["default.test", "a.example.test"])?;
    import(&pki, &["--redis", &redis.url()]).await?;
    // The plugin is pointed at keys outside its grant ("cert:" only).
    let config = redis_config(&pki, spawn_echo_backend().await?, &[redis.url()], false, "")
        .replace("cert_key = \"cert:{name}.crt\"", "cert_key = \"secret:{name}.crt\"");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let err = connect(server.addr, &pki.client(&[]), "a.example.test").await.unwrap_err();
    assert_eq!(alert_of(&err), Some(REFUSED), "{err}");
    assert_eq!(server.plugin_stats().errors(), 1);
    // The same through `tern plugin call`, which shows the plugin's message.
    let url = redis.url();
    let call = |settings: &[&str]| {
        let mut args = vec!["plugin", "call", REDIS_PLUGIN, "a.example.test", "--redis", &url, "--kv-prefix", "cert:"];
        for setting in settings {
            args.extend(["--setting", setting]);
        }
        run_command(tern(&args))
    };
    let output = call(&["cert_key=secret:{name}.crt"]).await?;
    assert!(text(&output).contains("outside the prefixes granted"), "{}", text(&output));
    let output = call(&["cert_key=cert:{name}.crt", "key_key=cert:{name}.key"]).await?;
    assert!(text(&output).contains("validation: ok, covers a.example.test"), "{}", text(&output));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_certificates_spread_over_slots_all_resolve() -> anyhow::Result<()> {
    let cluster = RedisCluster::start().await?;
    let names: Vec<String> = (0..24).map(|i| format!("site{i}.example.test")).collect();
    let pki = Pki::new(&["default.test"])?;
    for name in &names {
        pki.issue_as(name, &[name])?;
    }
    let report = import(&pki, &["--redis", &cluster.urls()[0], "--cluster"]).await?;
    assert!(report.contains("imported 25 pair(s), skipped 0"), "{report}");
    for node in &cluster.nodes {
        let size = node.command(&["DBSIZE"]).await?;
        assert!(!size.starts_with(":0"), "every master holds some keys, node {} has {size}", node.port);
    }
    let config = redis_config(&pki, spawn_echo_backend().await?, &cluster.urls(), true, "");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let client = pki.client(&[]);
    for name in &names {
        assert_eq!(served_leaf(&connect(server.addr, &client, name).await?), pki.leaf(name), "{name}");
    }
    assert_eq!(server.plugin_stats().count(Outcome::Found), names.len() as u64);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_cached_names_keep_working_misses_fail_fast_and_service_recovers() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let pki = Pki::new(&["default.test", "cached.example.test", "later.example.test"])?;
    import(&pki, &["--redis", &redis.url()]).await?;
    let backend = spawn_echo_backend().await?;
    let config = format!(
        "{}\n[[listener]]\nname = \"strict\"\nbind = \"127.0.0.1:0\"\nplugin = \"files\"\nstrict = true\nbackend = \"http://{backend}\"\n",
        redis_config(&pki, backend, &[redis.url()], false, "")
    );
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let client = pki.client(&[]);
    connect(server.addr, &client, "cached.example.test").await?;

    redis.kill().await?;
    // Cached: served without Redis.
    connect(server.addr, &client, "cached.example.test").await?;
    // Not cached: within the store timeout (250 ms) the listener's policy applies, not a hang: the default
    // certificate on this listener, an alert on the strict one.
    let started = Instant::now();
    let stream = sni_verified_as(server.addr, &pki, "later.example.test", "default.test").await?;
    assert_eq!(served_leaf(&stream), pki.leaf("default.test"));
    println!("miss with Redis down answered after {:?}", started.elapsed());
    assert!(started.elapsed() < Duration::from_secs(5), "a miss with Redis down must fail fast");
    let strict = server.addrs.iter().find(|(n, _)| n == "strict").map(|(_, a)| *a).expect("strict listener");
    let err = connect(strict, &client, "later.example.test").await.unwrap_err();
    assert_eq!(alert_of(&err), Some(REFUSED), "{err}");
    assert_eq!(server.plugin_stats().count(Outcome::StoreUnavailable), 2);
    assert_eq!(counter(server.metrics.handshake_failures.by(FailureKind::PluginUnavailable)), 1);

    redis.restart().await?;
    import(&pki, &["--redis", &redis.url()]).await?;
    let back = Instant::now();
    // The host's client reconnects by itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match connect(server.addr, &client, "later.example.test").await {
            Ok(stream) => {
                assert_eq!(served_leaf(&stream), pki.leaf("later.example.test"));
                println!("a new name was served {:?} after Redis was back", back.elapsed());
                break;
            }
            Err(err) if Instant::now() < deadline => {
                println!("not yet recovered: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => anyhow::bail!("tern did not recover after Redis came back: {err}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidation_reaches_every_node_sharing_the_redis() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let pki = Pki::new(&["default.test", "a.example.test"])?;
    import(&pki, &["--redis", &redis.url()]).await?;
    let config = format!(
        "{}\n[invalidation]\nredis = \"certs\"\n",
        redis_config(&pki, spawn_echo_backend().await?, &[redis.url()], false, "")
    );
    let nodes = [TestServer::start(&config, pki.dir.path()).await?, TestServer::start(&config, pki.dir.path()).await?];
    let client = pki.client(&[]);
    let old = pki.leaf("a.example.test");
    for node in &nodes {
        assert_eq!(served_leaf(&connect(node.addr, &client, "a.example.test").await?), old);
    }
    // The certificate changes in the store; the nodes still serve the cached one (TTL: one hour).
    pki.issue_as("a.example.test", &["a.example.test"])?;
    let new = pki.leaf("a.example.test");
    assert_ne!(old, new);
    import(&pki, &["--redis", &redis.url()]).await?;
    for node in &nodes {
        assert_eq!(served_leaf(&connect(node.addr, &client, "a.example.test").await?), old);
    }
    // Subscriptions are set up as the servers start: publish until both nodes hear it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = run_command(tern(&["certs", "invalidate", "a.example.test", "--redis", &redis.url()])).await?;
        if text(&output).contains("received by 2 node(s)") {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "nodes never subscribed: {}", text(&output));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in &nodes {
        let deadline = Instant::now() + Duration::from_secs(5);
        while served_leaf(&connect(node.addr, &client, "a.example.test").await?) != new {
            anyhow::ensure!(Instant::now() < deadline, "node {} still serves the old certificate", node.addr);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_entries_are_served_stale_while_redis_is_down() -> anyhow::Result<()> {
    let mut redis = RedisServer::start().await?;
    let pki = Pki::new(&["default.test", "a.example.test"])?;
    import(&pki, &["--redis", &redis.url()]).await?;
    // Every answer expires after one second, but may be served stale for a minute if refreshing fails.
    let config = format!(
        "{}\n[cache]\nttl = \"1s\"\nmax_stale = \"1m\"\n",
        redis_config(&pki, spawn_echo_backend().await?, &[redis.url()], false, "")
    );
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let client = pki.client(&[]);
    connect(server.addr, &client, "a.example.test").await?;
    redis.kill().await?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let stream = connect(server.addr, &client, "a.example.test").await?;
    assert_eq!(served_leaf(&stream), pki.leaf("a.example.test"));
    assert_eq!(counter(&server.metrics.stale_serves), 1);
    // The refresh runs in the background (stale-while-revalidate), tried once and failed.
    for _ in 0..250 {
        if server.plugin_stats().errors() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.plugin_stats().errors(), 1, "the refresh was tried and failed");
    Ok(())
}

/// Prints (does not assert) the miss path through Redis: plugin call + `MGET` on loopback + parse. For real
/// figures: `cargo test --release -p tern-e2e --test e2e -- --nocapture redis_selection_latency`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_selection_latency_figures() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let names: Vec<String> = (0..300).map(|i| format!("host{i}.example.test")).collect();
    let pki = Pki::new(&["default.test"])?;
    for name in &names {
        pki.issue_as(name, &[name])?;
    }
    import(&pki, &["--redis", &redis.url()]).await?;
    let server =
        TestServer::start(&redis_config(&pki, spawn_echo_backend().await?, &[redis.url()], false, ""), pki.dir.path())
            .await?;
    print_selection_latency(&server, &names, "Redis plugin").await?;
    assert_eq!(server.plugin_stats().count(Outcome::Found), names.len() as u64);
    Ok(())
}

/// [`redis_config`] with `grants.routes = { <routes> }` for the plugin.
fn with_route_grants(config: String, routes: &str) -> String {
    config.replacen("grants.kv =", &format!("grants.routes = {{ {routes} }}\ngrants.kv ="), 1)
}

/// Runs one write command (`SET`, `HSET`) and checks that Redis accepted it.
async fn store(redis: &RedisServer, command: &[&str]) -> anyhow::Result<()> {
    let reply = redis.command(command).await?;
    anyhow::ensure!(reply.starts_with('+') || reply.starts_with(':'), "{command:?}: {reply}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_beside_the_certificate_hold_its_route_and_its_rsa_member() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let names =
        ["default.test", "routed.example.test", "plain.example.test", "dual.example.test", "*.wild.example.test"];
    let pki = Pki::new(&names)?;
    import(&pki, &["--redis", &redis.url()]).await?;
    let (listener, routed) = (Named::start("listener", None).await?, Named::start("routed", None).await?);
    let origin = format!("http://127.0.0.1:{}", routed.addr.port());
    // Beside `cert:{name}.crt` and `cert:{name}.key`: `cert:{name}.route`, `cert:{name}.crt.rsa|.key.rsa`.
    store(&redis, &["SET", "cert:routed.example.test.route", &format!("origin {origin}\n")]).await?;
    store(&redis, &["SET", "cert:*.wild.example.test.route", &format!("# the wildcard's route\norigin {origin}")])
        .await?;
    let (rsa_chain, rsa_key) = pki.ca.issue_with_key(&["dual.example.test"], &rsa_key().await?)?;
    store(&redis, &["SET", "cert:dual.example.test.crt.rsa", &rsa_chain]).await?;
    store(&redis, &["SET", "cert:dual.example.test.key.rsa", &rsa_key]).await?;

    let config = redis_config(&pki, listener.addr, &[redis.url()], false, "");
    let config = with_route_grants(config, &format!("origins = [\"{origin}\"]"));
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let routes = [
        ("routed.example.test", "routed routed.example.test"),
        ("x.wild.example.test", "routed x.wild.example.test"),
        ("plain.example.test", "listener plain.example.test"),
        ("dual.example.test", "listener dual.example.test"),
    ];
    assert_routes_and_rsa_member(server.addr, &pki, &routes, "dual.example.test", &rsa_chain).await?;
    // A name without an RSA member has nothing to offer such a client.
    assert!(connect(server.addr, &rsa_only_client(&pki)?, "plain.example.test").await.is_err());
    assert_eq!(server.plugin_stats().count(Outcome::Found), 4, "one call per name, the route cached with it");
    assert_eq!((routed.hits(), listener.hits()), (2, 2));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_fields_hold_the_route_the_rsa_member_and_passthrough_targets() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let pki = Pki::new(&["default.test", "pooled.example.test", "plain.example.test", "dual.example.test"])?;
    let pem = |name: &str| -> anyhow::Result<(String, String)> {
        let read = |ext: &str| std::fs::read_to_string(pki.certs().join(format!("{name}.{ext}")));
        Ok((read("crt")?, read("key")?))
    };
    let (listener, pooled) = (Named::start("listener", None).await?, Named::start("pooled", None).await?);
    let pass_ca = TestCa::new("passthrough CA")?;
    let passthrough = Named::start("passthrough", Some(server_tls(&pass_ca, &["pass.example.test"])?)).await?;
    let (chain, key) = pem("pooled.example.test")?;
    store(&redis, &["HSET", "cert:pooled.example.test", "crt", &chain, "key", &key, "route", "pool blue"]).await?;
    let (chain, key) = pem("plain.example.test")?;
    store(&redis, &["HSET", "cert:plain.example.test", "crt", &chain, "key", &key]).await?;
    let (chain, key) = pem("dual.example.test")?;
    let (rsa_chain, rsa_key) = pki.ca.issue_with_key(&["dual.example.test"], &rsa_key().await?)?;
    store(
        &redis,
        &["HSET", "cert:dual.example.test", "crt", &chain, "key", &key, "rsa_crt", &rsa_chain, "rsa_key", &rsa_key],
    )
    .await?;
    // A passthrough name needs no certificate at all.
    store(&redis, &["HSET", "cert:pass.example.test", "route", &format!("passthrough {}", passthrough.addr)]).await?;

    let settings = ", layout = \"hash\", hash_key = \"cert:{name}\"";
    let config = redis_config(&pki, listener.addr, &[redis.url()], false, settings);
    let config = with_route_grants(config, &format!("pools = [\"blue\"], passthrough = [\"{}\"]", passthrough.addr))
        + &format!("\n[[upstream]]\nname = \"blue\"\nservers = [\"{}\"]\n", pooled.addr);
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let routes = [
        ("pooled.example.test", "pooled pooled.example.test"),
        ("plain.example.test", "listener plain.example.test"),
        ("dual.example.test", "listener dual.example.test"),
    ];
    assert_routes_and_rsa_member(server.addr, &pki, &routes, "dual.example.test", &rsa_chain).await?;
    assert_passed_through(server.addr, &pass_ca, "pass.example.test").await?;
    assert_eq!(server.plugin_stats().count(Outcome::Found), 4);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_stored_route_fails_the_handshake_with_a_message_naming_where_it_is() -> anyhow::Result<()> {
    let redis = RedisServer::start().await?;
    let pki = Pki::new(&["default.test", "bad.example.test", "empty.example.test"])?;
    import(&pki, &["--redis", &redis.url()]).await?;
    store(&redis, &["SET", "cert:bad.example.test.route", "teleport 127.0.0.1:1"]).await?;
    store(&redis, &["SET", "cert:empty.example.test.route", "pool"]).await?;
    let config = redis_config(&pki, spawn_echo_backend().await?, &[redis.url()], false, "");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let client = pki.client(&[]);
    for name in ["bad.example.test", "empty.example.test"] {
        let err = connect(server.addr, &client, name).await.expect_err("a malformed route fails the handshake");
        assert_eq!(alert_of(&err), Some(REFUSED), "{name}: {err}");
    }
    assert_eq!(server.plugin_stats().errors(), 2);
    let plugin = server.plugins[0].1.current();
    let message = |name: &'static str| {
        let plugin = plugin.clone();
        async move {
            let name = tern::sni::ServerName::parse(name).map_err(|e| anyhow::anyhow!("{e}"))?;
            match plugin.select(&name, "main").await {
                Err(tern::plugin::PluginError::Returned(message)) => anyhow::Ok(message),
                other => anyhow::bail!("expected the plugin's error, got {other:?}"),
            }
        }
    };
    let bad = message("bad.example.test").await?;
    let want = "key \"cert:bad.example.test.route\" (route of bad.example.test): expected `pool NAME`, \
                `origin URL` or `passthrough HOST:PORT`, got \"teleport 127.0.0.1:1\"";
    assert!(bad.contains(want), "{bad}");
    let empty = message("empty.example.test").await?;
    let want = "key \"cert:empty.example.test.route\" (route of empty.example.test): expected";
    assert!(empty.contains(want) && empty.ends_with("got \"pool\""), "{empty}");

    // The hash layout names the field and the hash.
    let (chain, key) = pki.ca.issue(&["h.example.test"])?;
    store(&redis, &["HSET", "cert:h.example.test", "crt", &chain, "key", &key, "route", "origin"]).await?;
    let url = redis.url();
    let mut args = vec!["plugin", "call", REDIS_PLUGIN, "h.example.test", "--redis", &url, "--kv-prefix", "cert:"];
    args.extend(["--setting", "layout=hash", "--setting", "hash_key=cert:{name}"]);
    let output = run_command(tern(&args)).await?;
    assert!(!output.status.success());
    assert!(
        text(&output).contains("field \"route\" of hash \"cert:h.example.test\" (route of h.example.test): expected"),
        "{}",
        text(&output)
    );
    Ok(())
}

/// Redis killed while misses keep coming (so the plugin's breaker opens), then started again: a name nobody asked
/// for yet must be served within about a second of Redis answering, while the load goes on. Before the breaker
/// probed the store and the client's reconnect delay was capped, this took 7.7–9.1 s (the breaker's 5 s cooldown,
/// and a trial failing on a client still waiting out its reconnect backoff).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_served_again_soon_after_redis_returns_with_the_breaker_open() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let mut redis = RedisServer::start().await?;
    let pki = Pki::new(&["default.test", "later.example.test"])?;
    import(&pki, &["--redis", &redis.url()]).await?;
    let server =
        TestServer::start(&redis_config(&pki, spawn_echo_backend().await?, &[redis.url()], false, ""), pki.dir.path())
            .await?;
    redis.kill().await?;
    // Misses for names nobody has, from two loops, all the while.
    let (stop, made) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let mut load = tokio::task::JoinSet::new();
    for worker in 0..2 {
        let (stop, made, client, addr) = (stop.clone(), made.clone(), pki.client(&[]), server.addr);
        load.spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let name = format!("miss-{worker}-{i}.example.test");
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), handshake(addr, &client, Some(&name), "default.test"))
                        .await;
                made.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let opened = Instant::now();
    while server.plugin_stats().count(Outcome::CircuitOpen) == 0 {
        anyhow::ensure!(opened.elapsed() < Duration::from_secs(20), "the breaker never opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Open for a while: the cooldown (5 s) is not what ends it.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    redis.restart().await?;
    let back = Instant::now();
    import(&pki, &["--redis", &redis.url()]).await?;
    let imported = back.elapsed();
    let client = pki.client(&[]);
    let served = loop {
        if let Ok(stream) = handshake(server.addr, &client, Some("later.example.test"), "later.example.test").await
            && served_leaf(&stream) == pki.leaf("later.example.test")
        {
            break back.elapsed();
        }
        anyhow::ensure!(back.elapsed() < Duration::from_secs(20), "never served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    stop.store(true, Ordering::SeqCst);
    while load.join_next().await.is_some() {}
    println!(
        "served {served:?} after Redis answered again (its data was back after {imported:?}), under {} misses",
        made.load(Ordering::SeqCst)
    );
    assert!(served < Duration::from_secs(2), "served only {served:?} after Redis was back");
    Ok(())
}
