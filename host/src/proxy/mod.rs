//! The reverse proxy behind the TLS handshake: HTTP/1.1 or HTTP/2 (by ALPN) from clients, forwarded along the
//! answer's route (the listener's backend, a pool, an origin: [`send`]) with the upstream headers of [`headers`].
//! Bodies stream both ways; nothing is buffered whole.
//!
//! Every resource a client can hold here is bounded: the connection by its [`watchdog`](crate::watchdog)
//! (request head, keep-alive, send stalls), HTTP/2 by its stream and header-list caps, the upload by its idle
//! timeout, the backend side by the connection budget ([`crate::backend`]), an upgraded connection by its idle
//! timeout and by the client connection slot it keeps until it closes.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::counters::Key as _;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::answer::Served;
use crate::backend::Budget;
use crate::body::Counted;
use crate::config::{ClientLimits, ProxySettings};
use crate::metrics::{Metrics, inc};
use crate::route::Route;
use crate::sni::ServerName;
use crate::upstream::{HttpClient, Upstreams};
use crate::watchdog::{Activity, Tracked};

pub mod access;
mod headers;
mod send;

use headers::strip_hop_by_hop;
use send::{Failed, Sent, with_base};

/// Response body type: the backend's streamed body, or a small one tern makes itself.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// One listener's proxy: to its backend, or to the pool or origin a plugin routed the name to.
#[derive(Debug, Clone)]
pub struct Proxy {
    client: HttpClient,
    backend: Uri,
    /// With `listener.backend_proxy_protocol`: how each client connection's own client to `backend` is made.
    backend_private: Option<crate::upstream::Recipe>,
    /// Without it: `backend`'s connections driven by their requests (all but upgrades go this way).
    direct: Option<Arc<crate::upstream::Direct>>,
    upstreams: Arc<Upstreams>,
    response_timeout: std::time::Duration,
    connect_timeout: std::time::Duration,
    metrics: Arc<Metrics>,
}

/// What the proxy knows about one client connection.
#[derive(Debug, Clone)]
pub struct Connection {
    /// The client's address.
    pub peer: SocketAddr,
    /// The address the client connected to (tern's side of the connection), if the socket could tell.
    pub local: Option<SocketAddr>,
    /// Upstream connections that carry this connection's PROXY protocol header, and only its requests.
    pub private: crate::upstream::Private,
    /// Whether ALPN chose HTTP/2.
    pub h2: bool,
    /// The SNI the handshake was for (normalised), if the client sent one.
    pub servername: Option<ServerName>,
    /// The certificates and route of the answer: a request may name any host one of them covers.
    pub served: Arc<Served>,
    /// The listener's client limits.
    pub limits: ClientLimits,
    /// What the handshake negotiated (for the access log and the JA4 header).
    pub tls: access::HandshakeFacts,
    /// The request header carrying the client's JA4 fingerprint upstream (`listener.ja4_header`), if any.
    pub ja4_header: Option<http::HeaderName>,
}

/// How long an HTTP/2 connection told to go away (idle, draining) gets to finish before it is dropped.
const GOAWAY_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

impl Proxy {
    /// A proxy to `backend` (an `http://host:port` origin) whose connections count against `budget` (and start
    /// with a PROXY protocol header if `backend_proxy_protocol` says so), and to the routes of `upstreams`.
    pub fn new(
        backend: Uri,
        settings: &ProxySettings,
        metrics: Arc<Metrics>,
        budget: Budget,
        upstreams: Arc<Upstreams>,
        backend_proxy_protocol: Option<crate::config::SendProxyProtocol>,
    ) -> Self {
        let versions = crate::upstream::Versions::Http1;
        let recipe = crate::upstream::Recipe::new(
            settings,
            settings.connect_timeout,
            budget,
            crate::upstream::no_tls(),
            versions,
        );
        let direct = backend_proxy_protocol.is_none().then(|| recipe.direct(backend.clone()));
        Self {
            client: recipe.shared(None),
            direct,
            backend_private: backend_proxy_protocol.map(|_| recipe),
            backend,
            upstreams,
            response_timeout: settings.response_timeout,
            connect_timeout: settings.connect_timeout,
            metrics,
        }
    }

    /// Serves HTTP on an accepted TLS stream until the client closes it, a deadline of the connection passes, or,
    /// once `drain` turns true, until the requests in flight are answered (graceful shutdown). Upgraded
    /// connections started on it are waited for too, so the client's connection slot stays taken until they end.
    pub async fn serve<S>(
        self: Arc<Self>,
        stream: S,
        conn: Connection,
        mut drain: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), hyper::Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Activity::new(conn.limits.clone(), conn.h2);
        let io = TokioIo::new(Tracked::new(stream, activity.clone()));
        let tunnels = Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
        let conn = Arc::new(conn);
        let metrics = self.metrics.clone();
        let service = {
            let (activity, tunnels, conn) = (activity.clone(), tunnels.clone(), conn.clone());
            hyper::service::service_fn(move |req| {
                let (proxy, conn, tunnels) = (self.clone(), conn.clone(), tunnels.clone());
                let in_flight = activity.begin();
                async move {
                    let response = proxy.forward(req, &conn, &tunnels).await;
                    Ok::<_, std::convert::Infallible>(response.map(|body| Counted::new(body, Some(in_flight))))
                }
            })
        };
        let limits = &conn.limits;
        // hyper's HTTP/1 and HTTP/2 connections share no trait for graceful_shutdown, hence the macro.
        macro_rules! until_done {
            ($conn:expr) => {{
                enum Ended<T> {
                    Done(T),
                    Drain,
                    Expired(crate::watchdog::Expired),
                }
                let mut served = std::pin::pin!($conn);
                let ended = tokio::select! {
                    done = served.as_mut() => Ended::Done(done),
                    _ = drain.wait_for(|draining| *draining) => Ended::Drain,
                    why = activity.expired() => Ended::Expired(why),
                };
                match ended {
                    Ended::Done(done) => done,
                    Ended::Drain => {
                        // A connection that has not carried a request yet gets its first one (within the request
                        // head timeout): its client would not send it again, as it would on a reused connection.
                        let first = tokio::time::timeout(limits.request_head_timeout, activity.first_request());
                        let finished = tokio::select! {
                            done = served.as_mut() => Some(done),
                            _ = first => None,
                        };
                        match finished {
                            Some(done) => done,
                            None => {
                                served.as_mut().graceful_shutdown();
                                served.await
                            }
                        }
                    }
                    Ended::Expired(why) => {
                        inc(metrics.connections_timed_out.by(why));
                        tracing::debug!(peer = %conn.peer, reason = why.label(), "closing client connection");
                        if why == crate::watchdog::Expired::Idle && conn.h2 {
                            // Tell an idle HTTP/2 client to go away rather than cutting it off.
                            served.as_mut().graceful_shutdown();
                            let _ = tokio::time::timeout(GOAWAY_GRACE, served.as_mut()).await;
                        }
                        Ok(())
                    }
                }
            }};
        }
        let result = if conn.h2 {
            until_done!(h2_builder(limits).serve_connection(io, service))
        } else {
            until_done!(h1_builder(limits).serve_connection(io, service).with_upgrades())
        };
        // Upgraded connections keep the client's slot (the caller's permit) until they end.
        let mut pending = std::mem::take(&mut *lock(&tunnels));
        while pending.join_next().await.is_some() {}
        result
    }

    /// Forwards one request; with the access log on, its line is written once the response body has ended.
    async fn forward(&self, req: Request<Incoming>, conn: &Arc<Connection>, tunnels: &Tunnels) -> Response<Body> {
        let log = access::get();
        let request = log.map(|_| access::RequestFacts::of(&req));
        let mut trace = access::Trace::new();
        let response = self.forward_inner(req, conn, tunnels, &mut trace).await;
        match (log, request) {
            (Some(log), Some(request)) => {
                log.follow(response, conn.clone(), request, trace, &self.backend, self.metrics.clone())
            }
            _ => response,
        }
    }

    /// Forwards one request along the connection's route; failures become 4xx/5xx responses.
    async fn forward_inner(
        &self,
        mut req: Request<Incoming>,
        conn: &Connection,
        tunnels: &Tunnels,
        trace: &mut access::Trace,
    ) -> Response<Body> {
        if let Err(status) = check_authority(&req, conn) {
            inc(&self.metrics.misdirected_requests);
            return simple(status, "misdirected request: this connection does not serve that host\n");
        }
        let upgrade = wants_upgrade(&req).then(|| hyper::upgrade::on(&mut req));
        let (upstream, upload) = match self.upstream_request(req, conn, upgrade.is_some()) {
            Ok(upstream) => upstream,
            Err(status) => return simple(status, "bad request\n"),
        };
        trace.uploaded = Some(upload.received.clone());
        let sent_at = std::time::Instant::now();
        let sent = match &conn.served.route {
            Route::Listener => {
                trace.sent = Sent::Listener;
                let private = self.private_backend(conn);
                let client = private.as_ref().unwrap_or(&self.client);
                let via = send::Via { direct: self.direct.as_ref(), client, base: &self.backend };
                self.send_via(via, (upstream, upgrade.is_some()), upload, self.response_timeout).await
            }
            Route::Origin(origin) => match self.upstreams.origin_client(origin).await {
                Ok(client) => {
                    trace.sent = Sent::Origin(origin.clone());
                    let upstream = with_base(upstream, &origin.base);
                    let sent = self.exchange(&client, upstream, upload, self.response_timeout).await;
                    sent.map(|response| response.map(BodyExt::boxed))
                }
                Err(why) => {
                    tracing::warn!(origin = %origin, error = %why, "no TLS trust for the origin");
                    Err(Failed::Other(why))
                }
            },
            Route::Pool(name) => match self.upstreams.pool(name) {
                Some(pool) => {
                    let upstream = (upstream, upgrade.is_some());
                    self.via_pool(pool, conn, upstream, upload, &mut trace.sent).await
                }
                None => Err(Failed::NoServer),
            },
        };
        let mut response = match sent {
            Ok(response) => response,
            Err(failed) => return self.refuse(failed, &conn.served.route),
        };
        trace.upstream = Some(sent_at.elapsed());
        self.metrics.backend_latency.observe(sent_at.elapsed());
        let class = usize::from(response.status().as_u16() / 100).min(5);
        inc(&self.metrics.backend_status[class]);
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_side) = upgrade
        {
            let backend_side = hyper::upgrade::on(&mut response);
            let idle = conn.limits.tunnel_idle_timeout;
            lock(tunnels).spawn(splice_upgraded(client_side, backend_side, idle));
            let (parts, _) = response.into_parts();
            return Response::from_parts(parts, empty());
        }
        strip_hop_by_hop(response.headers_mut(), false);
        response
    }
}

type Tunnels = std::sync::Mutex<tokio::task::JoinSet<()>>;

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A JoinSet stays consistent across a panic elsewhere: recover the lock.
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The request's host (Host header, and the URI's authority in absolute form or HTTP/2) must be the connection's
/// server name or a name its certificate covers; anything else is another tenant's host reached over this
/// tenant's connection, answered 421 so that the client opens a connection for that name (RFC 9110 §15.5.20).
fn check_authority(req: &Request<Incoming>, conn: &Connection) -> Result<(), StatusCode> {
    let header =
        req.headers().get(header::HOST).map(|h| h.to_str().map_err(|_| StatusCode::BAD_REQUEST)).transpose()?;
    let uri = req.uri().authority().map(|a| a.host());
    if header.is_none() && uri.is_none() {
        return Ok(()); // upstream_request answers 400
    }
    for authority in header.into_iter().chain(uri) {
        let host = host_of(authority);
        let host = host.strip_suffix('.').unwrap_or(host);
        if conn.servername.as_ref().is_some_and(|sni| sni.as_str().eq_ignore_ascii_case(host)) {
            continue;
        }
        match ServerName::parse(host) {
            Ok(name) if conn.served.covers(&name) => {}
            _ => return Err(StatusCode::MISDIRECTED_REQUEST),
        }
    }
    Ok(())
}

/// The host part of `host[:port]`, IPv6 literals included.
fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    authority
        .rsplit_once(':')
        .map_or(authority, |(host, port)| if port.bytes().all(|b| b.is_ascii_digit()) { host } else { authority })
}

/// Whether an HTTP/1.1 request asks to switch protocols (e.g. WebSocket). `h2c` is never granted: tern speaks
/// HTTP/1.1 to backends, and a cleartext HTTP/2 upgrade inside TLS is a request-smuggling vector; such a request
/// is forwarded as a plain request without its upgrade headers.
fn wants_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req
            .headers()
            .get_all(header::UPGRADE)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| !v.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c"))))
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
}

/// Copies bytes both ways between an upgraded client connection and the backend's, until either closes or nothing
/// moves for `idle`.
async fn splice_upgraded(
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    idle: std::time::Duration,
) {
    let (client, backend) = match tokio::try_join!(client, backend) {
        Ok(pair) => pair,
        Err(err) => {
            tracing::debug!(error = %err, "upgrade did not complete");
            return;
        }
    };
    let (client, backend) = (TokioIo::new(client), TokioIo::new(backend));
    if let Err(err) = crate::watchdog::splice_with_idle_timeout(client, backend, idle).await {
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

/// hyper's HTTP/2 server with the connection's stream, header and keep-alive limits.
fn h2_builder(limits: &crate::config::ClientLimits) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(limits.max_request_header_bytes)
        .keep_alive_interval(limits.h2_keepalive_interval)
        .keep_alive_timeout(limits.h2_keepalive_timeout);
    builder
}

/// hyper's HTTP/1.1 server with the connection's header limit. The watchdog bounds head reading; hyper's own
/// timer would also cut keep-alive pauses at the head timeout.
fn h1_builder(limits: &crate::config::ClientLimits) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(usize::try_from(limits.max_request_header_bytes).unwrap_or(usize::MAX).max(8192));
    builder
}
