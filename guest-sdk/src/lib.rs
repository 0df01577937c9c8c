//! Write tern plugins in a few lines of Rust.
//!
//! A plugin implements [`Plugin`] and registers it with [`export_plugin!`]; build it as a `cdylib` for the
//! `wasm32-wasip2` target and the result is a WebAssembly component tern can load. The contract it fulfils is the
//! WIT package `tern:plugin@0.2.0` (in the repository's `wit/` folder): the plugin is told the server name and
//! the listener, and answers with one or more certificates and an optional route, a passthrough target,
//! permission to obtain a certificate through ACME, or not-found. This crate hides the generated bindings behind
//! plain Rust types.
//!
//! Plugins written for 0.1 (the [`Selector`] trait and [`export_selector!`]) compile unchanged: they are
//! exported as 0.2 plugins that serve one certificate to the listener's backend. Building with the cargo
//! feature `contract-0-1` exports them against `tern:plugin@0.1.0` instead (only [`Selector`] is available then).
//! Moving a 0.1 plugin to 0.2 is one line: `export_selector!(T)` becomes `export_plugin!(T)` once `T`
//! implements [`Plugin`] (`fn select(hello: &Hello) -> Result<Answer, String>`, with `Answer::from(selection)`
//! turning a 0.1 [`Selection`] into an answer).
//!
//! ```no_run
//! use tern_guest::{config, Certificate, Selection, Selector};
//!
//! /// Serves `<name>.crt` / `<name>.key` from the directory the operator granted to the plugin.
//! struct Files;
//!
//! impl Selector for Files {
//!     fn select(servername: &str) -> Result<Selection, String> {
//!         let dir = config::get("dir").unwrap_or_else(|| "/".to_string());
//!         let read = |ext: &str| std::fs::read_to_string(format!("{dir}/{servername}.{ext}"));
//!         match (read("crt"), read("key")) {
//!             (Ok(chain), Ok(private_key)) => Ok(Selection::Found(Certificate::new(chain, private_key))),
//!             _ => Ok(Selection::NotFound),
//!         }
//!     }
//! }
//!
//! tern_guest::export_selector!(Files);
//! # fn main() {}
//! ```
//!
//! Limits that apply to every call (deadline, memory cap, capabilities) are described in the WIT package and in
//! the project README; a plugin that exceeds them fails the one handshake that needed it.

use std::time::Duration;

/// Re-exported so that plugins and the export macro use the same version as this crate.
pub use wit_bindgen;

/// The generated bindings. Not part of the public API: use the types and functions re-exported below.
#[doc(hidden)]
#[allow(unsafe_code, missing_debug_implementations, clippy::all)]
#[cfg(not(feature = "contract-0-1"))]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "../wit/tern-plugin-0.2.0",
        world: "cert-selector",
        pub_export_macro: true,
        export_macro_name: "__export_cert_selector",
        default_bindings_module: "tern_guest::__bindings",
    });
}

/// The 0.1 bindings (cargo feature `contract-0-1`).
#[doc(hidden)]
#[allow(unsafe_code, missing_debug_implementations, clippy::all)]
#[cfg(feature = "contract-0-1")]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "../wit/tern-plugin-0.1.0",
        world: "cert-selector",
        pub_export_macro: true,
        export_macro_name: "__export_cert_selector",
        default_bindings_module: "tern_guest::__bindings",
    });
}

use __bindings::tern::plugin::types as wit;

#[cfg(not(feature = "contract-0-1"))]
mod contract;
#[cfg(not(feature = "contract-0-1"))]
pub use contract::{Answer, Hello, Plugin, Route, RouteLine, Served};

/// A certificate chosen for a server name.
#[derive(Clone, PartialEq, Eq)]
pub struct Certificate {
    /// PEM certificates, leaf first, then intermediates.
    pub chain: String,
    /// PEM private key of the leaf (PKCS#8, SEC1 or PKCS#1).
    pub private_key: String,
    /// How long tern may cache this answer; `None` means the operator's default TTL.
    pub ttl: Option<Duration>,
}

impl Certificate {
    /// A certificate with the host's default cache TTL.
    pub fn new(chain: impl Into<String>, private_key: impl Into<String>) -> Self {
        Self { chain: chain.into(), private_key: private_key.into(), ttl: None }
    }

    /// Ask the host to cache this answer for `ttl` (rounded down to whole seconds, at most `u32::MAX`).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }
}

// Written by hand so that a plugin that logs its answer can never print the private key.
impl std::fmt::Debug for Certificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificate")
            .field("chain_bytes", &self.chain.len())
            .field("private_key", &"<redacted>")
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// The outcome of a successful selection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Serve this certificate.
    Found(Certificate),
    /// This plugin has no certificate for the name: the listener's default certificate (or, in strict mode, a
    /// TLS alert) applies, and the host caches this answer for its negative TTL.
    NotFound,
}

/// The one thing a plugin implements: choose a certificate for a server name.
///
/// `servername` is already normalised by the host (lowercase, no trailing dot, valid DNS syntax). Return
/// `Err(message)` when selection failed (a store is down, data is malformed): the handshake fails with a TLS
/// alert, the message is logged with the name, and nothing is cached.
pub trait Selector {
    /// Choose the certificate for `servername`.
    fn select(servername: &str) -> Result<Selection, String>;
}

/// Registers a [`Selector`] as the plugin's `select-certificate` export. Use it once per plugin, at the crate root.
#[macro_export]
macro_rules! export_selector {
    ($selector:ty) => {
        $crate::__export_with!(|request: $crate::__private::Request| {
            $crate::__private::selector_answer(<$selector as $crate::Selector>::select($crate::__private::servername(
                &request,
            )))
        });
    };
}

/// The component export both macros share: `select-certificate` answered by `$answer(request)`.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_with {
    ($answer:expr) => {
        const _: () = {
            struct __TernExport;
            impl $crate::__bindings::Guest for __TernExport {
                fn select_certificate(
                    request: $crate::__private::Request,
                ) -> ::std::result::Result<$crate::__private::WitAnswer, ::std::string::String> {
                    ($answer)(request)
                }
            }
    $crate::__bindings::__export_cert_selector!(__TernExport with_types_in $crate::__bindings);
        };
    };
}

/// Support for the export macros; not part of the public API.
#[doc(hidden)]
pub mod __private {
    #[cfg(feature = "contract-0-1")]
    pub use super::wit::Selection as WitAnswer;
    #[cfg(not(feature = "contract-0-1"))]
    pub use super::wit::{Answer as WitAnswer, Hello as Request};
    /// What the 0.1 export is called with: the server name.
    #[cfg(feature = "contract-0-1")]
    pub type Request = String;

    pub(crate) fn ttl_seconds(ttl: Option<std::time::Duration>) -> Option<u32> {
        ttl.map(|ttl| u32::try_from(ttl.as_secs()).unwrap_or(u32::MAX))
    }

    /// The server name of a call.
    #[cfg(feature = "contract-0-1")]
    pub fn servername(request: &Request) -> &str {
        request
    }

    /// The server name of a call.
    #[cfg(not(feature = "contract-0-1"))]
    pub fn servername(request: &Request) -> &str {
        &request.servername
    }

    /// Converts a 0.1-style answer into the WIT type.
    #[cfg(feature = "contract-0-1")]
    pub fn selector_answer(answer: Result<super::Selection, String>) -> Result<WitAnswer, String> {
        answer.map(|selection| match selection {
            super::Selection::Found(cert) => WitAnswer::Found(super::wit::Certificate {
                ttl_seconds: ttl_seconds(cert.ttl),
                chain: cert.chain,
                private_key: cert.private_key,
            }),
            super::Selection::NotFound => WitAnswer::NotFound,
        })
    }

    /// Converts a 0.1-style answer into the WIT type.
    #[cfg(not(feature = "contract-0-1"))]
    pub fn selector_answer(answer: Result<super::Selection, String>) -> Result<WitAnswer, String> {
        answer.map(|selection| super::Answer::from(selection).into_wit())
    }

    /// Calls a [`Plugin`](super::Plugin) and converts its answer.
    #[cfg(not(feature = "contract-0-1"))]
    pub fn plugin_answer<P: super::Plugin>(request: Request) -> Result<WitAnswer, String> {
        let hello = super::Hello { servername: request.servername, listener: request.listener };
        P::select(&hello).map(super::Answer::into_wit)
    }
}

/// The plugin's settings: the `settings` table of its section in tern's config file.
pub mod config {
    use super::__bindings::tern::plugin::config as host;

    /// The value of one setting, or `None` if it is not set.
    pub fn get(key: &str) -> Option<String> {
        host::get(key)
    }

    /// The value of one setting, or `default` if it is not set.
    pub fn get_or(key: &str, default: &str) -> String {
        host::get(key).unwrap_or_else(|| default.to_string())
    }

    /// Every setting as (key, value) pairs, sorted by key.
    pub fn all() -> Vec<(String, String)> {
        host::get_all()
    }
}

/// Logging into tern's log; each line carries the plugin name and the server name being selected.
pub mod log {
    use super::__bindings::tern::plugin::log::{Level, log};

    /// Log at error level.
    pub fn error(message: &str) {
        log(Level::Error, message)
    }
    /// Log at warn level.
    pub fn warn(message: &str) {
        log(Level::Warn, message)
    }
    /// Log at info level.
    pub fn info(message: &str) {
        log(Level::Info, message)
    }
    /// Log at debug level.
    pub fn debug(message: &str) {
        log(Level::Debug, message)
    }
}

/// Read-only key-value access (Redis) within the prefixes the operator granted to the plugin.
pub mod kv {
    use super::__bindings::tern::plugin::kv as host;
    pub use super::__bindings::tern::plugin::kv::Error;

    /// The value at `key`, or `None`.
    pub fn get(key: &str) -> Result<Option<Vec<u8>>, Error> {
        host::get(key)
    }

    /// Several values in one round trip, in the order of `keys`.
    pub fn get_many(keys: &[String]) -> Result<Vec<Option<Vec<u8>>>, Error> {
        host::get_many(keys)
    }

    /// Fields of the hash at `key`, in the order of `fields`.
    pub fn hash_get(key: &str, fields: &[String]) -> Result<Vec<Option<Vec<u8>>>, Error> {
        host::hash_get(key, fields)
    }
}

/// The wildcard name that covers `servername` one label up (`a.example.com` → `*.example.com`), if any.
///
/// Plugins use it for a wildcard fallback; tern itself checks that a returned wildcard certificate really covers
/// the requested name.
pub fn wildcard_of(servername: &str) -> Option<String> {
    let (_, parent) = servername.split_once('.')?;
    // A wildcard needs at least two labels under it (`*.com` is never valid).
    parent.contains('.').then(|| format!("*.{parent}"))
}

/// The usual lookup: `fetch(servername)`, then, if `wildcard` is on and that found nothing,
/// `fetch("*.<parent>")` (see [`wildcard_of`]). `fetch` returns `Ok(None)` for "nothing stored under this name";
/// its errors end the lookup.
pub fn exact_or_wildcard(
    servername: &str,
    wildcard: bool,
    mut fetch: impl FnMut(&str) -> Result<Option<Certificate>, String>,
) -> Result<Selection, String> {
    if let Some(cert) = fetch(servername)? {
        return Ok(Selection::Found(cert));
    }
    if wildcard
        && let Some(pattern) = wildcard_of(servername)
        && let Some(cert) = fetch(&pattern)?
    {
        log::debug(&format!("serving wildcard {pattern}"));
        return Ok(Selection::Found(cert));
    }
    Ok(Selection::NotFound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_goes_one_label_up() {
        assert_eq!(wildcard_of("a.example.com").as_deref(), Some("*.example.com"));
        assert_eq!(wildcard_of("a.b.example.com").as_deref(), Some("*.b.example.com"));
        assert_eq!(wildcard_of("example.com"), None);
        assert_eq!(wildcard_of("localhost"), None);
    }

    #[test]
    fn certificate_debug_never_shows_the_key() {
        let cert = Certificate::new("CHAIN", "SECRET-KEY-MATERIAL");
        let shown = format!("{cert:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
    }

    #[test]
    fn ttl_saturates() {
        let cert = Certificate::new("c", "k").with_ttl(Duration::from_secs(u64::MAX));
        let answer = __private::selector_answer(Ok(Selection::Found(cert)));
        #[cfg(not(feature = "contract-0-1"))]
        let ttl = match answer {
            Ok(__private::WitAnswer::Serve(served)) => served.ttl_seconds,
            other => panic!("expected a certificate, got {other:?}"),
        };
        #[cfg(feature = "contract-0-1")]
        let ttl = match answer {
            Ok(__private::WitAnswer::Found(cert)) => cert.ttl_seconds,
            other => panic!("expected a certificate, got {other:?}"),
        };
        assert_eq!(ttl, Some(u32::MAX));
    }
}
