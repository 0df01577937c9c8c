//! The client side: handshakes for one name until the server presents a certificate that chains to Pebble's root,
//! what each attempt got, and the figures of a set of names.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use serde_json::{Value, json};

/// Pause after a handshake that failed outright (refused, reset, alert) before the next attempt.
const AFTER_ERROR: Duration = Duration::from_millis(250);
/// Pause after a handshake that completed with the wrong certificate (the server already waited).
const AFTER_FALLBACK: Duration = Duration::from_millis(50);

/// What one handshake got.
#[derive(Debug)]
pub enum Attempt {
    /// A certificate chaining to Pebble's root, valid for the name.
    Issued,
    /// The server's fallback (default) certificate.
    Fallback,
    /// Some other certificate that does not verify.
    Wrong(String),
    /// The handshake failed (connection refused or reset, an alert).
    Error(String),
    /// No finished handshake within the attempt timeout.
    Timeout,
}

/// Handshakes with SNI, checked the way a browser trusting only Pebble's root would check them; resumption off,
/// so every attempt shows the certificate served now.
#[derive(Debug, Clone)]
pub struct Probe {
    client: Arc<rustls::ClientConfig>,
    pebble: Arc<WebPkiServerVerifier>,
    fallback: Option<CertificateDer<'static>>,
    attempt_timeout: Duration,
}

impl Probe {
    /// `roots_pem`: Pebble's root (`GET /roots/0`); `fallback`: the leaf a server serves while it has nothing.
    pub fn new(roots_pem: &str, fallback: Option<CertificateDer<'static>>, attempt_timeout: Duration) -> Result<Self> {
        let provider = tern::crypto::provider().clone();
        let mut roots = rustls::RootCertStore::empty();
        for root in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
            roots.add(root?)?;
        }
        anyhow::ensure!(!roots.is_empty(), "no root in Pebble's /roots/0");
        let pebble = WebPkiServerVerifier::builder_with_provider(roots.into(), provider.clone()).build()?;
        // The chain is checked after the handshake (to tell the fallback from other failures); the handshake
        // signature is checked during it.
        let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(tern_fixtures::TestVerifier::accept_any(provider))
            .with_no_client_auth();
        client.resumption = rustls::client::Resumption::disabled();
        client.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Self { client: Arc::new(client), pebble, fallback, attempt_timeout })
    }

    /// One handshake to `addr` sending `name`.
    pub async fn attempt(&self, addr: SocketAddr, name: &str) -> Attempt {
        let Ok(server_name) = ServerName::try_from(name.to_string()) else {
            return Attempt::Error(format!("{name}: not a server name"));
        };
        let handshake = async {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tokio_rustls::TlsConnector::from(self.client.clone()).connect(server_name.clone(), tcp).await
        };
        let stream = match tokio::time::timeout(self.attempt_timeout, handshake).await {
            Err(_) => return Attempt::Timeout,
            Ok(Err(err)) => return Attempt::Error(err.to_string()),
            Ok(Ok(stream)) => stream,
        };
        let Some(chain) = stream.get_ref().1.peer_certificates() else {
            return Attempt::Error("no certificate presented".into());
        };
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Attempt::Error("empty certificate chain".into());
        };
        if self.fallback.as_ref() == Some(leaf) {
            return Attempt::Fallback;
        }
        match self.pebble.verify_server_cert(leaf, intermediates, &server_name, &[], UnixTime::now()) {
            Ok(_) => Attempt::Issued,
            Err(err) => Attempt::Wrong(err.to_string()),
        }
    }
}

/// What obtaining one name took.
#[derive(Debug, Default)]
pub struct NameOutcome {
    /// From the first attempt's start to the end of the handshake that presented Pebble's certificate.
    pub issued_after: Option<Duration>,
    pub attempts: u32,
    pub fallbacks: u32,
    pub wrong: u32,
    pub errors: u32,
    pub timeouts: u32,
    /// Failed attempts by what the client saw.
    pub failures: BTreeMap<String, u32>,
}

impl NameOutcome {
    /// Attempts that did not end in Pebble's certificate.
    pub fn failed_handshakes(&self) -> u32 {
        self.fallbacks + self.wrong + self.errors + self.timeouts
    }
}

/// Names of a phase issued so far, and whether the phase was stopped for want of progress.
#[derive(Debug, Default)]
pub struct Progress {
    issued: AtomicUsize,
    stopped: AtomicBool,
}

/// Handshakes for `name` until one presents Pebble's certificate, `deadline` passes or `progress` is stopped.
/// Attempt `k` goes to `targets[(first + k) % len]`: with two nodes, a retry lands on the other one (a load
/// balancer without affinity). With `race`, the first attempt goes to every target at once (the time to
/// certificate is then that of the first handshake that presented one).
pub async fn obtain(
    probe: &Probe,
    targets: &[SocketAddr],
    first: usize,
    name: &str,
    deadline: Instant,
    progress: &Progress,
    race: bool,
) -> NameOutcome {
    let mut outcome = NameOutcome::default();
    let started = Instant::now();
    let mut k = first;
    while Instant::now() < deadline && !progress.stopped.load(Ordering::Relaxed) {
        let addrs = if race && k == first { targets.to_vec() } else { vec![targets[k % targets.len()]] };
        k += 1;
        let attempts = futures_util::future::join_all(addrs.into_iter().map(|addr| async move {
            let attempt = probe.attempt(addr, name).await;
            (attempt, started.elapsed())
        }))
        .await;
        let (mut issued_after, mut pause) = (None::<Duration>, Duration::ZERO);
        for (attempt, elapsed) in attempts {
            outcome.attempts += 1;
            let failure = match attempt {
                Attempt::Issued => {
                    issued_after = Some(issued_after.map_or(elapsed, |t| t.min(elapsed)));
                    continue;
                }
                Attempt::Fallback => {
                    outcome.fallbacks += 1;
                    pause = pause.max(AFTER_FALLBACK);
                    "the fallback certificate".to_string()
                }
                Attempt::Wrong(err) => {
                    outcome.wrong += 1;
                    pause = pause.max(AFTER_FALLBACK);
                    format!("wrong certificate: {err}")
                }
                Attempt::Error(err) => {
                    outcome.errors += 1;
                    pause = pause.max(AFTER_ERROR);
                    err
                }
                Attempt::Timeout => {
                    outcome.timeouts += 1;
                    format!("no handshake within {:?}", probe.attempt_timeout)
                }
            };
            *outcome.failures.entry(failure).or_default() += 1;
        }
        if let Some(elapsed) = issued_after {
            outcome.issued_after = Some(elapsed);
            progress.issued.fetch_add(1, Ordering::Relaxed);
            return outcome;
        }
        tokio::time::sleep(pause).await;
    }
    outcome
}

/// The figures of a set of names obtained together.
#[derive(Debug)]
pub struct Phase {
    pub names: usize,
    pub concurrency: usize,
    pub wall: Duration,
    pub outcomes: Vec<NameOutcome>,
    /// Stopped because no name was issued for this long (the CA hung), if it was.
    pub stalled: Option<Duration>,
}

impl Phase {
    /// Times to certificate of the names that got one, sorted, in milliseconds.
    fn latencies_ms(&self) -> Vec<f64> {
        let mut ms: Vec<f64> =
            self.outcomes.iter().filter_map(|o| o.issued_after).map(|d| d.as_secs_f64() * 1000.0).collect();
        ms.sort_by(f64::total_cmp);
        ms
    }

    pub fn issued(&self) -> usize {
        self.outcomes.iter().filter(|o| o.issued_after.is_some()).count()
    }

    pub fn json(&self) -> Value {
        let ms = self.latencies_ms();
        let sum = |f: fn(&NameOutcome) -> u32| self.outcomes.iter().map(|o| u64::from(f(o))).sum::<u64>();
        let mut failures: BTreeMap<&str, u64> = BTreeMap::new();
        for (what, n) in self.outcomes.iter().flat_map(|o| &o.failures) {
            *failures.entry(what).or_default() += u64::from(*n);
        }
        json!({
            "names": self.names,
            "concurrency": self.concurrency,
            "issued": self.issued(),
            "not_issued": self.names - self.issued(),
            "wall_s": self.wall.as_secs_f64(),
            "certificates_per_s": self.issued() as f64 / self.wall.as_secs_f64().max(1e-9),
            "time_to_certificate_ms": {
                "p50": percentile(&ms, 0.50),
                "p90": percentile(&ms, 0.90),
                "p99": percentile(&ms, 0.99),
                "max": ms.last().copied(),
                "min": ms.first().copied(),
            },
            "handshakes": sum(|o| o.attempts),
            "failed_handshakes": {
                "total": sum(NameOutcome::failed_handshakes),
                "fallback_certificate": sum(|o| o.fallbacks),
                "wrong_certificate": sum(|o| o.wrong),
                "errors": sum(|o| o.errors),
                "timeouts": sum(|o| o.timeouts),
            },
            "names_with_a_failed_handshake": self.outcomes.iter().filter(|o| o.failed_handshakes() > 0).count(),
            "stopped_after_no_progress_for_s": self.stalled.map(|d| d.as_secs_f64()),
            "failed_handshakes_by_what_the_client_saw": failures,
        })
    }
}

/// The `q` quantile of sorted values (nearest rank); `None` for none.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// How names are obtained in a phase.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// Names in flight at once.
    pub concurrency: usize,
    /// Pause after each name (sequential phases).
    pub pause: Duration,
    /// A name gives up this long after its first attempt.
    pub name_timeout: Duration,
    /// The whole phase stops when no name was issued for this long (e.g. the CA hung).
    pub stall: Duration,
    /// Nothing runs past this.
    pub deadline: Instant,
    /// The first handshake of every name goes to every target at once.
    pub race: bool,
}

/// Obtains every name, `pace.concurrency` at a time: name `i` first on `targets[i % len]`. Each name gives up at
/// `pace.name_timeout` after its first attempt or at `pace.deadline`, whichever is first; everything stops when no
/// name was issued for `pace.stall`.
pub async fn run_phase(probe: &Probe, targets: &[SocketAddr], names: &[String], pace: Pace) -> Phase {
    use futures_util::StreamExt;
    let Pace { concurrency, pause, name_timeout, stall, deadline, race } = pace;
    let progress = Arc::new(Progress::default());
    let watchdog = {
        let (progress, total) = (progress.clone(), names.len());
        tokio::spawn(async move {
            let (mut seen, mut since) = (0, Instant::now());
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let issued = progress.issued.load(Ordering::Relaxed);
                if issued >= total {
                    return;
                }
                if issued != seen {
                    (seen, since) = (issued, Instant::now());
                } else if since.elapsed() >= stall {
                    progress.stopped.store(true, Ordering::Relaxed);
                    return;
                }
            }
        })
    };
    let started = Instant::now();
    let progress_ref = &progress;
    let outcomes: Vec<NameOutcome> = futures_util::stream::iter(names.iter().enumerate())
        .map(|(i, name)| async move {
            let name_deadline = (Instant::now() + name_timeout).min(deadline);
            let outcome = obtain(probe, targets, i, name, name_deadline, progress_ref, race).await;
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
            outcome
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    // Sequential phases pause after each name; the last pause is not part of the work.
    let wall = started.elapsed().saturating_sub(if concurrency <= 1 { pause } else { Duration::ZERO });
    watchdog.abort();
    let stalled = progress.stopped.load(Ordering::Relaxed).then_some(stall);
    Phase { names: names.len(), concurrency, wall, outcomes, stalled }
}

/// One handshake per name on `targets[(i + 1) % len]` (the node that did not serve the name first): how many
/// did not present Pebble's certificate at once.
pub async fn confirm_elsewhere(probe: &Probe, targets: &[SocketAddr], names: &[String], concurrency: usize) -> usize {
    use futures_util::StreamExt;
    futures_util::stream::iter(names.iter().enumerate())
        .map(|(i, name)| async move {
            let addr = targets[(i + 1) % targets.len()];
            !matches!(probe.attempt(addr, name).await, Attempt::Issued)
        })
        .buffer_unordered(concurrency.max(1))
        .filter(|missed| std::future::ready(*missed))
        .count()
        .await
}
