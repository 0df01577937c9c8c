//! The core path without sockets. Selection runs on a real plugin (the chaos test plugin, which misbehaves on
//! request), a real cache and real static certificates: static, cache hit, miss, negative, stale, default,
//! strict, plugin error and timeout. TLS acceptance runs over `tokio::io::duplex` with a real rustls client, and
//! the handshake deadline under paused time.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tern::cache::CertCache;
use tern::config::{CacheSettings, Grants, PluginSettings, StaticCertSettings};
use tern::failure::{Blame, FailureKind};
use tern::metrics::Metrics;
use tern::plugin::{Outcome, PluginError, PluginSlot};
use tern::select::{Policy, SelectError, Selector, Source, StaticCerts};
use tern::tls::{self, TlsTemplate};

use crate::support::*;

/// A selector over a static certificate (`static.test`), a default one (`default.test`) and the chaos plugin
/// granted the PKI's directory (it serves `a.test`; `error.*` returns an error, `loop.*` spins).
struct Core {
    pki: Pki,
    selector: Selector,
    slot: Arc<PluginSlot>,
    metrics: Arc<Metrics>,
    /// Falls back to the default certificate.
    lenient: Policy,
    /// Refuses what nobody serves.
    strict: Policy,
}

fn cache_settings(ttl: Duration) -> CacheSettings {
    CacheSettings {
        max_entries: 1000,
        max_bytes: 16 << 20,
        max_negative_entries: 1000,
        ttl,
        max_ttl: Duration::from_secs(3600),
        negative_ttl: Duration::from_secs(60),
        max_stale: Duration::from_secs(60),
        invalid_ttl: Duration::from_secs(10),
    }
}

async fn core(cache: CacheSettings, plugin_timeout: Duration) -> anyhow::Result<Core> {
    let pki = Pki::new(&["default.test", "static.test", "a.test"])?;
    let certificate = |name: &str, serves: Vec<String>| StaticCertSettings {
        name: name.into(),
        cert: pki.certs().join(format!("{name}.test.crt")),
        key: pki.certs().join(format!("{name}.test.key")),
        serve_names: Some(serves),
    };
    let statics =
        StaticCerts::load(&[certificate("default", vec![]), certificate("static", vec!["static.test".into()])])?;
    let default = statics.by_id("default").cloned();
    let mut settings = PluginSettings::one_off("chaos", std::path::Path::new(CHAOS_PLUGIN));
    settings.timeout = plugin_timeout;
    settings.max_concurrency = 4;
    settings.grants = Grants { files: Some(pki.certs()), ..Grants::default() };
    let runtime =
        tern::plugin::runtime_for(std::slice::from_ref(&settings), tern::config::defaults::PLUGIN_KEEP_RESIDENT)?;
    let plugin = tern::plugin::load_all(&runtime, &[settings], &tern::store::Stores::new()).await?.remove(0);
    let slot = Arc::new(PluginSlot::new(plugin));
    let metrics = Arc::new(Metrics::default());
    let selector = Selector::new(statics, CertCache::new(&cache, metrics.clone()), metrics.clone());
    let lenient = Policy { listener: "memory".into(), plugin: Some(slot.clone()), default };
    let strict = Policy { listener: "memory".into(), plugin: Some(slot.clone()), default: None };
    Ok(Core { pki, selector, slot, metrics, lenient, strict })
}

impl Core {
    async fn source(&self, policy: &Policy, sni: &str) -> Result<Source, SelectError> {
        self.selector.select(policy, Some(sni)).await.map(|(_, source)| source)
    }

    async fn failure(&self, policy: &Policy, sni: Option<&str>) -> SelectError {
        self.selector.select(policy, sni).await.map(|(_, s)| s).expect_err("selection should fail")
    }

    fn calls(&self) -> u64 {
        self.slot.stats().calls()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn selection_goes_static_then_cache_then_plugin_then_the_listeners_fallback() -> anyhow::Result<()> {
    let core = core(cache_settings(Duration::from_secs(300)), Duration::from_secs(1)).await?;
    assert_eq!(core.source(&core.lenient, "static.test").await?, Source::Static);
    assert_eq!(core.calls(), 0, "a static certificate never asks the plugin");
    assert_eq!(core.source(&core.lenient, "a.test").await?, Source::Plugin, "miss");
    assert_eq!(core.source(&core.lenient, "A.Test.").await?, Source::CacheHit, "hit, under the normalised name");
    assert_eq!(core.calls(), 1);
    // Negative answers are cached too; the default certificate serves them.
    assert_eq!(core.source(&core.lenient, "nobody.test").await?, Source::Default);
    assert_eq!(core.source(&core.lenient, "nobody.test").await?, Source::Default);
    assert_eq!((core.calls(), counter(&core.metrics.cache_negative_hits)), (2, 1));
    // A strict listener refuses instead, and blames the client.
    let unknown = core.failure(&core.strict, Some("nobody.test")).await;
    assert_eq!((unknown.kind(), unknown.blame()), (FailureKind::UnknownName, Blame::Client), "{unknown}");
    assert_eq!(core.failure(&core.strict, None).await.kind(), FailureKind::NoSni);
    assert_eq!(core.failure(&core.strict, Some("bad..name")).await.kind(), FailureKind::MalformedSni);
    assert_eq!(core.calls(), 2, "malformed names and cached negatives never reach the plugin");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_error_or_timeout_fails_that_name_only_and_blames_the_plugin() -> anyhow::Result<()> {
    let core = core(cache_settings(Duration::from_secs(300)), Duration::from_millis(300)).await?;
    let error = core.failure(&core.lenient, Some("error.test")).await;
    assert!(
        matches!(&error, SelectError::Plugin { source: PluginError::Returned(_), .. }),
        "a plugin error is not papered over with the default certificate: {error}"
    );
    assert_eq!(error.blame(), Blame::Plugin);
    let timeout = core.failure(&core.lenient, Some("loop.test")).await;
    assert!(matches!(&timeout, SelectError::Plugin { source: PluginError::Timeout(_), .. }), "{timeout}");
    assert_eq!(core.slot.stats().count(Outcome::Timeout), 1);
    assert_eq!(core.source(&core.lenient, "a.test").await?, Source::Plugin, "other names are still served");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refresh_that_is_refused_serves_the_cached_certificate_past_its_ttl() -> anyhow::Result<()> {
    let core = core(cache_settings(Duration::from_millis(200)), Duration::from_secs(1)).await?;
    let (first, source) = core.selector.select(&core.lenient, Some("a.test")).await?;
    assert_eq!(source, Source::Plugin);
    std::fs::write(core.pki.certs().join("a.test.crt"), "not a certificate")?;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (again, source) = core.selector.select(&core.lenient, Some("a.test")).await?;
    assert_eq!(source, Source::Stale, "served past its TTL while the refresh runs");
    let (Some(first), Some(again)) = (first.served(), again.served()) else { anyhow::bail!("not served") };
    assert!(Arc::ptr_eq(first, again), "the certificate cached before");
    // The background refresh gets the bad certificate and refuses it: the cached one keeps serving.
    for _ in 0..100 {
        if core.calls() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((core.calls(), counter(&core.metrics.stale_serves)), (2, 1));
    let (again, source) = core.selector.select(&core.lenient, Some("a.test")).await?;
    assert_eq!(source, Source::Stale, "stale-if-error: the refused refresh left the cached answer");
    assert!(again.served().is_some_and(|again| Arc::ptr_eq(first, again)));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_past_its_ttl_is_served_at_once_while_one_refresh_runs_in_the_background() -> anyhow::Result<()> {
    let core = core(cache_settings(Duration::from_millis(300)), Duration::from_secs(5)).await?;
    core.pki.issue_as("slow.test", &["slow.test"])?;
    // The chaos plugin takes 1.5 s for `slow.*` names.
    assert_eq!(core.source(&core.lenient, "slow.test").await?, Source::Plugin);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Past its TTL: every handshake is answered from the cache at once, none waits for the refresh.
    for _ in 0..5 {
        assert_eq!(core.source(&core.lenient, "slow.test").await?, Source::Stale);
    }
    let found = || core.slot.stats().count(Outcome::Found);
    assert_eq!(found(), 1, "the stale answers did not wait for the refresh");
    for _ in 0..250 {
        if found() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(found(), 2, "one background refresh for five stale handshakes");
    assert_eq!(core.source(&core.lenient, "slow.test").await?, Source::CacheHit, "the refreshed answer is fresh");
    assert_eq!(found(), 2);
    Ok(())
}

fn template() -> anyhow::Result<TlsTemplate> {
    let sessions = rustls::server::ServerSessionMemoryCache::new(64);
    Ok(TlsTemplate::new(&[b"http/1.1".to_vec()], &Default::default(), None, sessions, None, 1)?)
}

async fn client_over(
    io: tokio::io::DuplexStream,
    core: &Core,
    name: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::io::DuplexStream>> {
    let name = rustls::pki_types::ServerName::try_from(name.to_string())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tokio_rustls::TlsConnector::from(core.pki.client(&[])).connect(name, io).await
}

/// A plugin memory slot kept resident between calls (`server.plugin_keep_resident`) is reset completely: no call
/// sees what an earlier call wrote, neither in initialised data nor in 768 separate dirty pages of zeroed memory
/// (the chaos plugin's `residue`), with the default kept, with nothing kept, and with a spare instance made ahead
/// of each call (`spare_instances`: every call but the first runs on one, each in a slot an earlier call
/// dirtied). One call at a time, so each call gets the slot the previous one left (its permit is freed only once
/// that slot is reset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_plugin_call_sees_what_an_earlier_call_left_in_its_memory() -> anyhow::Result<()> {
    let name = tern::sni::ServerName::parse("residue.example.test").map_err(|e| anyhow::anyhow!("{e}"))?;
    let kept = tern::config::defaults::PLUGIN_KEEP_RESIDENT;
    for (keep, spares) in [(kept, 0), (0, 0), (kept, 1)] {
        let mut settings = PluginSettings::one_off("chaos", std::path::Path::new(CHAOS_PLUGIN));
        settings.max_concurrency = 1;
        settings.spare_instances = spares;
        let runtime = tern::plugin::runtime_for(std::slice::from_ref(&settings), keep)?;
        let plugin = tern::plugin::load_all(&runtime, &[settings], &tern::store::Stores::new()).await?.remove(0);
        for call in 0..12 {
            if call > 0 {
                let ready = || {
                    let ready = plugin.spares_ready() >= spares;
                    async move { Ok(ready) }
                };
                eventually_within(
                    &format!("call {call}: a spare made"),
                    Duration::from_secs(5),
                    Duration::from_millis(2),
                    ready,
                )
                .await?;
            }
            match plugin.select(&name, "memory").await {
                Err(PluginError::Returned(message)) => {
                    assert_eq!(message, "residue: clean", "call {call}, {keep} bytes kept resident, {spares} spares")
                }
                other => panic!("call {call}: expected the plugin's report, got {other:?}"),
            }
        }
        assert_eq!(plugin.stats().calls_on_spare(), if spares > 0 { 11 } else { 0 });
        // The pages really stayed: the reset above was the in-place one, not a decommit. (With a spare, the slot
        // the last call left is the spare's now, in use, so the pool counts no unused resident bytes.)
        if spares == 0 && runtime.keep_resident() > 0 {
            let kept = || {
                let kept = runtime.pool_resident_bytes() >= 3 << 20;
                async move { Ok(kept) }
            };
            eventually_within("3 MiB kept resident", Duration::from_secs(5), Duration::from_millis(10), kept)
                .await
                .with_context(|| format!("only {} bytes kept resident", runtime.pool_resident_bytes()))?;
        }
        if keep == 0 {
            assert_eq!(runtime.pool_resident_bytes(), 0);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_over_memory_serves_the_chosen_certificate_or_refuses_with_an_alert() -> anyhow::Result<()> {
    let core = core(cache_settings(Duration::from_secs(300)), Duration::from_secs(1)).await?;
    let template = template()?;
    let (client_io, server_io) = tokio::io::duplex(64 << 10);
    let (client, served) = tokio::join!(
        client_over(client_io, &core, "a.test"),
        tls::accept(server_io, None, &core.selector, &core.lenient, &template)
    );
    let client = client?;
    let Ok(tls::Outcome::Accepted(accepted)) = served else { anyhow::bail!("not accepted: {served:?}") };
    assert_eq!((accepted.source, accepted.servername.as_ref().map(|n| n.as_str())), (Source::Plugin, Some("a.test")));
    let leaf = client.get_ref().1.peer_certificates().expect("handshake done")[0].clone();
    assert_eq!(leaf, core.pki.leaf("a.test"));

    let (client_io, server_io) = tokio::io::duplex(64 << 10);
    let server = async {
        match tls::accept(server_io, None, &core.selector, &core.strict, &template).await {
            Ok(tls::Outcome::Refused(refusal)) => {
                let kind = refusal.error.kind();
                refusal.send_alert().await;
                Some(kind)
            }
            _ => None,
        }
    };
    let (client, refused) = tokio::join!(client_over(client_io, &core, "nobody.test"), server);
    assert_eq!(refused, Some(FailureKind::UnknownName));
    let err = client.expect_err("a strict listener refuses an unknown name");
    assert_eq!(alert_of(&err), Some(REFUSED), "{err}");
    Ok(())
}

/// Bytes of a cache hit's selection future: ~1.5 KB in debug and release builds (17 KB before the miss path was
/// boxed).
const SELECT_FUTURE_MAX: usize = 4096;
/// Bytes of `tls::accept`'s future: ~5.8 KB (20 KB before).
const ACCEPT_FUTURE_MAX: usize = 8192;

/// A future is as large as its largest path, and a handshake's is copied whole (into its task, into the deadline's
/// timer): the plugin call, the cache's miss path, ACME and the challenge answer are boxed where they start, so the
/// future of a cache hit does not carry them. Before, selection alone was 17 KB and a connection's task 44 KB
/// (release build): 12 KiB more per open connection (`bench/conn-memory.py`).
#[tokio::test]
async fn a_handshakes_future_does_not_carry_the_miss_path() -> anyhow::Result<()> {
    let core = core(cache_settings(Duration::from_secs(300)), Duration::from_secs(1)).await?;
    let template = template()?;
    let select = core.selector.select(&core.lenient, Some("a.test"));
    let (_client_io, server_io) = tokio::io::duplex(1024);
    let accept = tls::accept(server_io, None, &core.selector, &core.lenient, &template);
    let (select, accept) = (std::mem::size_of_val(&select), std::mem::size_of_val(&accept));
    assert!(select <= SELECT_FUTURE_MAX, "selection's future is {select} bytes");
    assert!(accept <= ACCEPT_FUTURE_MAX, "a handshake's future is {accept} bytes");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_client_that_never_finishes_its_hello_is_held_only_until_the_deadline() -> anyhow::Result<()> {
    let core = core(cache_settings(Duration::from_secs(300)), Duration::from_secs(1)).await?;
    let template = template()?;
    let (mut client_io, server_io) = tokio::io::duplex(64 << 10);
    // The first bytes of a TLS record header, then nothing.
    tokio::io::AsyncWriteExt::write_all(&mut client_io, &[0x16, 0x03, 0x01]).await?;
    let started = tokio::time::Instant::now();
    let deadline = Duration::from_secs(10);
    let accepted =
        tokio::time::timeout(deadline, tls::accept(server_io, None, &core.selector, &core.lenient, &template));
    assert!(accepted.await.is_err(), "accept waits for the rest of the hello");
    assert!(started.elapsed() >= deadline, "and only the deadline ends it");
    assert_eq!(core.calls(), 0);
    Ok(())
}

/// A transport that counts the writes made to it (a vectored write is one write, as one `writev` would be).
struct CountingWrites {
    inner: tokio::io::DuplexStream,
    writes: Arc<std::sync::atomic::AtomicUsize>,
}

impl tokio::io::AsyncRead for CountingWrites {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CountingWrites {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[std::io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let joined: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let written = std::pin::Pin::new(&mut self.inner).poll_write(cx, &joined);
        if matches!(written, std::task::Poll::Ready(Ok(n)) if n > 0) {
            self.writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// When the hand-driven client sends its request.
#[derive(Clone, Copy, PartialEq)]
enum Ask {
    /// In the same write as its Finished (as browsers send them).
    WithFinished,
    /// In a write of its own a moment after its Finished (as curl, Python and tokio-rustls do).
    AfterFinished,
    /// Only once the server's ticket has arrived (a preconnect, a client that reads first).
    AfterTicket,
}

/// A TLS 1.3 client driven by hand, sending its request as `ask` says. Returns the tickets it got and the plaintext
/// answer.
async fn hand_driven_client(mut io: tokio::io::DuplexStream, core: &Core, ask: Ask) -> anyhow::Result<(u32, Vec<u8>)> {
    use std::io::{Read, Write};
    use tokio::io::AsyncReadExt;
    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nhost: a.test\r\n\r\n";
    let config = client_config(&core.pki.ca, &[], &[&rustls::version::TLS13]);
    let mut conn = rustls::ClientConnection::new(config, "a.test".try_into()?)?;
    let mut buf = vec![0u8; 16 << 10];
    let mut requested = false;
    let mut answer = Vec::new();
    loop {
        if !conn.is_handshaking() && !requested {
            if ask == Ask::AfterFinished {
                // The Finished alone first, then the request after a pause well inside the server's ticket hold.
                send_tls(&mut conn, &mut io).await?;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if ask != Ask::AfterTicket || conn.tls13_tickets_received() > 0 {
                conn.writer().write_all(REQUEST)?;
                requested = true;
            }
        }
        send_tls(&mut conn, &mut io).await?;
        let mut plain = [0u8; 4096];
        while let Ok(n) = conn.reader().read(&mut plain) {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&plain[..n]);
        }
        if answer.ends_with(b"ok") {
            return Ok((conn.tls13_tickets_received(), answer));
        }
        let n = io.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "server closed; answer so far {:?}", String::from_utf8_lossy(&answer));
        conn.read_tls(&mut &buf[..n])?;
        conn.process_new_packets()?;
    }
}

/// Writes whatever the client connection has to send.
async fn send_tls(conn: &mut rustls::ClientConnection, io: &mut tokio::io::DuplexStream) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    while conn.wants_write() {
        let mut out = Vec::new();
        conn.write_tls(&mut out)?;
        io.write_all(&out).await?;
    }
    Ok(())
}

/// One hand-driven client (`ask`) against one served handshake and answer: the client's tickets and answer, and the
/// server's writes by the end of the handshake and of the answer.
async fn ticket_exchange(
    core: &Core,
    template: &TlsTemplate,
    ask: Ask,
) -> anyhow::Result<((u32, Vec<u8>), (usize, usize))> {
    let (client_io, server_io) = tokio::io::duplex(64 << 10);
    let (client, server) =
        tokio::join!(hand_driven_client(client_io, core, ask), counted_answer(server_io, core, template));
    Ok((client?, server?))
}

/// Serves one handshake on `io` and answers one request; returns the writes made by the end of the handshake and
/// by the end of the answer.
async fn counted_answer(
    io: tokio::io::DuplexStream,
    core: &Core,
    template: &TlsTemplate,
) -> anyhow::Result<(usize, usize)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let io = CountingWrites { inner: io, writes: writes.clone() };
    let Ok(tls::Outcome::Accepted(mut accepted)) = tls::accept(io, None, &core.selector, &core.lenient, template).await
    else {
        anyhow::bail!("not accepted")
    };
    let after_handshake = writes.load(std::sync::atomic::Ordering::SeqCst);
    let mut request = vec![0u8; 1024];
    let n = accepted.stream.read(&mut request).await?;
    anyhow::ensure!(request[..n].starts_with(b"GET / "), "{:?}", String::from_utf8_lossy(&request[..n]));
    // As hyper's server does each time it has polled the connection, with nothing written yet.
    accepted.stream.flush().await?;
    accepted.stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await?;
    accepted.stream.flush().await?;
    Ok((after_handshake, writes.load(std::sync::atomic::Ordering::SeqCst)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls13_tickets_leave_with_the_answer_when_the_request_came_with_the_finished() -> anyhow::Result<()> {
    let core = core(cache_settings(Duration::from_secs(300)), Duration::from_secs(1)).await?;
    let template = template()?;
    // The request in the client's Finished flight: the ticket waits and leaves in the answer's write.
    let ((tickets, answer), writes) = ticket_exchange(&core, &template, Ask::WithFinished).await?;
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&answer));
    assert_eq!(tickets, 1, "the ticket arrived with the answer");
    assert_eq!(writes, (1, 2), "server flight; then ticket and answer in one write");
    // The request in a write of its own after the Finished: the ticket still waits for the answer.
    let ((tickets, _), writes) = ticket_exchange(&core, &template, Ask::AfterFinished).await?;
    assert_eq!(tickets, 1);
    assert_eq!(writes, (1, 2), "server flight; then ticket and answer in one write");
    // A client that waits for its ticket before it asks anything (a preconnect) gets it without asking, once the
    // hold is over.
    let started = std::time::Instant::now();
    let ((tickets, _), writes) = ticket_exchange(&core, &template, Ask::AfterTicket).await?;
    assert_eq!(tickets, 1);
    assert_eq!(writes, (1, 3), "server flight; the ticket alone after the hold; the answer");
    assert!(started.elapsed() >= tern::coalesce::TICKET_HOLD, "the ticket went before the hold was over");
    Ok(())
}
