//! The certificate cache: hits never call the plugin, concurrent misses share one call; latency figures.

use tern_fixtures::spawn_echo_backend;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_hit_does_not_call_the_plugin() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let server = start_default(&pki).await?;
    let client = pki.client(&[]);
    for _ in 0..5 {
        let stream = connect(server.addr, &client, "a.test").await?;
        assert_eq!(served_leaf(&stream), pki.leaf("a.test"));
    }
    assert_eq!(server.plugin_stats().calls(), 1);
    assert_eq!((counter(&server.metrics.cache_misses), counter(&server.metrics.cache_hits)), (1, 4));
    // Case and a trailing dot do not make a new cache entry.
    connect(server.addr, &client, "A.Test.").await.map(|_| ()).or_else(|e| {
        // rustls clients may refuse to send a trailing dot; the normalisation itself is unit-tested.
        if e.kind() == std::io::ErrorKind::InvalidInput { Ok(()) } else { Err(e) }
    })?;
    assert_eq!(server.plugin_stats().calls(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_name_make_one_plugin_call() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "slow.test"])?;
    let config = config_with(
        &pki,
        spawn_echo_backend().await?,
        CHAOS_PLUGIN,
        "timeout = \"5s\"",
        "default_certificate = \"default\"",
    );
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let client = pki.client(&[]);
    // The chaos plugin takes 1.5 s on slow.*: all these handshakes arrive while the first call runs.
    let handshakes: Vec<_> = (0..12)
        .map(|_| {
            let (addr, client) = (server.addr, client.clone());
            tokio::spawn(async move { connect(addr, &client, "slow.test").await.map(|s| served_leaf(&s)) })
        })
        .collect();
    for handshake in handshakes {
        assert_eq!(handshake.await??, pki.leaf("slow.test"));
    }
    assert_eq!(server.plugin_stats().calls(), 1);
    Ok(())
}

/// Prints (does not assert) selection latency: cache miss (fresh instance + plugin call + file reads + parse and
/// validation) and cache hit. For real figures run it optimised:
/// `cargo test --release -p tern-e2e --test e2e -- --nocapture selection_latency`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selection_latency_figures() -> anyhow::Result<()> {
    const N: usize = 300;
    let pki = Pki::new(&["default.test"])?;
    let names: Vec<String> = (0..N).map(|i| format!("host{i}.example.test")).collect();
    for name in &names {
        pki.issue_as(name, &[name])?;
    }
    let server =
        TestServer::start(&basic_config(&pki, spawn_echo_backend().await?, "strict = true"), pki.dir.path()).await?;
    print_selection_latency(&server, &names, "file-path plugin").await?;
    assert_eq!(server.plugin_stats().calls(), N as u64);
    Ok(())
}
