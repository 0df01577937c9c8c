//! A misbehaving plugin fails only the handshake that needed it: alert, counter, and everyone else unaffected.

use std::time::{Duration, Instant};

use tern::demo::spawn_echo_backend;

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
    assert_eq!((counter(&stats.traps), counter(&stats.errors), counter(&stats.found)), (1, 1, 1));
    assert_eq!(counter(&server.metrics.handshake_failures.plugin), 2);
    // Failures are not cached: asking again calls the plugin again.
    connect(server.addr, &client, "trap.example.test").await.unwrap_err();
    assert_eq!(counter(&stats.traps), 2);
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
    assert_eq!((counter(&stats.timeouts), counter(&stats.found)), (1, GOOD.len() as u64));
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
    assert_eq!(counter(&server.plugin_stats().memory_limits), 1);
    connect(server.addr, &client, "g1.test").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_pem_mismatched_key_and_wrong_name_are_refused_and_not_cached() -> anyhow::Result<()> {
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
    assert_eq!(counter(&server.metrics.handshake_failures.bad_certificate), 4);
    assert_eq!(counter(&server.plugin_stats().calls), 4, "refused answers must not be cached");
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
    assert_eq!(counter(&server.plugin_stats().errors), 1);
    Ok(())
}
