//! A real ACME CA for the ACME tests: Let's Encrypt's test server `pebble` with `pebble-challtestsrv` as its DNS,
//! both on free loopback ports, killed when dropped (Debian package `pebble`, see scripts/setup.sh).
//!
//! - Pebble serves its ACME directory over HTTPS with a certificate for `127.0.0.1` and `localhost` issued by a
//!   throwaway CA of this harness: [`Pebble::directory_ca`] is that CA's PEM, what tern's `acme.ca` trusts.
//! - Pebble's validation authority dials [`PebbleOptions::tls_port`] (TLS-ALPN-01) and
//!   [`PebbleOptions::http_port`] (HTTP-01) on the address the mock DNS gives for the name: `127.0.0.1` by
//!   default (no AAAA records at all, so IPv4 loopback is the only candidate), another address for the names
//!   [`Pebble::set_a`] was given (e.g. a second tern node bound on `127.0.0.2`). Pebble resolves with Go's resolver,
//!   which may answer from `/etc/hosts` before asking DNS: use names like `*.test`, not `localhost`.
//! - Certificates Pebble issues chain to a root generated at each start, fetched with [`Pebble::roots_pem`].
//! - Pebble keeps everything in memory: [`Pebble::restart`] brings up a new CA on the same ports with a new root and
//!   intermediate and no accounts, orders or authorizations. The mock DNS keeps running (its records survive).
//! - Pebble's deliberate unreliability stays on unless an option says otherwise: 5% of good nonces are rejected as
//!   `badNonce`, valid authorizations are reused 50% of the time. Its random validation sleeps are off
//!   (`PEBBLE_VA_NOSLEEP=1`), so validation happens as soon as the client answers a challenge.
//!
//! Pebble 2.4.0 (Debian's) has no ARI (`renewalInfo` is not in its directory) and no profiles (`meta.profiles`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tern_fixtures::TestCa;

use crate::support::{client_config, connect, free_port, get};

/// How long Pebble and the mock DNS get to come up, and any one request to them.
const START_TIMEOUT: Duration = Duration::from_secs(20);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts with fresh ports when a process could not bind (a port taken between picking and binding).
const START_ATTEMPTS: usize = 3;
/// Lines of a process's log quoted in errors.
const LOG_TAIL: usize = 40;
/// The two processes; each logs (stdout and stderr) to `<program>.log` in the harness's directory.
const PROGRAMS: [&str; 2] = ["pebble", "pebble-challtestsrv"];
/// What the harness writes to a log before each start of the process.
const START_MARKER: &str = "=== harness: starting ";

/// An external account binding key from Pebble's example configuration: (key id, base64url HMAC key).
pub const EXAMPLE_EAB: (&str, &str) = ("kid-1", "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W");

/// How to run Pebble. The validation ports are required ([`PebbleOptions::new`]); everything else is Pebble's default
/// when left alone.
#[derive(Debug, Clone)]
pub struct PebbleOptions {
    /// Where Pebble's validation authority connects for TLS-ALPN-01 (`tlsPort`): a tern listener's port.
    pub tls_port: u16,
    /// Where it connects for HTTP-01 (`httpPort`).
    pub http_port: u16,
    /// Lifetime of issued certificates in seconds (`certificateValidityPeriod`; Pebble's default is 5 years).
    pub validity: Option<u64>,
    /// Percentage of good nonces rejected as `badNonce` (`PEBBLE_WFE_NONCEREJECT`; Pebble's default is 5).
    pub nonce_reject: Option<u32>,
    /// Percentage of new orders that reuse a valid authorization (`PEBBLE_AUTHZREUSE`; Pebble's default is 50).
    pub authz_reuse: Option<u32>,
    /// Require external account binding with this (key id, base64url HMAC key), e.g. [`EXAMPLE_EAB`].
    pub eab: Option<(String, String)>,
    /// Pebble's `-strict` (upcoming breaking changes).
    pub strict: bool,
    /// More environment for Pebble (e.g. `PEBBLE_CHAIN_LENGTH`).
    pub env: Vec<(String, String)>,
}

impl PebbleOptions {
    pub fn new(tls_port: u16, http_port: u16) -> Self {
        Self {
            tls_port,
            http_port,
            validity: None,
            nonce_reject: None,
            authz_reuse: None,
            eab: None,
            strict: false,
            env: Vec::new(),
        }
    }
}

/// Ports of one harness: Pebble's ACME and management listeners, the mock DNS (UDP and TCP) and its management API.
#[derive(Debug, Clone, Copy)]
struct Ports {
    acme: u16,
    management: u16,
    dns: u16,
    dns_management: u16,
}

impl Ports {
    async fn pick() -> Result<Self> {
        Ok(Self {
            acme: free_port().await?,
            management: free_port().await?,
            dns: free_udp_and_tcp_port().await?,
            dns_management: free_port().await?,
        })
    }
}

/// A running Pebble and its mock DNS; both are killed when this is dropped.
#[derive(Debug)]
pub struct Pebble {
    options: PebbleOptions,
    ports: Ports,
    /// PEM of the harness's CA, issuer of Pebble's HTTPS certificate.
    https_ca_pem: PathBuf,
    client: Arc<rustls::ClientConfig>,
    pebble: Option<Child>,
    challtestsrv: Option<Child>,
    dir: tempfile::TempDir,
}

impl Pebble {
    /// Starts the mock DNS and Pebble and waits until Pebble serves its directory.
    pub async fn start(options: PebbleOptions) -> Result<Self> {
        crate::support::init_logging();
        let dir = tempfile::tempdir()?;
        let https_ca = TestCa::new("tern test CA for Pebble's HTTPS")?;
        let (chain, key) = https_ca.issue(&["127.0.0.1", "localhost"])?;
        std::fs::write(dir.path().join("pebble-https.crt"), chain)?;
        std::fs::write(dir.path().join("pebble-https.key"), key)?;
        let https_ca_pem = dir.path().join("pebble-https-ca.pem");
        std::fs::write(&https_ca_pem, https_ca.pem())?;
        let client = client_config(&https_ca, &[], &[&rustls::version::TLS13, &rustls::version::TLS12]);
        let mut pebble = Pebble {
            options,
            ports: Ports::pick().await?,
            https_ca_pem,
            client,
            pebble: None,
            challtestsrv: None,
            dir,
        };
        let mut attempt = 1;
        loop {
            match pebble.launch_all().await {
                Ok(()) => return Ok(pebble),
                Err(e) if attempt < START_ATTEMPTS && pebble.port_taken() => {
                    // A port taken by someone else between picking and binding: try fresh ones.
                    eprintln!("pebble harness: start attempt {attempt} failed, retrying on other ports: {e:#}");
                    pebble.kill_all();
                    for program in PROGRAMS {
                        let log = pebble.dir.path().join(format!("{program}.log"));
                        let _ = std::fs::rename(&log, log.with_extension(format!("log.attempt-{attempt}")));
                    }
                    pebble.ports = Ports::pick().await?;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `https://127.0.0.1:PORT/dir`.
    pub fn directory_url(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.ports.acme)
    }

    /// PEM of the CA that signed Pebble's HTTPS certificate (directory and management interface).
    pub fn directory_ca(&self) -> &Path {
        &self.https_ca_pem
    }

    /// A rustls client config trusting Pebble's HTTPS certificate (no ALPN).
    pub fn https_client(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// Pebble's management interface, `https://127.0.0.1:PORT`.
    pub fn management_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.ports.management)
    }

    /// The mock DNS server Pebble resolves names with (UDP and TCP).
    pub fn dns_addr(&self) -> std::net::SocketAddr {
        (Ipv4Addr::LOCALHOST, self.ports.dns).into()
    }

    /// The directory object.
    pub async fn directory(&self) -> Result<serde_json::Value> {
        let (status, body) = self.https_get(self.ports.acme, "/dir").await?;
        ensure!(status == 200, "GET /dir: {status}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// The root the certificates Pebble issues chain to (PEM); a new one after each (re)start.
    pub async fn roots_pem(&self) -> Result<String> {
        self.management_pem("/roots/0").await
    }

    /// The intermediate that signs the certificates Pebble issues (PEM).
    pub async fn intermediates_pem(&self) -> Result<String> {
        self.management_pem("/intermediates/0").await
    }

    /// `GET /cert-status-by-serial/<hex serial>` of the management interface: `{"Status": "Valid"|"Revoked", ...}`.
    pub async fn cert_status(&self, serial_hex: &str) -> Result<serde_json::Value> {
        let path = format!("/cert-status-by-serial/{serial_hex}");
        let (status, body) = self.https_get(self.ports.management, &path).await?;
        ensure!(status == 200, "GET {path}: {status}: {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// Makes the mock DNS answer A queries for `host` with `ip` only (instead of the default `127.0.0.1`), so Pebble
    /// validates `host` at `ip`.
    pub async fn set_a(&self, host: &str, ip: &str) -> Result<()> {
        let ip: Ipv4Addr = ip.parse().with_context(|| format!("{ip:?} is not an IPv4 address"))?;
        let body = serde_json::json!({ "host": fqdn(host), "addresses": [ip.to_string()] });
        self.dns_management("/add-a", body).await
    }

    /// Back to the default answer (`127.0.0.1`) for `host`.
    pub async fn clear_a(&self, host: &str) -> Result<()> {
        self.dns_management("/clear-a", serde_json::json!({ "host": fqdn(host) })).await
    }

    /// The A records the mock DNS serves for `host`, asked over UDP as Pebble asks.
    pub async fn lookup_a(&self, host: &str) -> Result<Vec<IpAddr>> {
        dns_lookup(self.dns_addr(), host, 1).await
    }

    /// The AAAA records the mock DNS serves for `host` (none unless a test adds some).
    pub async fn lookup_aaaa(&self, host: &str) -> Result<Vec<IpAddr>> {
        dns_lookup(self.dns_addr(), host, 28).await
    }

    /// Whether Pebble is up (not killed, not exited).
    pub fn is_running(&mut self) -> bool {
        self.pebble.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills Pebble (the CA goes away as in a crash; the mock DNS stays). Returns once the process is gone.
    pub fn kill(&mut self) {
        kill(&mut self.pebble);
    }

    /// Kills Pebble if it runs and starts it again on the same ports and with the same options: a CA with a new root
    /// and intermediate that knows no accounts, orders or authorizations. Same HTTPS certificate, same mock DNS.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch_pebble().await
    }

    /// The end of Pebble's and the mock DNS's logs (stdout and stderr), for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- pebble ---\n{}\n--- pebble-challtestsrv ---\n{}",
            tail(&self.dir.path().join("pebble.log")),
            tail(&self.dir.path().join("pebble-challtestsrv.log"))
        )
    }

    async fn launch_all(&mut self) -> Result<()> {
        self.launch_challtestsrv().await?;
        self.launch_pebble().await
    }

    /// Whether the latest start of either process logged a failed bind (Pebble then exits; the mock DNS does not).
    fn port_taken(&self) -> bool {
        PROGRAMS.iter().any(|program| {
            let log = std::fs::read_to_string(self.dir.path().join(format!("{program}.log"))).unwrap_or_default();
            let latest = log.rsplit(START_MARKER).next().unwrap_or_default();
            latest.contains("address already in use")
        })
    }

    fn kill_all(&mut self) {
        kill(&mut self.pebble);
        kill(&mut self.challtestsrv);
    }

    fn log_file(&self, name: &str) -> Result<std::fs::File> {
        let path = self.dir.path().join(format!("{name}.log"));
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        use std::io::Write;
        writeln!(file, "{START_MARKER}{name} ===")?;
        Ok(file)
    }

    fn command(&self, program: &str) -> Result<Command> {
        let mut command = Command::new(program);
        let log = self.log_file(program)?;
        command.current_dir(self.dir.path()).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        // Only what the harness sets: no stray PEBBLE_* settings, no proxies between Pebble and the validation targets.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("PEBBLE_") || key.to_ascii_lowercase().ends_with("_proxy") {
                command.env_remove(key.as_ref());
            }
        }
        Ok(command)
    }

    async fn launch_challtestsrv(&mut self) -> Result<()> {
        let mut command = self.command("pebble-challtestsrv")?;
        // Only the mock DNS and its management API: tern answers the challenges itself.
        command.args(["-http01", "", "-https01", "", "-tlsalpn01", ""]);
        command.args(["-dns01", &format!("127.0.0.1:{}", self.ports.dns)]);
        command.args(["-management", &format!("127.0.0.1:{}", self.ports.dns_management)]);
        command.args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""]);
        self.challtestsrv = Some(
            command
                .spawn()
                .context("starting pebble-challtestsrv (is the pebble package installed? see scripts/setup.sh)")?,
        );
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            let dns = dns_lookup(self.dns_addr(), "harness-ready.test", 1).await;
            let management = tokio::net::TcpStream::connect(("127.0.0.1", self.ports.dns_management)).await;
            if dns.is_ok_and(|a| a == [IpAddr::V4(Ipv4Addr::LOCALHOST)]) && management.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.challtestsrv.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("pebble-challtestsrv exited ({status}) while starting\n{}", self.logs());
            }
            if self.port_taken() {
                bail!("pebble-challtestsrv could not bind its ports\n{}", self.logs());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("pebble-challtestsrv not ready after {START_TIMEOUT:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn config(&self) -> serde_json::Value {
        let dir = self.dir.path();
        let mut pebble = serde_json::json!({
            "listenAddress": format!("127.0.0.1:{}", self.ports.acme),
            "managementListenAddress": format!("127.0.0.1:{}", self.ports.management),
            "certificate": dir.join("pebble-https.crt"),
            "privateKey": dir.join("pebble-https.key"),
            "httpPort": self.options.http_port,
            "tlsPort": self.options.tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": self.options.eab.is_some(),
        });
        if let Some((kid, key)) = &self.options.eab {
            let keys = serde_json::Map::from_iter([(kid.clone(), serde_json::Value::from(key.as_str()))]);
            pebble["externalAccountMACKeys"] = keys.into();
        }
        if let Some(validity) = self.options.validity {
            pebble["certificateValidityPeriod"] = validity.into();
        }
        serde_json::json!({ "pebble": pebble })
    }

    async fn launch_pebble(&mut self) -> Result<()> {
        let config = self.dir.path().join("pebble-config.json");
        std::fs::write(&config, serde_json::to_string_pretty(&self.config())?)?;
        let mut command = self.command("pebble")?;
        command.arg("-config").arg(&config);
        command.args(["-dnsserver", &self.dns_addr().to_string()]);
        command.arg(format!("-strict={}", self.options.strict));
        command.env("PEBBLE_VA_NOSLEEP", "1");
        if let Some(percent) = self.options.nonce_reject {
            command.env("PEBBLE_WFE_NONCEREJECT", percent.to_string());
        }
        if let Some(percent) = self.options.authz_reuse {
            command.env("PEBBLE_AUTHZREUSE", percent.to_string());
        }
        command.envs(self.options.env.iter().map(|(k, v)| (k, v)));
        self.pebble = Some(command.spawn().context("starting pebble (is it installed? see scripts/setup.sh)")?);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT;
        loop {
            // Short polls: whatever else might hold the port must not stall noticing that Pebble exited.
            let directory = tokio::time::timeout(Duration::from_secs(1), self.https_get(self.ports.acme, "/dir")).await;
            let management = tokio::net::TcpStream::connect(("127.0.0.1", self.ports.management)).await;
            if directory.is_ok_and(|d| d.is_ok_and(|(status, _)| status == 200)) && management.is_ok() {
                return Ok(());
            }
            if let Some(status) = self.pebble.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!("pebble exited ({status}) while starting\n{}", self.logs());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("pebble not serving its directory after {START_TIMEOUT:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn management_pem(&self, path: &str) -> Result<String> {
        let (status, body) = self.https_get(self.ports.management, path).await?;
        ensure!(status == 200, "GET {path} from Pebble's management interface: {status}: {body}");
        ensure!(body.contains("-----BEGIN CERTIFICATE-----"), "GET {path}: not PEM: {body}");
        Ok(body)
    }

    /// One HTTPS GET to Pebble on `port` (directory or management interface): (status, body).
    async fn https_get(&self, port: u16, path: &str) -> Result<(u16, String)> {
        let request = async {
            let stream = connect((Ipv4Addr::LOCALHOST, port).into(), &self.client, "127.0.0.1").await?;
            let (status, _, body) = get(stream, &format!("127.0.0.1:{port}"), path).await?;
            anyhow::Ok((status.as_u16(), body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, request).await.with_context(|| format!("GET {path}: timed out"))?
    }

    /// One POST of `body` to the mock DNS's management API.
    async fn dns_management(&self, path: &str, body: serde_json::Value) -> Result<()> {
        use http_body_util::BodyExt;
        let request = async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.ports.dns_management)).await?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            let request = http::Request::post(path)
                .header(http::header::HOST, format!("127.0.0.1:{}", self.ports.dns_management))
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let text = response.into_body().collect().await?.to_bytes();
            ensure!(status.is_success(), "POST {path} {body}: {status}: {}", String::from_utf8_lossy(&text));
            anyhow::Ok(())
        };
        tokio::time::timeout(REQUEST_TIMEOUT, request).await.with_context(|| format!("POST {path}: timed out"))?
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Kills and reaps a child (SIGKILL: reaping takes moments).
fn kill(child: &mut Option<Child>) {
    if let Some(mut child) = child.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn fqdn(host: &str) -> String {
    if host.ends_with('.') { host.to_string() } else { format!("{host}.") }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
}

/// A loopback port free for both UDP and TCP a moment ago (the mock DNS listens on both).
async fn free_udp_and_tcp_port() -> Result<u16> {
    for _ in 0..20 {
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
        let port = udp.local_addr()?.port();
        if tokio::net::TcpListener::bind(("127.0.0.1", port)).await.is_ok() {
            return Ok(port);
        }
    }
    bail!("no loopback port free for both UDP and TCP")
}

/// One DNS query for `host` of type `qtype` (1 = A, 28 = AAAA) over UDP: the addresses answered.
async fn dns_lookup(server: std::net::SocketAddr, host: &str, qtype: u16) -> Result<Vec<IpAddr>> {
    let id = (std::process::id() as u16) ^ 0x7e57;
    let mut query = Vec::with_capacity(64);
    query.extend_from_slice(&id.to_be_bytes());
    // Recursion desired; one question.
    query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in host.trim_end_matches('.').split('.') {
        ensure!(!label.is_empty() && label.len() < 64, "bad DNS name {host:?}");
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.push(0);
    query.extend_from_slice(&qtype.to_be_bytes());
    query.extend_from_slice(&[0, 1]);

    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    socket.connect(server).await?;
    let mut reply = vec![0u8; 4096];
    let mut received = None;
    for _ in 0..3 {
        socket.send(&query).await?;
        if let Ok(n) = tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut reply)).await {
            received = Some(n?);
            break;
        }
    }
    let reply = &reply[..received.context("no answer from the mock DNS")?];
    parse_dns_reply(reply, id, qtype).with_context(|| format!("DNS reply for {host}"))
}

fn parse_dns_reply(reply: &[u8], id: u16, qtype: u16) -> Result<Vec<IpAddr>> {
    let byte = |at: usize| reply.get(at).copied().context("truncated DNS reply");
    let u16_at = |at: usize| Ok::<_, anyhow::Error>(u16::from_be_bytes([byte(at)?, byte(at + 1)?]));
    ensure!(u16_at(0)? == id, "DNS reply with another id");
    let rcode = byte(3)? & 0x0f;
    ensure!(rcode == 0, "DNS rcode {rcode}");
    let (questions, answers) = (u16_at(4)?, u16_at(6)?);
    let skip_name = |mut at: usize| -> Result<usize> {
        loop {
            let len = byte(at)? as usize;
            if len == 0 {
                return Ok(at + 1);
            }
            if len & 0xc0 == 0xc0 {
                return Ok(at + 2);
            }
            at += 1 + len;
        }
    };
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(at)? + 4;
    }
    let mut addresses = Vec::new();
    for _ in 0..answers {
        at = skip_name(at)?;
        let (rtype, len) = (u16_at(at)?, u16_at(at + 8)? as usize);
        let data = reply.get(at + 10..at + 10 + len).context("truncated DNS record")?;
        at += 10 + len;
        match (rtype, data.len()) {
            (1, 4) if qtype == 1 => addresses.push(IpAddr::V4(Ipv4Addr::new(data[0], data[1], data[2], data[3]))),
            (28, 16) if qtype == 28 => {
                let octets: [u8; 16] = data.try_into()?;
                addresses.push(IpAddr::V6(Ipv6Addr::from(octets)));
            }
            _ => {}
        }
    }
    Ok(addresses)
}
