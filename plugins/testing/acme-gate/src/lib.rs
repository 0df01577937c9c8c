//! Test-only plugin, contract 0.2: the permission gate for certificate issuance. It never has a certificate
//! itself; for an allowed name it answers `obtain`, and the host gets the certificate through its `[acme]` section.
//!
//! Settings:
//! - `allow`: comma-separated entries. An entry starting with `.` (`.allowed.test`) allows that name without the
//!   dot and every name ending in it (`allowed.test`, `a.allowed.test`); any other entry (`exact.test`) allows
//!   that name only. Unset or empty: nothing is allowed.
//! - `ttl`: cache TTL hint of the permission, in whole seconds; default: none (the host's TTL).
//! - `route_pool`: an `[[upstream]]` pool to route allowed names to; default: the listener's backend.
//!
//! Every other name gets `not-found`. Each answer is logged as one line through the host.

use std::time::Duration;

use tern_guest::{Answer, Hello, Plugin, Route, config, log};

struct AcmeGate;

impl Plugin for AcmeGate {
    fn select(hello: &Hello) -> Result<Answer, String> {
        let name = hello.servername.as_str();
        let allowed = config::get("allow").is_some_and(|list| list.split(',').any(|entry| allows(entry, name)));
        if !allowed {
            log::info(&format!("acme-gate: not-found for {name}"));
            return Ok(Answer::NotFound);
        }
        let ttl = match config::get("ttl") {
            None => None,
            Some(text) => Some(Duration::from_secs(
                text.trim().parse().map_err(|err| format!("acme-gate: setting ttl = {text:?}: {err}"))?,
            )),
        };
        let route = config::get("route_pool").map(Route::Pool);
        log::info(&format!("acme-gate: obtain for {name}, route {route:?}, ttl {ttl:?}"));
        Ok(Answer::Obtain { route, ttl })
    }
}

tern_guest::export_plugin!(AcmeGate);

/// Whether one `allow` entry covers `name` (normalised by the host: lowercase, no trailing dot).
fn allows(entry: &str, name: &str) -> bool {
    let entry = entry.trim().to_ascii_lowercase();
    match entry.strip_prefix('.') {
        Some("") => false,
        Some(parent) => name == parent || name.ends_with(&entry),
        None => !entry.is_empty() && name == entry,
    }
}
