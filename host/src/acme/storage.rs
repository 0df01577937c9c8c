//! Where ACME state lives: a `[[redis]]` store shared by a fleet, or a local directory for one node.
//!
//! | what | Redis (`{prefix}{name}:kind`, one hash slot per name) | directory |
//! |---|---|---|
//! | issued certificate (chain in clear, key sealed) | `{..}:cert` | `certs/<name>.json` |
//! | failure state (count, next attempt, last error) | `{..}:state` | `state/<name>.json` |
//! | the account (credentials sealed) | `{account}:cert` | `account.json` |
//! | one order's lock (token, lease) | `{..}:lock`, `SET NX PX`, fenced by token | this process's memory |
//! | challenge answers (TLS-ALPN-01 digest, HTTP-01 key authorization) | `{..}:chal` with a TTL | memory |
//! | renewal schedule (name → renew-at) | sorted set `schedule` | read from `certs/` |
//! | order budgets (counts per hour) | `budget:<scope>:<hour>` with a TTL | memory |
//!
//! Names are normalised [`crate::sni::ServerName`]s (lowercase letters, digits, `-`, `.`), so they are safe as
//! file names and inside hash tags.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::{RedisStore, StoreError};

/// A storage operation that failed. Never carries a stored value.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// Redis failed.
    #[error(transparent)]
    Redis(#[from] StoreError),
    /// The directory could not be read or written.
    #[error("acme storage {path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What happened.
        message: String,
    },
}

/// The records kept per name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The issued certificate.
    Cert,
    /// The failure state.
    State,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Cert => "cert",
            Kind::State => "state",
        }
    }
}

/// The account's records live under this pseudo-name (not a valid server name: no clash).
pub(crate) const ACCOUNT: &str = "_account";

/// In-process state of directory storage: locks, challenges and budgets of a single node.
#[derive(Debug, Default)]
pub(crate) struct Local {
    locks: HashMap<String, (String, Instant)>,
    challenges: HashMap<String, (String, Instant)>,
    budgets: HashMap<String, u32>,
}

/// ACME storage.
#[derive(Debug, Clone)]
pub(crate) enum Storage {
    /// Shared by every node of the fleet.
    Redis {
        /// The store.
        store: Arc<RedisStore>,
        /// Key prefix.
        prefix: String,
    },
    /// One node.
    Directory {
        /// The folder.
        root: PathBuf,
        /// Locks, challenges and budgets.
        local: Arc<Mutex<Local>>,
    },
}

/// Releases a lock only for its holder; extends it only for its holder.
const UNLOCK: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end";
const EXTEND: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end";
/// Writes a record only while the writer holds the name's lock (fencing: a holder whose lease ran out and was
/// taken over cannot overwrite the new holder's result).
const FENCED_SET: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[2], ARGV[2]) return 1 else return 0 end";

use super::lock as lock_of;

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Storage {
    /// Redis storage under `prefix`.
    pub(crate) fn redis(store: Arc<RedisStore>, prefix: String) -> Self {
        Storage::Redis { store, prefix }
    }

    /// Directory storage in `root` (created on first write).
    pub(crate) fn directory(root: PathBuf) -> Self {
        Storage::Directory { root, local: Arc::default() }
    }

    fn key(prefix: &str, name: &str, what: &str) -> String {
        format!("{prefix}{{{name}}}:{what}")
    }

    fn file(root: &std::path::Path, kind: Kind, name: &str) -> PathBuf {
        if name == ACCOUNT {
            return root.join("account.json");
        }
        root.join(format!("{}s", kind.label())).join(format!("{name}.json"))
    }

    fn io(path: &std::path::Path, err: impl std::fmt::Display) -> StorageError {
        StorageError::Io { path: path.display().to_string(), message: err.to_string() }
    }

    /// A record, if there is one.
    pub(crate) async fn get(&self, kind: Kind, name: &str) -> Result<Option<Vec<u8>>, StorageError> {
        match self {
            Storage::Redis { store, prefix } => Ok(store.get(&Self::key(prefix, name, kind.label())).await?),
            Storage::Directory { root, .. } => {
                let path = Self::file(root, kind, name);
                match tokio::fs::read(&path).await {
                    Ok(bytes) => Ok(Some(bytes)),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(err) => Err(Self::io(&path, err)),
                }
            }
        }
    }

    /// Writes a record unconditionally (failure state, the account under its own lock).
    pub(crate) async fn put(&self, kind: Kind, name: &str, value: &[u8]) -> Result<(), StorageError> {
        match self {
            Storage::Redis { store, prefix } => {
                store.run::<()>(redis::cmd("SET").arg(Self::key(prefix, name, kind.label())).arg(value)).await?;
                Ok(())
            }
            Storage::Directory { root, .. } => write_atomically(Self::file(root, kind, name), value.to_vec()).await,
        }
    }

    /// Writes a record if `token` still holds the name's lock; `false` if it lost it.
    pub(crate) async fn put_fenced(
        &self,
        kind: Kind,
        name: &str,
        token: &str,
        value: &[u8],
    ) -> Result<bool, StorageError> {
        match self {
            Storage::Redis { store, prefix } => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(FENCED_SET).arg(2).arg(Self::key(prefix, name, "lock")).arg(Self::key(
                    prefix,
                    name,
                    kind.label(),
                ));
                cmd.arg(token).arg(value);
                Ok(store.run::<i64>(&cmd).await? == 1)
            }
            Storage::Directory { root, local } => {
                let held =
                    lock_of(local).locks.get(name).is_some_and(|(t, until)| t == token && *until > Instant::now());
                if held {
                    write_atomically(Self::file(root, kind, name), value.to_vec()).await?;
                }
                Ok(held)
            }
        }
    }

    /// Deletes a record.
    pub(crate) async fn delete(&self, kind: Kind, name: &str) -> Result<(), StorageError> {
        match self {
            Storage::Redis { store, prefix } => {
                store.run::<()>(redis::cmd("DEL").arg(Self::key(prefix, name, kind.label()))).await?;
                Ok(())
            }
            Storage::Directory { root, .. } => {
                let path = Self::file(root, kind, name);
                match tokio::fs::remove_file(&path).await {
                    Ok(()) => Ok(()),
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(err) => Err(Self::io(&path, err)),
                }
            }
        }
    }

    /// Takes the name's lock for `lease` if nobody holds it.
    pub(crate) async fn lock(&self, name: &str, token: &str, lease: Duration) -> Result<bool, StorageError> {
        match self {
            Storage::Redis { store, prefix } => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(Self::key(prefix, name, "lock")).arg(token).arg("NX").arg("PX").arg(millis(lease));
                Ok(store.run::<Option<String>>(&cmd).await?.is_some())
            }
            Storage::Directory { local, .. } => {
                let mut local = lock_of(local);
                let now = Instant::now();
                if local.locks.get(name).is_some_and(|(_, until)| *until > now) {
                    return Ok(false);
                }
                local.locks.insert(name.to_string(), (token.to_string(), now + lease));
                Ok(true)
            }
        }
    }

    /// Extends the lease of a lock `token` holds; `false` if it no longer holds it.
    pub(crate) async fn extend(&self, name: &str, token: &str, lease: Duration) -> Result<bool, StorageError> {
        match self {
            Storage::Redis { store, prefix } => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(EXTEND).arg(1).arg(Self::key(prefix, name, "lock")).arg(token).arg(millis(lease));
                Ok(store.run::<i64>(&cmd).await? == 1)
            }
            Storage::Directory { local, .. } => {
                let mut local = lock_of(local);
                match local.locks.get_mut(name) {
                    Some((t, until)) if t == token && *until > Instant::now() => {
                        *until = Instant::now() + lease;
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            }
        }
    }

    /// Releases the lock if `token` holds it.
    pub(crate) async fn unlock(&self, name: &str, token: &str) -> Result<(), StorageError> {
        match self {
            Storage::Redis { store, prefix } => {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(UNLOCK).arg(1).arg(Self::key(prefix, name, "lock")).arg(token);
                store.run::<i64>(&cmd).await?;
                Ok(())
            }
            Storage::Directory { local, .. } => {
                let mut local = lock_of(local);
                if local.locks.get(name).is_some_and(|(t, _)| t == token) {
                    local.locks.remove(name);
                }
                Ok(())
            }
        }
    }

    /// Whether somebody holds the name's lock.
    pub(crate) async fn is_locked(&self, name: &str) -> Result<bool, StorageError> {
        match self {
            Storage::Redis { store, prefix } => {
                Ok(store.run::<i64>(redis::cmd("EXISTS").arg(Self::key(prefix, name, "lock"))).await? == 1)
            }
            Storage::Directory { local, .. } => {
                Ok(lock_of(local).locks.get(name).is_some_and(|(_, until)| *until > Instant::now()))
            }
        }
    }

    /// Publishes a challenge answer (`what` is `tls:<name>` or `http:<token>`) for `ttl`.
    pub(crate) async fn put_challenge(&self, what: &str, value: &str, ttl: Duration) -> Result<(), StorageError> {
        match self {
            Storage::Redis { store, prefix } => {
                let mut cmd = redis::cmd("SET");
                cmd.arg(Self::key(prefix, what, "chal")).arg(value).arg("PX").arg(millis(ttl));
                store.run::<()>(&cmd).await?;
                Ok(())
            }
            Storage::Directory { local, .. } => {
                let mut local = lock_of(local);
                let now = Instant::now();
                local.challenges.retain(|_, (_, until)| *until > now);
                local.challenges.insert(what.to_string(), (value.to_string(), now + ttl));
                Ok(())
            }
        }
    }

    /// A published challenge answer.
    pub(crate) async fn challenge(&self, what: &str) -> Result<Option<String>, StorageError> {
        match self {
            Storage::Redis { store, prefix } => {
                let value = store.get(&Self::key(prefix, what, "chal")).await?;
                Ok(value.and_then(|v| String::from_utf8(v).ok()))
            }
            Storage::Directory { local, .. } => Ok(lock_of(local)
                .challenges
                .get(what)
                .filter(|(_, until)| *until > Instant::now())
                .map(|(v, _)| v.clone())),
        }
    }

    /// Withdraws a challenge answer.
    pub(crate) async fn delete_challenge(&self, what: &str) -> Result<(), StorageError> {
        match self {
            Storage::Redis { store, prefix } => {
                store.run::<()>(redis::cmd("DEL").arg(Self::key(prefix, what, "chal"))).await?;
                Ok(())
            }
            Storage::Directory { local, .. } => {
                lock_of(local).challenges.remove(what);
                Ok(())
            }
        }
    }

    /// Counts one order against `scope` in the current hour and returns the count so far (this one included).
    pub(crate) async fn count_order(&self, scope: &str, hour: u64) -> Result<u32, StorageError> {
        let window = format!("budget:{scope}:{hour}");
        match self {
            Storage::Redis { store, prefix } => {
                let key = format!("{prefix}{window}");
                let mut pipe = redis::pipe();
                pipe.cmd("INCR").arg(&key).cmd("EXPIRE").arg(&key).arg(7200).ignore();
                let (count,): (u32,) = store.run_pipeline(&pipe).await?;
                Ok(count)
            }
            Storage::Directory { local, .. } => {
                let mut local = lock_of(local);
                let suffix = format!(":{hour}");
                local.budgets.retain(|key, _| key.ends_with(&suffix));
                let count = local.budgets.entry(window).or_default();
                *count = count.saturating_add(1);
                Ok(*count)
            }
        }
    }

    /// Puts a name on the renewal schedule (or moves it).
    pub(crate) async fn schedule(&self, name: &str, renew_at: i64) -> Result<(), StorageError> {
        match self {
            Storage::Redis { store, prefix } => {
                store.run::<()>(redis::cmd("ZADD").arg(format!("{prefix}schedule")).arg(renew_at).arg(name)).await?;
                Ok(())
            }
            // The directory's schedule is the certificates' own renew-at.
            Storage::Directory { .. } => Ok(()),
        }
    }

    /// Takes a name off the renewal schedule.
    pub(crate) async fn unschedule(&self, name: &str) -> Result<(), StorageError> {
        match self {
            Storage::Redis { store, prefix } => {
                store.run::<()>(redis::cmd("ZREM").arg(format!("{prefix}schedule")).arg(name)).await?;
                Ok(())
            }
            Storage::Directory { .. } => Ok(()),
        }
    }

    /// Names on the schedule with their renew-at (unix seconds), soonest first: those due by `until`, at most
    /// `limit` of them.
    pub(crate) async fn scheduled(&self, until: i64, limit: usize) -> Result<Vec<(String, i64)>, StorageError> {
        match self {
            Storage::Redis { store, prefix } => {
                let mut cmd = redis::cmd("ZRANGE");
                cmd.arg(format!("{prefix}schedule")).arg("-inf").arg(until).arg("BYSCORE");
                cmd.arg("LIMIT").arg(0).arg(limit).arg("WITHSCORES");
                Ok(store.run::<Vec<(String, i64)>>(&cmd).await?)
            }
            Storage::Directory { root, .. } => {
                let mut due = Vec::new();
                for name in self.directory_names(root).await? {
                    if let Some(bytes) = self.get(Kind::Cert, &name).await?
                        && let Ok(record) = serde_json::from_slice::<super::record::Record>(&bytes)
                        && record.renew_at <= until
                    {
                        due.push((name, record.renew_at));
                    }
                }
                due.sort_by_key(|(_, at)| *at);
                due.truncate(limit);
                Ok(due)
            }
        }
    }

    /// How many names are managed.
    pub(crate) async fn managed(&self) -> Result<u64, StorageError> {
        match self {
            Storage::Redis { store, prefix } => {
                Ok(store.run::<u64>(redis::cmd("ZCARD").arg(format!("{prefix}schedule"))).await?)
            }
            Storage::Directory { root, .. } => Ok(self.directory_names(root).await?.len() as u64),
        }
    }

    async fn directory_names(&self, root: &std::path::Path) -> Result<Vec<String>, StorageError> {
        let dir = root.join("certs");
        let mut entries = match tokio::fs::read_dir(&dir).await {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(Self::io(&dir, err)),
        };
        let mut names = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(|e| Self::io(&dir, e))? {
            if let Some(name) = entry.file_name().to_str().and_then(|f| f.strip_suffix(".json")) {
                names.push(name.to_string());
            }
        }
        Ok(names)
    }
}

/// Writes `bytes` to a temporary file beside `path`, then renames it over `path`: readers see the old record or
/// the new one, never half of one. Private keys are in it sealed, but the file is made readable by its owner only.
async fn write_atomically(path: PathBuf, bytes: Vec<u8>) -> Result<(), StorageError> {
    let shown = path.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let dir = path.parent().ok_or_else(|| std::io::Error::other("no parent folder"))?;
        std::fs::create_dir_all(dir)?;
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{}-{n}.tmp", std::process::id()));
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    })
    .await
    .map_err(|e| Storage::io(&shown, e))?
    .map_err(|e| Storage::io(&shown, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lock_is_released_and_extended_only_by_its_holder_and_fences_writes_after_its_lease() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::directory(dir.path().to_path_buf());
        let lease = Duration::from_millis(50);
        assert!(storage.lock("a.test", "one", lease).await.unwrap());
        assert!(!storage.lock("a.test", "two", lease).await.unwrap(), "held");
        storage.unlock("a.test", "two").await.unwrap();
        assert!(!storage.extend("a.test", "two", lease).await.unwrap(), "not the holder");
        assert!(storage.is_locked("a.test").await.unwrap(), "a stranger cannot release it");
        assert!(storage.put_fenced(Kind::Cert, "a.test", "one", b"first").await.unwrap());
        tokio::time::sleep(lease * 2).await;
        // The lease ran out and another holder took over: the old holder can neither extend nor write.
        assert!(storage.lock("a.test", "two", lease).await.unwrap());
        assert!(!storage.extend("a.test", "one", lease).await.unwrap());
        assert!(!storage.put_fenced(Kind::Cert, "a.test", "one", b"stale").await.unwrap());
        assert_eq!(storage.get(Kind::Cert, "a.test").await.unwrap().as_deref(), Some(&b"first"[..]));
        assert!(storage.put_fenced(Kind::Cert, "a.test", "two", b"second").await.unwrap());
        assert_eq!(storage.get(Kind::Cert, "a.test").await.unwrap().as_deref(), Some(&b"second"[..]));
    }

    #[tokio::test]
    async fn budgets_count_per_scope_and_hour() {
        let storage = Storage::directory(std::path::PathBuf::from("/nonexistent"));
        assert_eq!(storage.count_order("all", 7).await.unwrap(), 1);
        assert_eq!(storage.count_order("all", 7).await.unwrap(), 2);
        assert_eq!(storage.count_order("example.com", 7).await.unwrap(), 1);
        assert_eq!(storage.count_order("all", 8).await.unwrap(), 1, "a new hour starts afresh");
    }
}
