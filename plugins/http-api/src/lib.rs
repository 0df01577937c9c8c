//! The HTTP-API plugin: `GET <url_template with {name}>` through `wasi:http` (grant the API's `host:port` in
//! the plugin's `grants.http.allow`). The API answers `200` with a JSON object, or `404` (also `410`, and `414`
//! for a name too long for its URLs) for names it does not know. Any other status fails the handshake.
//!
//! The JSON object's fields (any other field is ignored):
//! - `chain`, `key` (strings, required unless `passthrough` is given): PEM certificate chain (leaf first) and
//!   private key.
//! - `ttl` (whole seconds, optional): the cache hint of the answer.
//! - `rsa_chain`, `rsa_key` (strings, optional, both or neither): a second certificate for the name, served to
//!   clients that cannot use the first one's key type (the first is usually ECDSA).
//! - `route` (optional): where the name's traffic goes, `{"pool": "NAME"}` (an `[[upstream]]`) or
//!   `{"origin": "http://host:port"}` (or `https://`). Absent or `null`: the listener's backend.
//! - `passthrough` (string `"host:port"`, optional): forward the connection untouched to this TCP target instead
//!   of terminating TLS; `chain`, `key`, `rsa_chain` and `rsa_key` are then not needed (and ignored), and `route`
//!   must be absent.
//!
//! So `{"chain": PEM, "key": PEM, "ttl": 300}` is a complete answer, as it always was. The host checks every
//! route and passthrough target against the plugin's `grants.routes`. A field of the wrong type or an unknown
//! route kind is an error naming the field.
//!
//! Settings:
//! - `url_template` (required): e.g. `https://certs.internal:8443/v1/certs/{name}`.
//! - `auth_header`, `auth_value` (optional): a header sent with every request, e.g. `authorization` and
//!   `Bearer ...`; give the value as `{ env = "VARIABLE" }` in the config so it lives in neither the file nor
//!   any log.
//! - `wildcard`: `true` (default) to ask for `*.<parent>` after a 404 for the exact name.

use serde_json::{Map, Value};
use std::time::Duration;
use tern_guest::{Answer, Certificate, Hello, Plugin, Route, Served, config, log, wildcard_of};
use wasi::http::types::{Fields, IncomingBody, Method, OutgoingRequest, Scheme};
use wasi::io::streams::StreamError;

struct HttpApi;

impl Plugin for HttpApi {
    fn select(hello: &Hello) -> Result<Answer, String> {
        let template = config::get("url_template").ok_or("setting url_template is required")?;
        let wildcard = (config::get_or("wildcard", "true") == "true").then(|| wildcard_of(&hello.servername));
        for name in std::iter::once(hello.servername.clone()).chain(wildcard.flatten()) {
            if let Some(answer) = fetch(&template, &name)? {
                if name != hello.servername {
                    log::debug(&format!("serving wildcard {name}"));
                }
                return Ok(answer);
            }
        }
        Ok(Answer::NotFound)
    }
}

tern_guest::export_plugin!(HttpApi);

fn fetch(template: &str, name: &str) -> Result<Option<Answer>, String> {
    let url = template.replace("{name}", name);
    let (status, body) = get(&url)?;
    match status {
        200 => parse_answer(&body).map(Some).map_err(|why| format!("{url}: {why}")),
        // 404/410: the API has no certificate for the name; 414: the name makes the URL longer than the API takes,
        // so it cannot have one either (any client can send such a name: not an error of the plugin).
        404 | 410 | 414 => Ok(None),
        other => Err(format!("{url}: HTTP status {other}")),
    }
}

/// The answer a 200 body makes.
fn parse_answer(body: &[u8]) -> Result<Answer, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("answer is not the expected JSON: {e}"))?;
    let Value::Object(fields) = value else {
        return Err(format!("answer is not the expected JSON: {}, not an object", kind(&value)));
    };
    let ttl = match present(&fields, "ttl") {
        None => None,
        Some(value) => Some(Duration::from_secs(
            value.as_u64().ok_or_else(|| format!("field ttl: expected whole seconds, got {}", shown(value)))?,
        )),
    };
    let route = present(&fields, "route").map(parse_route).transpose()?;
    if let Some(target) = string(&fields, "passthrough")? {
        if route.is_some() {
            return Err("fields route and passthrough exclude each other: give one".into());
        }
        return Ok(Answer::Passthrough { target: target.to_string(), ttl });
    }
    let required = |field: &str| {
        string(&fields, field)?.ok_or_else(|| format!("field {field} is missing (and there is no passthrough)"))
    };
    let mut served = Served::one(Certificate::new(required("chain")?, required("key")?));
    match (string(&fields, "rsa_chain")?, string(&fields, "rsa_key")?) {
        (Some(chain), Some(key)) => served = served.and(Certificate::new(chain, key)),
        (None, None) => {}
        (Some(_), None) => return Err("field rsa_chain without rsa_key".into()),
        (None, Some(_)) => return Err("field rsa_key without rsa_chain".into()),
    }
    served.route = route;
    served.ttl = ttl;
    Ok(Answer::Serve(served))
}

/// `{"pool": NAME}` or `{"origin": URL}`.
fn parse_route(value: &Value) -> Result<Route, String> {
    const EXPECTED: &str = r#"expected {"pool": NAME} or {"origin": URL}"#;
    let Value::Object(route) = value else { return Err(format!("field route: {EXPECTED}, got {}", kind(value))) };
    let mut entries = route.iter();
    let (Some((kind_name, target)), None) = (entries.next(), entries.next()) else {
        let keys: Vec<&String> = route.keys().collect();
        return Err(format!("field route: {EXPECTED}, got an object with the keys {keys:?}"));
    };
    let Value::String(target) = target else {
        return Err(format!("field route.{kind_name}: expected a string, got {}", kind(target)));
    };
    match kind_name.as_str() {
        "pool" => Ok(Route::Pool(target.clone())),
        "origin" => Ok(Route::Origin(target.clone())),
        other => Err(format!("field route: unknown kind {other:?}, {EXPECTED}")),
    }
}

/// The field's value, `None` if it is absent or `null`.
fn present<'a>(fields: &'a Map<String, Value>, field: &str) -> Option<&'a Value> {
    fields.get(field).filter(|value| !value.is_null())
}

/// A string field, `None` if it is absent or `null`.
fn string<'a>(fields: &'a Map<String, Value>, field: &str) -> Result<Option<&'a str>, String> {
    match present(fields, field) {
        None => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(other) => Err(format!("field {field}: expected a string, got {}", kind(other))),
    }
}

/// The JSON type of a value, for messages (never the value: it may be key material).
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A number as written, anything else by its type.
fn shown(value: &Value) -> String {
    match value {
        Value::Number(n) => n.to_string(),
        other => kind(other).to_string(),
    }
}

/// A blocking GET; returns status and body.
fn get(url: &str) -> Result<(u16, Vec<u8>), String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("{url:?}: not an absolute URL"))?;
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => return Err(format!("{url:?}: unsupported scheme {other}")),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let headers = Fields::new();
    if let (Some(name), Some(value)) = (config::get("auth_header"), config::get("auth_value")) {
        headers.append(&name, &value.into_bytes()).map_err(|e| format!("auth header: {e:?}"))?;
    }
    let request = OutgoingRequest::new(headers);
    let invalid = |what: &str| format!("{url:?}: invalid {what}");
    request.set_method(&Method::Get).map_err(|()| invalid("method"))?;
    request.set_scheme(Some(&scheme)).map_err(|()| invalid("scheme"))?;
    request.set_authority(Some(authority)).map_err(|()| invalid("authority"))?;
    request.set_path_with_query(Some(path)).map_err(|()| invalid("path"))?;

    let pending = wasi::http::outgoing_handler::handle(request, None).map_err(|e| format!("{url}: {e:?}"))?;
    pending.subscribe().block();
    let response = pending
        .get()
        .ok_or_else(|| format!("{url}: no response"))?
        .map_err(|()| format!("{url}: response already taken"))?
        .map_err(|e| format!("{url}: {e:?}"))?;
    let status = response.status();
    let body = response.consume().map_err(|()| format!("{url}: body already taken"))?;
    let stream = body.stream().map_err(|()| format!("{url}: body stream already taken"))?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(format!("{url}: reading body: {}", e.to_debug_string()));
            }
        }
    }
    drop(stream);
    IncomingBody::finish(body);
    Ok((status, bytes))
}
