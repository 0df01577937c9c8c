//! tern: a TLS terminator whose certificates are chosen at handshake time by a sandboxed WebAssembly plugin.
//!
//! The flow of one connection: `tls::accept` reads the ClientHello, [`select::Selector`] picks the certificate
//! (static certificates, then the cache, then a [`plugin`] call whose answer [`certs`] parses and validates), the
//! handshake completes, and the proxy forwards HTTP to the backend. [`server`] wires it together from a [`config`]
//! file; [`resumption`] shares sessions and ticket keys across a fleet. `ARCHITECTURE.md` maps every concept to
//! its module.
//!
//! The public surface is what the `tern` binary, the end-to-end tests and the benchmarks use; everything else is
//! private to the crate.

pub mod acme;
mod admin;
mod admission;
pub mod answer;
mod backend;
mod body;
pub mod cache;
pub mod certs;
pub mod civil;
mod clip;
pub mod coalesce;
pub mod compression;
pub mod config;
pub mod counters;
pub mod crypto;
pub mod failure;
mod fdlimit;
#[doc(hidden)]
pub mod fuzzing;
pub mod handover;
mod http_listener;
pub mod ja4;
mod listener;
pub mod metrics;
pub mod negotiated;
pub mod plugin;
mod proxy;
pub mod proxy_protocol;
mod reload;
pub mod resumption;
pub mod route;
pub mod select;
pub mod server;
pub mod sni;
pub mod store;
pub mod tls;
pub mod upstream;
pub mod watchdog;

pub use config::Config;
pub use proxy::access;
pub use server::Server;
