//! End-to-end tests: tern over real sockets with real TLS clients (rustls, openssl, curl), real Wasm plugins
//! and a real HTTP backend. One test binary, so the plugins and the host link once.

// Test helpers report failure by panicking, like the tests themselves.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod access_log;
mod acme;
mod caching;
mod cli;
mod compression;
mod grpc;
mod hostile;
mod http_api;
mod in_memory;
mod negotiation;
mod operations;
mod pebble_smoke;
mod plugin_failures;
mod polyglot;
mod proxy;
mod proxy_protocol;
mod proxy_protocol_out;
mod redis;
mod redis_support;
mod resumption;
mod routing;
mod selection;
mod support;
mod upgrade;
