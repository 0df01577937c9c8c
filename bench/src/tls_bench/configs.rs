//! The configurations under test: tern's TOML and nginx's config for each, written from a certificate set (Caddy's
//! and HAProxy's are in `peers.rs`).

use std::net::SocketAddr;
use std::path::Path;

use crate::Setup;

/// The minimal direct-answer server (`tls-floor`): not a certificate-selecting server, so its handshakes for other
/// names than the first are not verified, and it is the baseline of the floor comparison.
pub const FLOOR_DIRECT: &str = "floor-direct";

/// The same server proxying each request, as it came, to the bench backend over pooled keep-alive connections:
/// the least a TLS-terminating proxy can do (`tls-floor --backend`). Like floor-direct, one certificate for all.
pub const FLOOR_PROXY: &str = "floor-proxy";

/// A `[[certificate]]` entry for every host of the set (tern's static preload).
fn static_certificates(setup: &Setup) -> String {
    let dir = setup.dir.display();
    setup
        .names
        .iter()
        .map(|name| {
            format!("[[certificate]]\nname = \"{name}\"\ncert = \"{dir}/{name}.crt\"\nkey = \"{dir}/{name}.key\"\n")
        })
        .collect()
}

/// tern's config for `config`; `api_template` is the certificate API's URL template for this set (`tern-http`).
pub fn tern_config(
    config: &str,
    setup: &Setup,
    addr: SocketAddr,
    backend: SocketAddr,
    redis_url: &str,
    api_template: &str,
) -> String {
    let dir = setup.dir.display();
    let mut text = format!(
        "[log]\nlevel = \"warn\"\naccess = false\n\n[cache]\nmax_entries = {}\n\n",
        (setup.n + 1000).max(100_000)
    );
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/wasm32-wasip2/release");
    match config {
        "tern-static" => {
            text += &static_certificates(setup);
            text += &format!("\n[[listener]]\nbind = \"{addr}\"\nstrict = true\nbackend = \"http://{backend}\"\n");
        }
        // Diagnostic: the static preload plus a file plugin on the listener that is never asked (every name is
        // static). Separates what a loaded plugin runtime costs a process from what the cache lookup costs.
        "tern-static-idle-plugin" => {
            text += &static_certificates(setup);
            text += &format!(
                "[[plugin]]\nname = \"files\"\npath = \"{}\"\ngrants.files = \"{dir}\"\n\n\
                 [[listener]]\nbind = \"{addr}\"\nplugin = \"files\"\nstrict = true\nbackend = \"http://{backend}\"\n",
                plugins.join("file_path.wasm").display()
            );
        }
        // The file plugin with a route for every name (contract 0.2): `tern-routed` sends every name to the same
        // backend as an origin route (the cost of routing alone, against tern-file); `tern-routed-unique` gives
        // every name its own origin (127.x.y.z on a closed port: the cache holds 100k distinct routes).
        "tern-routed" | "tern-routed-unique" => {
            let (template, grant) = if config == "tern-routed" {
                ("{name}.via", format!("http://{backend}"))
            } else {
                ("{name}.own", "http://*:*".to_string())
            };
            text += &format!(
                "[[plugin]]\nname = \"files\"\npath = \"{}\"\ngrants.files = \"{dir}\"\n\
                 settings = {{ route_template = \"{template}\" }}\ngrants.routes = {{ origins = [\"{grant}\"] }}\n\n\
                 [[listener]]\nbind = \"{addr}\"\nplugin = \"files\"\nstrict = true\nbackend = \"http://{backend}\"\n",
                plugins.join("file_path.wasm").display()
            );
        }
        "tern-file" => {
            text += &format!(
                "[[plugin]]\nname = \"files\"\npath = \"{}\"\ngrants.files = \"{dir}\"\n\n\
                 [[listener]]\nbind = \"{addr}\"\nplugin = \"files\"\nstrict = true\nbackend = \"http://{backend}\"\n",
                plugins.join("file_path.wasm").display()
            );
        }
        // The shipped http-api plugin against the bench's certificate API (the one caddy-http asks too).
        "tern-http" => {
            let authority = api_template.split('/').nth(2).unwrap_or_default();
            text += &format!(
                "[[plugin]]\nname = \"api\"\npath = \"{}\"\n\
                 settings = {{ url_template = \"{api_template}\", wildcard = \"false\" }}\n\
                 grants.http = {{ allow = [\"{authority}\"] }}\n\n\
                 [[listener]]\nbind = \"{addr}\"\nplugin = \"api\"\nstrict = true\nbackend = \"http://{backend}\"\n",
                plugins.join("http_api.wasm").display()
            );
        }
        _ => {
            let prefix = &setup.prefix;
            text += &format!(
                "[[redis]]\nname = \"certs\"\nurls = [\"{redis_url}\"]\n\n\
                 [[plugin]]\nname = \"redis\"\npath = \"{}\"\n\
                 settings = {{ cert_key = \"{prefix}{{name}}.crt\", key_key = \"{prefix}{{name}}.key\" }}\n\
                 grants.kv = {{ redis = \"certs\", prefixes = [\"{prefix}\"] }}\n\n\
                 [[listener]]\nbind = \"{addr}\"\nplugin = \"redis\"\nstrict = true\nbackend = \"http://{backend}\"\n",
                plugins.join("redis_plugin.wasm").display()
            );
        }
    }
    text
}

/// A tern config as a node of the propagation benchmark's fleet: `cache.ttl` of `ttl` seconds and, where the
/// config has a Redis store (`tern-redis`), `[invalidation]` on it (`tern certs invalidate` reaches every node).
pub fn fleet_node(config: &str, ttl: u32) -> String {
    let mut text = config.replacen("[cache]\n", &format!("[cache]\nttl = \"{ttl}s\"\n"), 1);
    if text.contains("[[redis]]\nname = \"certs\"") {
        text += "\n[invalidation]\nredis = \"certs\"\n";
    }
    text
}

/// Writes the route files of the routed configurations for every name of the set: `<name>.via` (to `backend`)
/// and `<name>.own` (the name's own origin, `127.a.b.c:9`).
pub fn write_routes(setup: &Setup, backend: SocketAddr) -> anyhow::Result<()> {
    for (i, name) in setup.names.iter().enumerate() {
        std::fs::write(setup.dir.join(format!("{name}.via")), format!("origin http://{backend}\n"))?;
        let own = format!("origin http://127.{}.{}.{}:9\n", (i >> 16) & 255, (i >> 8) & 255, (i & 255).max(1));
        std::fs::write(setup.dir.join(format!("{name}.own")), own)?;
    }
    Ok(())
}

pub fn nginx_config(config: &str, setup: &Setup, addr: SocketAddr, backend: SocketAddr, prefix: &Path) -> String {
    let dir = setup.dir.display();
    let mut text = format!(
        "user root;\nworker_processes 2;\npid {prefix}/nginx.pid;\nerror_log {prefix}/logs/error.log warn;\n\
         worker_rlimit_nofile 65536;\nevents {{ worker_connections 16384; }}\n\
         http {{\n  access_log off;\n  server_names_hash_max_size 1048576;\n  server_names_hash_bucket_size 128;\n\
         ssl_protocols TLSv1.2 TLSv1.3;\n  ssl_session_cache shared:SSL:50m;\n  ssl_session_tickets on;\n\
         upstream backend {{ server {backend}; keepalive 64; }}\n",
        prefix = prefix.display()
    );
    let location =
        "location / { proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }";
    match config {
        "nginx-static" => {
            for (i, name) in setup.names.iter().enumerate() {
                let default = if i == 0 { " default_server" } else { "" };
                text += &format!(
                    "  server {{ listen {addr} ssl{default}; server_name {name}; \
                     ssl_certificate {dir}/{name}.crt; ssl_certificate_key {dir}/{name}.key; {location} }}\n"
                );
            }
        }
        _ => {
            text += &format!(
                "  server {{ listen {addr} ssl default_server; server_name _; \
                 ssl_certificate {dir}/$ssl_server_name.crt; ssl_certificate_key {dir}/$ssl_server_name.key; {location} }}\n"
            );
        }
    }
    text + "}\n"
}
