//! One fleet, one session space: `tern` processes sharing a real `redis-server` resume each other's sessions
//! (TLS 1.2 session IDs, TLS 1.2 and 1.3 tickets, TLS 1.3 stateful sessions), survive a node's death, a late
//! start, key rotation and Redis going away; listeners with other client-auth settings never share sessions.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rustls::HandshakeKind;
use rustls::client::Tls12Resumption;

use crate::redis_support::RedisServer;
use crate::support::*;

const SECRET: &str = "e2e-resumption-secret-0123456789abcdef";

/// A `tern run` process with its listener and admin addresses.
struct Node {
    child: tokio::process::Child,
    addr: SocketAddr,
    admin: SocketAddr,
    config: std::path::PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Node {
    async fn start(pki: &Pki, name: &str, config: &str) -> Result<Node> {
        let path = pki.path(&format!("{name}.toml"));
        std::fs::write(&path, config)?;
        let process = TernProcess::start(&path).await.with_context(|| format!("starting node {name}"))?;
        let admin = process.admin.with_context(|| format!("node {name} has no [admin]"))?;
        Ok(Node { child: process.child, addr: process.addr, admin, config: path, log: process.log })
    }

    async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let (status, body) = admin(self.admin, "GET", "/metrics", None).await?;
        anyhow::ensure!(status == 200, "metrics: {status}");
        Ok(sample(&body, name, labels))
    }

    /// Waits (up to 10 s) until a metric reaches `want`.
    async fn metric_reaches(&self, name: &str, labels: &[(&str, &str)], want: f64) -> Result<f64> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let value = self.metric(name, labels).await?;
            if value >= want || Instant::now() > deadline {
                return Ok(value);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

/// A node config: the file-path plugin, Redis for resumption (`extra` goes into `[resumption]`), admin on.
fn node_config(pki: &Pki, backend: SocketAddr, redis: &str, node: &str, extra: &str) -> String {
    basic_config(pki, backend, "default_certificate = \"default\"")
        + &format!(
            r#"
[[redis]]
name = "shared"
urls = ["{redis}"]

[resumption]
redis = "shared"
secret = "{SECRET}"
node = "{node}"
{extra}

[admin]
bind = "127.0.0.1:0"
"#
        )
}

/// A client that resumes: its own session cache, one TLS version, a TLS 1.2 mode.
fn resuming_client(
    pki: &Pki,
    version: &'static rustls::SupportedProtocolVersion,
    tls12: Tls12Resumption,
) -> Arc<rustls::ClientConfig> {
    let mut config = (*client_config(&pki.ca, &[b"http/1.1"], &[version])).clone();
    config.resumption = rustls::client::Resumption::in_memory_sessions(64).tls12_resumption(tls12);
    Arc::new(config)
}

/// Handshake plus one request (which also makes the client read the TLS 1.3 tickets sent after the
/// handshake); returns how the handshake went.
async fn visit(addr: SocketAddr, client: &Arc<rustls::ClientConfig>, name: &str) -> Result<HandshakeKind> {
    let stream = connect(addr, client, name).await?;
    let kind = stream.get_ref().1.handshake_kind().context("handshake finished")?;
    let (status, _, _) = get(stream, name, "/").await?;
    anyhow::ensure!(status == 200, "status {status}");
    Ok(kind)
}

fn tls12(mode: Tls12Resumption) -> (&'static rustls::SupportedProtocolVersion, Tls12Resumption) {
    (&rustls::version::TLS12, mode)
}

const TLS13: (&rustls::SupportedProtocolVersion, Tls12Resumption) =
    (&rustls::version::TLS13, Tls12Resumption::SessionIdOrTickets);

/// `openssl s_client` over TLS 1.2 for a.test, saving (`-sess_out`) or offering (`-sess_in`) a session file.
async fn openssl_tls12(pki: &Pki, addr: SocketAddr, session_flag: &str, extra: &[&str]) -> Result<String> {
    let ca = pki.path("ca.pem");
    std::fs::write(&ca, pki.ca.pem())?;
    let mut command = std::process::Command::new("openssl");
    command.args(["s_client", "-connect", &addr.to_string(), "-servername", "a.test", "-tls1_2"]);
    command.arg("-CAfile").arg(&ca).arg(session_flag).arg(pki.path("openssl.session")).args(extra);
    Ok(text(&run_command(command).await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_and_tickets_made_on_one_node_resume_on_another() -> Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let redis = RedisServer::start().await?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let a = Node::start(&pki, "a", &node_config(&pki, backend, &redis.url(), "a", "")).await?;
    let b = Node::start(&pki, "b", &node_config(&pki, backend, &redis.url(), "b", "")).await?;

    let cases = [
        ("TLS 1.2 session ID", tls12(Tls12Resumption::SessionIdOnly), true),
        ("TLS 1.2 ticket", tls12(Tls12Resumption::SessionIdOrTickets), false),
        ("TLS 1.3 ticket", TLS13, false),
    ];
    for (label, (version, mode), stateful) in cases {
        let client = resuming_client(&pki, version, mode);
        let received = b.metric("tern_sessions_replicated_total", &[("direction", "in")]).await?;
        assert_eq!(visit(a.addr, &client, "a.test").await?, HandshakeKind::Full, "{label}: first visit");
        if stateful {
            let now =
                b.metric_reaches("tern_sessions_replicated_total", &[("direction", "in")], received + 1.0).await?;
            assert!(now > received, "{label}: B never received A's session");
        }
        assert_eq!(visit(b.addr, &client, "a.test").await?, HandshakeKind::Resumed, "{label}: on node B");
        assert_eq!(visit(a.addr, &client, "a.test").await?, HandshakeKind::Resumed, "{label}: back on A");
    }
    assert!(b.metric("tern_tls_handshakes_total", &[("kind", "resumed")]).await? >= 3.0);
    assert_eq!(a.metric("tern_tls_handshakes_total", &[("kind", "full")]).await?, 3.0);

    // OpenSSL as the client: a TLS 1.2 session ID (no ticket) and a TLS 1.2 ticket, made on A, resumed on B.
    for (label, extra) in [("session ID", &["-no_ticket"][..]), ("ticket", &[][..])] {
        let received = b.metric("tern_sessions_replicated_total", &[("direction", "in")]).await?;
        let first = openssl_tls12(&pki, a.addr, "-sess_out", extra).await?;
        if extra.contains(&"-no_ticket") {
            b.metric_reaches("tern_sessions_replicated_total", &[("direction", "in")], received + 1.0).await?;
        }
        let second = openssl_tls12(&pki, b.addr, "-sess_in", extra).await?;
        assert!(first.contains("New, TLSv1.2"), "openssl {label} on A:\n{first}");
        assert!(second.contains("Reused, TLSv1.2"), "openssl {label} on B:\n{second}");
    }
    // Nothing secret in the logs: no secret, and Redis holds only sealed state.
    for node in [&a, &b] {
        assert!(!node.log_text().contains(SECRET));
    }
    let stream = redis.command(&["XRANGE", "tern:resumption:sessions", "-", "+", "COUNT", "1"]).await?;
    assert!(stream.contains("\r\nd\r\n") && !stream.contains("a.test"), "sessions sealed at rest: {stream}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_node_resume_on_the_survivor() -> Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let redis = RedisServer::start().await?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let mut a = Node::start(&pki, "a", &node_config(&pki, backend, &redis.url(), "a", "")).await?;
    let b = Node::start(&pki, "b", &node_config(&pki, backend, &redis.url(), "b", "")).await?;
    let clients: Vec<_> = (0..30)
        .map(|i| match i % 3 {
            0 => resuming_client(&pki, &rustls::version::TLS13, Tls12Resumption::SessionIdOrTickets),
            1 => resuming_client(&pki, &rustls::version::TLS12, Tls12Resumption::SessionIdOrTickets),
            _ => resuming_client(&pki, &rustls::version::TLS12, Tls12Resumption::SessionIdOnly),
        })
        .collect();
    for client in &clients {
        assert_eq!(visit(a.addr, client, "a.test").await?, HandshakeKind::Full);
    }
    // Every TLS 1.2 client (20) left a session in A's cache; wait until B holds them all.
    b.metric_reaches("tern_sessions_replicated_total", &[("direction", "in")], 20.0).await?;
    a.child.start_kill()?;
    a.child.wait().await?;
    let mut resumed = 0;
    for client in &clients {
        if visit(b.addr, client, "a.test").await? == HandshakeKind::Resumed {
            resumed += 1;
        }
    }
    assert_eq!(resumed, clients.len(), "every client of the dead node resumes on the survivor");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_later_resumes_sessions_made_before_it_started() -> Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let redis = RedisServer::start().await?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    // Tickets off: TLS 1.3 resumes statefully too, so every session below travels through the stream.
    let config = |node: &str| node_config(&pki, backend, &redis.url(), node, "tickets = false");
    let a = Node::start(&pki, "a", &config("a")).await?;
    let clients = [
        resuming_client(&pki, &rustls::version::TLS12, Tls12Resumption::SessionIdOrTickets),
        resuming_client(&pki, &rustls::version::TLS13, Tls12Resumption::SessionIdOrTickets),
    ];
    for client in &clients {
        assert_eq!(visit(a.addr, client, "a.test").await?, HandshakeKind::Full);
    }
    a.metric_reaches("tern_sessions_replicated_total", &[("direction", "out")], 2.0).await?;
    let c = Node::start(&pki, "c", &config("c")).await?;
    c.metric_reaches("tern_sessions_replicated_total", &[("direction", "in")], 2.0).await?;
    for (client, label) in clients.iter().zip(["TLS 1.2 session ID", "TLS 1.3 stateful"]) {
        assert_eq!(visit(c.addr, client, "a.test").await?, HandshakeKind::Resumed, "{label} on the late node");
    }
    assert_eq!(c.metric("tern_tickets_issued_total", &[]).await?, 0.0, "tickets = false issues none");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_while_clients_resume_keeps_resumption_above_99_percent() -> Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let redis = RedisServer::start().await?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let fast = "ticket_rotation = \"1s\"\nticket_lifetime = \"3s\"";
    let a = Node::start(&pki, "a", &node_config(&pki, backend, &redis.url(), "a", fast)).await?;
    let b = Node::start(&pki, "b", &node_config(&pki, backend, &redis.url(), "b", fast)).await?;
    let addrs = [a.addr, b.addr];
    let run_for = Duration::from_secs(6);
    let mut workers = Vec::new();
    for i in 0..6 {
        let client = if i % 2 == 0 {
            resuming_client(&pki, &rustls::version::TLS13, Tls12Resumption::SessionIdOrTickets)
        } else {
            resuming_client(&pki, &rustls::version::TLS12, Tls12Resumption::SessionIdOrTickets)
        };
        workers.push(tokio::spawn(async move {
            let started = Instant::now();
            let (mut resumed, mut full, mut n) = (0u32, 0u32, i);
            visit(addrs[n % 2], &client, "a.test").await?;
            while started.elapsed() < run_for {
                n += 1;
                match visit(addrs[n % 2], &client, "a.test").await? {
                    HandshakeKind::Resumed => resumed += 1,
                    _ => full += 1,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Ok::<_, anyhow::Error>((resumed, full))
        }));
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let config = a.config.to_string_lossy().to_string();
    let rotated = run_command(tern(&["tickets", "rotate", "-c", &config, "--lead", "300ms"])).await?;
    assert!(text(&rotated).contains("generation 1"), "{}", text(&rotated));
    let status = text(&run_command(tern(&["tickets", "status", "-c", &config])).await?);
    assert!(status.contains("CURRENT") && status.contains("opens") && !status.contains("DIFFERENT"), "{status}");
    assert!(!status.contains(SECRET), "{status}");
    let (mut resumed, mut full) = (0, 0);
    for worker in workers {
        let (r, f) = worker.await??;
        resumed += r;
        full += f;
    }
    let share = f64::from(resumed) / f64::from(resumed + full);
    println!("rotation under load: {resumed} resumed, {full} full ({:.2} % resumed)", share * 100.0);
    assert!(resumed + full >= 100, "too few handshakes to judge: {}", resumed + full);
    assert!(share >= 0.99, "{resumed} resumed, {full} full");
    // Keys really rotated: six one-second slots went by; a key that never changed would be over 6 s old.
    assert!(a.metric("tern_ticket_key_age_seconds", &[]).await? <= 3.0);
    assert_eq!(a.metric("tern_ticket_key_local", &[]).await?, 0.0);
    Ok(())
}

/// Wall time frozen at construction: the client keeps offering tickets its own clock would call expired, so
/// the test sees the server refuse them.
#[derive(Debug)]
struct FrozenClock(rustls::pki_types::UnixTime);

impl rustls::time_provider::TimeProvider for FrozenClock {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        Some(self.0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ticket_older_than_the_key_window_gets_a_full_handshake() -> Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let redis = RedisServer::start().await?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let window = "ticket_rotation = \"1s\"\nticket_lifetime = \"1s\"";
    let a = Node::start(&pki, "a", &node_config(&pki, backend, &redis.url(), "a", window)).await?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.der())?;
    let provider = tern::crypto::provider().clone();
    let clock = Arc::new(FrozenClock(rustls::pki_types::UnixTime::now()));
    let mut client = rustls::ClientConfig::builder_with_details(provider, clock)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let client = Arc::new(client);
    assert_eq!(visit(a.addr, &client, "a.test").await?, HandshakeKind::Full);
    assert_eq!(visit(a.addr, &client, "a.test").await?, HandshakeKind::Resumed, "within the window");
    // Window: the key's slot plus one more (lifetime 1 s / rotation 1 s) and the next: 3.2 s is past it.
    let refused = || async {
        // A key past the window is dropped from the ring at the next refresh; until then it counts as expired.
        let unknown = a.metric("tern_ticket_rejections_total", &[("reason", "unknown_key")]).await?;
        let expired = a.metric("tern_ticket_rejections_total", &[("reason", "expired_key")]).await?;
        Ok::<_, anyhow::Error>(unknown + expired)
    };
    assert_eq!(refused().await?, 0.0);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    assert_eq!(visit(a.addr, &client, "a.test").await?, HandshakeKind::Full, "ticket past the window");
    assert_eq!(refused().await?, 1.0, "the server saw the old ticket and refused it");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_down_nodes_use_local_keys_then_recover_the_fleet_keys() -> Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let mut redis = RedisServer::start().await?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let fast = "ticket_rotation = \"1s\"\nticket_lifetime = \"2s\"";
    let a = Node::start(&pki, "a", &node_config(&pki, backend, &redis.url(), "a", fast)).await?;
    let b = Node::start(&pki, "b", &node_config(&pki, backend, &redis.url(), "b", fast)).await?;
    let tls13 = || resuming_client(&pki, &rustls::version::TLS13, Tls12Resumption::SessionIdOrTickets);

    redis.kill().await?;
    // The next slot's key was pulled ahead; the one after that cannot be: a local key takes over.
    assert_eq!(a.metric_reaches("tern_ticket_key_local", &[], 1.0).await?, 1.0, "{}", a.log_text());
    let client = tls13();
    assert_eq!(visit(a.addr, &client, "a.test").await?, HandshakeKind::Full);
    assert_eq!(visit(a.addr, &client, "a.test").await?, HandshakeKind::Resumed, "local key resumes locally");
    assert!(a.metric("tern_resumption_redis_errors_total", &[]).await? >= 1.0);

    redis.restart().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while (a.metric("tern_ticket_key_local", &[]).await? != 0.0 || b.metric("tern_ticket_key_local", &[]).await? != 0.0)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.metric("tern_ticket_key_local", &[]).await?, 0.0, "{}", a.log_text());
    assert_eq!(b.metric("tern_ticket_key_local", &[]).await?, 0.0);
    let client = tls13();
    assert_eq!(visit(a.addr, &client, "a.test").await?, HandshakeKind::Full);
    // With 1 s slots, A may have just made the new slot's key; B pulls keys every quarter slot, so give it one
    // pull (seen failing on a loaded machine when B was asked at once).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(visit(b.addr, &client, "a.test").await?, HandshakeKind::Resumed, "fleet keys again");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_with_other_client_auth_never_share_sessions() -> Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    std::fs::write(pki.path("ca.pem"), pki.ca.pem())?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let mtls = |name: &str, mode: &str| {
        format!(
            "\n[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nplugin = \"files\"\nbackend = \"http://{backend}\"\n\
             default_certificate = \"default\"\nclient_ca = \"ca.pem\"\nclient_auth = \"{mode}\"\n"
        )
    };
    let config = basic_config(&pki, backend, "default_certificate = \"default\"")
        + &mtls("optional", "optional")
        + &mtls("required", "required");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let addr_of = |name: &str| server.addrs.iter().find(|(n, _)| n == name).map(|(_, a)| *a).unwrap();
    for (label, (version, mode)) in [
        ("TLS 1.3 ticket", TLS13),
        ("TLS 1.2 ticket", tls12(Tls12Resumption::SessionIdOrTickets)),
        ("TLS 1.2 session ID", tls12(Tls12Resumption::SessionIdOnly)),
    ] {
        // The client caches by server name only, so it offers each listener the other's session.
        for (home, away) in [(server.addr, addr_of("optional")), (addr_of("optional"), server.addr)] {
            let client = resuming_client(&pki, version, mode);
            assert_eq!(visit(home, &client, "a.test").await?, HandshakeKind::Full, "{label}");
            assert_eq!(visit(home, &client, "a.test").await?, HandshakeKind::Resumed, "{label}: same scope resumes");
            let away = visit(away, &client, "a.test").await?;
            assert_eq!(away, HandshakeKind::Full, "{label}: a session must not cross client-auth settings");
        }
    }
    let refused = connect(addr_of("required"), &pki.client(&[b"http/1.1"]), "a.test").await;
    let refused = match refused {
        Err(err) => Some(err),
        // TLS 1.3: the server's verdict on the (missing) client certificate arrives after the client finished.
        Ok(stream) => get(stream, "a.test", "/").await.err().map(|e| std::io::Error::other(e.to_string())),
    };
    assert!(refused.is_some(), "a client without a certificate is refused where one is required");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_carries_keys_and_sessions_too() -> Result<()> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let cluster = crate::redis_support::RedisCluster::start().await?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let urls = cluster.urls().iter().map(|u| format!("{u:?}")).collect::<Vec<_>>().join(", ");
    let config = |node: &str| {
        node_config(&pki, backend, "CLUSTER", node, "")
            .replace("urls = [\"CLUSTER\"]", &format!("urls = [{urls}]\ncluster = true"))
    };
    let a = Node::start(&pki, "a", &config("a")).await?;
    let b = Node::start(&pki, "b", &config("b")).await?;
    for (label, (version, mode), stateful) in
        [("TLS 1.2 session ID", tls12(Tls12Resumption::SessionIdOnly), true), ("TLS 1.3 ticket", TLS13, false)]
    {
        let client = resuming_client(&pki, version, mode);
        assert_eq!(visit(a.addr, &client, "a.test").await?, HandshakeKind::Full, "{label}");
        if stateful {
            b.metric_reaches("tern_sessions_replicated_total", &[("direction", "in")], 1.0).await?;
        }
        assert_eq!(visit(b.addr, &client, "a.test").await?, HandshakeKind::Resumed, "{label} across the cluster");
    }
    let status = text(&run_command(tern(&["tickets", "status", "-c", &a.config.to_string_lossy()])).await?);
    assert!(status.contains("CURRENT") && status.contains("opens"), "{status}");
    assert_eq!(a.metric("tern_resumption_redis_errors_total", &[]).await?, 0.0, "{}", a.log_text());
    Ok(())
}

/// TLS 1.3 tickets a client holds after one request over a fresh connection to a server whose `[resumption]`
/// section is `resumption` (none: the defaults).
async fn tickets_after_one_request(resumption: &str) -> Result<u32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new(&["a.test", "default.test"])?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let config = basic_config(&pki, backend, "default_certificate = \"default\"") + resumption;
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let mut stream = connect(server.addr, &pki.client(&[b"http/1.1"]), "a.test").await?;
    stream.write_all(b"GET / HTTP/1.1\r\nhost: a.test\r\nconnection: close\r\n\r\n").await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    anyhow::ensure!(response.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&response));
    Ok(stream.get_ref().1.tls13_tickets_received())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tls13_ticket_per_handshake_unless_configured() -> Result<()> {
    assert_eq!(tickets_after_one_request("").await?, 1, "default: one ticket, as Go and Caddy send");
    assert_eq!(tickets_after_one_request("\n[resumption]\ntls13_tickets = 3\n").await?, 3);
    assert_eq!(tickets_after_one_request("\n[resumption]\ntls13_tickets = 0\n").await?, 0);
    Ok(())
}
