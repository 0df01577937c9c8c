//! The file-descriptor budget. tern raises its soft `RLIMIT_NOFILE` to the hard limit at start-up, then splits
//! what it may open between client connections (all listeners together), backend connections and a reserve for
//! everything else (plugins' files and HTTP requests, Redis, the admin API, logs). Client connections beyond
//! their share wait in the kernel's accept queue and backend connections beyond theirs wait for a permit, so tern
//! never reaches the limit and `accept` never fails with "Too many open files".

use crate::config::Config;

/// How the process's descriptors are shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// The soft limit in force (after raising it).
    pub limit: u64,
    /// Client connections open at once, all listeners together.
    pub clients: usize,
    /// Backend connections open at once, all backends together.
    pub backends: usize,
    /// Kept for everything else.
    pub reserve: usize,
    /// Whether clients and backends were scaled down to fit under the limit.
    pub scaled: bool,
}

/// Raises the soft descriptor limit to the hard one (where allowed) and returns the soft limit now in force.
pub fn raise_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if let Some(hard) = limit.maximum
        && limit.current.is_some_and(|soft| soft < hard)
    {
        limit.current = Some(hard);
        if let Err(err) = setrlimit(Resource::Nofile, limit) {
            tracing::debug!(error = %err, "cannot raise the file descriptor limit");
        }
    }
    // `None` means unlimited.
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// Shares `limit` descriptors between the config's wishes; if they do not fit, clients and backends are scaled
/// down in proportion (and the caller warns).
pub fn budget(config: &Config, limit: u64) -> FdBudget {
    let plugin_calls: usize = config.plugins.iter().map(|p| p.max_concurrency).sum();
    let admin = config.admin.as_ref().map_or(0, |a| a.max_connections);
    // Each plugin call may hold a file and an HTTP connection; 128 for Redis, logs, the binary's own files.
    let reserve = 128 + admin + 2 * plugin_calls;
    let clients = config.server.max_connections.saturating_mul(config.listeners.len());
    let backends = config.proxy.max_backend_connections;
    let available = usize::try_from(limit).unwrap_or(usize::MAX).saturating_sub(reserve);
    let wanted = clients.saturating_add(backends);
    if wanted <= available {
        return FdBudget { limit, clients, backends, reserve, scaled: false };
    }
    // Proportional shares, at least one each.
    let share = |n: usize| ((n as f64 / wanted as f64) * available as f64).floor().max(1.0) as usize;
    FdBudget { limit, clients: share(clients), backends: share(backends), reserve, scaled: true }
}

/// Descriptors the process has open now (Linux; `None` elsewhere).
pub fn open_now() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(|dir| dir.count())
}

/// The process's connection budgets: permits for client connections of all listeners and for backend connections
/// of all backends.
#[derive(Debug, Clone)]
pub struct Budgets {
    /// How descriptors were shared out.
    pub fd: FdBudget,
    /// One permit per open client connection.
    pub clients: std::sync::Arc<tokio::sync::Semaphore>,
    /// One permit per open backend connection.
    pub backends: std::sync::Arc<tokio::sync::Semaphore>,
}

impl Budgets {
    /// Raises the descriptor limit and sizes the budgets for `config`, warning if they had to shrink.
    pub fn for_config(config: &Config) -> Self {
        let limit = raise_limit();
        let fd = budget(config, limit);
        if fd.scaled {
            tracing::warn!(
                fd_limit = limit,
                clients = fd.clients,
                backends = fd.backends,
                "the file-descriptor limit is below what max_connections and proxy.max_backend_connections ask \
                 for; connections are capped to fit (raise the limit, e.g. LimitNOFILE= in the systemd unit)"
            );
        }
        Self {
            fd,
            clients: std::sync::Arc::new(tokio::sync::Semaphore::new(fd.clients)),
            backends: std::sync::Arc::new(tokio::sync::Semaphore::new(fd.backends)),
        }
    }

    /// Appends the budgets and what is in use of them, and the descriptors open now, as gauges.
    pub(crate) fn render(&self, x: &mut crate::metrics::Exposition) {
        let in_use = |budget: usize, free: usize| budget.saturating_sub(free) as u64;
        for (name, help, value) in [
            ("tern_open_files_limit", "The soft file-descriptor limit in force.", self.fd.limit),
            ("tern_client_connections_budget", "Client connections all listeners may hold.", self.fd.clients as u64),
            (
                "tern_client_connections_open",
                "Client connections open.",
                in_use(self.fd.clients, self.clients.available_permits()),
            ),
            ("tern_backend_connections_budget", "Backend connections the process may hold.", self.fd.backends as u64),
            (
                "tern_backend_connections_open",
                "Backend connections open.",
                in_use(self.fd.backends, self.backends.available_permits()),
            ),
        ] {
            x.family(name, "gauge", help);
            x.sample(name, "", value);
        }
        if let Some(open) = open_now() {
            x.family("tern_open_files", "gauge", "File descriptors open.");
            x.sample("tern_open_files", "", open as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_connections: usize, listeners: usize) -> Config {
        let mut text =
            format!("[server]\nmax_connections = {max_connections}\n[proxy]\nmax_backend_connections = 4096\n");
        for i in 0..listeners {
            text.push_str(&format!(
                "[[listener]]\nname = \"l{i}\"\nbind = \"127.0.0.1:0\"\nstrict = true\nbackend = \"http://127.0.0.1:1\"\n"
            ));
        }
        Config::from_toml(&text, std::path::Path::new("/t/tern.toml")).unwrap()
    }

    #[test]
    fn a_budget_that_fits_is_kept_and_one_that_does_not_is_scaled_under_the_limit() {
        let b = budget(&config(1000, 2), 1 << 20);
        assert_eq!((b.clients, b.backends, b.scaled), (2000, 4096, false));
        let b = budget(&config(10_000, 2), 4096);
        assert!(b.scaled && b.clients + b.backends + b.reserve <= 4096, "{b:?}");
        assert!(b.clients > 1000 && b.backends > 500, "{b:?}");
    }

    #[test]
    fn raising_the_limit_never_lowers_it() {
        let before = rustix::process::getrlimit(rustix::process::Resource::Nofile).current.unwrap_or(u64::MAX);
        assert!(raise_limit() >= before);
    }
}
