//! Replacing the binary without refusing a connection (SIGUSR2: the listening sockets handed to the new process,
//! then the old one drains), a failed upgrade that leaves the old process serving, and systemd socket activation
//! through systemd's own `systemd-socket-activate`. Readiness and the new main process are read from a
//! notification socket, as systemd would.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use tern_fixtures::spawn_echo_backend;

use crate::support::*;

/// What the client loops saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    /// A keep-alive connection the server closed between requests (the client opens another, as HTTP clients
    /// do for a request nothing answered).
    reconnected: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::SeqCst);
        self.errors.lock().expect("test lock").push(what);
    }
}

/// One handshake and one request on a new connection, until `stop`.
async fn fresh_connections(
    addr: SocketAddr,
    client: Arc<rustls::ClientConfig>,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::SeqCst) {
        let request = async {
            let tls = connect(addr, &client, "a.test").await?;
            let (status, _, _) = get(tls, "a.test", "/fresh").await?;
            anyhow::ensure!(status == 200, "status {status}");
            anyhow::Ok(())
        };
        match tokio::time::timeout(Duration::from_secs(10), request).await {
            Ok(Ok(())) => tally.ok.fetch_add(1, Ordering::SeqCst),
            Ok(Err(err)) => {
                tally.fail(format!("fresh: {err:#}"));
                0
            }
            Err(_) => {
                tally.fail("fresh: no answer within 10 s".into());
                0
            }
        };
    }
}

/// Requests on one keep-alive connection, every 20 ms, until `stop`. When the server closes the connection
/// between requests (a draining process), the request is sent again on a new one; only that one failing counts.
async fn keep_alive(addr: SocketAddr, client: Arc<rustls::ClientConfig>, tally: Arc<Tally>, stop: Arc<AtomicBool>) {
    use http_body_util::{BodyExt, Empty};
    type Sender = hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>;
    let open = || async {
        let tls = connect(addr, &client, "a.test").await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        anyhow::Ok(sender)
    };
    let send = |sender: &mut Sender| {
        let request = http::Request::get("/kept").header("host", "a.test").body(Empty::new());
        let sent = request.map(|r| sender.send_request(r));
        async move {
            let response = sent?.await?;
            let status = response.status();
            response.into_body().collect().await?;
            anyhow::ensure!(status == 200, "status {status}");
            anyhow::Ok(())
        }
    };
    let mut sender: Option<Sender> = None;
    while !stop.load(Ordering::SeqCst) {
        let reused = sender.as_ref().is_some_and(|s| !s.is_closed());
        if !reused {
            sender = match open().await {
                Ok(s) => Some(s),
                Err(err) => {
                    tally.fail(format!("keep-alive connect: {err:#}"));
                    None
                }
            };
        }
        let Some(current) = sender.as_mut() else { continue };
        match send(current).await {
            Ok(()) => {
                tally.ok.fetch_add(1, Ordering::SeqCst);
            }
            Err(first) => {
                // Closed under the request before any answer: send it again on a new connection.
                tally.reconnected.fetch_add(1, Ordering::SeqCst);
                let again = async { send(&mut open().await?).await };
                match again.await {
                    Ok(()) => {
                        tally.ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(err) => tally.fail(format!("keep-alive: {first:#}, then {err:#}")),
                }
                sender = None;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Receives what tern tells systemd (`NOTIFY_SOCKET`).
struct Notifications {
    socket: tokio::net::UnixDatagram,
    path: PathBuf,
}

impl Notifications {
    fn bind(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("notify.sock");
        Ok(Self { socket: tokio::net::UnixDatagram::bind(&path)?, path })
    }

    fn path(&self) -> &str {
        self.path.to_str().expect("temporary paths are UTF-8")
    }

    /// The next message, within `wait`.
    async fn next(&self, wait: Duration) -> anyhow::Result<String> {
        let mut buffer = vec![0u8; 4096];
        let n = tokio::time::timeout(wait, self.socket.recv(&mut buffer)).await.context("no notification")??;
        Ok(String::from_utf8_lossy(&buffer[..n]).into_owned())
    }
}

/// A process this test did not start itself (the successor), stopped when the test ends whatever happens.
struct Stray(u32);

impl Drop for Stray {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill").arg("-KILL").arg(self.0.to_string()).status();
    }
}

fn signal(pid: u32, signal: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status()?;
    anyhow::ensure!(status.success(), "kill -{signal} {pid}");
    Ok(())
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A copy of the binary under test at `dir/tern`, replaced the way a package manager does (a new file renamed
/// over the old one), so that the running process's file is gone.
fn install_binary(dir: &Path) -> anyhow::Result<PathBuf> {
    let path = dir.join("tern");
    let staged = dir.join("tern.new");
    std::fs::copy(TERN, &staged)?;
    std::fs::rename(&staged, &path)?;
    Ok(path)
}

/// [`TernProcess::start_from`] on a binary [`install_binary`] just wrote. A child another test forks while the copy
/// is open for writing holds that descriptor until its own exec, and exec'ing the copy meanwhile fails with
/// ETXTBSY ("Text file busy"): retried for up to a second.
async fn start_installed(binary: &Path, config: &Path, env: &[(&str, &str)]) -> anyhow::Result<TernProcess> {
    for _ in 0..20 {
        match TernProcess::start_from(binary, config, None, env).await {
            Err(err)
                if err
                    .chain()
                    .any(|e| e.downcast_ref::<std::io::Error>().and_then(|e| e.raw_os_error()) == Some(26)) =>
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other,
        }
    }
    TernProcess::start_from(binary, config, None, env).await
}

/// The config of these tests: the file-path plugin, a default certificate, the echo backend, an admin API.
fn upgrade_config(pki: &Pki, backend: SocketAddr) -> String {
    let mut config = basic_config(pki, backend, "default_certificate = \"default\"");
    config.push_str("\n[admin]\nbind = \"127.0.0.1:0\"\n");
    config.replace("[[certificate]]", "[server]\nshutdown_grace = \"5s\"\nupgrade_timeout = \"20s\"\n\n[[certificate]]")
}

/// Client loops against `addr`: 4 making a new connection per request, 1 on a keep-alive connection.
fn load(addr: SocketAddr, pki: &Pki, tally: &Arc<Tally>, stop: &Arc<AtomicBool>) -> tokio::task::JoinSet<()> {
    let client = pki.client(&[b"http/1.1"]);
    let mut loops = tokio::task::JoinSet::new();
    for _ in 0..4 {
        loops.spawn(fresh_connections(addr, client.clone(), tally.clone(), stop.clone()));
    }
    loops.spawn(keep_alive(addr, client, tally.clone(), stop.clone()));
    loops
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_the_binary_drops_no_connection() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let config = pki.dir.path().join("tern.toml");
    std::fs::write(&config, upgrade_config(&pki, spawn_echo_backend().await?))?;
    let bin = tempfile::tempdir()?;
    let binary = install_binary(bin.path())?;
    let notifications = Notifications::bind(bin.path())?;
    let env = [("NOTIFY_SOCKET", notifications.path())];
    let mut old = start_installed(&binary, &config, &env).await?;
    let old_pid = old.child.id().context("old pid")?;
    assert_eq!(notifications.next(Duration::from_secs(5)).await?, "READY=1");

    let (tally, stop) = (Arc::new(Tally::default()), Arc::new(AtomicBool::new(false)));
    let mut loops = load(old.addr, &pki, &tally, &stop);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = tally.ok.load(Ordering::SeqCst);

    // A new binary at the same path, then the upgrade.
    install_binary(bin.path())?;
    signal(old_pid, "USR2")?;
    let message = notifications.next(Duration::from_secs(30)).await?;
    let new_pid: u32 = message
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .with_context(|| format!("no MAINPID in {message:?}"))?
        .parse()?;
    let _successor = Stray(new_pid);
    assert!(message.contains("READY=1"), "{message:?}");
    assert_ne!(new_pid, old_pid);
    let exe = std::fs::read_link(format!("/proc/{new_pid}/exe"))?;
    assert_eq!(exe, binary, "the successor runs the file now at the binary's path");

    // The old process drains and exits by itself.
    let status = tokio::time::timeout(Duration::from_secs(20), old.child.wait()).await.context("old exits")??;
    assert!(status.success(), "old process: {status}");
    let at_exit = tally.ok.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::SeqCst);
    while loops.join_next().await.is_some() {}

    let (ok, failed) = (tally.ok.load(Ordering::SeqCst), tally.failed.load(Ordering::SeqCst));
    let reconnected = tally.reconnected.load(Ordering::SeqCst);
    println!(
        "upgrade: {ok} requests ({before} before the signal, {} after the old process exited), {failed} failed, \
         {reconnected} keep-alive requests sent again on a new connection",
        ok - at_exit
    );
    assert_eq!(failed, 0, "{:?}", tally.errors.lock().expect("test lock"));
    assert!(before > 20 && ok - at_exit > 20, "load ran before and after: {before}, {}", ok - at_exit);
    // Every listener went over, the admin API too: the successor answers on the old addresses.
    let admin_addr = old.admin.context("admin")?;
    let (status, body) = admin(admin_addr, "GET", "/readyz", None).await?;
    assert_eq!(status, 200, "{body}");
    assert!(alive(new_pid));
    let log = old.log.lock().expect("test lock").join("\n");
    assert!(log.contains("upgrade: the new process serves"), "{log}");
    assert!(log.contains("listening sockets taken over from the old process"), "{log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_upgrade_leaves_the_old_process_serving() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let config = pki.dir.path().join("tern.toml");
    let text = upgrade_config(&pki, spawn_echo_backend().await?);
    std::fs::write(&config, &text)?;
    let bin = tempfile::tempdir()?;
    let binary = install_binary(bin.path())?;
    let mut old = start_installed(&binary, &config, &[]).await?;
    let old_pid = old.child.id().context("old pid")?;
    let (tally, stop) = (Arc::new(Tally::default()), Arc::new(AtomicBool::new(false)));
    let mut loops = load(old.addr, &pki, &tally, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The new process cannot start: its config names a plugin file that is not there.
    std::fs::write(&config, text.replace(FILE_PATH_PLUGIN, "/nonexistent/plugin.wasm"))?;
    signal(old_pid, "USR2")?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !old.log.lock().expect("test lock").iter().any(|l| l.contains("upgrade failed")) {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no failed upgrade logged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after_failure = tally.ok.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::SeqCst);
    while loops.join_next().await.is_some() {}
    assert!(old.child.try_wait()?.is_none(), "the old process still runs");
    assert_eq!(tally.failed.load(Ordering::SeqCst), 0, "{:?}", tally.errors.lock().expect("test lock"));
    assert!(tally.ok.load(Ordering::SeqCst) > after_failure + 10, "still serving after the failed upgrade");
    let (status, _) = admin(old.admin.context("admin")?, "GET", "/readyz", None).await?;
    assert_eq!(status, 200, "still ready, not draining");
    let log = old.log.lock().expect("test lock").join("\n");
    assert!(log.contains("/nonexistent/plugin.wasm"), "the reason is logged: {log}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_socket_activation_serves_on_the_passed_socket() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let port = free_port().await?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let config = pki.dir.path().join("tern.toml");
    let text = basic_config(&pki, spawn_echo_backend().await?, "default_certificate = \"default\"");
    std::fs::write(&config, text.replace("127.0.0.1:0", &addr.to_string()))?;
    let dir = tempfile::tempdir()?;
    let notifications = Notifications::bind(dir.path())?;
    // systemd's own tool: holds the listening socket, then runs tern with LISTEN_FDS, LISTEN_FDNAMES, LISTEN_PID.
    // If tern bound the address itself instead, it would fail: the socket is taken.
    let mut child = tokio::process::Command::new("systemd-socket-activate")
        .arg("--listen")
        .arg(addr.to_string())
        .arg("--fdname=main")
        .arg(format!("--setenv=NOTIFY_SOCKET={}", notifications.path()))
        .arg("--setenv=TERN_LOG=info")
        .arg(TERN)
        .args(["run", "-c"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("systemd-socket-activate (Debian's systemd package; scripts/setup.sh test installs it)")?;
    // It starts tern on the first connection, which waits in the socket's queue meanwhile and is served.
    let client = pki.client(&[b"http/1.1"]);
    let first = async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let tcp = loop {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(tcp) => break tcp,
                Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(err) => return Err(anyhow::anyhow!("systemd-socket-activate does not listen: {err}")),
            }
        };
        let name = rustls::pki_types::ServerName::try_from("a.test")?;
        let tls = tokio_rustls::TlsConnector::from(client.clone()).connect(name, tcp).await?;
        get(tls, "a.test", "/first").await
    };
    let served = tokio::time::timeout(Duration::from_secs(30), first).await;
    let ready = notifications.next(Duration::from_secs(5)).await;
    let (Ok(Ok((status, _, body))), Ok(ready)) = (served, ready) else {
        let _ = child.start_kill();
        let output = child.wait_with_output().await?;
        anyhow::bail!("tern did not serve: {}", String::from_utf8_lossy(&output.stderr));
    };
    assert_eq!(status, 200, "{body}");
    assert_eq!(ready, "READY=1");
    let tls = connect(addr, &client, "a.test").await?;
    let (status, _, body) = get(tls, "a.test", "/second").await?;
    assert_eq!(status, 200, "{body}");
    signal(child.id().context("pid")?, "TERM")?;
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output()).await??;
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{log}");
    assert!(log.contains("listening sockets from systemd") && log.contains("sockets=1"), "{log}");
    Ok(())
}
