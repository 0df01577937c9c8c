//! The host's Redis client: one per `[[redis]]` section, shared by every plugin granted it.
//!
//! Plugins in any language get Redis through the `kv` interface without linking a client of their own; the host
//! owns connection reuse (one multiplexed connection, or a cluster connection that follows slot moves), timeouts
//! and reconnection. tern starts even when Redis is down: the first command connects, a failed connect is retried
//! by the next command, and an established connection reconnects by itself.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use tokio::sync::OnceCell;

use crate::config::RedisSettings;

/// The longest pause between two reconnect attempts of a lost connection. The client's default backoff grows to
/// 3.2 s, and every command waits for the attempt in progress: a Redis that came back stayed unused for seconds.
/// A refused connect on a down Redis costs little; one that hangs is bounded by the store's timeout.
const RECONNECT_MAX_DELAY: Duration = Duration::from_millis(100);

/// A store command that failed. Messages never include values.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Redis could not be reached or did not answer within the timeout.
    #[error("redis {store}: unavailable: {message}")]
    Unavailable {
        /// The store's name.
        store: String,
        /// What happened.
        message: String,
    },
    /// Redis answered with an error.
    #[error("redis {store}: {message}")]
    Command {
        /// The store's name.
        store: String,
        /// The error Redis reported.
        message: String,
    },
}

#[derive(Clone)]
enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

/// A connection owned by one task (see [`RedisStore::dedicated`]); it reconnects by itself.
pub(crate) struct Dedicated(String, Connection);

impl std::fmt::Debug for Dedicated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Dedicated").field(&self.0).finish()
    }
}

impl Dedicated {
    /// Runs one command; the connection's own response timeout bounds it.
    pub(crate) async fn run<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let reply = match &mut self.1 {
            Connection::Standalone(c) => cmd.query_async::<T>(c).await,
            Connection::Cluster(c) => cmd.query_async::<T>(c).await,
        };
        reply.map_err(|err| {
            if err.is_io_error() || err.is_connection_dropped() || err.is_timeout() {
                StoreError::Unavailable { store: self.0.clone(), message: err.to_string() }
            } else {
                StoreError::Command { store: self.0.clone(), message: err.to_string() }
            }
        })
    }
}

/// One Redis deployment.
pub struct RedisStore {
    settings: RedisSettings,
    connection: OnceCell<Connection>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("name", &self.settings.name)
            .field("cluster", &self.settings.cluster)
            .finish()
    }
}

impl RedisStore {
    /// A store for these settings; nothing connects until the first command.
    pub fn new(settings: RedisSettings) -> Self {
        Self { settings, connection: OnceCell::new() }
    }

    /// The store's name from the config.
    pub fn name(&self) -> &str {
        &self.settings.name
    }

    /// `PING`: whether the store answers at all (a command-line tool asks before it relies on it).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.query::<String>(&redis::cmd("PING")).await.map(drop)
    }

    /// `GET key`.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.query(redis::cmd("GET").arg(key)).await
    }

    /// `MGET keys...` (split by slot on a cluster).
    pub(crate) async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.query(redis::cmd("MGET").arg(keys)).await
    }

    /// `HMGET key fields...`.
    pub(crate) async fn hash_get(&self, key: &str, fields: &[String]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        if fields.is_empty() {
            return Ok(Vec::new());
        }
        self.query(redis::cmd("HMGET").arg(key).arg(fields)).await
    }

    /// Runs write commands in bulk (operator tools): pipelines of 1,000 on a standalone server; on a cluster, where
    /// a pipeline must stay within one slot, up to 256 single commands in flight over the multiplexed connection.
    pub async fn write_all(&self, commands: Vec<redis::Cmd>) -> Result<(), StoreError> {
        use futures_util::StreamExt;
        let connection = self.connection().await?.clone();
        // Bulk writes queue behind each other: give them more time than a handshake-path read.
        let timeout = self.settings.timeout.max(Duration::from_secs(30));
        match connection {
            Connection::Standalone(mut c) => {
                for chunk in commands.chunks(1000) {
                    let mut pipeline = redis::pipe();
                    for command in chunk {
                        pipeline.add_command(command.clone()).ignore();
                    }
                    self.finish(tokio::time::timeout(timeout, pipeline.query_async::<()>(&mut c)).await)?;
                }
                Ok(())
            }
            Connection::Cluster(c) => {
                let mut replies = futures_util::stream::iter(commands)
                    .map(|command| {
                        let mut c = c.clone();
                        async move { tokio::time::timeout(timeout, command.query_async::<()>(&mut c)).await }
                    })
                    .buffer_unordered(256);
                while let Some(reply) = replies.next().await {
                    self.finish(reply)?;
                }
                Ok(())
            }
        }
    }

    /// Subscribes to `channel` on a dedicated connection and yields its messages as text. The stream ends when
    /// the connection drops; the caller resubscribes. On a cluster, any node will do: Redis Cluster forwards
    /// every `PUBLISH` to all nodes.
    pub(crate) async fn subscribe(
        &self,
        channel: &str,
    ) -> Result<impl futures_util::Stream<Item = String> + Send + use<>, StoreError> {
        use futures_util::StreamExt;
        let url = self.settings.urls.first().ok_or_else(|| self.unavailable("no URL".into()))?;
        let failed = |e: redis::RedisError| self.unavailable(e.to_string());
        let client = redis::Client::open(url.as_str()).map_err(failed)?;
        let connect = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::time::timeout(self.settings.timeout.max(Duration::from_secs(1)), connect)
            .await
            .map_err(|_| self.unavailable("subscribe timed out".into()))?
            .map_err(failed)?;
        Ok(pubsub.into_on_message().filter_map(|msg| async move { msg.get_payload::<String>().ok() }))
    }

    /// `PUBLISH channel message`; returns how many subscribers received it.
    pub async fn publish(&self, channel: &str, message: &str) -> Result<u64, StoreError> {
        self.query(redis::cmd("PUBLISH").arg(channel).arg(message)).await
    }

    /// Runs one command with the per-command timeout and returns its typed reply.
    pub async fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        self.query(cmd).await
    }

    /// Runs a pipeline in one round trip and returns its (non-ignored) replies. On a cluster every command must
    /// touch keys of one slot.
    pub(crate) async fn run_pipeline<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, StoreError> {
        let mut connection = self.connection().await?.clone();
        let reply = tokio::time::timeout(self.settings.timeout, async {
            match &mut connection {
                Connection::Standalone(c) => pipe.query_async::<T>(c).await,
                Connection::Cluster(c) => pipe.query_async::<T>(c).await,
            }
        })
        .await;
        self.finish(reply)
    }

    /// Runs a pipeline in one round trip, ignoring replies. On a cluster every command must touch keys of one slot.
    pub(crate) async fn pipeline(&self, pipe: &redis::Pipeline) -> Result<(), StoreError> {
        self.run_pipeline::<()>(pipe).await
    }

    /// A connection of its own, for blocking reads (`XREAD BLOCK`) that would otherwise hold up every command
    /// queued behind them on the shared multiplexed connection. `patience` is how long a reply may take (longer
    /// than the block time).
    pub(crate) async fn dedicated(&self, patience: Duration) -> Result<Dedicated, StoreError> {
        let s = &self.settings;
        let failed = |e: redis::RedisError| self.unavailable(e.to_string());
        let connect = async {
            if s.cluster {
                let client = redis::cluster::ClusterClientBuilder::new(s.urls.clone())
                    .connection_timeout(s.timeout)
                    .response_timeout(patience)
                    .build()
                    .map_err(failed)?;
                Ok(Dedicated(
                    self.settings.name.clone(),
                    Connection::Cluster(client.get_async_connection().await.map_err(failed)?),
                ))
            } else {
                let url = s.urls.first().ok_or_else(|| self.unavailable("no URL".into()))?;
                let client = redis::Client::open(url.as_str()).map_err(failed)?;
                let manager = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(s.timeout))
                    .set_response_timeout(Some(patience))
                    .set_max_delay(RECONNECT_MAX_DELAY);
                Ok(Dedicated(
                    self.settings.name.clone(),
                    Connection::Standalone(ConnectionManager::new_with_config(client, manager).await.map_err(failed)?),
                ))
            }
        };
        tokio::time::timeout(s.timeout.max(Duration::from_secs(1)), connect)
            .await
            .map_err(|_| self.unavailable("connect timed out".into()))?
    }

    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, StoreError> {
        let mut connection = self.connection().await?.clone();
        let reply = tokio::time::timeout(self.settings.timeout, async {
            match &mut connection {
                Connection::Standalone(c) => cmd.query_async::<T>(c).await,
                Connection::Cluster(c) => cmd.query_async::<T>(c).await,
            }
        })
        .await;
        self.finish(reply)
    }

    fn finish<T>(&self, reply: Result<redis::RedisResult<T>, tokio::time::error::Elapsed>) -> Result<T, StoreError> {
        match reply {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) if err.is_io_error() || err.is_connection_dropped() || err.is_timeout() => {
                Err(self.unavailable(err.to_string()))
            }
            Ok(Err(err)) => Err(StoreError::Command { store: self.settings.name.clone(), message: err.to_string() }),
            Err(_) => Err(self.unavailable(format!("no answer within {:?}", self.settings.timeout))),
        }
    }

    fn unavailable(&self, message: String) -> StoreError {
        StoreError::Unavailable { store: self.settings.name.clone(), message }
    }

    /// The connection, connecting on first use; a failed connect leaves the cell empty so the next call retries.
    async fn connection(&self) -> Result<&Connection, StoreError> {
        self.connection
            .get_or_try_init(|| async {
                tokio::time::timeout(self.settings.timeout.max(Duration::from_secs(1)), self.connect())
                    .await
                    .map_err(|_| self.unavailable("connect timed out".into()))?
            })
            .await
    }

    async fn connect(&self) -> Result<Connection, StoreError> {
        let s = &self.settings;
        let failed = |e: redis::RedisError| self.unavailable(e.to_string());
        if s.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(s.urls.clone())
                .connection_timeout(s.timeout)
                .response_timeout(s.timeout)
                .build()
                .map_err(failed)?;
            Ok(Connection::Cluster(client.get_async_connection().await.map_err(failed)?))
        } else {
            let url = s.urls.first().ok_or_else(|| self.unavailable("no URL".into()))?;
            let client = redis::Client::open(url.as_str()).map_err(failed)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(s.timeout))
                .set_response_timeout(Some(s.timeout))
                .set_max_delay(RECONNECT_MAX_DELAY);
            Ok(Connection::Standalone(ConnectionManager::new_with_config(client, config).await.map_err(failed)?))
        }
    }
}

/// The Redis stores of a config, by their `[[redis]] name`.
#[derive(Debug, Clone, Default)]
pub struct Stores {
    by_name: std::collections::HashMap<String, std::sync::Arc<RedisStore>>,
}

impl Stores {
    /// No stores.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the store called `name`.
    pub fn insert(&mut self, name: String, store: std::sync::Arc<RedisStore>) {
        self.by_name.insert(name, store);
    }

    /// The store called `name`.
    pub fn get(&self, name: &str) -> Option<&std::sync::Arc<RedisStore>> {
        self.by_name.get(name)
    }

    /// Every store, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &std::sync::Arc<RedisStore>)> {
        self.by_name.iter()
    }
}

impl FromIterator<(String, std::sync::Arc<RedisStore>)> for Stores {
    fn from_iter<I: IntoIterator<Item = (String, std::sync::Arc<RedisStore>)>>(iter: I) -> Self {
        Self { by_name: iter.into_iter().collect() }
    }
}
