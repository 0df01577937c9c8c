//! The `tern` binary: `check`, `plugin call`, and `run` until SIGTERM.

use std::process::Command;

use std::time::Duration;

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_accepts_a_good_config_and_names_file_and_key_of_a_bad_one() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test"])?;
    let good = pki.path("good.toml");
    std::fs::write(&good, basic_config(&pki, "127.0.0.1:9".parse()?, "default_certificate = \"default\""))?;
    let output = run_command(tern(&["check", "-c", &good.to_string_lossy()])).await?;
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("ok (1 listener(s), 1 certificate(s), 1 plugin(s) compiled)"), "{}", text(&output));

    let cases = [
        ("bind = \"127.0.0.1:0\"", "bind = \"nowhere\"", "listener \"main\".bind"),
        ("grants.files", "grantz.files", "unknown field `grantz`"),
        ("[[plugin]]", "[[plugin]]\nmax_concurrency = -1", "max_concurrency"),
    ];
    for (from, to, want) in cases {
        let bad = pki.path("bad.toml");
        std::fs::write(&bad, std::fs::read_to_string(&good)?.replacen(from, to, 1))?;
        let output = run_command(tern(&["check", "-c", &bad.to_string_lossy()])).await?;
        assert!(!output.status.success());
        let out = text(&output);
        assert!(
            out.contains(&bad.display().to_string()) && out.contains(want),
            "want {want:?} and the file in:\n{out}"
        );
    }
    // A plugin file that is not a component is refused by check, with the plugin named.
    let bogus = pki.path("bogus.wasm");
    std::fs::write(&bogus, b"\0asm not really")?;
    let bad = pki.path("bad-plugin.toml");
    std::fs::write(&bad, std::fs::read_to_string(&good)?.replace(FILE_PATH_PLUGIN, &bogus.to_string_lossy()))?;
    let output = run_command(tern(&["check", "-c", &bad.to_string_lossy()])).await?;
    assert!(!output.status.success());
    assert!(
        text(&output).contains("plugin \"files\"") && text(&output).contains("cannot compile"),
        "{}",
        text(&output)
    );
    // [acme] files are checked before anything is ordered: the CA file and the storage folder, each named.
    let acme = |keys: &str| {
        format!(
            "{}\n[acme]\ndirectory = \"https://127.0.0.1:9/dir\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n{keys}",
            std::fs::read_to_string(&good).unwrap_or_default()
        )
    };
    std::fs::write(pki.path("not-a-ca.pem"), "nothing here")?;
    std::fs::write(pki.path("a-file"), "")?;
    let cases = [
        ("directory_path = \"acme\"\nca = \"not-a-ca.pem\"", "acme.ca", "not-a-ca.pem"),
        ("directory_path = \"a-file/acme\"", "acme.directory_path", "a-file/acme"),
    ];
    for (keys, key, file) in cases {
        let bad = pki.path("bad-acme.toml");
        std::fs::write(&bad, acme(keys))?;
        let output = run_command(tern(&["check", "-c", &bad.to_string_lossy()])).await?;
        let out = text(&output);
        assert!(!output.status.success() && out.contains(key) && out.contains(file), "{keys}: {out}");
    }
    let fine = pki.path("acme.toml");
    std::fs::write(&fine, acme("directory_path = \"acme\""))?;
    let output = run_command(tern(&["check", "-c", &fine.to_string_lossy()])).await?;
    assert!(output.status.success(), "{}", text(&output));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_call_prints_what_the_plugin_returned() -> anyhow::Result<()> {
    let pki = Pki::new(&["a.test"])?;
    let certs = pki.certs().to_string_lossy().into_owned();
    let output = run_command(tern(&["plugin", "call", FILE_PATH_PLUGIN, "a.test", "--files", &certs])).await?;
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("validation: ok, covers a.test"), "{}", text(&output));
    assert!(text(&output).contains("contract:   tern:plugin@0.2.0"), "{}", text(&output));
    assert!(text(&output).contains("route:      the listener's backend"), "{}", text(&output));
    // The chaos plugin is built from unchanged 0.1 source against the 0.1 contract, and still answers.
    let output = run_command(tern(&["plugin", "call", CHAOS_PLUGIN, "a.test", "--files", &certs])).await?;
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("contract:   tern:plugin@0.1.0"), "{}", text(&output));
    assert!(text(&output).contains("certificate 1: ECDSA key"), "{}", text(&output));

    std::fs::write(pki.certs().join("a.test.route"), "pool blue\n")?;
    let output = run_command(tern(&["plugin", "call", FILE_PATH_PLUGIN, "a.test", "--files", &certs])).await?;
    assert!(text(&output).contains("route:      pool \"blue\""), "{}", text(&output));

    let output = run_command(tern(&["plugin", "call", FILE_PATH_PLUGIN, "b.test", "--files", &certs])).await?;
    assert!(text(&output).contains("result:     not-found"), "{}", text(&output));

    let setting = ["--setting", "cert_template=x.pem"];
    let output =
        run_command(tern(&["plugin", "call", FILE_PATH_PLUGIN, "a.test", "--files", &certs, setting[0], setting[1]]))
            .await?;
    assert!(!output.status.success());
    assert!(text(&output).contains("does not contain {name}"), "{}", text(&output));

    let output = run_command(tern(&["plugin", "call", CHAOS_PLUGIN, "loop.test", "--timeout", "200ms"])).await?;
    assert!(!output.status.success());
    assert!(text(&output).contains("FAILED (timeout)"), "{}", text(&output));
    let output = run_command(tern(&["plugin", "call", CHAOS_PLUGIN, "trap.test"])).await?;
    assert!(text(&output).contains("chaos: trap requested for trap.test"), "{}", text(&output));
    Ok(())
}

/// Starts `tern run -c config`; returns the child, the main listener's address and its log lines.
pub(crate) async fn spawn_tern(
    config: &std::path::Path,
) -> anyhow::Result<(tokio::process::Child, std::net::SocketAddr, LogLines)> {
    let process = TernProcess::start(config).await?;
    Ok((process.child, process.addr, process.log))
}

async fn signal(child: &tokio::process::Child, name: &str) -> anyhow::Result<()> {
    let pid = child.id().expect("running").to_string();
    let mut kill = Command::new("kill");
    kill.args([&format!("-{name}"), &pid]);
    anyhow::ensure!(run_command(kill).await?.status.success(), "kill -{name} failed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_plugins_and_sigterm_lets_a_slow_request_finish() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    pki.issue_as("a.test.v2", &["a.test"])?;
    let config = pki.path("tern.toml");
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let v1 = basic_config(&pki, backend, "default_certificate = \"default\"")
        .replace("[[listener]]", "on_swap = \"flush\"\n[[listener]]")
        + "\n[admin]\nbind = \"127.0.0.1:0\"\n";
    std::fs::write(&config, &v1)?;
    let TernProcess { mut child, addr, admin, listeners, .. } = TernProcess::start(&config).await?;
    let admin = admin.expect("the config has [admin]");
    // The ready file names every listener with its bound address.
    assert_eq!(listeners, [("main".to_string(), addr)]);
    let readyz = || async move {
        let mut curl = Command::new("curl");
        curl.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://{admin}/readyz")]);
        anyhow::Ok(String::from_utf8_lossy(&run_command(curl).await?.stdout).into_owned())
    };
    assert_eq!(readyz().await?, "200");
    let client = pki.client(&[b"http/1.1"]);
    assert_eq!(served_leaf(&connect(addr, &client, "a.test").await?), pki.leaf("a.test"));

    // SIGHUP: the changed plugin section is rebuilt and swapped in.
    std::fs::write(
        &config,
        v1.replace(
            "grants.files =",
            "settings = { cert_template = \"{name}.v2.crt\", key_template = \"{name}.v2.key\" }\ngrants.files =",
        ),
    )?;
    signal(&child, "HUP").await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while served_leaf(&connect(addr, &client, "a.test").await?) != pki.leaf("a.test.v2") {
        anyhow::ensure!(std::time::Instant::now() < deadline, "SIGHUP did not swap the plugin");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // SIGTERM during a 1.5 s request: the request completes, then tern exits 0.
    let stream = connect(addr, &client, "a.test").await?;
    let slow = tokio::spawn(async move { get(stream, "a.test", "/sleep/1500").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, "TERM").await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(readyz().await?, "503", "readiness fails while draining");
    let (status, _, body) = tokio::time::timeout(Duration::from_secs(10), slow).await???;
    assert_eq!((status.as_u16(), body.as_str()), (200, "slept 1500 ms\n"));
    let exit = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    assert!(exit.success(), "exit status {exit}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_with_json_logs_until_sigterm_and_exits_cleanly() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let config = pki.path("tern.toml");
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let text = basic_config(&pki, backend, "default_certificate = \"default\"") + "\n[log]\nformat = \"json\"\n";
    std::fs::write(&config, text)?;
    let (mut child, addr, log) = spawn_tern(&config).await?;
    let stream = connect(addr, &pki.client(&[b"h2"]), "a.test").await?;
    let (status, _, _) = get(stream, "a.test", "/json-logs").await?;
    assert_eq!(status, 200);
    // A refused handshake gets its own line too.
    assert!(handshake(addr, &pki.client(&[]), Some("nobody.test"), "nobody.test").await.is_err());
    signal(&child, "TERM").await?;
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    assert!(status.success(), "exit status {status}");
    let lines = log.lock().expect("test lock").clone();
    let records: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l))
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("{e}: {lines:?}"))?;
    let access = records
        .iter()
        .find(|r| r["target"] == "tern::access")
        .ok_or_else(|| anyhow::anyhow!("no access line in {lines:?}"))?;
    assert_eq!(access["fields"]["path"], "/json-logs");
    assert_eq!(access["fields"]["status"], 200);
    assert_eq!(access["fields"]["host"], "a.test");
    assert_eq!(access["fields"]["upstream"], format!("http://{backend}/"), "the upstream chosen is logged");
    assert!(!lines.iter().any(|l| l.contains("PRIVATE KEY") || l.contains("BEGIN")), "no PEM in logs: {lines:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_errors_name_the_file_print_each_cause_once_and_never_a_backtrace() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test"])?;
    let config = pki.path("tern.toml");
    let base = basic_config(&pki, tern_fixtures::spawn_echo_backend().await?, "default_certificate = \"default\"");
    let check = |text: String| {
        let config = config.clone();
        async move {
            std::fs::write(&config, text)?;
            let mut command = tern(&["check", "-c", &config.to_string_lossy()]);
            command.env("RUST_BACKTRACE", "1");
            let output = run_command(command).await?;
            anyhow::ensure!(!output.status.success(), "check accepted it");
            anyhow::Ok(self::text(&output))
        }
    };
    let missing = pki.path("missing.wasm");
    let unread = check(base.replace(FILE_PATH_PLUGIN, &missing.to_string_lossy())).await?;
    assert!(unread.contains("cannot read") && unread.contains("missing.wasm"), "{unread}");
    assert!(!unread.contains("cannot compile"), "{unread}");
    let garbage = pki.path("garbage.wasm");
    std::fs::write(&garbage, b"this is a text file, not a plugin")?;
    let not_wasm = check(base.replace(FILE_PATH_PLUGIN, &garbage.to_string_lossy())).await?;
    assert!(not_wasm.contains("not a WebAssembly file") && !not_wasm.contains("0x"), "no byte dump: {not_wasm}");
    for out in [&unread, &not_wasm] {
        assert!(!out.to_lowercase().contains("backtrace"), "{out}");
        assert_eq!(out.trim().lines().count(), 1, "one line, each cause once: {out}");
    }
    // Importing a directory without one valid pair is a failure, not "imported 0".
    let redis = crate::redis_support::RedisServer::start().await?;
    let empty = pki.path("empty");
    std::fs::create_dir_all(&empty)?;
    let output = run_command(tern(&["certs", "import", &empty.to_string_lossy(), "--redis", &redis.url()])).await?;
    assert!(!output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("nothing imported"), "{}", text(&output));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_config_file_the_file_at_fault_and_a_store_that_is_down() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test"])?;
    let config = pki.path("tern.toml");
    std::fs::write(
        &config,
        basic_config(&pki, tern_fixtures::spawn_echo_backend().await?, "default_certificate = \"default\""),
    )?;
    // A corrupt key: the key file is blamed, and the config file that named it is said too.
    let key = pki.certs().join("default.test.key");
    std::fs::write(&key, "-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")?;
    let out = text(&run_command(tern(&["check", "-c", &config.to_string_lossy()])).await?);
    assert!(out.contains(&config.display().to_string()), "the config file: {out}");
    assert!(out.contains(&key.display().to_string()), "the key file, not the certificate: {out}");
    assert!(!out.contains("default.test.crt"), "{out}");
    // A Redis that refuses connections is reported as down, not as a plugin that did not answer in time.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let url = format!("redis://{closed}");
    let output = run_command(tern(&["plugin", "call", REDIS_PLUGIN, "a.test", "--redis", &url])).await?;
    assert!(!output.status.success());
    let out = text(&output);
    assert!(out.contains(&url) && out.contains("does not answer"), "{out}");
    assert!(!out.contains("did not answer within"), "{out}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_systemd_unit_verifies_clean() -> anyhow::Result<()> {
    let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/systemd/tern.service"))?;
    for hardening in ["NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=CAP_NET_BIND_SERVICE"] {
        assert!(unit.contains(hardening), "{hardening}");
    }
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"), "reload is SIGHUP");
    assert!(unit.contains("Type=notify") && unit.contains("NotifyAccess=all"), "the upgrade's successor tells systemd");
    let socket = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../dist/systemd/tern.socket"))?;
    // Verified as installed, with this build's binary where the unit expects /usr/local/bin/tern.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("tern.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/tern", TERN))?;
    std::fs::write(dir.path().join("tern.socket"), socket)?;
    let mut command = Command::new("systemd-analyze");
    command.arg("verify").arg(&path).arg(dir.path().join("tern.socket"));
    let output = run_command(command).await?;
    assert!(output.status.success(), "{}", text(&output));
    assert_eq!(text(&output).trim(), "", "systemd-analyze has no complaint (unknown keys only warn)");
    Ok(())
}

/// The kernel's THP switch for a process, from `/proc/<pid>/status` (`THP_enabled`, Linux 5.0 and later).
fn thp_enabled(child: &tokio::process::Child) -> anyhow::Result<String> {
    let pid = child.id().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find_map(|l| l.strip_prefix("THP_enabled:")).map(str::trim);
    Ok(line.unwrap_or("absent").to_string())
}

/// mimalloc advises huge pages for its arenas; tern turns them off for its process (memory at start was 2-3x the
/// heap), unless `TERN_THP=on`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tern_runs_without_transparent_huge_pages_unless_asked() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test"])?;
    let config = pki.path("tern.toml");
    std::fs::write(&config, basic_config(&pki, "127.0.0.1:9".parse()?, "default_certificate = \"default\""))?;
    let off = TernProcess::start(&config).await?;
    assert_eq!(thp_enabled(&off.child)?, "0", "THP is on in a tern process");
    let on = TernProcess::start_from(std::path::Path::new(TERN), &config, None, &[("TERN_THP", "on")]).await?;
    assert_eq!(thp_enabled(&on.child)?, "1", "TERN_THP=on did not keep THP");
    Ok(())
}
