//! `[acme]` (certificates obtained on demand and renewed) and `[[http_listener]]` (plain HTTP: ACME HTTP-01
//! challenges, and a redirect to HTTPS for every other request): settings, TOML shape and validation.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::validate::Validator;
use super::{ConfigError, RedisSettings, Secret, defaults};
use crate::sni::ServerName;

/// `[acme]`: where certificates are obtained, how they are stored and renewed, and the budgets that bound
/// issuance. Names come from `names` (obtained at start-up) and from plugins answering `obtain`.
#[derive(Debug, Clone)]
pub struct AcmeSettings {
    /// The CA's ACME directory URL.
    pub directory: String,
    /// Account contact URLs (`mailto:ops@example.com`).
    pub contact: Vec<String>,
    /// External Account Binding, if the CA requires it.
    pub eab: Option<ExternalAccount>,
    /// Key type of issued certificates.
    pub key_type: KeyType,
    /// Where account, certificates, locks and challenges live.
    pub storage: AcmeStorage,
    /// Seals private keys and the account key at rest; never printed.
    pub secret: Secret,
    /// The challenge this node answers orders with.
    pub challenge: ChallengeKind,
    /// A CA file (PEM) the directory's HTTPS is verified against instead of the system roots (test CAs).
    pub ca: Option<PathBuf>,
    /// Names obtained at start-up and renewed without a plugin, served on every listener.
    pub names: Vec<ServerName>,
    /// Renew when this fraction of the certificate's lifetime is left (unless the CA's renewal information says
    /// otherwise).
    pub renewal_window: f64,
    /// How often a node looks for certificates due for renewal.
    pub renew_check_interval: Duration,
    /// How long a handshake waits for a first issuance before the listener's fallback applies.
    pub handshake_wait: Duration,
    /// One order (authorization, finalization, download) gives up after this long.
    pub order_timeout: Duration,
    /// New orders per hour, the whole fleet together.
    pub orders_per_hour: u32,
    /// New orders per hour for the names of one registered domain (public suffix list).
    pub orders_per_hour_per_domain: u32,
    /// Wait after a name's first failed order; doubles with each further failure.
    pub failure_backoff: Duration,
    /// The longest wait between two orders for a failing name.
    pub failure_backoff_max: Duration,
    /// Orders this node runs at once.
    pub max_concurrent_orders: usize,
    /// Names this node may be obtaining at once (running or waiting for an order slot); more are refused.
    pub max_pending: usize,
    /// Lease of the fleet-wide lock of one name's order; renewed while the order runs.
    pub lock_lease: Duration,
    /// Prefix of every Redis key ACME uses.
    pub prefix: String,
}

/// `acme.eab_kid` and `acme.eab_hmac`.
#[derive(Debug, Clone)]
pub struct ExternalAccount {
    /// The key identifier the CA gave.
    pub kid: String,
    /// The MAC key (base64url as the CA gives it); never printed.
    pub hmac: Secret,
}

/// `acme.key_type`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KeyType {
    /// ECDSA P-256 (the default).
    #[default]
    #[serde(rename = "ecdsa-p256")]
    EcdsaP256,
    /// RSA 2048.
    #[serde(rename = "rsa-2048")]
    Rsa2048,
}

/// `acme.challenge`
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ChallengeKind {
    /// TLS-ALPN-01, answered by the TLS listeners themselves (the default).
    #[default]
    #[serde(rename = "tls-alpn-01")]
    TlsAlpn01,
    /// HTTP-01, answered by `[[http_listener]]`s.
    #[serde(rename = "http-01")]
    Http01,
}

/// `acme.redis` or `acme.directory_path`.
#[derive(Debug, Clone)]
pub enum AcmeStorage {
    /// A `[[redis]]` store shared by a fleet.
    Redis(RedisSettings),
    /// A local directory: a single node.
    Directory(PathBuf),
}

/// `[[http_listener]]`: plain HTTP. Answers ACME HTTP-01 challenges and redirects every other request to HTTPS.
#[derive(Debug, Clone)]
pub struct HttpListenerSettings {
    /// Name used in logs.
    pub name: String,
    /// Address to listen on.
    pub bind: std::net::SocketAddr,
    /// The HTTPS port redirects point to (443 is left out of the URL).
    pub https_port: u16,
    /// Connections open at once; further ones wait in the kernel's accept queue.
    pub max_connections: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAcme {
    directory: String,
    #[serde(default)]
    contact: Vec<String>,
    eab_kid: Option<String>,
    eab_hmac: Option<toml::Value>,
    #[serde(default)]
    key_type: KeyType,
    redis: Option<String>,
    directory_path: Option<String>,
    secret: Option<toml::Value>,
    #[serde(default)]
    challenge: ChallengeKind,
    ca: Option<String>,
    #[serde(default)]
    names: Vec<String>,
    renewal_window: Option<f64>,
    renew_check_interval: Option<String>,
    handshake_wait: Option<String>,
    order_timeout: Option<String>,
    orders_per_hour: Option<u32>,
    orders_per_hour_per_domain: Option<u32>,
    failure_backoff: Option<String>,
    failure_backoff_max: Option<String>,
    max_concurrent_orders: Option<usize>,
    max_pending: Option<usize>,
    lock_lease: Option<String>,
    prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHttpListener {
    name: Option<String>,
    bind: String,
    https_port: Option<u16>,
    max_connections: Option<usize>,
}

impl Validator<'_> {
    pub(super) fn acme(
        &self,
        raw: RawAcme,
        redis: &[RedisSettings],
        handshake_timeout: Duration,
    ) -> Result<AcmeSettings, ConfigError> {
        let key = |field: &str| format!("acme.{field}");
        if !(raw.directory.starts_with("https://") || raw.directory.starts_with("http://")) {
            return Err(self.err(key("directory"), format!("{:?}: expected an https:// URL", raw.directory)));
        }
        let storage = match (raw.redis, raw.directory_path) {
            (Some(_), Some(_)) => return Err(self.err(key("redis"), "set acme.redis or acme.directory_path, not both")),
            (Some(name), None) => match redis.iter().find(|r| r.name == name) {
                Some(settings) => AcmeStorage::Redis(settings.clone()),
                None => return Err(self.err(key("redis"), format!("no [[redis]] named {name:?}"))),
            },
            (None, Some(path)) => AcmeStorage::Directory(self.path(&path)),
            (None, None) => {
                return Err(self.err(
                    key("redis"),
                    "missing: a [[redis]] store for a fleet (acme.redis) or a directory for one node (acme.directory_path)",
                ));
            }
        };
        let secret = match raw.secret {
            None => {
                return Err(self.err(
                    key("secret"),
                    "missing: private keys are sealed at rest with it; e.g. secret = { env = \"TERN_ACME_SECRET\" }",
                ));
            }
            Some(value) => self.secret("acme.secret", value)?,
        };
        let eab = match (raw.eab_kid, raw.eab_hmac) {
            (None, None) => None,
            (Some(kid), Some(hmac)) => {
                let hmac = self.value("acme.eab_hmac", hmac)?;
                Some(ExternalAccount {
                    kid,
                    hmac: Secret(std::sync::Arc::new(zeroize::Zeroizing::new(hmac.into_bytes()))),
                })
            }
            _ => return Err(self.err(key("eab_kid"), "set both acme.eab_kid and acme.eab_hmac, or neither")),
        };
        for contact in &raw.contact {
            if !contact.contains(':') {
                return Err(
                    self.err(key("contact"), format!("{contact:?}: expected a URL such as mailto:ops@example.com"))
                );
            }
        }
        if let Some(wildcard) = raw.names.iter().find(|n| n.starts_with("*.")) {
            return Err(self.err(key("names"), format!("{wildcard}: wildcards need DNS-01, which tern does not do")));
        }
        let names = raw
            .names
            .iter()
            .map(|n| ServerName::parse(n).map_err(|e| self.err(key("names"), format!("{n:?}: {e}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let renewal_window = raw.renewal_window.unwrap_or(defaults::ACME_RENEWAL_WINDOW);
        if !(renewal_window > 0.0 && renewal_window < 1.0) {
            return Err(self.err(key("renewal_window"), "a fraction of the lifetime between 0 and 1, e.g. 0.33"));
        }
        let handshake_wait =
            self.duration(&key("handshake_wait"), raw.handshake_wait.as_ref(), defaults::ACME_HANDSHAKE_WAIT)?;
        if handshake_wait >= handshake_timeout {
            return Err(self.err(key("handshake_wait"), "must be shorter than server.handshake_timeout"));
        }
        let failure_backoff =
            self.deadline(&key("failure_backoff"), raw.failure_backoff.as_ref(), defaults::ACME_FAILURE_BACKOFF)?;
        let failure_backoff_max = self.deadline(
            &key("failure_backoff_max"),
            raw.failure_backoff_max.as_ref(),
            defaults::ACME_FAILURE_BACKOFF_MAX,
        )?;
        if failure_backoff_max < failure_backoff {
            return Err(self.err(key("failure_backoff_max"), "is shorter than acme.failure_backoff"));
        }
        let prefix = raw.prefix.unwrap_or_else(|| defaults::ACME_PREFIX.to_string());
        if prefix.is_empty() || prefix.contains(char::is_whitespace) {
            return Err(self.err(key("prefix"), "must be non-empty, without spaces"));
        }
        let ceiling = 100_000;
        Ok(AcmeSettings {
            directory: raw.directory,
            contact: raw.contact,
            eab,
            key_type: raw.key_type,
            storage,
            secret,
            challenge: raw.challenge,
            ca: raw.ca.map(|p| self.path(&p)),
            names,
            renewal_window,
            renew_check_interval: self.deadline(
                &key("renew_check_interval"),
                raw.renew_check_interval.as_ref(),
                defaults::ACME_RENEW_CHECK_INTERVAL,
            )?,
            handshake_wait,
            order_timeout: self.deadline(
                &key("order_timeout"),
                raw.order_timeout.as_ref(),
                defaults::ACME_ORDER_TIMEOUT,
            )?,
            orders_per_hour: self
                .positive(&key("orders_per_hour"), raw.orders_per_hour.unwrap_or(defaults::ACME_ORDERS_PER_HOUR))?,
            orders_per_hour_per_domain: self.positive(
                &key("orders_per_hour_per_domain"),
                raw.orders_per_hour_per_domain.unwrap_or(defaults::ACME_ORDERS_PER_HOUR_PER_DOMAIN),
            )?,
            failure_backoff,
            failure_backoff_max,
            max_concurrent_orders: self.count(
                &key("max_concurrent_orders"),
                raw.max_concurrent_orders.unwrap_or(defaults::ACME_MAX_CONCURRENT_ORDERS),
                ceiling,
            )?,
            max_pending: self.count(
                &key("max_pending"),
                raw.max_pending.unwrap_or(defaults::ACME_MAX_PENDING),
                ceiling,
            )?,
            lock_lease: self.deadline(&key("lock_lease"), raw.lock_lease.as_ref(), defaults::ACME_LOCK_LEASE)?,
            prefix,
        })
    }

    pub(super) fn http_listeners(
        &self,
        raw: Vec<RawHttpListener>,
        max_connections: usize,
    ) -> Result<Vec<HttpListenerSettings>, ConfigError> {
        let named = raw
            .into_iter()
            .enumerate()
            .map(|(i, l)| (l.name.clone().unwrap_or_else(|| format!("http-listener-{i}")), l))
            .collect();
        self.entries(
            "http_listener",
            named,
            |(name, _)| name,
            |key, (name, l)| {
                let bind = l
                    .bind
                    .parse()
                    .map_err(|_| self.err(format!("{key}.bind"), format!("{:?} is not an address:port", l.bind)))?;
                let https_port = self.positive(&format!("{key}.https_port"), l.https_port.unwrap_or(443))?;
                let max_connections = self.count(
                    &format!("{key}.max_connections"),
                    l.max_connections.unwrap_or(max_connections),
                    defaults::MAX_CONNECTIONS_CEILING,
                )?;
                Ok(HttpListenerSettings { name, bind, https_port, max_connections })
            },
        )
    }
}
