//! The HTTP-API plugin: `GET <url_template with {name}>` through `wasi:http` (grant the API's `host:port` in
//! the plugin's `grants.http.allow`). The API answers `200` with JSON `{"chain": PEM, "key": PEM, "ttl": seconds}`
//! (`ttl` optional), or `404` for names it does not know.
//!
//! Settings:
//! - `url_template` (required): e.g. `https://certs.internal:8443/v1/certs/{name}`.
//! - `auth_header`, `auth_value` (optional): a header sent with every request, e.g. `authorization` and
//!   `Bearer ...`; give the value as `{ env = "VARIABLE" }` in the config so it lives in neither the file nor
//!   any log.
//! - `wildcard`: `true` (default) to ask for `*.<parent>` after a 404 for the exact name.

use std::time::Duration;
use tern_guest::{Certificate, Selection, Selector, config, exact_or_wildcard};
use wasi::http::types::{Fields, IncomingBody, Method, OutgoingRequest, Scheme};
use wasi::io::streams::StreamError;

struct HttpApi;

impl Selector for HttpApi {
    fn select(servername: &str) -> Result<Selection, String> {
        let template = config::get("url_template").ok_or("setting url_template is required")?;
        exact_or_wildcard(servername, config::get_or("wildcard", "true") == "true", |name| fetch(&template, name))
    }
}

tern_guest::export_selector!(HttpApi);

#[derive(serde::Deserialize)]
struct Answer {
    chain: String,
    key: String,
    ttl: Option<u64>,
}

fn fetch(template: &str, name: &str) -> Result<Option<Certificate>, String> {
    let url = template.replace("{name}", name);
    let (status, body) = get(&url)?;
    match status {
        200 => {
            let answer: Answer =
                serde_json::from_slice(&body).map_err(|e| format!("{url}: answer is not the expected JSON: {e}"))?;
            let cert = Certificate::new(answer.chain, answer.key);
            Ok(Some(match answer.ttl {
                Some(seconds) => cert.with_ttl(Duration::from_secs(seconds)),
                None => cert,
            }))
        }
        // 404/410: the API has no certificate for the name; 414: the name makes the URL longer than the API takes,
        // so it cannot have one either (any client can send such a name: not an error of the plugin).
        404 | 410 | 414 => Ok(None),
        other => Err(format!("{url}: HTTP status {other}")),
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
