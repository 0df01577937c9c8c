//! The session cache behind TLS 1.2 session IDs and TLS 1.3 stateful resumption, replicated through Redis.
//!
//! rustls calls [`StoresServerSessions`] synchronously inside the handshake, so `get` only ever reads local
//! memory. Replication runs ahead of use: `put` stores locally and queues the session for a writer task, which
//! appends it, sealed, to a Redis stream (`XADD <prefix>sessions MINID ~ <now − lifetime>`: entries older than
//! the session lifetime are trimmed, and the stream key itself expires one lifetime after the last write). A
//! reader task on every node follows the stream with a blocking `XREAD` on a connection of its own and fills the
//! local store; a node that starts late reads the stream from one lifetime ago, so it knows every live session
//! before its first handshake finishes loading them. Stream IDs carry the time of the write, which gives both the
//! remaining lifetime of each session and the replication lag.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustls::server::StoresServerSessions;
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use super::ResumptionMetrics;
use super::crypto::SealingKey;
use super::tickets::now_ms;
use crate::store::{Dedicated, RedisStore, StoreError};

/// Sessions waiting for the writer; beyond this, new sessions stay local (counted as dropped).
const OUTBOX: usize = 16_384;
/// Most sessions the writer sends in one pipeline.
const BATCH: usize = 256;
/// How long the reader's `XREAD` blocks.
const BLOCK: Duration = Duration::from_millis(1000);

#[derive(Clone)]
struct Entry {
    value: Arc<Zeroizing<Vec<u8>>>,
    expires: Instant,
}

/// A session on its way to Redis.
struct Outgoing {
    scope: Arc<str>,
    key: Vec<u8>,
    value: Arc<Zeroizing<Vec<u8>>>,
}

/// The Redis side of the session cache.
pub struct SharedSessions {
    /// The store.
    pub store: Arc<RedisStore>,
    /// Key prefix, e.g. `tern:resumption:`.
    pub prefix: String,
    /// Seals session state at rest.
    pub sealing: SealingKey,
}

impl std::fmt::Debug for SharedSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSessions").field("store", &self.store.name()).field("prefix", &self.prefix).finish()
    }
}

impl SharedSessions {
    fn stream(&self) -> String {
        format!("{}sessions", self.prefix)
    }

    pub(crate) fn aad(&self) -> Vec<u8> {
        format!("{}session", self.prefix).into_bytes()
    }
}

/// Every node's sessions, by scope; shared by all listeners through [`ScopedSessions`].
pub struct SessionCache {
    local: moka::sync::Cache<Vec<u8>, Entry>,
    lifetime: Duration,
    outbox: Option<mpsc::Sender<Outgoing>>,
    metrics: Arc<ResumptionMetrics>,
}

impl std::fmt::Debug for SessionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCache")
            .field("entries", &self.local.entry_count())
            .field("lifetime", &self.lifetime)
            .field("replicated", &self.outbox.is_some())
            .finish()
    }
}

/// The background half of replication, started by [`SessionCache::spawn`].
pub struct Replication {
    shared: SharedSessions,
    outbox: mpsc::Receiver<Outgoing>,
    node: String,
}

impl std::fmt::Debug for Replication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replication").field("shared", &self.shared).field("node", &self.node).finish()
    }
}

fn local_key(scope: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(scope.len() + 1 + key.len());
    k.extend_from_slice(scope.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

impl SessionCache {
    /// A cache of at most `capacity` sessions living `lifetime`; replicated through `shared` if given.
    pub fn new(
        capacity: u64,
        lifetime: Duration,
        shared: Option<SharedSessions>,
        node: String,
        metrics: Arc<ResumptionMetrics>,
    ) -> (Arc<Self>, Option<Replication>) {
        let local = moka::sync::Cache::builder().max_capacity(capacity.max(1)).time_to_live(lifetime).build();
        let (outbox, replication) = match shared {
            Some(shared) => {
                let (tx, rx) = mpsc::channel(OUTBOX);
                (Some(tx), Some(Replication { shared, outbox: rx, node }))
            }
            None => (None, None),
        };
        (Arc::new(Self { local, lifetime, outbox, metrics }), replication)
    }

    /// The store rustls sees for one resumption scope.
    pub fn scoped(self: &Arc<Self>, scope: &str) -> Arc<ScopedSessions> {
        Arc::new(ScopedSessions { cache: self.clone(), scope: Arc::from(scope) })
    }

    fn insert(&self, key: Vec<u8>, value: Arc<Zeroizing<Vec<u8>>>, remaining: Duration) {
        self.local.insert(key, Entry { value, expires: Instant::now() + remaining });
    }

    fn get(&self, key: &[u8]) -> Option<Entry> {
        self.local.get(key).filter(|e| e.expires > Instant::now())
    }
}

/// rustls's session store for one resumption scope: a listener only ever sees sessions made under the same
/// client-authentication settings.
pub struct ScopedSessions {
    cache: Arc<SessionCache>,
    scope: Arc<str>,
}

impl std::fmt::Debug for ScopedSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScopedSessions").field("scope", &self.scope).finish_non_exhaustive()
    }
}

impl StoresServerSessions for ScopedSessions {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        let value = Arc::new(Zeroizing::new(value));
        self.cache.insert(local_key(&self.scope, &key), value.clone(), self.cache.lifetime);
        if let Some(outbox) = &self.cache.outbox {
            let queued = outbox.try_send(Outgoing { scope: self.scope.clone(), key, value });
            if queued.is_err() {
                self.cache.metrics.sessions_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        true
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.cache.get(&local_key(&self.scope, key)).map(|e| e.value.to_vec())
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        // Single use on this node. Other nodes keep their replica until it expires: enforcing single use across
        // the fleet would need a Redis round trip inside the handshake. tern does not enable 0-RTT, so a second
        // resumption of the same session costs nothing but forward secrecy already bounded by the lifetime.
        let key = local_key(&self.scope, key);
        let entry = self.cache.get(&key)?;
        self.cache.local.invalidate(&key);
        Some(entry.value.to_vec())
    }

    fn can_cache(&self) -> bool {
        true
    }
}

/// `scope \0 key value` with lengths: what is sealed into a stream entry.
pub(crate) fn encode(scope: &str, key: &[u8], value: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
    let mut out = Zeroizing::new(Vec::with_capacity(4 + scope.len() + key.len() + value.len()));
    out.push(u8::try_from(scope.len()).ok()?);
    out.extend_from_slice(scope.as_bytes());
    out.extend_from_slice(&u16::try_from(key.len()).ok()?.to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    Some(out)
}

pub(crate) fn decode(plain: &[u8]) -> Option<(&str, &[u8], &[u8])> {
    let (&scope_len, rest) = plain.split_first()?;
    let (scope, rest) = rest.split_at_checked(usize::from(scope_len))?;
    let (key_len, rest) = rest.split_at_checked(2)?;
    let key_len = usize::from(u16::from_be_bytes([key_len[0], key_len[1]]));
    let (key, value) = rest.split_at_checked(key_len)?;
    Some((std::str::from_utf8(scope).ok()?, key, value))
}

impl Replication {
    /// Runs the writer and the reader until the process ends.
    pub async fn run(self, cache: Arc<SessionCache>) {
        let Replication { shared, outbox, node } = self;
        let shared = Arc::new(shared);
        tokio::join!(write(shared.clone(), outbox, node.clone(), cache.clone()), read(shared, node, cache));
    }
}

/// Sends queued sessions to the stream, a pipeline per batch. A failed batch is dropped (the sessions still
/// resume on this node) and counted.
async fn write(
    shared: Arc<SharedSessions>,
    mut outbox: mpsc::Receiver<Outgoing>,
    node: String,
    cache: Arc<SessionCache>,
) {
    let stream = shared.stream();
    let aad = shared.aad();
    let lifetime_ms = u64::try_from(cache.lifetime.as_millis()).unwrap_or(u64::MAX);
    let metrics = &cache.metrics;
    let mut batch = Vec::with_capacity(BATCH);
    let mut failing = false;
    while outbox.recv_many(&mut batch, BATCH).await > 0 {
        let mut pipe = redis::pipe();
        let min_id = now_ms().saturating_sub(lifetime_ms);
        let mut count = 0u64;
        for out in batch.drain(..) {
            let Some(plain) = encode(&out.scope, &out.key, &out.value) else { continue };
            let Some(sealed) = shared.sealing.seal(&plain, &aad) else { continue };
            pipe.cmd("XADD")
                .arg(&stream)
                .arg("MINID")
                .arg("~")
                .arg(min_id)
                .arg("*")
                .arg("n")
                .arg(&node)
                .arg("d")
                .arg(sealed)
                .ignore();
            count += 1;
        }
        pipe.cmd("PEXPIRE").arg(&stream).arg(lifetime_ms).ignore();
        match shared.store.pipeline(&pipe).await {
            Ok(()) => {
                metrics.sessions_published.fetch_add(count, Ordering::Relaxed);
                failing = false;
            }
            Err(err) => {
                metrics.sessions_dropped.fetch_add(count, Ordering::Relaxed);
                metrics.redis_errors.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    tracing::warn!(error = %err, "sessions: cannot publish to Redis; they resume on this node only");
                }
                failing = true;
            }
        }
    }
}

/// Follows the stream from one lifetime ago, filling the local cache with other nodes' sessions.
async fn read(shared: Arc<SharedSessions>, node: String, cache: Arc<SessionCache>) {
    let stream = shared.stream();
    let aad = shared.aad();
    let lifetime_ms = u64::try_from(cache.lifetime.as_millis()).unwrap_or(u64::MAX);
    let started_ms = now_ms();
    let mut last_id = format!("{}-0", started_ms.saturating_sub(lifetime_ms));
    let metrics = &cache.metrics;
    let mut connection: Option<Dedicated> = None;
    let mut retry = Duration::from_millis(100);
    loop {
        let conn = match &mut connection {
            Some(c) => c,
            None => match shared.store.dedicated(BLOCK + Duration::from_secs(2)).await {
                Ok(c) => connection.insert(c),
                Err(err) => {
                    metrics.redis_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %err, retry = ?retry, "sessions: cannot connect to follow the stream");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(Duration::from_secs(5));
                    continue;
                }
            },
        };
        let reply: Result<redis::Value, StoreError> = conn
            .run(
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("BLOCK")
                    .arg(u64::try_from(BLOCK.as_millis()).unwrap_or(1000))
                    .arg("STREAMS")
                    .arg(&stream)
                    .arg(&last_id),
            )
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(err) => {
                metrics.redis_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %err, retry = ?retry, "sessions: reading the stream failed");
                connection = None;
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        retry = Duration::from_millis(100);
        for (id, fields) in entries(reply) {
            let entry_ms = id.split('-').next().and_then(|ms| ms.parse::<u64>().ok()).unwrap_or(0);
            last_id = id;
            if fields.iter().any(|(f, v)| f == b"n" && v == node.as_bytes()) {
                continue;
            }
            let Some(sealed) = fields.iter().find(|(f, _)| f == b"d").map(|(_, v)| v) else { continue };
            let Some(plain) = shared.sealing.open(sealed, &aad) else {
                metrics.sessions_undecryptable.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let Some((scope, key, value)) = decode(&plain) else { continue };
            let now = now_ms();
            let age = now.saturating_sub(entry_ms);
            if age >= lifetime_ms {
                continue;
            }
            cache.insert(
                local_key(scope, key),
                Arc::new(Zeroizing::new(value.to_vec())),
                Duration::from_millis(lifetime_ms - age),
            );
            metrics.sessions_received.fetch_add(1, Ordering::Relaxed);
            if entry_ms >= started_ms {
                metrics.replication_lag.observe(Duration::from_millis(age));
            }
        }
    }
}

/// A stream entry's field/value pairs.
pub(crate) type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// `(id, fields)` of every entry in an `XREAD` reply (nil when the block timed out).
pub(crate) fn entries(reply: redis::Value) -> Vec<(String, Fields)> {
    use redis::Value;
    fn text(v: Value) -> Option<Vec<u8>> {
        match v {
            Value::BulkString(b) => Some(b),
            Value::SimpleString(s) => Some(s.into_bytes()),
            _ => None,
        }
    }
    fn items(v: Value) -> Vec<Value> {
        match v {
            Value::Array(a) | Value::Set(a) => a,
            Value::Map(m) => m.into_iter().flat_map(|(k, v)| [k, v]).collect(),
            _ => Vec::new(),
        }
    }
    let mut out = Vec::new();
    // RESP2: [[stream, [[id, [f, v, ...]], ...]]]; RESP3: {stream: [[id, [f, v, ...]], ...]}.
    let streams = match reply {
        Value::Map(m) => m.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
        other => items(other).into_iter().filter_map(|s| items(s).into_iter().nth(1)).collect(),
    };
    for stream_entries in streams {
        for entry in items(stream_entries) {
            let mut parts = items(entry).into_iter();
            let (Some(id), Some(fields)) = (parts.next().and_then(text), parts.next()) else { continue };
            let mut pairs = Vec::new();
            let mut fields = items(fields).into_iter();
            while let (Some(f), Some(v)) = (fields.next().and_then(text), fields.next().and_then(text)) {
                pairs.push((f, v));
            }
            out.push((String::from_utf8_lossy(&id).into_owned(), pairs));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_keep_sessions_apart_and_take_is_single_use() {
        let (cache, replication) = SessionCache::new(100, Duration::from_secs(60), None, "n".into(), Arc::default());
        assert!(replication.is_none());
        let plain = cache.scoped("none");
        let mtls = cache.scoped("mtls:required:ab");
        assert!(plain.put(b"id".to_vec(), b"state".to_vec()));
        assert_eq!(plain.get(b"id").unwrap(), b"state");
        assert!(mtls.get(b"id").is_none(), "another scope must not see it");
        assert_eq!(plain.take(b"id").unwrap(), b"state");
        assert!(plain.take(b"id").is_none());
    }

    #[test]
    fn stream_records_round_trip_and_reject_garbage() {
        let plain = encode("none", b"key", b"value").unwrap();
        assert_eq!(decode(&plain), Some(("none", &b"key"[..], &b"value"[..])));
        assert_eq!(decode(&plain[..3]), None);
        assert_eq!(decode(&[]), None);
    }
}
