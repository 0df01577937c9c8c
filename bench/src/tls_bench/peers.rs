//! The Caddy and HAProxy configurations under test, each the way its own documentation sets up many certificates,
//! all proxying to the same backend:
//!
//! - `caddy-files`: Caddy's JSON config, `apps.tls.certificates.load_files` with every certificate of the set,
//!   and `apps.tls.cache.capacity` raised above N (Caddy's certificate cache holds 10,000 by default and evicts at
//!   random beyond).
//! - `caddy-http`: Caddy's `get_certificate http` manager (`apps.tls.automation.policies[].get_certificate`,
//!   `via: http`) against the bench's certificate API (`cert_api.rs`), which tern's http-api plugin also reads.
//! - `haproxy-crtlist`: `bind ... ssl crt-list <file>` with one line per certificate (`<pem> <name>`), the PEM
//!   holding chain and key (HAProxy's own format), `mode http`.
//!
//! TLS: both keep their default resumption (Caddy: tickets; HAProxy: session cache and tickets), as nginx does
//! here; the full-handshake phases never offer a session, the resumed phase does. TLS 1.3's suite and group are
//! pinned where the server would otherwise choose by its own order (HAProxy enforces the server's order, OpenSSL
//! lists AES-256 first): TLS_AES_128_GCM_SHA256 with X25519 everywhere, as the client offers first.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde_json::json;

use crate::Setup;

/// Caddy's JSON config for `caddy-files` or `caddy-http`; `storage` is Caddy's data folder, `api_url` the
/// certificate API's URL for this set (`caddy-http`), `admin` where its admin API listens (off when `None`; the
/// propagation benchmark reloads through it).
pub fn caddy_config(
    config: &str,
    setup: &Setup,
    addr: SocketAddr,
    backend: SocketAddr,
    storage: &Path,
    api_url: &str,
    admin: Option<SocketAddr>,
) -> String {
    let admin = match admin {
        Some(admin) => json!({ "listen": admin.to_string() }),
        None => json!({ "disabled": true }),
    };
    let tls = if config == "caddy-http" {
        json!({ "automation": { "policies": [ { "get_certificate": [ { "via": "http", "url": api_url } ] } ] } })
    } else {
        let dir = &setup.dir;
        let files: Vec<_> = setup
            .names
            .iter()
            .map(|name| {
                json!({
                    "certificate": dir.join(format!("{name}.crt")).display().to_string(),
                    "key": dir.join(format!("{name}.key")).display().to_string(),
                })
            })
            .collect();
        json!({ "cache": { "capacity": setup.n + 1000 }, "certificates": { "load_files": files } })
    };
    json!({
        "admin": admin,
        "logging": { "logs": { "default": { "level": "ERROR" } } },
        "storage": { "module": "file_system", "root": storage.display().to_string() },
        "apps": {
            "tls": tls,
            "http": { "servers": { "bench": {
                "listen": [addr.to_string()],
                "automatic_https": { "disable": true },
                "tls_connection_policies": [ { "curves": ["x25519"], "alpn": ["http/1.1"] } ],
                "routes": [ { "handle": [ {
                    "handler": "reverse_proxy",
                    "upstreams": [ { "dial": backend.to_string() } ],
                } ] } ],
            } } },
        },
    })
    .to_string()
}

/// The folder of HAProxy's PEM files of a set: `<name>.pem`, chain then key.
fn haproxy_pems(setup: &Setup) -> PathBuf {
    setup.dir.join("haproxy")
}

/// Writes HAProxy's PEM file for every name of the set (set-up before the clock starts, kept between runs like
/// the set itself).
pub fn write_haproxy_pems(setup: &Setup) -> Result<()> {
    let dir = haproxy_pems(setup);
    let marker = dir.join(".complete");
    let label = setup.n.to_string();
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(label.as_str()) {
        return Ok(());
    }
    std::fs::create_dir_all(&dir)?;
    for name in setup.names.iter() {
        let mut pem = std::fs::read(setup.dir.join(format!("{name}.crt")))?;
        pem.extend(std::fs::read(setup.dir.join(format!("{name}.key")))?);
        std::fs::write(dir.join(format!("{name}.pem")), pem)?;
    }
    std::fs::write(marker, label)?;
    Ok(())
}

/// HAProxy's crt-list: one line per certificate, its PEM and the name it serves.
pub fn haproxy_crt_list(setup: &Setup) -> String {
    let dir = haproxy_pems(setup);
    setup.names.iter().map(|name| format!("{} {name}\n", dir.join(format!("{name}.pem")).display())).collect()
}

/// HAProxy's config: two threads (as nginx's two workers), `maxconn` within the descriptor limit, HTTP mode to
/// the backend; with `socket`, its Runtime API (`stats socket ... level admin`) on that Unix socket.
pub fn haproxy_config(addr: SocketAddr, backend: SocketAddr, crt_list: &Path, socket: Option<&Path>) -> String {
    let socket = socket.map(|s| format!("  stats socket {} level admin\n", s.display())).unwrap_or_default();
    format!(
        "global\n  nbthread 2\n  maxconn 4096\n{socket}\
         \x20 ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256\n\
         \x20 ssl-default-bind-options ssl-min-ver TLSv1.2\n\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\n\
         frontend bench\n  bind {addr} ssl crt-list {list} alpn http/1.1 curves X25519\n  default_backend backend\n\n\
         backend backend\n  server backend {backend}\n",
        list = crt_list.display()
    )
}
