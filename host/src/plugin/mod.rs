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
mod limits;
mod outcome;
mod runtime;
mod slot;

pub use call::Plugin;
pub use guard::Shed;
pub use outcome::{Outcome, PluginError, PluginStats};
pub use runtime::{PluginLoadError, PluginRuntime, load_all, runtime_for, sha256_hex};
pub use slot::{PluginSlot, SlotStatus};

use std::time::Duration;

/// What a plugin answered.
#[derive(Clone, PartialEq, Eq)]
pub enum Selection {
    /// A certificate, still unparsed.
    Found {
        /// PEM chain, leaf first.
        chain: String,
        /// PEM private key.
        key: String,
        /// Cache TTL hint.
        ttl: Option<Duration>,
    },
    /// The plugin does not know the name.
    NotFound,
}

// Written by hand: the derived form would print the private key.
impl std::fmt::Debug for Selection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selection::Found { chain, ttl, .. } => f
                .debug_struct("Found")
                .field("chain_bytes", &chain.len())
                .field("key", &"<redacted>")
                .field("ttl", ttl)
                .finish(),
            Selection::NotFound => f.write_str("NotFound"),
        }
    }
}
