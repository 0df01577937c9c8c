//! The admin listener (opt-in `[admin]`, loopback by default): health and readiness, Prometheus metrics, reload,
//! cache purge and lookup, plugin status. Responses never contain key material.
//!
//! | endpoint | method | what |
//! |---|---|---|
//! | `/healthz` | GET | `ok` while the process runs (no token needed) |
//! | `/readyz` | GET | `ready` once listeners are bound and plugins loaded; 503 `draining` during shutdown |
//! | `/metrics` | GET | Prometheus text |
//! | `/plugins` | GET | JSON: per plugin its build hash, load time, swaps, last rejected reload, call counters |
//! | `/reload` | POST | reload plugins from the config file now; JSON report (HTTP 422 if anything was rejected) |
//! | `/cache/purge` | POST | `?name=NAME` or `?name=*.parent` drops those names; no name drops everything |
//! | `/cache/lookup` | GET | `?name=NAME`: per plugin whether it is cached, fresh, its names, issuer, expiry |

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::cache::{CacheKey, Cached};
use crate::metrics::{Exposition, Metrics, label_value};
use crate::plugin::PluginSlot;
use crate::reload::Reloader;
use crate::select::Selector;
use crate::sni::ServerName;

/// What the admin endpoints read and act on.
#[derive(Debug)]
pub struct AdminState {
    /// Process counters.
    pub metrics: Arc<Metrics>,
    /// Resumption counters.
    pub resumption: Arc<crate::resumption::ResumptionMetrics>,
    /// Static certificates and the cache.
    pub selector: Arc<Selector>,
    /// Plugin slots by name.
    pub plugins: HashMap<String, Arc<PluginSlot>>,
    /// Listener names (0.2 plugins' answers are cached per listener).
    pub listeners: Vec<Arc<str>>,
    /// Each listener's admission state, for its metrics.
    pub admission: Vec<Arc<crate::admission::Admission>>,
    /// Upstream pools, for their metrics.
    pub upstreams: Arc<crate::upstream::Upstreams>,
    /// Certificates on demand, if configured.
    pub acme: Option<Arc<crate::acme::Acme>>,
    /// Reloads plugins.
    pub reloader: Arc<Reloader>,
    /// Bind address, token (required by every endpoint but the probes) and connection limits.
    pub settings: crate::config::AdminSettings,
    /// Connection budgets, published as gauges.
    pub budgets: crate::fdlimit::Budgets,
    /// The plugin runtime, for its memory budget gauge.
    pub plugin_memory: crate::plugin::PluginRuntime,
    /// Turns true when shutdown begins: readiness fails so load balancers stop sending traffic.
    pub draining: tokio::sync::watch::Receiver<bool>,
}

/// Serves the admin API on `listener` until the task is dropped. At most `admin.max_connections` connections
/// are open at once (more wait in the accept queue); each must send its request head within
/// `admin.request_head_timeout` (also the keep-alive idle time) and closes after `admin.connection_timeout`.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(state.settings.max_connections));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else { return };
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(err) => {
                tracing::warn!(error = %err, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let lifetime = state.settings.connection_timeout;
            let head = state.settings.request_head_timeout;
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(head)
                .serve_connection(TokioIo::new(tcp), service);
            let _ = tokio::time::timeout(lifetime, connection).await;
            drop(permit);
        });
    }
}

/// Whether `header` is `Bearer <token>`, compared in constant time (through SHA-256 digests, so neither the
/// token's bytes nor its length leak through timing).
fn authorized(header: Option<&[u8]>, token: &str) -> bool {
    let Some(given) = header.and_then(|h| h.strip_prefix(b"Bearer ")) else {
        return false;
    };
    let digest = |bytes: &[u8]| aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
    let (given, wanted) = (digest(given), digest(token.as_bytes()));
    aws_lc_rs::constant_time::verify_slices_are_equal(given.as_ref(), wanted.as_ref()).is_ok()
}

type Reply = Response<Full<Bytes>>;

async fn handle(state: &AdminState, req: Request<Incoming>) -> Reply {
    let path = req.uri().path();
    let probe = matches!(path, "/healthz" | "/readyz");
    if let Some(token) = &state.settings.token
        && !probe
        && !authorized(req.headers().get(header::AUTHORIZATION).map(|v| v.as_bytes()), token)
    {
        return text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
    }
    let name = query_param(req.uri().query(), "name");
    match (req.method(), path) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") if *state.draining.borrow() => text(StatusCode::SERVICE_UNAVAILABLE, "draining\n"),
        (&Method::GET, "/readyz") => text(StatusCode::OK, "ready\n"),
        (&Method::GET, "/metrics") => {
            // Entry counts lag until moka's maintenance runs; run it so the gauges are exact.
            state.selector.cache().run_pending_tasks().await;
            let mut reply = text(StatusCode::OK, render_metrics(state));
            reply
                .headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; version=0.0.4"));
            reply
        }
        (&Method::GET, "/plugins") => json(StatusCode::OK, &plugin_status(state)),
        (&Method::POST, "/reload") => {
            let report = state.reloader.reload().await;
            let status = if report.rejected.is_empty() { StatusCode::OK } else { StatusCode::UNPROCESSABLE_ENTITY };
            json(status, &report)
        }
        (&Method::POST, "/cache/purge") => {
            let cache = state.selector.cache();
            match &name {
                Some(name) => cache.invalidate_name(name),
                None => cache.invalidate_all(),
            }
            json(StatusCode::OK, &serde_json::json!({ "purged": name.as_deref().unwrap_or("*") }))
        }
        (&Method::GET, "/cache/lookup") => match name.as_deref().map(ServerName::parse) {
            Some(Ok(name)) => json(StatusCode::OK, &lookup(state, &name).await),
            Some(Err(err)) => text(StatusCode::BAD_REQUEST, format!("name: {err}\n")),
            None => text(StatusCode::BAD_REQUEST, "give ?name=\n"),
        },
        (_, path) if path.starts_with("/acme/") => acme_endpoint(state, req.method(), path, name.as_deref()).await,
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// `GET /acme/certificates`, `POST /acme/renew?name=`, `POST /acme/revoke?name=` (`tern acme list|renew|revoke`).
/// Never shows keys.
async fn acme_endpoint(state: &AdminState, method: &Method, path: &str, name: Option<&str>) -> Reply {
    let Some(acme) = &state.acme else {
        return text(StatusCode::NOT_FOUND, "no [acme] section in the config\n");
    };
    if (method, path) == (&Method::GET, "/acme/certificates") {
        return match acme.list(10_000).await {
            Ok(list) => json(StatusCode::OK, &serde_json::json!({ "certificates": list })),
            Err(err) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{err}\n")),
        };
    }
    let name = match name.map(ServerName::parse) {
        Some(Ok(name)) => name,
        Some(Err(err)) => return text(StatusCode::BAD_REQUEST, format!("name: {err}\n")),
        None => return text(StatusCode::BAD_REQUEST, "give ?name=\n"),
    };
    match (method, path) {
        (&Method::POST, "/acme/renew") => match acme.renew_now(&name).await {
            Ok(cert) => json(
                StatusCode::OK,
                &serde_json::json!({ "renewed": name.as_str(), "not_after": unix_seconds(cert.not_after), "issuer": cert.issuer }),
            ),
            Err(err) => text(StatusCode::BAD_GATEWAY, format!("{err}\n")),
        },
        (&Method::POST, "/acme/revoke") => match acme.revoke(&name).await {
            Ok(true) => json(StatusCode::OK, &serde_json::json!({ "revoked": name.as_str() })),
            Ok(false) => text(StatusCode::NOT_FOUND, "no stored certificate for that name\n"),
            Err(err) => text(StatusCode::BAD_GATEWAY, format!("{err}\n")),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn render_metrics(state: &AdminState) -> String {
    let mut x = Exposition::default();
    state.metrics.render(&mut x);
    state.budgets.render(&mut x);
    crate::admission::render(&mut x, &state.admission);
    state.plugin_memory.render(&mut x);
    state.resumption.render(&mut x);
    state.selector.cache().render(&mut x);
    state.upstreams.render(&mut x);
    if let Some(acme) = &state.acme {
        acme.metrics.render(&mut x);
    }
    let mut plugins: Vec<_> = state.plugins.iter().collect();
    plugins.sort_by(|a, b| a.0.cmp(b.0));
    x.family("tern_plugin_calls_total", "counter", "Plugin calls by outcome.");
    for (name, slot) in &plugins {
        slot.stats().render(name, &mut x);
    }
    type Phase = fn(&crate::plugin::PluginStats) -> &crate::metrics::Histogram;
    let phases: [(&str, &str, Phase); 2] = [
        ("tern_plugin_instantiate_seconds", "Time to instantiate a plugin, per call.", |s| s.instantiate()),
        ("tern_plugin_run_seconds", "Time a plugin's export ran, per call (store round trips included).", |s| s.run()),
    ];
    for (family, help, histogram) in phases {
        x.family(family, "histogram", help);
        for (name, slot) in &plugins {
            x.histogram(family, &format!("plugin=\"{}\"", label_value(name)), histogram(slot.stats()));
        }
    }
    x.family(
        "tern_plugin_spare_calls_total",
        "counter",
        "Plugin calls that ran in a spare instance made ahead of them.",
    );
    for (name, slot) in &plugins {
        x.sample(
            "tern_plugin_spare_calls_total",
            &format!("plugin=\"{}\"", label_value(name)),
            slot.stats().calls_on_spare(),
        );
    }
    x.family("tern_plugin_swaps_total", "counter", "Plugin builds swapped in by reloads.");
    for (name, slot) in &plugins {
        x.sample("tern_plugin_swaps_total", &format!("plugin=\"{}\"", label_value(name)), slot.status().swaps);
    }
    x.finish()
}

fn plugin_status(state: &AdminState) -> serde_json::Value {
    let mut plugins: Vec<_> = state
        .plugins
        .values()
        .map(|slot| {
            let mut entry = slot.stats().summary();
            entry["status"] = serde_json::json!(slot.status());
            entry
        })
        .collect();
    plugins.sort_by_key(|p| p["status"]["name"].as_str().map(str::to_string));
    serde_json::Value::Array(plugins)
}

/// Metadata of the cached answers for `name`: never the key, never the PEM.
async fn lookup(state: &AdminState, name: &ServerName) -> serde_json::Value {
    let mut answers = Vec::new();
    for (plugin, slot) in &state.plugins {
        let current = slot.current();
        let listeners: Vec<Option<Arc<str>>> = match current.contract() {
            crate::plugin::Contract::V0_1 => vec![None],
            _ => state.listeners.iter().cloned().map(Some).collect(),
        };
        for listener in listeners {
            let key =
                CacheKey { plugin: current.cache_scope().clone(), listener: listener.clone(), name: name.clone() };
            let Some(cached) = state.selector.cache().peek(&key).await else { continue };
            let mut answer = describe_cached(&cached);
            answer["plugin"] = serde_json::json!(plugin);
            answer["fresh"] = serde_json::json!(cached.is_fresh());
            if let Some(listener) = listener {
                answer["listener"] = serde_json::json!(&*listener);
            }
            answers.push(answer);
        }
    }
    let static_names = state.selector.statics().lookup(name).map(|c| c.primary().dns_names.clone());
    serde_json::json!({ "name": name.as_str(), "cached": answers, "static": static_names })
}

fn unix_seconds(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A cached answer's metadata: names, issuers, expiry, route or target; never a key, never PEM.
fn describe_cached(cached: &Cached) -> serde_json::Value {
    let unix = unix_seconds;
    match cached {
        Cached::Found { served, .. } => {
            let certificates: Vec<_> = served
                .certs()
                .iter()
                .map(|cert| {
                    serde_json::json!({
                        "dns_names": cert.dns_names,
                        "issuer": cert.issuer,
                        "key": crate::certs::key_kind(&cert.certified),
                        "not_after": unix(cert.not_after),
                    })
                })
                .collect();
            let first = served.primary();
            serde_json::json!({
                "answer": "found",
                // The first certificate's fields at the top level, as before certificate sets.
                "dns_names": first.dns_names,
                "issuer": first.issuer,
                "not_after": unix(first.not_after),
                "certificates": certificates,
                "route": served.route.describe(),
            })
        }
        Cached::Passthrough { target, .. } => {
            serde_json::json!({ "answer": "passthrough", "target": target.to_string() })
        }
        Cached::Obtain { route, .. } => serde_json::json!({ "answer": "obtain", "route": route.describe() }),
        Cached::NotFound { .. } => serde_json::json!({ "answer": "not_found" }),
        Cached::Invalid { error, .. } => serde_json::json!({ "answer": "invalid", "error": error.to_string() }),
    }
}

fn query_param(query: Option<&str>, wanted: &str) -> Option<String> {
    query?.split('&').filter_map(|pair| pair.split_once('=')).find(|(k, _)| *k == wanted).map(|(_, v)| v.to_string())
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Reply {
    let mut reply = Response::new(Full::new(body.into()));
    *reply.status_mut() = status;
    reply
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Reply {
    let body = serde_json::to_vec_pretty(value).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}").into_bytes());
    let mut reply = text(status, body);
    reply.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_token_must_match_exactly() {
        assert!(authorized(Some(b"Bearer s3cret"), "s3cret"));
        assert!(!authorized(Some(b"Bearer s3cre"), "s3cret"));
        assert!(!authorized(Some(b"Bearer s3cretX"), "s3cret"));
        assert!(!authorized(Some(b"bearer s3cret"), "s3cret"));
        assert!(!authorized(Some(b"s3cret"), "s3cret"));
        assert!(!authorized(None, "s3cret"));
    }
}
