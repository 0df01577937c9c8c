//! tern: a TLS terminator whose certificates are chosen at handshake time by a sandboxed WebAssembly plugin.
//!
//! The flow of one connection: [`tls::accept`] reads the ClientHello, [`select::Selector`] picks the certificate
//! (static certificates, then [`cache`], then a [`plugin`] call whose answer [`certs`] parses and validates), the
//! handshake completes, and [`proxy`] forwards HTTP to the backend. [`server`] wires it together from a
//! [`config`] file; [`resumption`] shares sessions and ticket keys across a fleet.

pub mod admin;
pub mod backend;
pub mod body;
pub mod cache;
pub mod certs;
pub mod clip;
pub mod config;
pub mod crypto;
pub mod demo;
pub mod fdlimit;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod plugin;
pub mod proxy;
pub mod reload;
pub mod resumption;
pub mod select;
pub mod server;
pub mod sni;
pub mod store;
pub mod tls;
pub mod tools;
pub mod watchdog;

pub use config::Config;
pub use server::Server;
