//! Fuzz entry points: one function per target, each taking arbitrary bytes. The property every one of them
//! checks is that no input makes tern panic; some also assert invariants of what they parsed (a failed assertion
//! is a panic, so the fuzzer reports it like any other).
//!
//! `fuzz/` at the repository root is a cargo-fuzz project with one libFuzzer target per function here
//! (`scripts/fuzz.sh` runs them; see `docs/fuzzing.md`). The tests at the end of this file replay every file of
//! the committed corpus (`fuzz/corpus/<target>/`) through its function on the stable toolchain, which is how CI
//! runs each target over its corpus; `seed_generators_make_seeds_every_target_accepts` regenerates the seeds when
//! `TERN_WRITE_SEED_CORPUS=1` is set.
//!
//! Targets that need keys (sessions and tickets from Redis) use fixed keys derived from [`SECRET`]: the seeds in
//! the corpus are sealed with them, so the fuzzer starts from inputs that open and decode.

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::ProducesTickets;

use crate::certs;
use crate::config::{Config, RedisSettings};
use crate::resumption::crypto::{SealingKey, derive};
use crate::resumption::sessions::{self, SharedSessions};
use crate::resumption::tickets::{self, KeyRing, NAME_LEN, Origin, Record, Schedule, SharedKeys, TicketKey, Ticketer};
use crate::sni::ServerName;
use crate::store::RedisStore;

/// A target: the name of its directory under `fuzz/corpus/` and of its file under `fuzz/fuzz_targets/`, and its
/// entry function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target.
pub const TARGETS: [Target; 9] = [
    ("sni", sni),
    ("config", config),
    ("certificate", certificate),
    ("session", session),
    ("session_stream", session_stream),
    ("ticket", ticket),
    ("ticket_key", ticket_key),
    ("proxy_header", proxy_header),
    ("route", route),
];

/// The operator secret the fixture keys derive from (as `[resumption] secret` would). Not a real secret.
pub const SECRET: &[u8] = b"tern fuzzing fixture secret, not a real one";
/// The Redis key prefix of the fixtures (tern's default).
pub const PREFIX: &str = "tern:resumption:";
/// The resumption scope of the fixture ticketer.
pub const SCOPE: &str = "none";
/// Name of the ring's encrypting ticket key (slot 0, active).
pub const KEY_CURRENT: [u8; NAME_LEN] = *b"fuzz-key-current";
/// Name of a retired fleet key of slot 0 (decrypts, never encrypts).
pub const KEY_RETIRED: [u8; NAME_LEN] = *b"fuzz-key-retired";
/// Name of a key whose slot (5) is outside the decryption window (0..=1).
pub const KEY_EXPIRED: [u8; NAME_LEN] = *b"fuzz-key-expired";
/// The certificate target checks coverage of this name (and of names taken from the certificate).
pub const COVERED_NAME: &str = "a.example.com";
/// Slot and generation the `ticket_key` target opens records for.
pub const RECORD_SLOT: u64 = 0;
/// See [`RECORD_SLOT`].
pub const RECORD_GENERATION: u32 = 0;

/// Keys and state shared by the fuzz targets, built once per process.
pub(crate) struct Fixtures {
    pub(crate) ticketer: Ticketer,
    pub(crate) sessions: SharedSessions,
    pub(crate) keys: SharedKeys,
}

fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        // Nothing connects until a command runs, and no target runs one.
        let store = Arc::new(RedisStore::new(RedisSettings {
            name: "fuzz".into(),
            urls: vec!["redis://127.0.0.1:9/".into()],
            cluster: false,
            timeout: Duration::from_secs(1),
        }));
        let ticket_key = |name: [u8; NAME_LEN], slot: u64, byte: u8| {
            Arc::new(TicketKey {
                name,
                slot,
                generation: 0,
                activate_ms: 0,
                origin: Origin::Cluster { node: "fuzz".into() },
                sealing: SealingKey::new(&[byte; 32]),
            })
        };
        let ring = KeyRing {
            keys: vec![ticket_key(KEY_CURRENT, 0, 0x11), ticket_key(KEY_EXPIRED, 5, 0x33)],
            retired: vec![ticket_key(KEY_RETIRED, 0, 0x22)],
        };
        Fixtures {
            // Slots of 2^62 ms: slot 0 until the year 146 million, so a target behaves the same at any time.
            ticketer: Ticketer {
                ring: Arc::new(ArcSwap::from_pointee(ring)),
                schedule: Schedule { interval_ms: 1 << 62, window: 1 },
                scope: SCOPE.as_bytes().to_vec(),
                lifetime: 3600,
                metrics: Arc::default(),
            },
            sessions: SharedSessions {
                store: store.clone(),
                prefix: PREFIX.into(),
                sealing: SealingKey::new(&derive(SECRET, "sessions")),
            },
            keys: SharedKeys { store, prefix: PREFIX.into(), sealing: SealingKey::new(&derive(SECRET, "ticket-keys")) },
        }
    })
}

/// SNI normalisation: [`ServerName::parse`] on the bytes (non-UTF-8 replaced, as such bytes never pass). Accepts
/// exactly what the documented rules allow; an accepted name is lowercase, has no trailing dot, is at most 253
/// bytes, parses to itself, is case-insensitive, and its wildcard is `*.` + its parent when that has two labels.
pub fn sni(data: &[u8]) {
    let raw = String::from_utf8_lossy(data);
    let parsed = ServerName::parse(&raw);
    assert_eq!(parsed.is_ok(), follows_name_rules(&raw), "{raw:?} gave {parsed:?}");
    let Ok(name) = parsed else { return };
    let s = name.as_str();
    assert!(!s.is_empty() && s.len() <= 253 && !s.ends_with('.'), "{s:?}");
    assert!(s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b)), "{s:?}");
    assert_eq!(name.to_string(), s);
    assert_eq!(ServerName::parse(s).as_ref(), Ok(&name), "not idempotent");
    assert_eq!(ServerName::parse(&raw.to_ascii_uppercase()).as_ref(), Ok(&name), "case-sensitive");
    let parent = s.split_once('.').map(|(_, parent)| parent).filter(|parent| parent.contains('.'));
    assert_eq!(name.wildcard(), parent.map(|p| format!("*.{p}")), "{s:?}");
}

/// The rules `ServerName` documents, written out independently of it.
fn follows_name_rules(raw: &str) -> bool {
    let name = raw.strip_suffix('.').unwrap_or(raw);
    let label_ok = |label: &str| {
        let bytes = label.as_bytes();
        (1..=63).contains(&bytes.len())
            && bytes.iter().all(|&b| matches!(b, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_'))
            && bytes.first() != Some(&b'-')
            && bytes.last() != Some(&b'-')
    };
    (1..=253).contains(&name.len()) && name.split('.').all(label_ok) && name.parse::<Ipv4Addr>().is_err()
}

/// Config parsing and validation: [`Config::from_toml`] on the text (non-UTF-8 replaced). Errors are fine; a
/// config it accepts has a listener, and both results format.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Config::from_toml(&text, Path::new("/fuzz/tern.toml")) {
        Ok(config) => {
            assert!(!config.listeners.is_empty(), "a config without listeners was accepted");
            let _ = format!("{config:?}");
        }
        Err(err) => {
            let _ = err.to_string();
        }
    }
}

/// PEM and certificate validation of a plugin's answer: the input is the chain PEM and the key PEM separated by
/// the first NUL byte (without one, the whole input is both, like a combined PEM file), through
/// [`certs::parse`]; a certificate it accepts is checked with `check_covers` and `certs::validate_answer` against
/// [`COVERED_NAME`] and names from its own subjectAltName, may only cover a name its DNS names list (exactly or as
/// the wildcard one label up), and is valid at both ends of its validity period.
pub fn certificate(data: &[u8]) {
    let mut parts = data.splitn(2, |&b| b == 0);
    let chain = parts.next().unwrap_or_default();
    let key = parts.next().unwrap_or(chain);
    let Ok(parsed) = certs::parse(chain, key) else { return };
    let _ = parsed.remaining_validity();
    if parsed.not_before <= parsed.not_after {
        assert!(parsed.check_validity(parsed.not_before).is_ok() && parsed.check_validity(parsed.not_after).is_ok());
    }
    let _ = parsed.check_validity(SystemTime::now()).map_err(|e| e.to_string());
    let mut names: Vec<ServerName> = ServerName::parse(COVERED_NAME).into_iter().collect();
    for dns in parsed.dns_names.iter().take(4) {
        let candidate = dns.strip_prefix("*.").map_or_else(|| dns.clone(), |parent| format!("x.{parent}"));
        names.extend(ServerName::parse(&candidate));
    }
    for name in &names {
        // The whole check a plugin's answer goes through before it is served.
        let _ = certs::validate_answer(chain, key, name);
        if parsed.check_covers(name).is_ok() {
            let wildcard = name.wildcard();
            let listed = parsed.dns_names.iter().any(|d| d == name.as_str() || Some(d) == wildcard.as_ref());
            assert!(listed, "covers {name} but lists {:?}", parsed.dns_names);
        } else {
            let _ = parsed.check_covers(name).map_err(|e| e.to_string());
        }
    }
}

/// Session state from Redis, the record inside a sealed stream entry: `sessions::decode` on the bytes (whatever
/// decodes encodes back to the same bytes), then the same bytes as a sealed entry opened with the fixture
/// session key and decoded.
pub fn session(data: &[u8]) {
    if let Some((scope, key, value)) = sessions::decode(data) {
        let again = sessions::encode(scope, key, value);
        assert_eq!(again.as_ref().map(|v| v.as_slice()), Some(data), "decode/encode do not round-trip");
    }
    let f = fixtures();
    if let Some(plain) = f.sessions.sealing.open(data, &f.sessions.aad()) {
        let _ = sessions::decode(&plain);
    }
}

/// A Redis `XREAD` reply as the session reader gets it: the bytes parsed as RESP, split into entries by
/// `sessions::entries`, and each entry's `d` field opened with the fixture key and decoded, as the reader does.
pub fn session_stream(data: &[u8]) {
    let Ok(reply) = redis::parse_redis_value(data) else { return };
    let f = fixtures();
    let aad = f.sessions.aad();
    for (id, fields) in sessions::entries(reply) {
        let _ = id.split('-').next().and_then(|ms| ms.parse::<u64>().ok());
        let Some((_, sealed)) = fields.iter().find(|(field, _)| field == b"d") else { continue };
        if let Some(plain) = f.sessions.sealing.open(sealed, &aad) {
            let _ = sessions::decode(&plain);
        }
    }
}

/// Session tickets: the bytes as a ticket presented by a client, through the fixture [`Ticketer`]'s `decrypt`
/// (a ticket that opens re-encrypts and opens again to the same state), and as a sealed box opened with a fixed
/// key; the hex encoding of Redis fields round-trips the first 96 bytes.
pub fn ticket(data: &[u8]) {
    let f = fixtures();
    if let Some(plain) = f.ticketer.decrypt(data) {
        let again = f.ticketer.encrypt(&plain);
        assert!(again.is_some(), "the fixture ring has an encrypting key");
        assert_eq!(again.and_then(|t| f.ticketer.decrypt(&t)), Some(plain), "ticket round trip");
    }
    let _ = f.sessions.sealing.open(data, SCOPE.as_bytes());
    // Redis fields hold key names (16 bytes) and sealed keys (60 bytes); `hex` allocates per byte, so a prefix
    // of that size is enough and keeps the target fast.
    let field = data.get(..96).unwrap_or(data);
    assert_eq!(tickets::unhex(&tickets::hex(field)).as_deref(), Some(field), "hex round trip");
}

/// Ticket keys from Redis: the bytes as the hex of a Redis field (`unhex`), and as the JSON record of a key
/// (`serde_json` as `read_slot` does), opened with the fixture ticket-key sealing key for slot
/// [`RECORD_SLOT`], generation [`RECORD_GENERATION`].
pub fn ticket_key(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Some(bytes) = tickets::unhex(&text) {
        assert_eq!(bytes.len() * 2, text.len(), "{text:?}");
    }
    let Ok(record) = serde_json::from_str::<Record>(&text) else { return };
    if let Some(key) = fixtures().keys.open(RECORD_SLOT, RECORD_GENERATION, &record) {
        assert_eq!((key.slot, key.generation), (RECORD_SLOT, RECORD_GENERATION));
    }
}

/// The first bytes of a connection on a listener that takes PROXY protocol: told apart from TLS, and the header
/// parsed when complete (`proxy_protocol`).
pub fn proxy_header(data: &[u8]) {
    crate::proxy_protocol::fuzz_classify_and_parse(data);
}

/// A plugin's route or passthrough target (checked against grants that allow every host and port) and an
/// operator's grant patterns. What is accepted round-trips: its printed form parses to the same route.
pub fn route(data: &[u8]) {
    use crate::route::{Pattern, Route, RouteGrants, parse_origin};
    let text = String::from_utf8_lossy(data);
    let (Ok(http), Ok(https), Ok(target)) =
        (Pattern::origin("http://*:*"), Pattern::origin("https://*:*"), Pattern::target("*:*"))
    else {
        panic!("the catch-all patterns parse");
    };
    let any = RouteGrants { pools: vec![], origins: vec![http, https], passthrough: vec![target] };
    if let Ok(Route::Origin(origin)) = any.origin(&text, None, true) {
        assert!(origin.tls || !origin.h2, "HTTP/2 by ALPN needs TLS");
        let again = parse_origin(&origin.to_string());
        let again = again.as_ref().map(|o| (&o.host, o.port, &o.base));
        assert_eq!(again, Ok((&origin.host, origin.port, &origin.base)), "a printed origin parses");
    }
    if let Ok(parsed) = any.passthrough(&text) {
        assert_eq!(any.passthrough(&parsed.to_string()).as_ref(), Ok(&parsed), "a printed target parses");
    }
    let _ = Pattern::origin(&text);
    let _ = Pattern::target(&text);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
