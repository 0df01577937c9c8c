//! The certificate cache: hits never call the plugin, concurrent misses share one call; latency figures.

use std::time::{Duration, Instant};

use tern::demo::spawn_echo_backend;
use tern::select::Policy;

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
    assert_eq!(counter(&server.plugin_stats().calls), 1);
    assert_eq!((counter(&server.metrics.cache_misses), counter(&server.metrics.cache_hits)), (1, 4));
    // Case and a trailing dot do not make a new cache entry.
    connect(server.addr, &client, "A.Test.").await.map(|_| ()).or_else(|e| {
        // rustls clients may refuse to send a trailing dot; the normalisation itself is unit-tested.
        if e.kind() == std::io::ErrorKind::InvalidInput { Ok(()) } else { Err(e) }
    })?;
    assert_eq!(counter(&server.plugin_stats().calls), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_for_one_name_make_one_plugin_call() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "slow.test"])?;
    let config = config_with(&pki, spawn_echo_backend().await?, CHAOS_PLUGIN, "", "default_certificate = \"default\"");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let client = pki.client(&[]);
    // The chaos plugin sleeps 300 ms on slow.*: all these handshakes arrive while the first call runs.
    let handshakes: Vec<_> = (0..12)
        .map(|_| {
            let (addr, client) = (server.addr, client.clone());
            tokio::spawn(async move { connect(addr, &client, "slow.test").await.map(|s| served_leaf(&s)) })
        })
        .collect();
    for handshake in handshakes {
        assert_eq!(handshake.await??, pki.leaf("slow.test"));
    }
    assert_eq!(counter(&server.plugin_stats().calls), 1);
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
    let selector = server.selector.clone();
    let policy = Policy { plugin: Some(server.plugins[0].1.clone()), default: None };
    let mut misses = Vec::with_capacity(N);
    let mut hits = Vec::with_capacity(N);
    for round in [&mut misses, &mut hits] {
        for name in &names {
            let started = Instant::now();
            selector.select(&policy, Some(name)).await?;
            round.push(started.elapsed());
        }
    }
    let (miss50, miss99) = percentiles(&mut misses);
    let (hit50, hit99) = percentiles(&mut hits);
    let build = if cfg!(debug_assertions) { "debug build" } else { "release build" };
    println!("selection latency over {N} names ({build}):");
    println!("  cache miss (plugin call + parse): median {miss50:?}, p99 {miss99:?}");
    println!("  cache hit:                        median {hit50:?}, p99 {hit99:?}");
    assert_eq!(counter(&server.plugin_stats().calls), N as u64);
    Ok(())
}

fn percentiles(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    (at(0.5), at(0.99))
}
