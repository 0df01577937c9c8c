//! What one plugin call came to. [`Outcome`] is the one list of outcomes: its label names the metric sample and
//! the log field, it says whether the outcome counts against the plugin's breaker, and [`PluginStats`] keeps one
//! counter per outcome, indexed by it, so that a new outcome cannot go uncounted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::guard::Shed;
use crate::counters::{Counters, Key};
use crate::metrics::{Exposition, Histogram, label_value};

/// Why a plugin call failed. Each variant is the plugin's (or its configuration's) fault, never the client's.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// The plugin returned `err(message)`.
    #[error("plugin returned an error: {0}")]
    Returned(String),
    /// The plugin returned an error after a store it was granted (Redis, an HTTP API) could not be reached.
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
    /// The plugin trapped (panic, unreachable, out-of-bounds access...).
    #[error("plugin trapped: {0}")]
    Trap(String),
    /// The plugin tried to grow its memory past the cap and trapped.
    #[error("plugin exceeded its memory limit of {limit} bytes")]
    MemoryLimit {
        /// The cap.
        limit: usize,
    },
    /// Growing the instance's memory would have taken the plugins of the whole process past
    /// `server.plugin_memory_total` (many large calls at once): this call trapped, the others go on.
    #[error("process-wide plugin memory budget of {limit} bytes exhausted")]
    MemoryBudget {
        /// The budget.
        limit: usize,
    },
    /// The call was not made: the plugin's call-rate cap or circuit breaker shed it.
    #[error("plugin call shed: {0:?}")]
    Shed(Shed),
    /// The call ran past its deadline and was abandoned.
    #[error("plugin did not answer within {0:?}")]
    Timeout(Duration),
    /// A fresh instance could not be set up (sandbox directory missing, instantiation failed).
    #[error("plugin could not be instantiated: {0}")]
    Instantiate(String),
}

impl PluginError {
    /// The outcome this failure is counted and labelled as.
    pub fn outcome(&self) -> Outcome {
        match self {
            PluginError::Returned(_) => Outcome::Error,
            PluginError::StoreUnavailable(_) => Outcome::StoreUnavailable,
            PluginError::Shed(Shed::RateLimited) => Outcome::RateLimited,
            PluginError::Shed(Shed::ClientRateLimited) => Outcome::ClientRateLimited,
            PluginError::Shed(Shed::CircuitOpen) => Outcome::CircuitOpen,
            PluginError::Trap(_) => Outcome::Trap,
            PluginError::MemoryLimit { .. } => Outcome::MemoryLimit,
            PluginError::MemoryBudget { .. } => Outcome::MemoryBudget,
            PluginError::Timeout(_) => Outcome::Timeout,
            PluginError::Instantiate(_) => Outcome::Instantiate,
        }
    }

    /// Whether this failure says the plugin (or the store behind it) is unhealthy (see
    /// [`Outcome::counts_against_plugin`]).
    pub fn counts_against_plugin(&self) -> bool {
        self.outcome().counts_against_plugin()
    }

    /// Short, stable label for metrics and log fields.
    pub fn kind(&self) -> &'static str {
        self.outcome().label()
    }

    /// Whether the call was not made at all (rate cap or breaker).
    pub fn is_shed(&self) -> bool {
        matches!(self, PluginError::Shed(_))
    }
}

/// What one plugin call came to, success or failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A certificate.
    Found,
    /// "Not found".
    NotFound,
    /// The plugin returned an error message.
    Error,
    /// A granted store could not be reached.
    StoreUnavailable,
    /// Not made: the call-rate cap.
    RateLimited,
    /// Not made: the client network's share of the rate cap was spent.
    ClientRateLimited,
    /// Not made: the circuit breaker was open.
    CircuitOpen,
    /// The plugin trapped.
    Trap,
    /// The plugin hit its memory cap.
    MemoryLimit,
    /// The plugins of the process together reached `server.plugin_memory_total`.
    MemoryBudget,
    /// Abandoned at the deadline.
    Timeout,
    /// No instance could be set up.
    Instantiate,
}

impl Key for Outcome {
    const ALL: &'static [Outcome] = &[
        Outcome::Found,
        Outcome::NotFound,
        Outcome::Error,
        Outcome::StoreUnavailable,
        Outcome::RateLimited,
        Outcome::ClientRateLimited,
        Outcome::CircuitOpen,
        Outcome::Trap,
        Outcome::MemoryLimit,
        Outcome::MemoryBudget,
        Outcome::Timeout,
        Outcome::Instantiate,
    ];

    /// The label of `tern_plugin_calls_total{outcome}` and of log fields.
    fn label(self) -> &'static str {
        match self {
            Outcome::Found => "found",
            Outcome::NotFound => "not_found",
            Outcome::Error => "error",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::RateLimited => "rate_limited",
            Outcome::ClientRateLimited => "client_rate_limited",
            Outcome::CircuitOpen => "circuit_open",
            Outcome::Trap => "trap",
            Outcome::MemoryLimit => "memory_limit",
            Outcome::MemoryBudget => "memory_budget",
            Outcome::Timeout => "timeout",
            Outcome::Instantiate => "instantiate",
        }
    }
}

impl Outcome {
    /// Whether this outcome says the plugin (or the store behind it) is unhealthy, so that it counts towards the
    /// circuit breaker. An error the plugin returned for one name, or a shared budget that many calls at once used
    /// up, is something a client can provoke at will by choosing names: counting it would let any client switch
    /// selection off for everyone.
    pub fn counts_against_plugin(self) -> bool {
        match self {
            Outcome::Trap
            | Outcome::MemoryLimit
            | Outcome::Timeout
            | Outcome::StoreUnavailable
            | Outcome::Instantiate => true,
            Outcome::Found
            | Outcome::NotFound
            | Outcome::Error
            | Outcome::MemoryBudget
            | Outcome::RateLimited
            | Outcome::ClientRateLimited
            | Outcome::CircuitOpen => false,
        }
    }

    /// Counted in the `error` total: the plugin ran and failed without trapping, or could not start.
    fn is_error(self) -> bool {
        matches!(self, Outcome::Error | Outcome::StoreUnavailable | Outcome::Instantiate)
    }

    /// Counted in the `trap` total: the instance trapped, for whatever reason.
    fn is_trap(self) -> bool {
        matches!(self, Outcome::Trap | Outcome::MemoryLimit | Outcome::MemoryBudget)
    }
}

/// Counters of one plugin's calls (of every build that served in its slot).
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Calls started (shed calls are not started).
    calls: AtomicU64,
    /// One counter per [`Outcome`].
    outcomes: Counters<Outcome>,
    /// The largest linear memory one call's instance held, bytes.
    peak_memory_bytes: AtomicU64,
    /// How long instantiating took, per call that got that far (a fresh instance per call).
    instantiate: Histogram,
    /// How long the export ran, per instantiated call (its store round trips included).
    run: Histogram,
    /// Calls that ran in a spare instance (made ahead, off the handshake).
    on_spare: AtomicU64,
}

impl PluginStats {
    /// Calls ending in `outcome`.
    pub fn count(&self, outcome: Outcome) -> u64 {
        self.outcomes.get(outcome)
    }

    /// Calls started.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Calls that failed without trapping (returned errors, store outages, instantiation failures).
    pub fn errors(&self) -> u64 {
        self.sum(Outcome::is_error)
    }

    /// Calls that trapped (memory cap and budget traps included).
    pub fn traps(&self) -> u64 {
        self.sum(Outcome::is_trap)
    }

    /// The largest linear memory one call's instance held, bytes.
    pub fn peak_memory_bytes(&self) -> u64 {
        self.peak_memory_bytes.load(Ordering::Relaxed)
    }

    /// Time spent instantiating, per call.
    pub fn instantiate(&self) -> &Histogram {
        &self.instantiate
    }

    /// Calls that ran in a spare instance, made before the call.
    pub fn calls_on_spare(&self) -> u64 {
        self.on_spare.load(Ordering::Relaxed)
    }

    /// Time the export ran, per call.
    pub fn run(&self) -> &Histogram {
        &self.run
    }

    fn sum(&self, included: fn(Outcome) -> bool) -> u64 {
        Outcome::ALL.iter().copied().filter(|o| included(*o)).map(|o| self.count(o)).sum()
    }

    pub(crate) fn started(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record(&self, outcome: Outcome) {
        self.outcomes.inc(outcome);
    }

    /// An instance taken by a call: made in `took`, ahead of the call when `on_spare`.
    pub(crate) fn instantiated(&self, took: Duration, on_spare: bool) {
        self.instantiate.observe(took);
        if on_spare {
            self.on_spare.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn ran(&self, took: Duration) {
        self.run.observe(took);
    }

    pub(crate) fn saw_memory(&self, bytes: usize) {
        self.peak_memory_bytes.fetch_max(u64::try_from(bytes).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The samples of `tern_plugin_calls_total` for the plugin `name` (the family header is the caller's). The
    /// `error` and `trap` samples are the totals of their kind; instantiation failures count only in `error`.
    pub(crate) fn render(&self, name: &str, x: &mut Exposition) {
        let plugin = label_value(name);
        for &outcome in Outcome::ALL {
            let value = match outcome {
                Outcome::Instantiate => continue,
                Outcome::Error => self.errors(),
                Outcome::Trap => self.traps(),
                other => self.count(other),
            };
            let labels = format!("plugin=\"{plugin}\",outcome=\"{}\"", outcome.label());
            x.sample("tern_plugin_calls_total", &labels, value);
        }
    }

    /// The counters the admin API's plugin status shows.
    pub(crate) fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "calls": self.calls(),
            "found": self.count(Outcome::Found),
            "not_found": self.count(Outcome::NotFound),
            "errors": self.errors(),
            "traps": self.traps(),
            "timeouts": self.count(Outcome::Timeout),
        })
    }
}
