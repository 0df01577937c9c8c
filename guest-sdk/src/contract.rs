//! The 0.2 contract: the plugin is told the listener, and answers with a certificate set and a route, a
//! passthrough target, or not-found.

use std::time::Duration;

use super::__private::ttl_seconds;
use super::{Certificate, Selection, wit};

/// What tern tells the plugin about the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The server name (normalised by the host: lowercase, no trailing dot, valid DNS syntax).
    pub servername: String,
    /// The `[[listener]]` the client connected to.
    pub listener: String,
}

/// Where a name's HTTP traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// An `[[upstream]]` pool of the host's config, by name.
    Pool(String),
    /// `http://host:port` or `https://host:port`.
    Origin(String),
}

/// Serve these certificates (the first whose key type the client supports), along this route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// One or more certificates for the name, in order of preference (e.g. ECDSA, then RSA).
    pub certificates: Vec<Certificate>,
    /// `None`: the listener's backend.
    pub route: Option<Route>,
    /// How long tern may cache the answer; `None`: the first certificate's TTL, else the operator's default.
    pub ttl: Option<Duration>,
}

impl Served {
    /// One certificate, to the listener's backend.
    pub fn one(certificate: Certificate) -> Self {
        Self { certificates: vec![certificate], route: None, ttl: None }
    }

    /// Adds a certificate to the set (tried after the ones before it).
    pub fn and(mut self, certificate: Certificate) -> Self {
        self.certificates.push(certificate);
        self
    }

    /// Sends the name's traffic along `route`.
    pub fn with_route(mut self, route: Route) -> Self {
        self.route = Some(route);
        self
    }
}

/// A plugin's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Terminate TLS.
    Serve(Served),
    /// Forward the connection untouched to the TCP `target` (`host:port`), cached for `ttl`.
    Passthrough {
        /// `host:port`.
        target: String,
        /// Cache TTL; `None`: the operator's default.
        ttl: Option<Duration>,
    },
    /// This plugin does not know the name (cached for the host's negative TTL).
    NotFound,
}

impl From<Selection> for Answer {
    fn from(selection: Selection) -> Self {
        match selection {
            Selection::Found(cert) => Answer::Serve(Served::one(cert)),
            Selection::NotFound => Answer::NotFound,
        }
    }
}

impl Answer {
    pub(crate) fn into_wit(self) -> wit::Answer {
        match self {
            Answer::Serve(served) => {
                let ttl = served.ttl.or_else(|| served.certificates.first().and_then(|c| c.ttl));
                wit::Answer::Serve(wit::Served {
                    certificates: served
                        .certificates
                        .into_iter()
                        .map(|c| wit::Certificate { chain: c.chain, private_key: c.private_key })
                        .collect(),
                    route: served.route.map(|route| match route {
                        Route::Pool(pool) => wit::Route::Pool(pool),
                        Route::Origin(url) => wit::Route::Origin(url),
                    }),
                    ttl_seconds: ttl_seconds(ttl),
                })
            }
            Answer::Passthrough { target, ttl } => {
                wit::Answer::Passthrough(wit::Passthrough { target, ttl_seconds: ttl_seconds(ttl) })
            }
            Answer::NotFound => wit::Answer::NotFound,
        }
    }
}

/// The one thing a 0.2 plugin implements: decide what to serve for a handshake.
///
/// Return `Err(message)` when selection failed (a store is down, data is malformed): the handshake fails with a
/// TLS alert, the message is logged with the name, and nothing is cached.
pub trait Plugin {
    /// Decide for `hello.servername`, reached on `hello.listener`.
    fn select(hello: &Hello) -> Result<Answer, String>;
}

/// Registers a [`Plugin`] as the component's `select-certificate` export. Use it once per plugin, at the crate
/// root.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        const _: () = {
            struct __TernExport;
            impl $crate::__bindings::Guest for __TernExport {
                fn select_certificate(
                    request: $crate::__private::Request,
                ) -> ::std::result::Result<$crate::__private::WitAnswer, ::std::string::String> {
                    $crate::__private::plugin_answer::<$plugin>(request)
                }
            }
    $crate::__bindings::__export_cert_selector!(__TernExport with_types_in $crate::__bindings);
        };
    };
}
