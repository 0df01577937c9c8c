//! Wiring: load certificates and plugins, bind listeners, accept connections, hand them to TLS and the proxy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::cache::CertCache;
use crate::config::{Config, Fallback, ListenerSettings};
use crate::fdlimit::Budgets;
use crate::listener::{Listener, ListenerCtx, accept_loop};
use crate::metrics::Metrics;
use crate::plugin::{self, PluginLoadError, PluginSlot};
use crate::proxy::Proxy;
use crate::resumption::{Resumption, scope_of};
use crate::select::{Policy, Selector, StaticCertError, StaticCerts};
use crate::tls::{self, TlsTemplate};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A static certificate is unusable.
    #[error(transparent)]
    StaticCert(#[from] StaticCertError),
    /// A plugin could not be loaded.
    #[error(transparent)]
    Plugin(#[from] PluginLoadError),
    /// A listener could not bind its address.
    #[error("listener {listener:?}: cannot bind {addr}: {source}")]
    Bind {
        /// Listener name.
        listener: String,
        /// Its address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// A listener's client CA bundle is unusable.
    #[error("listener {listener:?}: client_ca {path}: {message}")]
    ClientCa {
        /// Listener name.
        listener: String,
        /// The CA file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// An upstream pool's CA file is unusable.
    #[error("upstream {upstream:?}: ca {}: {message}", path.display())]
    UpstreamCa {
        /// Pool name.
        upstream: String,
        /// The CA file.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file or folder `[acme]` names is unusable.
    #[error("{key} {}: {message}", path.display())]
    Acme {
        /// The config key.
        key: &'static str,
        /// The file or folder.
        path: std::path::PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A start-up task on a blocking thread did not finish (it panicked or the runtime is shutting down).
    #[error("start-up task {task} did not finish: {message}")]
    Task {
        /// What the task was doing.
        task: &'static str,
        /// The join error.
        message: String,
    },
    /// TLS settings were refused by rustls.
    #[error("listener {listener:?}: TLS settings: {source}")]
    Tls {
        /// Listener name.
        listener: String,
        /// The rustls error.
        source: rustls::Error,
    },
}

/// A configured, bound server, ready to run.
#[derive(Debug)]
pub struct Server {
    listeners: Vec<Listener>,
    /// Compiles replacement plugin builds on reload.
    runtime: plugin::PluginRuntime,
    /// Redis stores by name, for replacement builds' grants.
    stores: crate::store::Stores,
    /// The admin listener, bound, with its settings.
    admin: Option<(TcpListener, crate::config::AdminSettings)>,
    /// The file-descriptor budget and the permits that enforce it.
    budgets: Budgets,
    /// Automatic reload settings.
    reload: crate::config::ReloadSettings,
    /// The config file the server was built from: reloads read it again.
    config_path: std::path::PathBuf,
    /// How long in-flight connections may take to finish on shutdown.
    shutdown_grace: Duration,
    /// Tells open connections to finish their current requests and close (graceful shutdown).
    draining: tokio::sync::watch::Sender<bool>,
    /// The store and channel cache invalidations arrive on.
    invalidation: Option<(Arc<crate::store::RedisStore>, String)>,
    selector: Arc<Selector>,
    plugins: HashMap<String, Arc<PluginSlot>>,
    metrics: Arc<Metrics>,
    resumption: Arc<Resumption>,
    upstreams: Arc<crate::upstream::Upstreams>,
    handshake_timeout: Duration,
    /// Certificates on demand, if `[acme]` is configured.
    acme: Option<Arc<crate::acme::Acme>>,
    /// Plain-HTTP listeners (HTTP-01 challenges, redirects to HTTPS).
    http_listeners: Vec<Arc<crate::http_listener::HttpListener>>,
}

impl Server {
    /// Loads static certificates and plugins (off the async workers) and binds every listener.
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        Self::bind_inheriting(config, &crate::handover::Inherited::none()).await
    }

    /// Like [`Server::bind`], but a listener whose socket is among `inherited` (a binary upgrade, systemd socket
    /// activation) takes it instead of binding; inherited sockets no listener takes are closed.
    pub async fn bind_inheriting(config: Config, inherited: &crate::handover::Inherited) -> Result<Self, StartError> {
        let certificate_settings = config.certificates.clone();
        let statics = tokio::task::spawn_blocking(move || StaticCerts::load(&certificate_settings))
            .await
            .map_err(|e| StartError::Task { task: "loading static certificates", message: e.to_string() })??;
        let stores = stores_for(&config);
        let invalidation =
            config.invalidation.as_ref().and_then(|i| Some((stores.get(&i.store)?.clone(), i.channel.clone())));
        let runtime = plugin::runtime_for(&config.plugins, config.server.plugin_keep_resident)?
            .with_memory_total(config.server.plugin_memory_total);
        let budgets = Budgets::for_config(&config);
        let plugins: HashMap<String, Arc<PluginSlot>> = plugin::load_all(&runtime, &config.plugins, &stores)
            .await?
            .into_iter()
            .map(|p| (p.name().to_string(), Arc::new(PluginSlot::new(p))))
            .collect();
        let resumption_store = config.resumption.store.as_ref().and_then(|name| stores.get(name).cloned());
        let session_capacity = u64::try_from(config.server.session_cache_entries).unwrap_or(u64::MAX);
        let resumption = Resumption::start(&config.resumption, resumption_store, session_capacity).await;
        let metrics = Arc::new(Metrics::default());
        if let Some(settings) = &config.acme {
            crate::acme::preflight(settings).await.map_err(|(key, path, message)| StartError::Acme {
                key,
                path,
                message,
            })?;
        }
        let acme = config.acme.clone().map(|settings| {
            let redis = match &settings.storage {
                crate::config::AcmeStorage::Redis(r) => stores.get(&r.name).cloned(),
                crate::config::AcmeStorage::Directory(_) => None,
            };
            Arc::new(crate::acme::Acme::new(settings, redis, &config.resumption.node))
        });
        let selector = Selector::new(statics, CertCache::new(&config.cache, metrics.clone()), metrics.clone());
        let selector = Arc::new(match &acme {
            Some(acme) => selector.with_acme(acme.clone()),
            None => selector,
        });
        let mut http_listeners = Vec::with_capacity(config.http_listeners.len());
        for settings in &config.http_listeners {
            let tcp = listen(inherited, &settings.name, settings.bind).await?;
            http_listeners.push(Arc::new(crate::http_listener::HttpListener {
                settings: settings.clone(),
                tcp,
                acme: acme.clone(),
                head_timeout: config.server.client.request_head_timeout,
            }));
        }

        let roots = pool_roots(&config.upstreams).await?;
        let upstreams = Arc::new(crate::upstream::Upstreams::new(
            &config.upstreams,
            &config.proxy,
            budgets.backends.clone(),
            roots,
        ));
        let (draining, drain_signal) = tokio::sync::watch::channel(false);
        let mut listeners = Vec::with_capacity(config.listeners.len());
        // One memo of compressed certificates for every listener: a chain served by two compresses once.
        let compression = crate::compression::Compression::new(&config.server.certificate_compression, metrics.clone());
        for settings in &config.listeners {
            let shared = Shared {
                compression: &compression,
                selector: &selector,
                plugins: &plugins,
                metrics: &metrics,
                budgets: &budgets,
                upstreams: &upstreams,
            };
            let tcp = listen(inherited, &settings.name, settings.bind).await?;
            listeners.push(Self::listener(&config, settings, shared, &resumption, &drain_signal, tcp).await?);
        }
        let admin = match &config.admin {
            None => None,
            Some(a) => Some((listen(inherited, "admin", a.bind).await?, a.clone())),
        };
        inherited.close_unclaimed();
        Ok(Self {
            listeners,
            admin,
            budgets,
            reload: config.reload.clone(),
            config_path: config.source.clone(),
            shutdown_grace: config.server.shutdown_grace,
            draining,
            runtime,
            stores,
            invalidation,
            selector,
            plugins,
            metrics,
            resumption,
            upstreams,
            handshake_timeout: config.server.handshake_timeout,
            acme,
            http_listeners,
        })
    }

    async fn listener(
        config: &Config,
        settings: &ListenerSettings,
        shared: Shared<'_>,
        resumption: &Resumption,
        drain_signal: &tokio::sync::watch::Receiver<bool>,
        tcp: TcpListener,
    ) -> Result<Listener, StartError> {
        let Shared { compression, selector, plugins, metrics, budgets, upstreams } = shared;
        let name: Arc<str> = Arc::from(settings.name.as_str());
        let default = match &settings.fallback {
            // Validated in config: the named certificate exists.
            Fallback::DefaultCertificate(id) => selector.statics().by_id(id).cloned(),
            Fallback::Strict => None,
        };
        let policy = Policy {
            listener: name.clone(),
            plugin: settings.plugin.as_ref().and_then(|p| plugins.get(p).cloned()),
            default,
        };
        let (verifier, scope) = match &settings.client_auth {
            None => (None, scope_of(None)),
            Some(auth) => {
                let ca_error = |message: String| StartError::ClientCa {
                    listener: settings.name.clone(),
                    path: auth.ca.clone(),
                    message,
                };
                let pem = tokio::fs::read(&auth.ca).await.map_err(|e| ca_error(e.to_string()))?;
                let verifier = tls::client_verifier(&pem, auth.required).map_err(ca_error)?;
                (Some(verifier), scope_of(Some((&pem, auth.required))))
            }
        };
        let (sessions, ticketer) = resumption.for_scope(&scope);
        let ticketer = ticketer.map(|t| t as Arc<dyn rustls::server::ProducesTickets>);
        let tls = TlsTemplate::new(
            &settings.alpn,
            &config.server.ciphers,
            verifier,
            sessions,
            ticketer,
            config.resumption.tls13_tickets,
        )
        .map_err(|source| StartError::Tls { listener: settings.name.clone(), source })?
        .with_compression(compression);
        let ctx = Arc::new(ListenerCtx {
            name: name.clone(),
            policy,
            tls,
            proxy: Arc::new(Proxy::new(
                settings.backend.clone(),
                &config.proxy,
                metrics.clone(),
                crate::backend::Budget::new(config.proxy.max_connections_per_backend, budgets.backends.clone()),
                upstreams.clone(),
                settings.backend_proxy_protocol,
            )),
            passthrough_connect_timeout: config.proxy.connect_timeout,
            drain_signal: drain_signal.clone(),
            selector: selector.clone(),
            metrics: metrics.clone(),
            handshake_timeout: config.server.handshake_timeout,
            limits: config.server.client.clone(),
            proxy_protocol: settings.proxy_protocol.clone(),
            admission: Arc::new(crate::admission::Admission::new(name.clone(), &settings.admission)),
            ja4_header: settings.ja4_header.clone(),
        });
        Ok(Listener {
            name,
            tcp,
            ctx,
            connections: Arc::new(Semaphore::new(config.server.max_connections)),
            max_connections: config.server.max_connections,
            all_clients: budgets.clients.clone(),
        })
    }

    /// A copy of every listening socket by its listener's name (the admin listener's is `admin`), to hand to a
    /// successor process ([`crate::handover::start_successor`]).
    pub fn listening_sockets(&self) -> std::io::Result<Vec<(String, std::os::fd::OwnedFd)>> {
        use std::os::fd::AsFd as _;
        let tls = self.listeners.iter().map(|l| (l.name.to_string(), l.tcp.as_fd()));
        let http = self.http_listeners.iter().map(|l| (l.settings.name.clone(), l.tcp.as_fd()));
        let admin = self.admin.iter().map(|(tcp, _)| ("admin".to_string(), tcp.as_fd()));
        tls.chain(http).chain(admin).map(|(name, fd)| Ok((name, fd.try_clone_to_owned()?))).collect()
    }

    /// Bound addresses by listener name (useful when binding port 0); the admin listener is named `admin`.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        let admin = self.admin.iter().filter_map(|(tcp, _)| Some(("admin".to_string(), tcp.local_addr().ok()?)));
        let http = self.http_listeners.iter().filter_map(|l| Some((l.settings.name.clone(), l.tcp.local_addr().ok()?)));
        self.listeners
            .iter()
            .filter_map(|l| Some((l.name.to_string(), l.tcp.local_addr().ok()?)))
            .chain(http)
            .chain(admin)
            .collect()
    }

    /// The process's counters.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// A loaded plugin by name.
    pub fn plugin(&self, name: &str) -> Option<&Arc<PluginSlot>> {
        self.plugins.get(name)
    }

    /// A reloader for this server's plugins, reading the config file the server was built from (see
    /// [`crate::reload`]).
    pub fn reloader(&self) -> Arc<crate::reload::Reloader> {
        Arc::new(crate::reload::Reloader::new(
            self.config_path.clone(),
            self.runtime.clone(),
            self.stores.clone(),
            self.plugins.clone(),
            self.selector.cache().clone(),
        ))
    }

    /// The node's resumption state.
    pub fn resumption(&self) -> &Arc<Resumption> {
        &self.resumption
    }

    /// The certificate selector (static certificates and cache).
    pub fn selector(&self) -> &Arc<Selector> {
        &self.selector
    }

    /// The ACME subsystem, if configured.
    pub fn acme(&self) -> Option<&Arc<crate::acme::Acme>> {
        self.acme.as_ref()
    }

    /// The handshake deadline in force.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    /// Accepts connections on every listener until `shutdown` completes, then drains: stops accepting, lets
    /// in-flight requests finish (keep-alive connections close after their current request) for up to
    /// `server.shutdown_grace`, and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let reloader = self.reloader();
        // Background tasks (admin, reload triggers, invalidations) outlive the accept loops during the drain, so
        // /readyz can say "draining" while connections finish.
        let mut tasks = tokio::task::JoinSet::new();
        let mut accepting = tokio::task::JoinSet::new();
        if let Some((store, channel)) = self.invalidation.clone() {
            tasks.spawn(listen_for_invalidations(store, channel, self.selector.cache().clone()));
        }
        self.resumption.spawn(&mut tasks);
        if let Some(acme) = &self.acme {
            tasks.spawn(acme.clone().maintain());
        }
        if self.reload.watch {
            tasks.spawn(crate::reload::watch(reloader.clone(), self.reload.watch_interval));
        }
        #[cfg(unix)]
        tasks.spawn(reload_on_sighup(reloader.clone()));
        let listener_names = self.listeners.iter().map(|l| l.name.clone()).collect();
        let admission = self.listeners.iter().map(|l| l.ctx.admission.clone()).collect();
        let mut connection_slots = Vec::new();
        for listener in self.listeners {
            if let Ok(addr) = listener.tcp.local_addr() {
                tracing::info!(listener = %listener.name, %addr, "listening");
            }
            connection_slots.push((listener.connections.clone(), listener.max_connections));
            accepting.spawn(accept_loop(listener));
        }
        for http in &self.http_listeners {
            if let Ok(addr) = http.tcp.local_addr() {
                tracing::info!(listener = %http.settings.name, %addr, "listening (plain HTTP)");
            }
            accepting.spawn(http.clone().serve());
        }
        if let Some((tcp, settings)) = self.admin {
            if let Ok(addr) = tcp.local_addr() {
                tracing::info!(%addr, "admin listening");
            }
            let state = crate::admin::AdminState {
                metrics: self.metrics.clone(),
                resumption: self.resumption.metrics().clone(),
                selector: self.selector.clone(),
                plugins: self.plugins.clone(),
                listeners: listener_names,
                admission,
                upstreams: self.upstreams.clone(),
                acme: self.acme.clone(),
                reloader,
                settings,
                budgets: self.budgets.clone(),
                plugin_memory: self.runtime.clone(),
                draining: self.draining.subscribe(),
            };
            tasks.spawn(crate::admin::serve(tcp, Arc::new(state)));
        }
        shutdown.await;
        // Stop accepting (dropping the listeners), then ask open connections to finish and close.
        accepting.abort_all();
        let _ = self.draining.send(true);
        let drained = tokio::time::timeout(self.shutdown_grace, async {
            for (slots, max) in connection_slots {
                // Every connection holds one permit until it ends.
                let _ = slots.acquire_many(u32::try_from(max).unwrap_or(u32::MAX)).await;
            }
        })
        .await;
        match drained {
            Ok(()) => tracing::info!("all connections finished"),
            Err(_) => tracing::warn!(grace = ?self.shutdown_grace, "connections still open after the grace period"),
        }
        tasks.abort_all();
    }
}

/// The listening socket of the listener `name` at `addr`: inherited if one matches, else bound now.
async fn listen(
    inherited: &crate::handover::Inherited,
    name: &str,
    addr: SocketAddr,
) -> Result<TcpListener, StartError> {
    let bound = match inherited.take(name, addr) {
        Some(socket) => socket,
        None => TcpListener::bind(addr).await,
    };
    bound.map_err(|source| StartError::Bind { listener: name.to_string(), addr, source })
}

/// The roots each TLS pool verifies its servers against (files read off the async workers).
async fn pool_roots(
    pools: &[crate::config::UpstreamSettings],
) -> Result<HashMap<String, rustls::RootCertStore>, StartError> {
    let mut roots = HashMap::new();
    for pool in pools {
        let Some(tls) = &pool.tls else { continue };
        let ca = tls.ca.clone();
        let loaded = tokio::task::spawn_blocking(move || match &ca {
            Some(path) => crate::upstream::load_roots(path),
            None => crate::upstream::system_roots(),
        })
        .await
        .map_err(|e| StartError::Task { task: "loading upstream CA files", message: e.to_string() })?;
        let store = loaded.map_err(|message| StartError::UpstreamCa {
            upstream: pool.name.clone(),
            path: tls.ca.clone().unwrap_or_else(|| "system roots".into()),
            message,
        })?;
        roots.insert(pool.name.clone(), store);
    }
    Ok(roots)
}

/// What every listener of the process shares.
#[derive(Clone, Copy)]
struct Shared<'a> {
    compression: &'a crate::compression::Compression,
    selector: &'a Arc<Selector>,
    plugins: &'a HashMap<String, Arc<PluginSlot>>,
    metrics: &'a Arc<Metrics>,
    budgets: &'a Budgets,
    upstreams: &'a Arc<crate::upstream::Upstreams>,
}

/// Reloads plugins on every SIGHUP.
#[cfg(unix)]
async fn reload_on_sighup(reloader: Arc<crate::reload::Reloader>) {
    let Ok(mut hangups) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload through the admin API or the file watcher");
        return;
    };
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading plugins");
        let report = reloader.reload().await;
        tracing::info!(swapped = ?report.swapped, rejected = report.rejected.len(), "reload finished");
    }
}

/// One client per `[[redis]]` section (they connect on first use).
pub fn stores_for(config: &Config) -> crate::store::Stores {
    config.redis.iter().map(|r| (r.name.clone(), Arc::new(crate::store::RedisStore::new(r.clone())))).collect()
}

/// Drops cached answers for the names published on `channel`, resubscribing (with backoff) whenever the
/// subscription drops. Names published while the subscription is down are missed; their TTL still bounds how
/// long they are served.
async fn listen_for_invalidations(store: Arc<crate::store::RedisStore>, channel: String, cache: CertCache) {
    use futures_util::StreamExt;
    const FIRST_RETRY: Duration = Duration::from_millis(100);
    let mut retry = FIRST_RETRY;
    loop {
        match store.subscribe(&channel).await {
            Ok(messages) => {
                tracing::info!(store = store.name(), channel, "subscribed to certificate invalidations");
                retry = FIRST_RETRY;
                let mut messages = std::pin::pin!(messages);
                while let Some(name) = messages.next().await {
                    tracing::info!(servername = %name.trim(), "cache invalidated");
                    cache.invalidate_name(name.trim());
                }
                tracing::warn!(store = store.name(), channel, "invalidation subscription lost, resubscribing");
            }
            Err(err) => tracing::warn!(channel, error = %err, retry = ?retry, "cannot subscribe to invalidations"),
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(Duration::from_secs(5));
    }
}
