//! The Redis plugin: certificates read from Redis through the host's `kv` capability (grant the store and key
//! prefixes in the plugin's `grants.kv`).
//!
//! Two layouts, each read in one round trip per name tried:
//! - `layout = "keys"` (default, the layout of the original research deployment): string keys fetched in one
//!   `MGET`: `<name>.crt` and `<name>.key`, an optional TTL key, and beside them the optional RSA member
//!   `<name>.crt.rsa` and `<name>.key.rsa` and the optional route `<name>.route`.
//! - `layout = "hash"`: one hash per host, `HMGET <name> crt key ttl rsa_crt rsa_key route`.
//!
//! Settings (all optional):
//! - `layout`: `keys` or `hash`.
//! - keys layout: `cert_key` (default `{name}.crt`), `key_key` (`{name}.key`), `ttl_key` (unset: no TTL key);
//!   `rsa_cert_key` and `rsa_key_key` (default: `cert_key` and `key_key` with `.rsa` appended, so
//!   `cert:{name}.crt` gives `cert:{name}.crt.rsa`: appended, so that no client-chosen name such as `x.rsa` can
//!   make one name's RSA key be read as another name's certificate); `route_key` (default: `cert_key` up to and
//!   including `{name}`, then `.route`, so `cert:{name}.crt` gives `cert:{name}.route`). The defaults share
//!   `cert_key`'s prefix, so they lie inside the prefixes already granted for it.
//! - hash layout: `hash_key` (default `{name}`), `cert_field` (`crt`), `key_field` (`key`), `ttl_field` (`ttl`),
//!   `rsa_cert_field` (`rsa_crt`), `rsa_key_field` (`rsa_key`), `route_field` (`route`).
//! - An empty value for any of the optional keys or fields (TTL, RSA member, route) means "not stored": it is not
//!   read at all.
//! - `wildcard`: `true` (default) to try `*.<parent>` when the exact name has no entry.
//!
//! `{name}` stands for the server name (or the wildcard name). Values:
//! - certificate and key: PEM. Both missing or either missing: the name is not found here.
//! - TTL: whole seconds, passed to tern as the cache hint of the answer.
//! - RSA member: a second certificate and key for the name, served to clients that cannot use the first one's key
//!   type (the first is usually ECDSA). Half of it (a certificate without its key) is ignored with a warning.
//! - route: one line, the same text as the file-path plugin's route files: `pool NAME` (an `[[upstream]]`),
//!   `origin http://host:port` or `origin https://host:port`, or `passthrough host:port` (tern forwards the
//!   connection untouched; no certificate needs to be stored). Blank lines and `#` comments are skipped. Without a
//!   route the listener's backend gets the traffic. A route stored for the exact name applies when the
//!   certificate comes from the wildcard entry (one wildcard certificate, a route per tenant); the wildcard
//!   entry's route applies to names without one. The host checks every route against the plugin's
//!   `grants.routes`; anything else in the value is an error naming the key (or field).
//!
//! A store error (Redis down, a key outside the grant) or a malformed value fails the handshake.

use std::time::Duration;
use tern_guest::{Answer, Certificate, Hello, Plugin, RouteLine, Served, config, kv, log, wildcard_of};

struct RedisPlugin;

impl Plugin for RedisPlugin {
    fn select(hello: &Hello) -> Result<Answer, String> {
        let layout = Layout::load()?;
        let wildcard = (config::get_or("wildcard", "true") == "true").then(|| wildcard_of(&hello.servername));
        // The exact name's route wins, whichever entry the certificate comes from.
        let mut route: Option<(RouteLine, Option<Duration>)> = None;
        for name in std::iter::once(hello.servername.clone()).chain(wildcard.flatten()) {
            let stored = layout.fetch(&name)?;
            if route.is_none() {
                route = stored.route()?.map(|line| Ok::<_, String>((line, stored.ttl()?))).transpose()?;
            }
            if let Some((RouteLine::Passthrough(target), ttl)) = route {
                return Ok(Answer::Passthrough { target, ttl });
            }
            if let Some(mut served) = stored.served()? {
                if name != hello.servername {
                    log::debug(&format!("serving wildcard {name}"));
                }
                served.route = route.and_then(|(line, _)| match line {
                    RouteLine::Route(route) => Some(route),
                    RouteLine::Passthrough(_) => None,
                });
                return Ok(Answer::Serve(served));
            }
        }
        Ok(Answer::NotFound)
    }
}

tern_guest::export_plugin!(RedisPlugin);

/// What one stored value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Cert,
    Key,
    Ttl,
    RsaCert,
    RsaKey,
    Route,
}

struct Layout {
    /// The hash key template (hash layout); `None`: the keys layout.
    hash: Option<String>,
    /// Each part that is read, with its key template (keys layout) or field (hash layout), in reading order.
    parts: Vec<(Part, String)>,
}

impl Layout {
    fn load() -> Result<Self, String> {
        // Unset: the default; set but empty: not stored.
        let optional = |setting: &str, default: Option<String>| match config::get(setting) {
            Some(value) if value.is_empty() => None,
            Some(value) => Some(value),
            None => default,
        };
        let (hash, parts) = match config::get_or("layout", "keys").as_str() {
            "keys" => {
                let cert = config::get_or("cert_key", "{name}.crt");
                let key = config::get_or("key_key", "{name}.key");
                let beside =
                    |template: &str, with: &str| template.contains("{name}").then(|| format!("{template}{with}"));
                let route = cert.find("{name}").map(|at| format!("{}.route", &cert[..at + "{name}".len()]));
                let optional_parts = [
                    (Part::Ttl, "ttl_key", config::get("ttl_key").filter(|t| !t.is_empty())),
                    (Part::RsaCert, "rsa_cert_key", optional("rsa_cert_key", beside(&cert, ".rsa"))),
                    (Part::RsaKey, "rsa_key_key", optional("rsa_key_key", beside(&key, ".rsa"))),
                    (Part::Route, "route_key", optional("route_key", route)),
                ];
                let mut parts = vec![(Part::Cert, cert), (Part::Key, key)];
                for (part, setting, template) in optional_parts {
                    let Some(template) = template else { continue };
                    // An explicit template without `{name}` would give every name the same value.
                    if part != Part::Ttl && !template.contains("{name}") {
                        return Err(format!("setting {setting}: {template:?} does not contain {{name}}"));
                    }
                    parts.push((part, template));
                }
                (None, parts)
            }
            "hash" => {
                let fields = [
                    (Part::Cert, Some(config::get_or("cert_field", "crt"))),
                    (Part::Key, Some(config::get_or("key_field", "key"))),
                    (Part::Ttl, optional("ttl_field", Some("ttl".into()))),
                    (Part::RsaCert, optional("rsa_cert_field", Some("rsa_crt".into()))),
                    (Part::RsaKey, optional("rsa_key_field", Some("rsa_key".into()))),
                    (Part::Route, optional("route_field", Some("route".into()))),
                ];
                let parts = fields.into_iter().filter_map(|(part, field)| Some((part, field?))).collect();
                (Some(config::get_or("hash_key", "{name}")), parts)
            }
            other => return Err(format!("setting layout: expected \"keys\" or \"hash\", got {other:?}")),
        };
        Ok(Layout { hash, parts })
    }

    /// Everything stored for `name`, in one round trip.
    fn fetch(&self, name: &str) -> Result<Stored, String> {
        let fill = |template: &str| template.replace("{name}", name);
        let (values, places) = match &self.hash {
            None => {
                let keys: Vec<String> = self.parts.iter().map(|(_, template)| fill(template)).collect();
                let values = kv::get_many(&keys).map_err(describe)?;
                (values, keys.iter().map(|key| format!("key {key:?}")).collect::<Vec<_>>())
            }
            Some(hash) => {
                let hash = fill(hash);
                let fields: Vec<String> = self.parts.iter().map(|(_, field)| field.clone()).collect();
                let values = kv::hash_get(&hash, &fields).map_err(describe)?;
                (values, fields.iter().map(|field| format!("field {field:?} of hash {hash:?}")).collect())
            }
        };
        if values.len() != self.parts.len() {
            return Err(format!("key-value store answered {} values for {} asked", values.len(), self.parts.len()));
        }
        let values = self.parts.iter().zip(places).zip(values);
        Ok(Stored {
            name: name.to_string(),
            values: values.filter_map(|(((part, _), place), value)| Some((*part, place, value?))).collect(),
        })
    }
}

/// The values stored for one name (only those present), each with where it was found.
struct Stored {
    name: String,
    values: Vec<(Part, String, Vec<u8>)>,
}

impl Stored {
    /// The value of `part`, with where it was found; `None` if it is not stored.
    fn raw(&self, part: Part) -> Option<(&str, &[u8])> {
        self.values.iter().find(|(p, _, _)| *p == part).map(|(_, place, bytes)| (place.as_str(), bytes.as_slice()))
    }

    /// The value of `part` as text, with where it was found; `None` if it is not stored.
    fn text(&self, part: Part) -> Result<Option<(&str, &str)>, String> {
        let Some((place, bytes)) = self.raw(part) else { return Ok(None) };
        match std::str::from_utf8(bytes) {
            Ok(text) => Ok(Some((place, text))),
            Err(_) => Err(format!("{place} of {}: not UTF-8 text", self.name)),
        }
    }

    /// The certificate stored as `cert` and `key`, if both are there.
    fn pair(&self, cert: Part, key: Part) -> Result<Option<Certificate>, String> {
        match (self.raw(cert), self.raw(key)) {
            (Some(_), Some(_)) => {}
            (Some((place, _)), None) | (None, Some((place, _))) if cert == Part::RsaCert => {
                log::warn(&format!("{place} of {}: only half of the RSA member is stored, ignored", self.name));
                return Ok(None);
            }
            _ => return Ok(None),
        }
        let (Some((_, chain)), Some((_, key))) = (self.text(cert)?, self.text(key)?) else { return Ok(None) };
        Ok(Some(Certificate::new(chain, key)))
    }

    /// The stored route, if any.
    fn route(&self) -> Result<Option<RouteLine>, String> {
        let Some((place, text)) = self.text(Part::Route)? else { return Ok(None) };
        RouteLine::parse(text).map(Some).map_err(|why| format!("{place} (route of {}): {why}", self.name))
    }

    /// The stored certificate set and TTL (no route yet), `None` if no certificate is stored.
    fn served(&self) -> Result<Option<Served>, String> {
        let Some(first) = self.pair(Part::Cert, Part::Key)? else { return Ok(None) };
        let mut served = Served::one(first);
        if let Some(rsa) = self.pair(Part::RsaCert, Part::RsaKey)? {
            served = served.and(rsa);
        }
        // Read only once there is something to serve, as before: a TTL stored without a certificate is ignored.
        served.ttl = self.ttl()?;
        Ok(Some(served))
    }

    /// The stored cache TTL, if any.
    fn ttl(&self) -> Result<Option<Duration>, String> {
        let Some((place, text)) = self.text(Part::Ttl)? else { return Ok(None) };
        let seconds = text
            .trim()
            .parse()
            .map_err(|_| format!("{place} (ttl of {}): expected whole seconds, got {text:?}", self.name))?;
        Ok(Some(Duration::from_secs(seconds)))
    }
}

fn describe(err: kv::Error) -> String {
    match err {
        kv::Error::Denied(m) => format!("key-value access denied: {m}"),
        kv::Error::Unavailable(m) => format!("key-value store unavailable: {m}"),
        kv::Error::Other(m) => format!("key-value store error: {m}"),
    }
}
