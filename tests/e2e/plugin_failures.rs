//! A misbehaving plugin fails only the handshake that needed it: alert, counter, and everyone else unaffected.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tern::failure::FailureKind;
use tern::plugin::Outcome;

use tern_fixtures::spawn_echo_backend;

use crate::support::*;

fn chaos_config(pki: &Pki, backend: std::net::SocketAddr, plugin_keys: &str) -> String {
    config_with(pki, backend, CHAOS_PLUGIN, plugin_keys, "default_certificate = \"default\"")
}

const GOOD: [&str; 8] = ["g0.test", "g1.test", "g2.test", "g3.test", "g4.test", "g5.test", "g6.test", "g7.test"];

fn pki_with_good_names() -> anyhow::Result<Pki> {
    let pki = Pki::new(&["default.test", "slow.test"])?;
    for name in GOOD {
        pki.issue_as(name, &[name])?;
    }
    Ok(pki)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_fails_one_handshake_with_an_alert_and_is_counted() -> anyhow::Result<()> {
    let pki = pki_with_good_names()?;
    let server = TestServer::start(&chaos_config(&pki, spawn_echo_backend().await?, ""), pki.dir.path()).await?;
    let client = pki.client(&[]);
    let err = connect(server.addr, &client, "trap.example.test").await.unwrap_err();
    assert_eq!(alert_of(&err), Some(REFUSED), "{err}");
    let err = connect(server.addr, &client, "error.example.test").await.unwrap_err();
    assert_eq!(alert_of(&err), Some(REFUSED), "{err}");
    connect(server.addr, &client, "g0.test").await?;
    let stats = server.plugin_stats();
    assert_eq!((stats.traps(), stats.errors(), stats.count(Outcome::Found)), (1, 1, 1));
    assert_eq!(counter(server.metrics.handshake_failures.by(FailureKind::Plugin)), 2);
    // Failures are not cached: asking again calls the plugin again.
    connect(server.addr, &client, "trap.example.test").await.unwrap_err();
    assert_eq!(stats.traps(), 2);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_spinning_forever_on_one_name_does_not_delay_other_names() -> anyhow::Result<()> {
    let pki = pki_with_good_names()?;
    let server =
        TestServer::start(&chaos_config(&pki, spawn_echo_backend().await?, "timeout = \"2s\""), pki.dir.path()).await?;
    let client = pki.client(&[]);
    let started = Instant::now();
    let spinning = {
        let (addr, client) = (server.addr, client.clone());
        tokio::spawn(async move {
            let result = connect(addr, &client, "loop.example.test").await;
            (result.map(|_| ()), Instant::now())
        })
    };
    // Let the spinning call start, then run misses for other names while it spins.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut others = Vec::new();
    for name in GOOD {
        let (addr, client) = (server.addr, client.clone());
        others.push(tokio::spawn(async move { (connect(addr, &client, name).await.map(|_| ()), Instant::now()) }));
    }
    let mut last_other = started;
    for other in others {
        let (result, finished) = other.await?;
        result?;
        last_other = last_other.max(finished);
    }
    let (spin_result, spin_finished) = spinning.await?;
    let err = spin_result.unwrap_err();
    assert_eq!(alert_of(&err), Some(REFUSED), "{err}");
    assert!(last_other < spin_finished, "other names completed only after the spinning call ended");
    println!(
        "other names done {:?} after start; spinning call cut off after {:?}",
        last_other - started,
        spin_finished - started
    );
    let stats = server.plugin_stats();
    assert_eq!((stats.count(Outcome::Timeout), stats.count(Outcome::Found)), (1, GOOD.len() as u64));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_hits_the_cap_and_is_counted() -> anyhow::Result<()> {
    let pki = pki_with_good_names()?;
    let config = chaos_config(&pki, spawn_echo_backend().await?, "memory_limit = \"16MiB\"");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let client = pki.client(&[]);
    let err = connect(server.addr, &client, "bomb.example.test").await.unwrap_err();
    assert_eq!(alert_of(&err), Some(REFUSED), "{err}");
    assert_eq!(server.plugin_stats().count(Outcome::MemoryLimit), 1);
    connect(server.addr, &client, "g1.test").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_pem_mismatched_key_and_wrong_name_are_refused_and_cached_briefly() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "mismatch.test", "other.test"])?;
    let certs = pki.certs();
    std::fs::write(
        certs.join("garbage.test.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )?;
    std::fs::copy(certs.join("other.test.key"), certs.join("garbage.test.key"))?;
    // mismatch.test's certificate with other.test's key.
    std::fs::copy(certs.join("other.test.key"), certs.join("mismatch.test.key"))?;
    // A valid pair, but for another name.
    std::fs::copy(certs.join("other.test.crt"), certs.join("wrong.test.crt"))?;
    std::fs::copy(certs.join("other.test.key"), certs.join("wrong.test.key"))?;
    let server = start_default(&pki).await?;
    let client = pki.client(&[]);
    for name in ["garbage.test", "mismatch.test", "wrong.test", "garbage.test"] {
        let err = connect(server.addr, &client, name).await.unwrap_err();
        assert_eq!(alert_of(&err), Some(REFUSED), "{name}: {err}");
    }
    assert_eq!(counter(server.metrics.handshake_failures.by(FailureKind::BadCertificate)), 4);
    // The second garbage.test is answered from the refusal cached for cache.invalid_ttl.
    assert_eq!(server.plugin_stats().calls(), 3, "refused answers are cached briefly");
    connect(server.addr, &client, "other.test").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_cannot_read_outside_its_granted_directory() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test"])?;
    // A valid pair right next to the granted directory, and a template that tries to reach it.
    let outside = pki.path("outside");
    std::fs::create_dir_all(&outside)?;
    pki.issue_as("escape.test", &["escape.test"])?;
    for ext in ["crt", "key"] {
        std::fs::rename(pki.certs().join(format!("escape.test.{ext}")), outside.join(format!("escape.test.{ext}")))?;
    }
    let base = basic_config(&pki, spawn_echo_backend().await?, "default_certificate = \"default\"");
    let config = base.replace(
        "grants.files =",
        "settings = { cert_template = \"../outside/{name}.crt\", key_template = \"../outside/{name}.key\" }\ngrants.files =",
    );
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let err = connect(server.addr, &pki.client(&[]), "escape.test").await.unwrap_err();
    assert_eq!(alert_of(&err), Some(REFUSED), "{err}");
    assert_eq!(server.plugin_stats().errors(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_that_keeps_failing_trips_the_breaker_and_recovers() -> anyhow::Result<()> {
    let pki = pki_with_good_names()?;
    // A cooldown long enough that the next handshake surely lands while the breaker is open, even under load.
    let keys = "breaker_threshold = 3\nbreaker_cooldown = \"2s\"";
    let server = TestServer::start(&chaos_config(&pki, spawn_echo_backend().await?, keys), pki.dir.path()).await?;
    let client = pki.client(&[]);
    // Traps count against the plugin (errors it returns for a name do not: a client can choose those names).
    for i in 0..3 {
        let err = connect(server.addr, &client, &format!("trap.n{i}.test")).await.unwrap_err();
        assert_eq!(alert_of(&err), Some(REFUSED), "{err}");
    }
    // Open: a good name is not even asked; the listener's default certificate answers at once.
    let stream = sni_verified_as(server.addr, &pki, "g0.test", "default.test").await?;
    assert_eq!(served_leaf(&stream), pki.leaf("default.test"));
    let stats = server.plugin_stats();
    assert_eq!((stats.calls(), stats.count(Outcome::CircuitOpen)), (3, 1));
    // After the cooldown one trial call goes through; it succeeds and closes the breaker.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(served_leaf(&connect(server.addr, &client, "g0.test").await?), pki.leaf("g0.test"));
    assert_eq!(served_leaf(&connect(server.addr, &client, "g1.test").await?), pki.leaf("g1.test"));
    assert_eq!(stats.calls(), 5);
    Ok(())
}

/// A flood of one million distinct random names, straight into the selector (as many handshakes would take
/// minutes on this machine; the SNI reaches the selector the same way). The cache stays within its bounds, the
/// plugin is called no faster than its cap, and a legitimate name keeps being served from the cache throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_random_names_keeps_cache_and_plugin_calls_bounded() -> anyhow::Result<()> {
    const FLOOD: usize = 1_000_000;
    const RATE: u64 = 200;
    let pki = Pki::new(&["default.test", "legit.example.test"])?;
    let config = config_with(
        &pki,
        spawn_echo_backend().await?,
        FILE_PATH_PLUGIN,
        &format!("max_calls_per_second = {RATE}"),
        "default_certificate = \"default\"",
    ) + "\n[cache]\nmax_entries = 1000\nmax_bytes = \"4MiB\"\nmax_negative_entries = 1000\n";
    let server = Arc::new(TestServer::start(&config, pki.dir.path()).await?);
    let default = server.selector.statics().by_id("default").cloned();
    let policy =
        Arc::new(tern::select::Policy { listener: "test".into(), plugin: Some(server.plugins[0].1.clone()), default });
    let (_, source) = server.selector.select(&policy, Some("legit.example.test")).await?;
    assert_eq!(source, tern::select::Source::Plugin);
    let rss_before = rss_kib();
    let started = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let (server, policy) = (server.clone(), policy.clone());
            tokio::spawn(async move {
                for i in 0..FLOOD / 2 {
                    let name = format!("r{w}x{i}.flood.test");
                    server.selector.select(&policy, Some(&name)).await?;
                    if i % 50_000 == 0 {
                        let (_, source) = server.selector.select(&policy, Some("legit.example.test")).await?;
                        anyhow::ensure!(source == tern::select::Source::CacheHit, "legit name not served from cache");
                    }
                }
                Ok(())
            })
        })
        .collect();
    for worker in workers {
        worker.await??;
    }
    let elapsed = started.elapsed();
    server.selector.cache().run_pending_tasks().await;
    let stats = server.plugin_stats();
    let calls = stats.calls();
    let negative = server.selector.cache().negative_entry_count();
    let served = server.selector.cache().entry_count() - negative;
    println!(
        "flood of {FLOOD} names in {elapsed:.1?}: {calls} plugin calls ({} shed by the {RATE}/s cap), {served} served and {negative} negative cache entries, RSS {} -> {} MiB",
        stats.count(Outcome::RateLimited),
        rss_before / 1024,
        rss_kib() / 1024
    );
    assert_eq!(served, 1, "only the legitimate name is served");
    assert!(negative <= 1000, "negative bound held: {negative} entries");
    // A full bucket (one second's worth) plus the refill over the flood's duration.
    let allowed = RATE + (elapsed.as_secs_f64() * RATE as f64).ceil() as u64 + 1;
    assert!(calls <= allowed, "{calls} plugin calls exceed the cap ({allowed} allowed in {elapsed:?})");
    assert_eq!(stats.calls() + stats.count(Outcome::RateLimited), FLOOD as u64 + 1);
    Ok(())
}

/// Resident memory of this process, KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
