//! The `tern` binary: `check`, `plugin call`, and `run` until SIGTERM.

use std::process::{Command, Stdio};

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

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
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_call_prints_what_the_plugin_returned() -> anyhow::Result<()> {
    let pki = Pki::new(&["a.test"])?;
    let certs = pki.certs().to_string_lossy().into_owned();
    let output = run_command(tern(&["plugin", "call", FILE_PATH_PLUGIN, "a.test", "--files", &certs])).await?;
    assert!(output.status.success(), "{}", text(&output));
    assert!(text(&output).contains("validation: ok, covers a.test"), "{}", text(&output));

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_until_sigterm_and_exits_cleanly() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let config = pki.path("tern.toml");
    let backend = tern::demo::spawn_echo_backend().await?;
    std::fs::write(&config, basic_config(&pki, backend, "default_certificate = \"default\""))?;
    let mut child = tokio::process::Command::from(tern(&["run", "-c", &config.to_string_lossy()]))
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut lines = BufReader::new(child.stderr.take().expect("piped")).lines();
    // The log line "listening ... addr=Some(127.0.0.1:PORT)" tells the port bound.
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.split("addr=Some(").nth(1) {
                return Ok::<_, anyhow::Error>(rest.trim_end_matches(')').parse::<std::net::SocketAddr>()?);
            }
        }
        anyhow::bail!("tern exited before listening")
    })
    .await??;
    let stream = connect(addr, &pki.client(&[b"h2"]), "a.test").await?;
    let (status, _, _) = get(stream, "a.test", "/").await?;
    assert_eq!(status, 200);
    let pid = child.id().expect("running").to_string();
    let kill = run_command({
        let mut kill = Command::new("kill");
        kill.args(["-TERM", &pid]);
        kill
    })
    .await?;
    assert!(kill.status.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait()).await??;
    assert!(status.success(), "exit status {status}");
    Ok(())
}
