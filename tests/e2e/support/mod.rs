//! Shared test harness: a PKI written to a temp dir, a tern server on ephemeral ports, TLS and HTTP clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tern::metrics::Metrics;
use tern_fixtures::TestCa;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

pub mod haproxy;
pub mod pebble;
mod routes;
pub use routes::*;

pub const FILE_PATH_PLUGIN: &str = env!("TERN_PLUGIN_FILE_PATH");
pub const CHAOS_PLUGIN: &str = env!("TERN_PLUGIN_CHAOS");

/// A CA and the leaf certificates it issued, written as `<dir>/certs/<name>.crt|.key`.
pub struct Pki {
    pub ca: TestCa,
    pub dir: tempfile::TempDir,
}

impl Pki {
    /// Issues one certificate per entry (the entry is both its SAN and its file name).
    pub fn new(names: &[&str]) -> Result<Self> {
        let pki = Pki { ca: TestCa::new("tern test CA")?, dir: tempfile::tempdir()? };
        std::fs::create_dir_all(pki.certs())?;
        for name in names {
            pki.issue_as(name, &[name])?;
        }
        Ok(pki)
    }

    /// Writes a certificate for `sans` under the file name `file`.
    pub fn issue_as(&self, file: &str, sans: &[&str]) -> Result<()> {
        let (chain, key) = self.ca.issue(sans)?;
        std::fs::write(self.certs().join(format!("{file}.crt")), chain)?;
        std::fs::write(self.certs().join(format!("{file}.key")), key)?;
        Ok(())
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// The leaf certificate DER of the certificate stored under `file`.
    pub fn leaf(&self, file: &str) -> CertificateDer<'static> {
        let pem = std::fs::read(self.certs().join(format!("{file}.crt"))).expect("certificate written by Pki");
        CertificateDer::from_pem_slice(&pem).expect("PEM written by rcgen")
    }

    /// A client config trusting this CA.
    pub fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        client_config(&self.ca, alpn, &[&rustls::version::TLS13, &rustls::version::TLS12])
    }
}

pub fn client_config(
    ca: &TestCa,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der()).expect("rcgen CA certificate parses");
    let mut config = rustls::ClientConfig::builder_with_provider(tern::crypto::provider().clone())
        .with_protocol_versions(versions)
        .expect("TLS 1.2/1.3 are supported")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

/// Config text common to most tests: a static default certificate (`default.test`, served for no name), one
/// plugin named `files` granted the PKI's directory, one listener named `main` on an ephemeral port.
/// `plugin_keys` and `listener_keys` are added to the plugin's and the listener's tables.
pub fn config_with(pki: &Pki, backend: SocketAddr, plugin: &str, plugin_keys: &str, listener_keys: &str) -> String {
    format!(
        r#"
[[certificate]]
name = "default"
cert = "certs/default.test.crt"
key = "certs/default.test.key"
names = []

[[plugin]]
name = "files"
path = "{plugin}"
grants.files = "{certs}"
{plugin_keys}

[[listener]]
name = "main"
bind = "127.0.0.1:0"
plugin = "files"
backend = "http://{backend}"
{listener_keys}
"#,
        certs = pki.certs().display(),
    )
}

/// [`config_with`] for the file-path plugin.
pub fn basic_config(pki: &Pki, backend: SocketAddr, listener_keys: &str) -> String {
    config_with(pki, backend, FILE_PATH_PLUGIN, "", listener_keys)
}

/// The most common set-up: file-path plugin, default certificate for unknown names, echo backend.
pub async fn start_default(pki: &Pki) -> Result<TestServer> {
    let backend = tern_fixtures::spawn_echo_backend().await?;
    TestServer::start(&basic_config(pki, backend, "default_certificate = \"default\""), pki.dir.path()).await
}

/// A running tern server; stops when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    pub addrs: Vec<(String, SocketAddr)>,
    pub metrics: Arc<Metrics>,
    pub plugins: Vec<(String, Arc<tern::plugin::PluginSlot>)>,
    pub selector: Arc<tern::select::Selector>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl TestServer {
    /// The admin listener's address (the config has an `[admin]` section).
    pub fn admin_addr(&self) -> SocketAddr {
        self.addrs.iter().find(|(n, _)| n == "admin").map(|(_, a)| *a).expect("admin listener bound")
    }

    /// Starts tern from config text; relative paths resolve against `dir`.
    pub async fn start(config: &str, dir: &Path) -> Result<Self> {
        init_logging();
        // Written to disk too: reloads read the file again.
        let path = dir.join("tern.toml");
        std::fs::write(&path, config)?;
        let config = tern::Config::from_toml(config, &path)?;
        let plugin_names: Vec<String> = config.plugins.iter().map(|p| p.name.clone()).collect();
        let server = tern::Server::bind(config).await?;
        let addrs = server.local_addrs();
        let metrics = server.metrics().clone();
        let selector = server.selector().clone();
        let plugins = plugin_names.into_iter().filter_map(|n| Some((n.clone(), server.plugin(&n)?.clone()))).collect();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        tokio::spawn(server.run(async move {
            let _ = stopped.await;
        }));
        Ok(Self { addr: addrs[0].1, addrs, metrics, plugins, selector, stop: Some(stop) })
    }

    /// Call counters of the plugin named `files` (the one the config helpers set up).
    pub fn plugin_stats(&self) -> &tern::plugin::PluginStats {
        self.plugins.iter().find(|(n, _)| n == "files").expect("plugin configured").1.stats()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Logs to the test's captured output when TERN_TEST_LOG is set (e.g. TERN_TEST_LOG=debug).
pub fn init_logging() {
    if let Ok(filter) = std::env::var("TERN_TEST_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
}

/// Connects and completes a TLS handshake sending `sni` (or no SNI when `None`, verifying as `verify_as`).
pub async fn handshake(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    sni: Option<&str>,
    verify_as: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut config = (**config).clone();
    config.enable_sni = sni.is_some();
    let name = ServerName::try_from(sni.unwrap_or(verify_as).to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await
}

/// Shorthand: handshake with SNI `name`, verified as `name`.
pub async fn connect(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
    name: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    handshake(addr, config, Some(name), name).await
}

/// The leaf certificate the server presented.
pub fn served_leaf(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().expect("handshake completed")[0].clone().into_owned()
}

/// The TLS alert a failed handshake received, if that is how it failed.
pub fn alert_of(err: &std::io::Error) -> Option<rustls::AlertDescription> {
    match err.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

/// Sends one GET over an established TLS stream (HTTP/2 if ALPN chose it) and returns status, headers, body.
pub async fn get(
    stream: TlsStream<TcpStream>,
    host: &str,
    path: &str,
) -> Result<(http::StatusCode, http::HeaderMap, String)> {
    use http_body_util::{BodyExt, Empty};
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = hyper_util::rt::TokioIo::new(stream);
    let request =
        |uri: String| http::Request::get(uri).header("user-agent", "tern-e2e").body(Empty::<bytes::Bytes>::new());
    let response = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        sender.send_request(request(format!("https://{host}{path}"))?).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        let mut req = request(path.to_string())?;
        req.headers_mut().insert(http::header::HOST, host.parse()?);
        sender.send_request(req).await?
    };
    let (parts, body) = response.into_parts();
    let body = body.collect().await.context("reading response body")?.to_bytes();
    Ok((parts.status, parts.headers, String::from_utf8_lossy(&body).into_owned()))
}

/// Runs a blocking command (openssl, curl, the tern CLI) off the async workers, with a time limit.
pub async fn run_command(mut command: std::process::Command) -> Result<std::process::Output> {
    command.stdin(std::process::Stdio::null());
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    let output =
        tokio::time::timeout(Duration::from_secs(60), command.output()).await.context("command timed out")??;
    Ok(output)
}

pub fn counter(c: &std::sync::atomic::AtomicU64) -> u64 {
    tern::metrics::get(c)
}

/// The fatal alert a refused handshake gets: rustls sends `access_denied` when no certificate was resolved.
pub const REFUSED: rustls::AlertDescription = rustls::AlertDescription::AccessDenied;

/// Waits (up to 5 s) until `counter` reaches `want`; for counters bumped just after the client saw the connection
/// close (a timed-out handshake closes the socket as the deadline fires).
pub async fn eventually_equals(c: &std::sync::atomic::AtomicU64, want: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while counter(c) != want && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    counter(c)
}

/// Polls `check` every 50 ms until it holds, for up to 10 s; `what` names the condition in the error.
pub async fn eventually<F, Fut>(what: &str, check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    eventually_within(what, Duration::from_secs(10), Duration::from_millis(50), check).await
}

/// Polls `check` every `every` until it holds, for at most `within`.
pub async fn eventually_within<F, Fut>(what: &str, within: Duration, every: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("{what}: not within {within:?}");
        }
        tokio::time::sleep(every).await;
    }
}

/// The `tern` binary under test.
pub const TERN: &str = env!("CARGO_BIN_EXE_tern-cli-under-test");

/// A `tern` command line.
pub fn tern(args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(TERN);
    command.args(args).env("TERN_LOG", "info");
    command
}

/// Everything a command printed.
pub fn text(output: &std::process::Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

pub const REDIS_PLUGIN: &str = env!("TERN_PLUGIN_REDIS_PLUGIN");
pub const HTTP_API_PLUGIN: &str = env!("TERN_PLUGIN_HTTP_API");

/// Selects every name twice straight through the selector (no TLS): first round misses (plugin call, store
/// reads, parse, validation), second round hits. Prints median and p99 of each; asserts nothing about time.
pub async fn print_selection_latency(server: &TestServer, names: &[String], what: &str) -> Result<()> {
    let policy =
        tern::select::Policy { listener: "test".into(), plugin: Some(server.plugins[0].1.clone()), default: None };
    let mut rounds = [Vec::with_capacity(names.len()), Vec::with_capacity(names.len())];
    for round in &mut rounds {
        for name in names {
            let started = std::time::Instant::now();
            server.selector.select(&policy, Some(name)).await?;
            round.push(started.elapsed());
        }
    }
    let build = if cfg!(debug_assertions) { "debug build" } else { "release build" };
    println!("selection latency, {what}, {} names ({build}):", names.len());
    for (label, samples) in ["cache miss (plugin call + parse)", "cache hit"].iter().zip(&mut rounds) {
        samples.sort();
        let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
        println!("  {label:<33} median {:?}, p99 {:?}", at(0.5), at(0.99));
    }
    Ok(())
}

/// Sends SNI `sni` but verifies the certificate against `verify_as`.
pub async fn sni_verified_as(
    addr: std::net::SocketAddr,
    pki: &Pki,
    sni: &str,
    verify_as: &str,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    // rustls sends the verification name as SNI, so a verifier that checks another name does the trick.
    let verifier = tern_fixtures::TestVerifier::verify_as(&pki.ca, verify_as, tern::crypto::provider().clone())?;
    let mut config = (*pki.client(&[])).clone();
    config.dangerous().set_certificate_verifier(verifier);
    let name = rustls::pki_types::ServerName::try_from(sni.to_string())?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    Ok(tokio_rustls::TlsConnector::from(std::sync::Arc::new(config)).connect(name, tcp).await?)
}

/// Every line a child process wrote to stderr so far.
pub type LogLines = Arc<std::sync::Mutex<Vec<String>>>;

/// A `tern run` process, started with `--ready-file`: its addresses come from that file, not from its log.
pub struct TernProcess {
    pub child: tokio::process::Child,
    /// The first listener's address.
    pub addr: SocketAddr,
    /// Every listener by name.
    pub listeners: Vec<(String, SocketAddr)>,
    pub admin: Option<SocketAddr>,
    pub log: LogLines,
    _ready: tempfile::TempDir,
}

impl TernProcess {
    /// `tern run -c config`.
    pub async fn start(config: &Path) -> Result<Self> {
        Self::start_with(config, None).await
    }

    /// `tern run -c config`, under a descriptor limit (soft and hard) of `nofile` if given.
    pub async fn start_with(config: &Path, nofile: Option<u32>) -> Result<Self> {
        Self::start_from(Path::new(TERN), config, nofile, &[]).await
    }

    /// `binary run -c config` (a copy of the binary under test), with `env` added to its environment.
    pub async fn start_from(binary: &Path, config: &Path, nofile: Option<u32>, env: &[(&str, &str)]) -> Result<Self> {
        let ready_dir = tempfile::tempdir()?;
        let ready = ready_dir.path().join("ready.json");
        let mut command = match nofile {
            None => {
                let mut command = std::process::Command::new(binary);
                let args = ["run", "-c", &config.to_string_lossy(), "--ready-file", &ready.to_string_lossy()];
                command.args(args).env("TERN_LOG", "info");
                command
            }
            Some(limit) => {
                let mut command = std::process::Command::new("bash");
                let line = format!("ulimit -n {limit} && exec \"$0\" run -c \"$1\" --ready-file \"$2\"",);
                command.args(["-c", &line]).arg(binary).arg(config).arg(&ready).env("TERN_LOG", "info");
                command
            }
        };
        command.stdin(std::process::Stdio::null()).envs(env.iter().copied());
        let mut child =
            tokio::process::Command::from(command).stderr(std::process::Stdio::piped()).kill_on_drop(true).spawn()?;
        use tokio::io::AsyncBufReadExt;
        let mut lines = tokio::io::BufReader::new(child.stderr.take().context("stderr piped")?).lines();
        let log = LogLines::default();
        let sink = log.clone();
        // Keep draining the log so the child never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().expect("test lock").push(line);
            }
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let text = loop {
            if let Ok(text) = std::fs::read_to_string(&ready) {
                break text;
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!("tern exited ({status}) before it was ready: {:?}", log.lock().expect("test lock"));
            }
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "tern not ready after 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let json: serde_json::Value = serde_json::from_str(&text)?;
        let listeners: Vec<(String, SocketAddr)> = json["listeners"]
            .as_object()
            .context("listeners")?
            .iter()
            .map(|(name, addr)| Ok((name.clone(), addr.as_str().context("address")?.parse()?)))
            .collect::<Result<_>>()?;
        let admin = json["admin"].as_str().map(str::parse).transpose()?;
        let addr = listeners.first().context("no listener")?.1;
        Ok(Self { child, addr, listeners, admin, log, _ready: ready_dir })
    }
}

/// One request to the admin API: (status, body).
pub async fn admin(addr: SocketAddr, method: &str, path: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut request = http::Request::builder().method(method).uri(path).header("host", "admin");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = sender.send_request(request.body(http_body_util::Empty::<bytes::Bytes>::new())?).await?;
    let status = response.status().as_u16();
    let body = http_body_util::BodyExt::collect(response.into_body()).await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The value of one sample, found by name and labels, from Prometheus text parsed by a real parser.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).expect("valid exposition");
    let found = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match found.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => v,
        _ => panic!("{name} is not a plain sample"),
    }
}

/// A port that was free a moment ago (for peers that need a number: redis-server, HAProxy).
pub async fn free_port() -> Result<u16> {
    Ok(tokio::net::TcpListener::bind("127.0.0.1:0").await?.local_addr()?.port())
}

/// A TCP connection to `to` from the loopback address `source` (tests tell clients apart by address).
pub async fn tcp_from(source: &str, to: SocketAddr) -> Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source.parse()?, 0))?;
    Ok(socket.connect(to).await?)
}
