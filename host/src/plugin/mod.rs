//! The plugin runtime: wasmtime components compiled once, pre-instantiated once, and run in a fresh `Store`
//! for every call, bounded by a deadline, a memory cap and a concurrency cap.
//!
//! A fresh store per call (the `wasmtime serve` pattern) means no state leaks between names and a trapped
//! instance is simply dropped. Calls only happen on cache misses, and with the pooling allocator a fresh
//! instantiation costs a few microseconds.

mod bindings;
mod call;
mod guard;
mod http;
mod instance;
mod limits;
mod outcome;
mod runtime;
mod slot;

pub use call::{Contract, Plugin};
pub use guard::Shed;
pub use outcome::{Outcome, PluginError, PluginStats};
pub use runtime::{PluginLoadError, PluginRuntime, load_all, runtime_for, sha256_hex};
pub use slot::{PluginSlot, SlotStatus};

use std::time::Duration;

/// What a plugin answered, whichever contract version it speaks (0.1 answers are a set of one, no route).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Terminate TLS with these certificates (still unparsed), sending requests along `route`.
    Serve {
        /// The set, in the plugin's order of preference.
        certificates: Vec<PemCertificate>,
        /// `None`: the listener's backend.
        route: Option<RouteRequest>,
        /// Cache TTL hint.
        ttl: Option<Duration>,
    },
    /// Forward the connection to a TCP target without terminating TLS.
    Passthrough {
        /// `host:port`, unchecked.
        target: String,
        /// Cache TTL hint.
        ttl: Option<Duration>,
    },
    /// No certificate yet: the plugin permits issuance, and the host obtains one for the name through ACME
    /// (`[acme]`), then serves it with `route`.
    Obtain {
        /// `None`: the listener's backend.
        route: Option<RouteRequest>,
        /// Cache TTL hint of the permission.
        ttl: Option<Duration>,
    },
    /// The plugin does not know the name.
    NotFound,
}

/// One certificate as a plugin sent it.
#[derive(Clone, PartialEq, Eq)]
pub struct PemCertificate {
    /// PEM chain, leaf first.
    pub chain: String,
    /// PEM private key.
    pub key: String,
}

// Written by hand: the derived form would print the private key.
impl std::fmt::Debug for PemCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemCertificate").field("chain_bytes", &self.chain.len()).field("key", &"<redacted>").finish()
    }
}

/// A route as a plugin sent it, before the grants are applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteRequest {
    /// An `[[upstream]]` pool by name.
    Pool(String),
    /// `http://host:port` or `https://host:port`.
    Origin(String),
}
