//! `[[http_listener]]`: plain HTTP on port 80. It answers ACME HTTP-01 validation requests
//! (`/.well-known/acme-challenge/<token>`, from the answers any node's order published) and redirects every other
//! request to the same host and path over HTTPS with `308 Permanent Redirect` (method and body kept).
//!
//! Bounds: `max_connections` connections at once (more wait in the kernel's accept queue); each must send its
//! request head within `server.request_head_timeout`, gets one response and is closed, and lives at most twice
//! that long whatever it does.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::acme::Acme;
use crate::config::HttpListenerSettings;
use crate::sni::ServerName;

/// What an HTTP listener's connections share.
#[derive(Debug)]
pub(crate) struct HttpListener {
    pub(crate) settings: HttpListenerSettings,
    pub(crate) tcp: TcpListener,
    pub(crate) acme: Option<Arc<Acme>>,
    pub(crate) head_timeout: std::time::Duration,
}

const CHALLENGE_PATH: &str = "/.well-known/acme-challenge/";

impl HttpListener {
    /// Accepts until the task is dropped.
    pub(crate) async fn serve(self: Arc<Self>) {
        let slots = Arc::new(tokio::sync::Semaphore::new(self.settings.max_connections));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let tcp = match self.tcp.accept().await {
                Ok((tcp, _)) => tcp,
                Err(err) => {
                    tracing::warn!(listener = %self.settings.name, error = %err, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = self.clone();
            tokio::spawn(async move {
                let head = this.head_timeout;
                let handler = this.clone();
                let service = hyper::service::service_fn(move |req| {
                    let handler = handler.clone();
                    async move { Ok::<_, Infallible>(handler.answer(req).await) }
                });
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(head)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(tcp), service);
                let _ = tokio::time::timeout(head * 2, connection).await;
                drop(permit);
            });
        }
    }

    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if let Some(token) = req.uri().path().strip_prefix(CHALLENGE_PATH) {
            let answer = match &self.acme {
                Some(acme) => acme.http_answer(token).await,
                None => None,
            };
            return match answer {
                Some(key_authorization) => reply(StatusCode::OK, key_authorization, None),
                None => reply(StatusCode::NOT_FOUND, "no such challenge\n".into(), None),
            };
        }
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).or(req.uri().host());
        // Only a valid host name goes into the Location header (no header injection, no open redirect to junk).
        let Some(host) = host.map(strip_port).and_then(|h| ServerName::parse(h).ok()) else {
            return reply(StatusCode::BAD_REQUEST, "a Host header naming a host is required\n".into(), None);
        };
        let port =
            if self.settings.https_port == 443 { String::new() } else { format!(":{}", self.settings.https_port) };
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let location = format!("https://{host}{port}{path}");
        reply(StatusCode::PERMANENT_REDIRECT, String::new(), Some(location))
    }
}

/// `host:port` → `host` (a bracketed IPv6 literal stays whole and is refused by the name check).
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

fn reply(status: StatusCode, body: String, location: Option<String>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
    headers.insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    if let Some(location) = location.and_then(|l| header::HeaderValue::try_from(l).ok()) {
        headers.insert(header::LOCATION, location);
    }
    response
}
