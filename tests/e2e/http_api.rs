//! Certificates from an HTTP API through `wasi:http`: a real local API server, the allow-list, the size cap.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tern::plugin::Outcome;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::json;
use tern_fixtures::spawn_echo_backend;

use crate::support::*;

const TOKEN: &str = "Bearer test-token";

/// A certificate API: `GET /v1/certs/<name>` → 200 with `<dir>/<name>.json` verbatim if there is one, else JSON
/// from `<dir>/<name>.crt|.key`; 404 if unknown, 401 without the token; `big.*` answers 2 MiB.
struct Api {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

async fn start_api(dir: PathBuf) -> anyhow::Result<Api> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let requests = Arc::new(AtomicU64::new(0));
    let counter = requests.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (dir, counter) = (dir.clone(), counter.clone());
            let service = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                counter.fetch_add(1, Ordering::SeqCst);
                let dir = dir.clone();
                async move { Ok::<_, Infallible>(answer(&dir, &req)) }
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
            );
        }
    });
    Ok(Api { addr, requests })
}

fn answer(dir: &std::path::Path, req: &http::Request<Incoming>) -> http::Response<Full<Bytes>> {
    let respond = |status: u16, body: Vec<u8>| {
        http::Response::builder().status(status).body(Full::new(Bytes::from(body))).expect("valid response")
    };
    if req.headers().get("authorization").is_none_or(|v| v != TOKEN) {
        return respond(401, b"unauthorized".to_vec());
    }
    let Some(name) = req.uri().path().strip_prefix("/v1/certs/") else { return respond(404, Vec::new()) };
    if name.starts_with("big.") {
        return respond(200, vec![b' '; 2 << 20]);
    }
    if let Ok(json) = std::fs::read(dir.join(format!("{name}.json"))) {
        return respond(200, json);
    }
    match (
        std::fs::read_to_string(dir.join(format!("{name}.crt"))),
        std::fs::read_to_string(dir.join(format!("{name}.key"))),
    ) {
        (Ok(chain), Ok(key)) => {
            let json = format!("{{\"chain\": {chain:?}, \"key\": {key:?}, \"ttl\": 300}}");
            respond(200, json.into_bytes())
        }
        _ => respond(404, Vec::new()),
    }
}

fn api_config(pki: &Pki, backend: SocketAddr, api: SocketAddr, allow: &str, extra_settings: &str) -> String {
    let plugin_keys = format!(
        "settings = {{ url_template = \"http://{api}/v1/certs/{{name}}\", auth_header = \"authorization\", \
         auth_value = \"{TOKEN}\"{extra_settings} }}\n\
         grants.http = {{ allow = [\"{allow}\"], max_response_bytes = \"64KiB\" }}\n"
    );
    config_with(pki, backend, HTTP_API_PLUGIN, &plugin_keys, "default_certificate = \"default\"").replacen(
        &format!("grants.files = \"{}\"", pki.certs().display()),
        "",
        1,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_plugin_serves_each_name_its_certificate() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.example.test", "*.wild.example.test"])?;
    let api = start_api(pki.certs()).await?;
    let config = api_config(&pki, spawn_echo_backend().await?, api.addr, &api.addr.to_string(), "");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let client = pki.client(&[]);
    assert_eq!(served_leaf(&connect(server.addr, &client, "a.example.test").await?), pki.leaf("a.example.test"));
    assert_eq!(
        served_leaf(&connect(server.addr, &client, "x.wild.example.test").await?),
        pki.leaf("*.wild.example.test")
    );
    // 404 for the name and its wildcard: the default certificate.
    let stream = handshake(server.addr, &client, None, "default.test").await?;
    assert_eq!(served_leaf(&stream), pki.leaf("default.test"));
    assert_eq!(server.plugin_stats().count(Outcome::Found), 2);
    assert_eq!(api.requests.load(Ordering::SeqCst), 3, "a, x.wild (404) and *.wild");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_outside_the_allow_list_are_refused_and_big_answers_are_cut_off() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.example.test"])?;
    let api = start_api(pki.certs()).await?;
    let backend = spawn_echo_backend().await?;
    // The grant names another port of the same host: the request never leaves tern.
    let config = api_config(&pki, backend, api.addr, "127.0.0.1:1", "");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let err = connect(server.addr, &pki.client(&[]), "a.example.test").await.unwrap_err();
    assert_eq!(alert_of(&err), Some(REFUSED), "{err}");
    assert_eq!(server.plugin_stats().errors(), 1);
    assert_eq!(api.requests.load(Ordering::SeqCst), 0, "a refused request must not reach the network");
    drop(server);

    let config = api_config(&pki, backend, api.addr, &api.addr.to_string(), ", wildcard = false");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let err = connect(server.addr, &pki.client(&[]), "big.example.test").await.unwrap_err();
    assert_eq!(alert_of(&err), Some(REFUSED), "{err}");
    assert_eq!(server.plugin_stats().errors(), 1, "a 2 MiB answer exceeds the 64 KiB cap");
    connect(server.addr, &pki.client(&[]), "a.example.test").await?;
    Ok(())
}

/// An HTTPS API whose certificate the plugin cannot verify (the test CA is not a public root): the request is
/// made, fails verification, and the handshake gets the listener's fallback — an outage, not a crash. (With two
/// rustls providers compiled in, wasmtime-wasi-http's HTTPS client panicked unless tern installed its provider as
/// the process default; a panic would drop the connection instead of serving the default certificate.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_api_with_an_unverifiable_certificate_is_an_outage_not_a_crash() -> anyhow::Result<()> {
    use rustls::pki_types::pem::PemObject;
    let pki = Pki::new(&["default.test", "a.example.test", "api.test"])?;
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(pki.certs().join("api.test.crt"))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(pki.certs().join("api.test.key"))?;
    let tls = rustls::ServerConfig::builder_with_provider(tern::crypto::provider().clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let api = listener.local_addr()?;
    let hellos = Arc::new(AtomicU64::new(0));
    let seen = hellos.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await; // the plugin's client gives up on the certificate
            });
        }
    });
    let config = api_config(&pki, spawn_echo_backend().await?, api, &api.to_string(), "")
        .replace("url_template = \"http://", "url_template = \"https://");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let stream = sni_verified_as(server.addr, &pki, "a.example.test", "default.test").await?;
    assert_eq!(served_leaf(&stream), pki.leaf("default.test"));
    assert!(counter(&hellos) >= 1, "the plugin's HTTPS request reached the API");
    assert_eq!(server.plugin_stats().count(Outcome::Found), 0);
    // The process is fine: the next handshake is served the same way.
    let stream = sni_verified_as(server.addr, &pki, "a.example.test", "default.test").await?;
    assert_eq!(served_leaf(&stream), pki.leaf("default.test"));
    Ok(())
}

/// Writes the API's answer for `name` (served verbatim by [`start_api`]).
fn api_answer(pki: &Pki, name: &str, json: &serde_json::Value) -> anyhow::Result<()> {
    Ok(std::fs::write(pki.certs().join(format!("{name}.json")), json.to_string())?)
}

/// Today's answer for `name` (`chain`, `key`) from its files, with `extra` fields added.
fn answer_with(pki: &Pki, name: &str, extra: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let read = |ext: &str| std::fs::read_to_string(pki.certs().join(format!("{name}.{ext}")));
    let mut json = json!({ "chain": read("crt")?, "key": read("key")? });
    if let (Some(json), serde_json::Value::Object(extra)) = (json.as_object_mut(), extra) {
        json.extend(extra);
    }
    Ok(json)
}

/// [`api_config`] with `grants.routes = { <routes> }` for the plugin.
fn with_route_grants(config: String, routes: &str) -> String {
    config.replacen("grants.http =", &format!("grants.routes = {{ {routes} }}\ngrants.http ="), 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_answers_carry_routes_rsa_members_and_passthrough_targets() -> anyhow::Result<()> {
    let names =
        ["default.test", "routed.example.test", "pooled.example.test", "plain.example.test", "dual.example.test"];
    let pki = Pki::new(&names)?;
    let api = start_api(pki.certs()).await?;
    let (listener, routed, pooled) = (
        Named::start("listener", None).await?,
        Named::start("routed", None).await?,
        Named::start("pooled", None).await?,
    );
    let pass_ca = tern_fixtures::TestCa::new("passthrough CA")?;
    let passthrough = Named::start("passthrough", Some(server_tls(&pass_ca, &["pass.example.test"])?)).await?;
    let origin = format!("http://127.0.0.1:{}", routed.addr.port());
    api_answer(
        &pki,
        "routed.example.test",
        &answer_with(&pki, "routed.example.test", json!({ "route": { "origin": origin } }))?,
    )?;
    api_answer(
        &pki,
        "pooled.example.test",
        &answer_with(&pki, "pooled.example.test", json!({ "route": { "pool": "blue" }, "ttl": 60 }))?,
    )?;
    // `plain.example.test` keeps today's answer: chain, key, ttl and nothing else.
    let (rsa_chain, rsa_key) = pki.ca.issue_with_key(&["dual.example.test"], &rsa_key().await?)?;
    let dual = json!({ "rsa_chain": rsa_chain, "rsa_key": rsa_key, "route": null });
    api_answer(&pki, "dual.example.test", &answer_with(&pki, "dual.example.test", dual)?)?;
    api_answer(&pki, "pass.example.test", &json!({ "passthrough": passthrough.addr.to_string() }))?;

    let config = api_config(&pki, listener.addr, api.addr, &api.addr.to_string(), "");
    let routes = format!("origins = [\"{origin}\"], pools = [\"blue\"], passthrough = [\"{}\"]", passthrough.addr);
    let config = with_route_grants(config, &routes)
        + &format!("\n[[upstream]]\nname = \"blue\"\nservers = [\"{}\"]\n", pooled.addr);
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let routes = [
        ("routed.example.test", "routed routed.example.test"),
        ("pooled.example.test", "pooled pooled.example.test"),
        ("plain.example.test", "listener plain.example.test"),
        ("dual.example.test", "listener dual.example.test"),
    ];
    assert_routes_and_rsa_member(server.addr, &pki, &routes, "dual.example.test", &rsa_chain).await?;
    assert_passed_through(server.addr, &pass_ca, "pass.example.test").await?;
    assert_eq!(server.plugin_stats().count(Outcome::Found), 5, "one call per name, routes cached with the answers");
    assert_eq!(api.requests.load(Ordering::SeqCst), 5);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_api_answers_fail_the_handshake_with_a_message_naming_the_field() -> anyhow::Result<()> {
    let pki = Pki::new(&["default.test", "a.example.test"])?;
    let api = start_api(pki.certs()).await?;
    let cases = [
        (
            "kind.example.test",
            json!({ "route": { "teleport": "127.0.0.1:1" } }),
            "field route: unknown kind \"teleport\"",
        ),
        (
            "text.example.test",
            json!({ "route": "pool blue" }),
            "field route: expected {\"pool\": NAME} or {\"origin\": URL}, got a string",
        ),
        (
            "two.example.test",
            json!({ "route": { "pool": "blue", "origin": "http://127.0.0.1:1" } }),
            concat!(
                "field route: expected {\"pool\": NAME} or {\"origin\": URL}, ",
                "got an object with the keys [\"origin\", \"pool\"]"
            ),
        ),
        ("number.example.test", json!({ "route": { "pool": 7 } }), "field route.pool: expected a string, got a number"),
        ("pass.example.test", json!({ "passthrough": 443 }), "field passthrough: expected a string, got a number"),
        (
            "both.example.test",
            json!({ "passthrough": "127.0.0.1:1", "route": { "pool": "blue" } }),
            "fields route and passthrough exclude each other",
        ),
        ("half.example.test", json!({ "rsa_chain": "PEM" }), "field rsa_chain without rsa_key"),
        ("ttl.example.test", json!({ "ttl": -1 }), "field ttl: expected whole seconds, got -1"),
    ];
    for (name, extra, _) in &cases {
        pki.issue_as(name, &[name])?;
        api_answer(&pki, name, &answer_with(&pki, name, extra.clone())?)?;
    }
    api_answer(&pki, "nochain.example.test", &json!({ "key": "PEM" }))?;
    let config = api_config(&pki, spawn_echo_backend().await?, api.addr, &api.addr.to_string(), ", wildcard = false");
    // Granted, so that a refusal can only be the plugin's.
    let config = with_route_grants(config, "passthrough = [\"127.0.0.1:1\"]");
    let server = TestServer::start(&config, pki.dir.path()).await?;
    let plugin = server.plugins[0].1.current();
    let expected = cases.iter().map(|(name, _, want)| (*name, *want));
    for (name, want) in expected.chain([("nochain.example.test", "field chain is missing")]) {
        let err = connect(server.addr, &pki.client(&[]), name).await.expect_err("a malformed answer is refused");
        assert_eq!(alert_of(&err), Some(REFUSED), "{name}: {err}");
        let servername = tern::sni::ServerName::parse(name).map_err(|e| anyhow::anyhow!("{e}"))?;
        match plugin.select(&servername, "main").await {
            Err(tern::plugin::PluginError::Returned(message)) => {
                assert!(message.contains(&format!("/v1/certs/{name}: {want}")), "{name}: {message}")
            }
            other => panic!("{name}: expected the plugin's error, got {other:?}"),
        }
    }
    assert_eq!(server.plugin_stats().count(Outcome::Found), 0);
    // The well-formed name next to them is served.
    connect(server.addr, &pki.client(&[]), "a.example.test").await?;
    Ok(())
}
