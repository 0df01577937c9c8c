//! The reverse proxy behind the TLS handshake: HTTP/1.1 or HTTP/2 (by ALPN) from clients, HTTP/1.1 over a pooled
//! client to the backend. Bodies stream both ways; nothing is buffered whole.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::ProxySettings;
use crate::metrics::{Metrics, inc};

/// Response body type: the backend's streamed body, or a small one tern makes itself.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// One listener's proxy to its backend.
#[derive(Debug, Clone)]
pub struct Proxy {
    client: Client<HttpConnector, Incoming>,
    backend: Uri,
    response_timeout: std::time::Duration,
    metrics: Arc<Metrics>,
}

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1); never forwarded as they are.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

impl Proxy {
    /// A proxy to `backend` (an `http://host:port` origin).
    pub fn new(backend: Uri, settings: &ProxySettings, metrics: Arc<Metrics>) -> Self {
        let mut connector = HttpConnector::new();
        // A backend that is down must give a fast 502, not hang the client.
        connector.set_connect_timeout(Some(settings.connect_timeout));
        connector.set_nodelay(true);
        let client =
            Client::builder(TokioExecutor::new()).pool_idle_timeout(settings.pool_idle_timeout).build(connector);
        Self { client, backend, response_timeout: settings.response_timeout, metrics }
    }

    /// Serves HTTP on an accepted TLS stream until the client closes it, or, once `drain` turns true, until the
    /// requests in flight are answered (graceful shutdown).
    pub async fn serve<S>(
        self: Arc<Self>,
        stream: S,
        peer: SocketAddr,
        h2: bool,
        mut drain: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), hyper::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = TokioIo::new(stream);
        let service = hyper::service::service_fn(move |req| {
            let proxy = self.clone();
            async move { Ok::<_, Infallible>(proxy.forward(req, peer).await) }
        });
        // hyper's HTTP/1 and HTTP/2 connections share no trait for graceful_shutdown, hence the macro.
        macro_rules! until_drained {
            ($conn:expr) => {{
                let mut conn = std::pin::pin!($conn);
                tokio::select! {
                    done = conn.as_mut() => return done,
                    _ = drain.wait_for(|draining| *draining) => conn.as_mut().graceful_shutdown(),
                }
                conn.await
            }};
        }
        if h2 {
            until_drained!(hyper::server::conn::http2::Builder::new(TokioExecutor::new()).serve_connection(io, service))
        } else {
            until_drained!(hyper::server::conn::http1::Builder::new().serve_connection(io, service).with_upgrades())
        }
    }

    /// Forwards one request and writes its access-log line.
    async fn forward(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let started = std::time::Instant::now();
        let method = req.method().clone();
        let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned);
        let host = host.or_else(|| req.uri().authority().map(|a| a.to_string())).unwrap_or_default();
        let path = req.uri().path_and_query().map_or_else(|| "/".to_string(), |pq| pq.to_string());
        let version = req.version();
        let response = self.forward_inner(req, peer).await;
        let status = response.status().as_u16();
        tracing::info!(
            target: "tern::access",
            %peer, %method, host, path, ?version, status, micros = started.elapsed().as_micros() as u64,
            "request"
        );
        response
    }

    /// Forwards one request; failures become 502/504 responses.
    async fn forward_inner(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let upstream = match self.upstream_request(req, peer, upgrade.is_some()) {
            Ok(upstream) => upstream,
            Err(status) => return simple(status, "bad request\n"),
        };
        let sent_at = std::time::Instant::now();
        let sent = tokio::time::timeout(self.response_timeout, self.client.request(upstream)).await;
        let mut response = match sent {
            Ok(Ok(response)) => response,
            Ok(Err(err)) => {
                inc(&self.metrics.backend_status[0]);
                tracing::warn!(backend = %self.backend, error = %err, "backend unreachable");
                return simple(StatusCode::BAD_GATEWAY, "bad gateway\n");
            }
            Err(_) => {
                inc(&self.metrics.backend_status[0]);
                tracing::warn!(backend = %self.backend, timeout = ?self.response_timeout, "backend did not answer");
                return simple(StatusCode::GATEWAY_TIMEOUT, "gateway timeout\n");
            }
        };
        self.metrics.backend_latency.observe(sent_at.elapsed());
        let class = usize::from(response.status().as_u16() / 100).min(5);
        inc(&self.metrics.backend_status[class]);
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_side) = upgrade
        {
            let backend_side = hyper::upgrade::on(&mut response);
            tokio::spawn(splice_upgraded(client_side, backend_side));
            let (parts, _) = response.into_parts();
            return Response::from_parts(parts, empty());
        }
        strip_hop_by_hop(response.headers_mut(), false);
        response.map(BodyExt::boxed)
    }

    fn upstream_request(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        upgrade: bool,
    ) -> Result<Request<Incoming>, StatusCode> {
        let (mut parts, body) = req.into_parts();
        // HTTP/2 carries the host in :authority; HTTP/1.1 in the Host header.
        let host = parts
            .headers
            .get(header::HOST)
            .cloned()
            .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()))
            .ok_or(StatusCode::BAD_REQUEST)?;
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let mut uri = self.backend.clone().into_parts();
        uri.path_and_query = Some(path.parse().map_err(|_| StatusCode::BAD_REQUEST)?);
        parts.uri = Uri::from_parts(uri).map_err(|_| StatusCode::BAD_REQUEST)?;
        parts.version = Version::HTTP_11;

        let headers = &mut parts.headers;
        strip_hop_by_hop(headers, upgrade);
        headers.insert(header::HOST, host.clone());
        headers.insert(X_FORWARDED_HOST, host);
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        let client_ip = peer.ip().to_string();
        let forwarded_for = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(earlier) => format!("{earlier}, {client_ip}"),
            None => client_ip,
        };
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_str(&forwarded_for).map_err(|_| StatusCode::BAD_REQUEST)?);
        if upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        Ok(Request::from_parts(parts, body))
    }
}

/// Whether an HTTP/1.1 request asks to switch protocols (e.g. WebSocket).
fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// Removes hop-by-hop headers, including those the Connection header names. `Upgrade` survives only on an
/// upgrade request.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        if keep_upgrade && name == header::UPGRADE {
            continue;
        }
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
}

/// Copies bytes both ways between an upgraded client connection and the backend's.
async fn splice_upgraded(client: hyper::upgrade::OnUpgrade, backend: hyper::upgrade::OnUpgrade) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::debug!(error = %err, "upgrade did not complete");
            return;
        }
    };
    let (mut client, mut backend) = (TokioIo::new(client), TokioIo::new(backend));
    if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut backend).await {
        tracing::debug!(error = %err, "upgraded connection closed");
    }
}

fn simple(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())).map_err(|e| match e {}).boxed());
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

fn empty() -> Body {
    Full::new(Bytes::new()).map_err(|e| match e {}).boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("keep-alive, x-secret-hop"));
        headers.insert("x-secret-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut headers, false);
        let left: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-kept"]);
    }

    #[test]
    fn upgrade_survives_on_upgrade_requests() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers.get(header::UPGRADE).unwrap(), "websocket");
        assert!(headers.get(header::CONNECTION).is_none());
    }
}
