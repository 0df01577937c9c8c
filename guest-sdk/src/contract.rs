//! The 0.2 contract: the plugin is told the listener, and answers with a certificate set and a route, a
//! passthrough target, permission to obtain a certificate through ACME (and a route), or not-found.

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
    /// No certificate yet: the host obtains one for the name through ACME (its `[acme]` section), then serves it
    /// along `route` (checked against `grants.routes`). The plugin is the permission gate for issuance: this
    /// answer is what allows the host to ask a CA for the name. The permission is cached for `ttl`. Without an
    /// `[acme]` section nothing can be obtained and the listener's fallback applies; a handshake for which no
    /// certificate is ready within `acme.handshake_wait` gets the listener's fallback.
    Obtain {
        /// `None`: the listener's backend.
        route: Option<Route>,
        /// Cache TTL of the permission (whole seconds, at most `u32::MAX`); `None`: the operator's default.
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
                    route: served.route.map(Route::into_wit),
                    ttl_seconds: ttl_seconds(ttl),
                })
            }
            Answer::Passthrough { target, ttl } => {
                wit::Answer::Passthrough(wit::Passthrough { target, ttl_seconds: ttl_seconds(ttl) })
            }
            Answer::Obtain { route, ttl } => {
                wit::Answer::Obtain(wit::Obtain { route: route.map(Route::into_wit), ttl_seconds: ttl_seconds(ttl) })
            }
            Answer::NotFound => wit::Answer::NotFound,
        }
    }
}

impl Route {
    fn into_wit(self) -> wit::Route {
        match self {
            Route::Pool(pool) => wit::Route::Pool(pool),
            Route::Origin(url) => wit::Route::Origin(url),
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
        $crate::__export_with!($crate::__private::plugin_answer::<$plugin>);
    };
}

/// A route as operators store it next to a certificate (a file, a Redis value, a hash field): one line,
/// `pool NAME`, `origin URL` or `passthrough HOST:PORT`. The shipped plugins share this format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteLine {
    /// Terminate TLS and send the traffic here.
    Route(Route),
    /// Pass the connection through to `host:port`.
    Passthrough(String),
}

impl RouteLine {
    /// Parses the first line that is neither blank nor a `#` comment.
    pub fn parse(text: &str) -> Result<Self, String> {
        let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or("");
        match line.split_once(char::is_whitespace).map(|(kind, value)| (kind, value.trim())) {
            Some(("pool", pool)) => Ok(RouteLine::Route(Route::Pool(pool.to_string()))),
            Some(("origin", url)) => Ok(RouteLine::Route(Route::Origin(url.to_string()))),
            Some(("passthrough", target)) => Ok(RouteLine::Passthrough(target.to_string())),
            _ => Err(format!("expected `pool NAME`, `origin URL` or `passthrough HOST:PORT`, got {line:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_lines_parse_and_anything_else_is_an_error() {
        assert_eq!(RouteLine::parse("# tenant 7\n\npool  eu \n"), Ok(RouteLine::Route(Route::Pool("eu".into()))));
        assert_eq!(
            RouteLine::parse("origin https://a.test:443"),
            Ok(RouteLine::Route(Route::Origin("https://a.test:443".into())))
        );
        assert_eq!(RouteLine::parse("passthrough b.test:443"), Ok(RouteLine::Passthrough("b.test:443".into())));
        for bad in ["", "pool", "teleport x", "# only a comment"] {
            assert!(RouteLine::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn obtain_carries_its_route_and_a_saturating_ttl() {
        let answer = Answer::Obtain { route: Some(Route::Pool("eu".into())), ttl: Some(Duration::from_secs(u64::MAX)) };
        match answer.into_wit() {
            wit::Answer::Obtain(wit::Obtain { route: Some(wit::Route::Pool(pool)), ttl_seconds }) => {
                assert_eq!((pool.as_str(), ttl_seconds), ("eu", Some(u32::MAX)));
            }
            other => panic!("expected obtain with a pool route, got {other:?}"),
        }
        match (Answer::Obtain { route: None, ttl: None }).into_wit() {
            wit::Answer::Obtain(wit::Obtain { route: None, ttl_seconds: None }) => {}
            other => panic!("expected obtain to the listener's backend, got {other:?}"),
        }
    }
}
