//! Operating tern: admin API, Prometheus metrics, hot swap (admin reload, file watch) under load.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tern_fixtures::spawn_echo_backend;

use crate::support::*;

const TOKEN: &str = "admin-secret";

fn admin_section() -> String {
    format!("\n[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_valid_prometheus_text_and_move_with_traffic() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.example.test", "b.example.test"])?;
    let config =
        basic_config(&pki, spawn_echo_backend().await?, "default_certificate = \"default\"") + &admin_section();
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let admin_addr = server.admin_addr();
    assert_eq!(admin(admin_addr, "GET", "/metrics", None).await?.0, 401, "metrics need the token");
    assert_eq!(admin(admin_addr, "GET", "/healthz", None).await?, (200, "ok\n".into()));
    let client = pki.client(&[b"h2"]);
    for name in ["a.example.test", "a.example.test", "b.example.test"] {
        let (status, _, _) = get(connect(server.addr, &client, name).await?, name, "/").await?;
        assert_eq!(status, 200);
    }
    let (status, text) = admin(admin_addr, "GET", "/metrics", Some(TOKEN)).await?;
    assert_eq!(status, 200);
    assert_eq!(sample(&text, "tern_handshakes_total", &[("outcome", "ok")]), 3.0);
    assert_eq!(sample(&text, "tern_tls_version_total", &[("version", "1.3")]), 3.0);
    assert_eq!(sample(&text, "tern_selections_total", &[("how", "cache_miss")]), 2.0);
    assert_eq!(sample(&text, "tern_selections_total", &[("how", "cache_hit")]), 1.0);
    assert_eq!(sample(&text, "tern_plugin_calls_total", &[("plugin", "files"), ("outcome", "found")]), 2.0);
    // Where the misses' time went: one instantiation and one run per call, none for the hit.
    let line = |name: &str| {
        let prefix = format!("{name}{{plugin=\"files\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.parse::<f64>().ok())
    };
    assert_eq!(line("tern_plugin_instantiate_seconds_count"), Some(2.0), "{text}");
    assert_eq!(line("tern_plugin_run_seconds_count"), Some(2.0), "{text}");
    assert!(line("tern_plugin_run_seconds_sum").is_some_and(|s| s > 0.0), "{text}");
    assert_eq!(sample(&text, "tern_backend_responses_total", &[("class", "2xx")]), 3.0);
    assert_eq!(sample(&text, "tern_cache_entries", &[]), 2.0);
    // A refused handshake moves its own counter.
    let strict = TestServer::start(
        &(basic_config(&pki, spawn_echo_backend().await?, "strict = true") + &admin_section()),
        pki.dir.path(),
    )
    .await?;
    assert!(connect(strict.addr, &client, "nobody.example.test").await.is_err());
    let (_, text) = admin(strict.admin_addr(), "GET", "/metrics", Some(TOKEN)).await?;
    assert_eq!(sample(&text, "tern_handshakes_total", &[("outcome", "unknown_name")]), 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_lookup_shows_metadata_only_and_purge_forces_a_new_plugin_call() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.example.test"])?;
    let config =
        basic_config(&pki, spawn_echo_backend().await?, "default_certificate = \"default\"") + &admin_section();
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let admin_addr = server.admin_addr();
    connect(server.addr, &pki.client(&[]), "a.example.test").await?;
    let (status, body) = admin(admin_addr, "GET", "/cache/lookup?name=a.example.test", Some(TOKEN)).await?;
    assert_eq!(status, 200, "{body}");
    let lookup: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(lookup["cached"][0]["answer"], "found", "{body}");
    assert_eq!(lookup["cached"][0]["dns_names"][0], "a.example.test", "{body}");
    assert_eq!(lookup["cached"][0]["issuer"], "CN=tern test CA", "{body}");
    assert!(!body.contains("PRIVATE KEY") && !body.contains("BEGIN"), "no PEM may leave the admin API: {body}");
    let (status, _) = admin(admin_addr, "POST", "/cache/purge?name=a.example.test", Some(TOKEN)).await?;
    assert_eq!(status, 200);
    connect(server.addr, &pki.client(&[]), "a.example.test").await?;
    assert_eq!(server.plugin_stats().calls(), 2, "purged name asks the plugin again");
    let (status, body) = admin(admin_addr, "GET", "/plugins", Some(TOKEN)).await?;
    assert_eq!(status, 200);
    let plugins: serde_json::Value = serde_json::from_str(&body)?;
    assert_eq!(plugins[0]["status"]["name"], "files");
    assert_eq!(plugins[0]["status"]["sha256"].as_str().map(str::len), Some(64), "{body}");
    Ok(())
}

/// Handshakes in a loop until stopped; counts successes and failures.
fn handshake_loop(
    addr: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    names: Vec<&'static str>,
    stop: Arc<AtomicBool>,
) -> (Arc<AtomicU64>, Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (ok2, failed2) = (ok.clone(), failed.clone());
    let task = tokio::spawn(async move {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let name = names[i % names.len()];
            i += 1;
            match connect(addr, &client, name).await {
                Ok(_) => ok2.fetch_add(1, Ordering::Relaxed),
                Err(err) => {
                    eprintln!("handshake for {name} failed: {err}");
                    failed2.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    });
    (ok, failed, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_the_plugin_under_load_fails_no_handshake_and_a_broken_build_is_rejected() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.example.test", "b.example.test"])?;
    // Version 2 of every certificate sits beside version 1; the new plugin config serves version 2.
    for name in ["a.example.test", "b.example.test"] {
        pki.issue_as(&format!("{name}.v2"), &[name])?;
    }
    let plugin_copy = pki.path("plugin.wasm");
    std::fs::copy(FILE_PATH_PLUGIN, &plugin_copy)?;
    let v1 = basic_config(&pki, spawn_echo_backend().await?, "default_certificate = \"default\"")
        .replace(FILE_PATH_PLUGIN, &plugin_copy.to_string_lossy())
        .replace("[[listener]]", "on_swap = \"flush\"\nprobe_names = [\"a.example.test\"]\n\n[[listener]]")
        + &admin_section();
    let server = TestServer::start(&v1, pki.dir.path()).await?;
    let admin_addr = server.admin_addr();
    let client = pki.client(&[]);
    assert_eq!(served_leaf(&connect(server.addr, &client, "a.example.test").await?), pki.leaf("a.example.test"));

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed, looping) =
        handshake_loop(server.addr, client.clone(), vec!["a.example.test", "b.example.test"], stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    // New logic: read <name>.v2.crt / .key.
    let v2 = v1.replace(
        "grants.files =",
        "settings = { cert_template = \"{name}.v2.crt\", key_template = \"{name}.v2.key\" }\ngrants.files =",
    );
    std::fs::write(pki.path("tern.toml"), &v2)?;
    let (status, report) = admin(admin_addr, "POST", "/reload", Some(TOKEN)).await?;
    assert_eq!(status, 200, "{report}");
    assert!(report.contains("\"swapped\": [\n    \"files\""), "{report}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(served_leaf(&connect(server.addr, &client, "a.example.test").await?), pki.leaf("a.example.test.v2"));

    // A broken build is rejected; the running one keeps serving.
    std::fs::write(&plugin_copy, b"\0asm garbage")?;
    let (status, report) = admin(admin_addr, "POST", "/reload", Some(TOKEN)).await?;
    assert_eq!(status, 422, "{report}");
    assert!(report.contains("cannot compile"), "{report}");
    // A build that compiles but fails its probe is rejected too.
    std::fs::copy(FILE_PATH_PLUGIN, &plugin_copy)?;
    std::fs::write(pki.path("tern.toml"), v2.replace("{name}.v2.crt", "{name}.v3.crt"))?;
    let (status, report) = admin(admin_addr, "POST", "/reload", Some(TOKEN)).await?;
    assert_eq!(status, 422, "{report}");
    assert!(report.contains("probe a.example.test"), "{report}");
    tokio::time::sleep(Duration::from_millis(200)).await;

    stop.store(true, Ordering::Relaxed);
    looping.await?;
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("handshakes during a swap and two rejected reloads: {ok} ok, {failed} failed");
    assert!(ok > 20, "the loop ran ({ok} handshakes)");
    assert_eq!(failed, 0);
    assert_eq!(served_leaf(&connect(server.addr, &client, "b.example.test").await?), pki.leaf("b.example.test.v2"));
    let (_, plugins) = admin(admin_addr, "GET", "/plugins", Some(TOKEN)).await?;
    assert!(plugins.contains("probe a.example.test"), "last error shown: {plugins}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_plugin_file_is_picked_up_by_the_watcher() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "chaos.example.test"])?;
    let plugin_copy = pki.path("plugin.wasm");
    std::fs::copy(FILE_PATH_PLUGIN, &plugin_copy)?;
    let config = basic_config(&pki, spawn_echo_backend().await?, "default_certificate = \"default\"")
        .replace(FILE_PATH_PLUGIN, &plugin_copy.to_string_lossy())
        // Flush on swap: the old build's "not found" for trap.example.test must not outlive it.
        .replace("[[listener]]", "on_swap = \"flush\"\n\n[[listener]]")
        + "\n[reload]\nwatch = true\nwatch_interval = \"100ms\"\n";
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let client = pki.client(&[]);
    connect(server.addr, &client, "chaos.example.test").await?;
    assert_eq!(server.plugin_stats().traps(), 0);
    // Replace the component with the chaos plugin: its "trap" names trap, which the file-path plugin never does.
    let changed = Instant::now();
    std::fs::copy(CHAOS_PLUGIN, &plugin_copy)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let _ = connect(server.addr, &client, "trap.example.test").await;
        if server.plugin_stats().traps() > 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the new build never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("file change to new plugin serving: {:?} (watch interval 100 ms)", changed.elapsed());
    Ok(())
}
