//! Where a name's traffic goes: the route a plugin answered with, checked against what the operator granted it
//! (`grants.routes`). A route outside the grants is an invalid answer, like a key that does not match its leaf.
//!
//! Depends on nothing above it: config validation parses grants with the same patterns answers are checked by.

use std::sync::Arc;

use http::Uri;

/// Where a terminated connection's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The listener's `backend` (no route in the answer, a 0.1 plugin, a static or default certificate).
    Listener,
    /// An `[[upstream]]` pool, by name.
    Pool(Arc<str>),
    /// An origin chosen by the plugin.
    Origin(Arc<Origin>),
}

impl Route {
    /// How this route reads in logs and admin output.
    pub fn describe(&self) -> String {
        match self {
            Route::Listener => "listener".into(),
            Route::Pool(name) => format!("pool:{name}"),
            Route::Origin(origin) => origin.to_string(),
        }
    }

    /// Estimated bytes held by the route (cache weighing).
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Route::Listener => 0,
            Route::Pool(name) => name.len() + 16,
            Route::Origin(origin) => 2 * origin.host.len() + 96,
        }
    }
}

/// An origin: scheme, host and port, nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// `https`: verified TLS with `host` as the server name.
    pub tls: bool,
    /// Lowercase DNS name or IP literal (IPv6 without brackets).
    pub host: String,
    /// Port (default 80 or 443 by scheme).
    pub port: u16,
    /// `scheme://host:port`, the base of upstream request URIs.
    pub base: Uri,
    /// CA certificates an `https` origin is verified against (the grant's `origin_ca`); `None`: system roots.
    pub ca: Option<Arc<std::path::Path>>,
    /// Offer HTTP/2 by ALPN (the grant's `origin_h2`).
    pub h2: bool,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// A passthrough target: the TCP `host:port` a connection is forwarded to untouched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Lowercase DNS name or IP literal (IPv6 without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a plugin's route or passthrough target was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RouteError {
    /// It is not a route at all (bad URL, path after the port, bad port).
    #[error("malformed {what} {value:?}: {why}")]
    Malformed {
        /// "origin", "passthrough target".
        what: &'static str,
        /// What the plugin sent (clipped).
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// It is well formed, but outside what the operator granted.
    #[error("{what} {value} is not granted to this plugin (grants.routes.{grant})")]
    Denied {
        /// "pool", "origin", "passthrough target".
        what: &'static str,
        /// The route.
        value: String,
        /// The grant key that would allow it.
        grant: &'static str,
    },
}

/// `grants.routes`: what a plugin may route to. Nothing by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteGrants {
    /// `[[upstream]]` pool names.
    pub pools: Vec<String>,
    /// Origin patterns: `http://host:port` or `https://host:port`, host exact, `*.suffix` or `*`, port or `*`.
    pub origins: Vec<Pattern>,
    /// Passthrough target patterns: `host:port`, with the same wildcards.
    pub passthrough: Vec<Pattern>,
}

impl RouteGrants {
    /// The route an answer asked for, if granted.
    pub fn pool(&self, name: &str) -> Result<Route, RouteError> {
        match self.pools.iter().find(|p| p.as_str() == name) {
            Some(pool) => Ok(Route::Pool(Arc::from(pool.as_str()))),
            None => Err(RouteError::Denied { what: "pool", value: clip(name), grant: "pools" }),
        }
    }

    /// The origin an answer asked for, if well formed and granted; verified against `ca` if it is `https`, and
    /// offered HTTP/2 if `h2`.
    pub fn origin(&self, url: &str, ca: Option<&std::path::Path>, h2: bool) -> Result<Route, RouteError> {
        let mut origin = parse_origin(url)?;
        origin.ca = ca.map(Arc::from);
        origin.h2 = h2 && origin.tls;
        let scheme = if origin.tls { Scheme::Https } else { Scheme::Http };
        if !self.origins.iter().any(|p| p.matches(Some(scheme), &origin.host, origin.port)) {
            return Err(RouteError::Denied { what: "origin", value: origin.to_string(), grant: "origins" });
        }
        Ok(Route::Origin(Arc::new(origin)))
    }

    /// The passthrough target an answer asked for, if well formed and granted.
    pub fn passthrough(&self, target: &str) -> Result<Target, RouteError> {
        let malformed = |why| RouteError::Malformed { what: "passthrough target", value: clip(target), why };
        let (host, port) = split_host_port(target).map_err(malformed)?;
        let port = port.ok_or(malformed("no port"))?;
        let target = Target { host, port };
        if !self.passthrough.iter().any(|p| p.matches(None, &target.host, target.port)) {
            return Err(RouteError::Denied {
                what: "passthrough target",
                value: target.to_string(),
                grant: "passthrough",
            });
        }
        Ok(target)
    }
}

/// `http` or `https`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Cleartext HTTP.
    Http,
    /// HTTP over verified TLS.
    Https,
}

/// A granted host and port pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    scheme: Option<Scheme>,
    host: HostMatch,
    /// `None`: any port.
    port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostMatch {
    Any,
    Exact(String),
    /// `*.suffix`: any name that ends in `.suffix` (one label or more below it).
    Below(String),
}

impl Pattern {
    /// An origin pattern: `http://HOST:PORT` or `https://HOST:PORT`.
    pub fn origin(text: &str) -> Result<Self, String> {
        let (scheme, rest) = match text.split_once("://") {
            Some(("http", rest)) => (Scheme::Http, rest),
            Some(("https", rest)) => (Scheme::Https, rest),
            _ => return Err(format!("{text:?}: expected http://HOST:PORT or https://HOST:PORT")),
        };
        let mut pattern = Self::target(rest)?;
        pattern.scheme = Some(scheme);
        Ok(pattern)
    }

    /// A passthrough pattern: `HOST:PORT` (`*` or `*.suffix` for the host, `*` for the port).
    pub fn target(text: &str) -> Result<Self, String> {
        let (host, port) =
            text.rsplit_once(':').ok_or_else(|| format!("{text:?}: expected HOST:PORT (use * for any port)"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let port = match port {
            "*" => None,
            port => Some(port.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| format!("{text:?}: bad port"))?),
        };
        let host = match host.as_str() {
            "*" => HostMatch::Any,
            _ if host.is_empty() => return Err(format!("{text:?}: no host")),
            _ => match host.strip_prefix("*.") {
                Some(suffix) if !suffix.is_empty() && !suffix.contains('*') => HostMatch::Below(format!(".{suffix}")),
                Some(_) => return Err(format!("{text:?}: a wildcard host is * or *.suffix")),
                None if host.contains('*') => return Err(format!("{text:?}: a wildcard host is * or *.suffix")),
                None => HostMatch::Exact(host),
            },
        };
        Ok(Self { scheme: None, host, port })
    }

    fn matches(&self, scheme: Option<Scheme>, host: &str, port: u16) -> bool {
        self.scheme == scheme
            && self.port.is_none_or(|p| p == port)
            && match &self.host {
                HostMatch::Any => true,
                HostMatch::Exact(exact) => exact == host,
                HostMatch::Below(suffix) => host.len() > suffix.len() && host.ends_with(suffix.as_str()),
            }
    }
}

/// Parses `http://host[:port]` or `https://host[:port]` (an optional trailing `/`, nothing else).
pub fn parse_origin(url: &str) -> Result<Origin, RouteError> {
    let malformed = |why| RouteError::Malformed { what: "origin", value: clip(url), why };
    let (tls, rest) = if let Some(rest) = url.strip_prefix("https://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("http://") {
        (false, rest)
    } else {
        return Err(malformed("expected http:// or https://"));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.contains(['/', '?', '#', '@']) {
        return Err(malformed("an origin is scheme://host:port with no path, query or user"));
    }
    let (host, port) = split_host_port(authority).map_err(malformed)?;
    let port = port.unwrap_or(if tls { 443 } else { 80 });
    let shown = if host.contains(':') { format!("[{host}]") } else { host.clone() };
    let base = format!("{}://{shown}:{port}", if tls { "https" } else { "http" })
        .parse::<Uri>()
        .map_err(|_| malformed("not a valid URI"))?;
    Ok(Origin { tls, host, port, base, ca: None, h2: false })
}

/// `host[:port]` with a DNS name, IPv4 or `[IPv6]` host; the host lowercased, brackets removed.
fn split_host_port(authority: &str) -> Result<(String, Option<u16>), &'static str> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or("unclosed [")?;
        host.parse::<std::net::Ipv6Addr>().map_err(|_| "bad IPv6 literal")?;
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or("junk after ]")?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => None,
        Some(port) => Some(port.parse::<u16>().ok().filter(|p| *p > 0).ok_or("bad port")?),
    };
    let host = host.to_ascii_lowercase();
    let valid = host.parse::<std::net::IpAddr>().is_ok() || crate::sni::ServerName::parse(&host).is_ok();
    if !valid {
        return Err("bad host");
    }
    Ok((host, port))
}

/// Plugin text in errors and logs: at most 128 bytes.
fn clip(text: &str) -> String {
    crate::clip::prefix(text, 128).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants() -> RouteGrants {
        RouteGrants {
            pools: vec!["blue".into()],
            origins: vec![
                Pattern::origin("https://*.origin.test:443").unwrap(),
                Pattern::origin("http://127.0.0.1:*").unwrap(),
            ],
            passthrough: vec![Pattern::target("[::1]:8443").unwrap(), Pattern::target("*.tls.test:*").unwrap()],
        }
    }

    #[test]
    fn granted_routes_pass_and_everything_else_is_denied_or_malformed() {
        let g = grants();
        assert_eq!(g.pool("blue").unwrap(), Route::Pool("blue".into()));
        assert!(matches!(g.pool("green"), Err(RouteError::Denied { what: "pool", .. })));
        let Route::Origin(o) = g.origin("https://a.origin.test", None, false).unwrap() else { panic!() };
        assert_eq!(
            (o.tls, o.host.as_str(), o.port, o.base.to_string()),
            (true, "a.origin.test", 443, "https://a.origin.test:443/".into())
        );
        assert!(g.origin("http://127.0.0.1:8080/", None, false).is_ok());
        for denied in
            ["http://a.origin.test:443", "https://origin.test", "https://a.origin.test:8443", "http://127.0.0.2:80"]
        {
            assert!(matches!(g.origin(denied, None, false), Err(RouteError::Denied { .. })), "{denied}");
        }
        for malformed in [
            "ftp://x.test",
            "http://x.test/path",
            "http://u@x.test",
            "http://x.test:0",
            "http://x_y..test",
            "http://[::1",
        ] {
            assert!(matches!(g.origin(malformed, None, false), Err(RouteError::Malformed { .. })), "{malformed}");
        }
        assert_eq!(g.passthrough("[::1]:8443").unwrap().to_string(), "[::1]:8443");
        assert_eq!(g.passthrough("B.TLS.test:9000").unwrap().host, "b.tls.test");
        assert!(matches!(g.passthrough("tls.test:9000"), Err(RouteError::Denied { .. })));
        assert!(matches!(g.passthrough("b.tls.test"), Err(RouteError::Malformed { .. })));
    }

    #[test]
    fn patterns_reject_what_they_cannot_mean() {
        for bad in ["x.test:443", "ftp://x.test:1", "https://x.test", "https://a*.test:1", "https://*.:1", "https://:1"]
        {
            assert!(Pattern::origin(bad).is_err(), "{bad}");
        }
        assert!(Pattern::target("*:*").is_ok());
    }
}
