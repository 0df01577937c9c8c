//! The Redis plugin: certificates read from Redis through the host's `kv` capability (grant the store and key
//! prefixes in the plugin's `grants.kv`).
//!
//! Two layouts:
//! - `layout = "keys"` (default, the layout of the original research deployment): `GET <name>.crt` and
//!   `GET <name>.key`, fetched in one `MGET`; an optional TTL key beside them.
//! - `layout = "hash"`: one hash per host, `HMGET <name> crt key ttl`.
//!
//! Settings (all optional):
//! - `layout`: `keys` or `hash`.
//! - keys layout: `cert_key` (default `{name}.crt`), `key_key` (`{name}.key`), `ttl_key` (unset: no TTL key).
//! - hash layout: `hash_key` (default `{name}`), `cert_field` (`crt`), `key_field` (`key`), `ttl_field` (`ttl`).
//! - `wildcard`: `true` (default) to try `*.<parent>` when the exact name has no entry.
//!
//! `{name}` stands for the server name (or the wildcard name). A TTL value is whole seconds, passed to tern as
//! the cache hint. A missing certificate or key means "not found"; a store error fails the handshake.

use std::time::Duration;
use tern_guest::{Certificate, Selection, Selector, config, exact_or_wildcard, kv};

struct RedisPlugin;

impl Selector for RedisPlugin {
    fn select(servername: &str) -> Result<Selection, String> {
        let layout = Layout::load()?;
        exact_or_wildcard(servername, config::get_or("wildcard", "true") == "true", |name| layout.fetch(name))
    }
}

tern_guest::export_selector!(RedisPlugin);

enum Layout {
    Keys { cert: String, key: String, ttl: Option<String> },
    Hash { key: String, fields: Vec<String> },
}

impl Layout {
    fn load() -> Result<Self, String> {
        match config::get_or("layout", "keys").as_str() {
            "keys" => Ok(Layout::Keys {
                cert: config::get_or("cert_key", "{name}.crt"),
                key: config::get_or("key_key", "{name}.key"),
                ttl: config::get("ttl_key"),
            }),
            "hash" => Ok(Layout::Hash {
                key: config::get_or("hash_key", "{name}"),
                fields: ["cert_field", "key_field", "ttl_field"]
                    .iter()
                    .zip(["crt", "key", "ttl"])
                    .map(|(setting, default)| config::get_or(setting, default))
                    .collect(),
            }),
            other => Err(format!("setting layout: expected \"keys\" or \"hash\", got {other:?}")),
        }
    }

    /// The certificate stored for `name`, if both its chain and key are there.
    fn fetch(&self, name: &str) -> Result<Option<Certificate>, String> {
        let fill = |template: &str| template.replace("{name}", name);
        let values = match self {
            Layout::Keys { cert, key, ttl } => {
                let mut keys = vec![fill(cert), fill(key)];
                keys.extend(ttl.as_deref().map(fill));
                kv::get_many(&keys).map_err(describe)?
            }
            Layout::Hash { key, fields } => kv::hash_get(&fill(key), fields).map_err(describe)?,
        };
        let mut values = values.into_iter();
        let (Some(Some(chain)), Some(Some(key))) = (values.next(), values.next()) else { return Ok(None) };
        let text = |bytes: Vec<u8>, what: &str| {
            String::from_utf8(bytes).map_err(|_| format!("{what} of {name} is not UTF-8 PEM"))
        };
        let mut cert = Certificate::new(text(chain, "certificate")?, text(key, "key")?);
        if let Some(Some(ttl)) = values.next() {
            let ttl = text(ttl, "ttl")?;
            let seconds =
                ttl.trim().parse().map_err(|_| format!("ttl of {name}: expected whole seconds, got {ttl:?}"))?;
            cert = cert.with_ttl(Duration::from_secs(seconds));
        }
        Ok(Some(cert))
    }
}

fn describe(err: kv::Error) -> String {
    match err {
        kv::Error::Denied(m) => format!("key-value access denied: {m}"),
        kv::Error::Unavailable(m) => format!("key-value store unavailable: {m}"),
        kv::Error::Other(m) => format!("key-value store error: {m}"),
    }
}
