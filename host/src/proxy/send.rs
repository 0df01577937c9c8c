//! Sending a request upstream along the connection's route: one exchange with a deadline that starts when the
//! upload ends, a pool's choice of server with retries and passive health, the response tern makes when nothing
//! answered, what the access log says about where a request went, and which client carries a request on routes
//! that send PROXY protocol headers (the client connection's own, [`crate::upstream::Private`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::header::HeaderMap;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Either, Empty};
use hyper::body::Incoming;

use super::{Body, Connection, Proxy, simple};
use crate::body::UploadWatch;
use crate::metrics::inc;
use crate::route::Route;
use crate::upstream::proxy_header::ClientFacts;
use crate::upstream::{Direct, DirectBody, DirectError, Failure, HttpClient, Pool, Slot, UpBody};

impl Proxy {
    /// Sends one request through `client` and waits for the response head (see [`Proxy::deadline`]).
    pub(super) async fn exchange(
        &self,
        client: &HttpClient,
        upstream: Request<UpBody>,
        upload: UploadWatch,
        response_timeout: std::time::Duration,
    ) -> Result<Response<Incoming>, Failed> {
        let sent = async { client.request(upstream).await.map_err(|err| failed_of(&err, err.is_connect())) };
        self.deadline(sent, upload, response_timeout).await
    }

    /// [`Proxy::exchange`] over the listener backend's [`Direct`] connections.
    pub(super) async fn exchange_direct(
        &self,
        direct: &Arc<Direct>,
        upstream: Request<UpBody>,
        upload: UploadWatch,
        response_timeout: std::time::Duration,
    ) -> Result<Response<DirectBody>, Failed> {
        let sent = async {
            direct.request(upstream).await.map_err(|err| match err {
                DirectError::Connect(err) => failed_of(&*err, true),
                DirectError::Http(err) => failed_of(&err, false),
            })
        };
        self.deadline(sent, upload, response_timeout).await
    }

    /// Sends one request to one upstream: over its [`Direct`] connections, if it has them and the request does not
    /// `upgrade`; otherwise through `via.client`, the URI on `via.base`.
    pub(super) async fn send_via(
        &self,
        via: Via<'_>,
        (upstream, upgrade): (Request<UpBody>, bool),
        upload: UploadWatch,
        response_timeout: std::time::Duration,
    ) -> Result<Response<Body>, Failed> {
        match via.direct {
            // An upgrade needs hyper-util's connection task: the connection outlives the response.
            Some(direct) if !upgrade => {
                let sent = self.exchange_direct(direct, upstream, upload, response_timeout).await;
                sent.map(|response| response.map(BodyExt::boxed))
            }
            _ => {
                let upstream = with_base(upstream, via.base);
                let sent = self.exchange(via.client, upstream, upload, response_timeout).await;
                sent.map(|response| response.map(BodyExt::boxed))
            }
        }
    }

    /// Waits for `sent`, the response head. The response deadline starts once the client has finished uploading:
    /// a slow upload to a healthy backend is bounded by the body's own idle timeout, not by the backend's response
    /// timeout.
    async fn deadline<B>(
        &self,
        sent: impl Future<Output = Result<Response<B>, Failed>>,
        upload: UploadWatch,
        response_timeout: std::time::Duration,
    ) -> Result<Response<B>, Failed> {
        let mut sent = std::pin::pin!(sent);
        let answered = tokio::select! {
            answered = sent.as_mut() => Ok(answered),
            _ = upload.done => tokio::time::timeout(response_timeout, sent.as_mut()).await,
        };
        match answered {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(_)) if upload.timed_out.load(Ordering::Acquire) => Err(Failed::UploadTimeout),
            Ok(Err(failed)) => Err(failed),
            Err(_) => Err(Failed::Timeout(response_timeout)),
        }
    }

    /// Sends a request to a server of `pool`; a connect failure, or a connection that broke before the response
    /// head, moves a bodiless idempotent request on to another server, up to the pool's `retries`. Each outcome
    /// feeds the server's passive health. An `upgrade` goes through hyper-util's client, never [`Direct`].
    pub(super) async fn via_pool(
        &self,
        pool: &Pool,
        conn: &Connection,
        (upstream, upgrade): (Request<UpBody>, bool),
        upload: UploadWatch,
        chosen: &mut Sent,
    ) -> Result<Response<Body>, Failed> {
        let retry = retry_template(&upstream);
        let (mut next, mut upload) = (Some(upstream), Some(upload));
        let mut tried = Vec::with_capacity(2);
        // The last attempt's failure: what the client learns when no further server is left to try.
        let mut last = Failed::NoServer;
        loop {
            let Some(index) = pool.pick(&tried) else {
                return Err(last);
            };
            tried.push(index);
            let request = match (next.take(), &retry) {
                (Some(request), _) => request,
                (None, Some(template)) => template.rebuild(),
                (None, None) => return Err(Failed::NoServer),
            };
            let server = &pool.servers[index];
            *chosen = Sent::Pool(pool.name.clone(), server.address.clone());
            let watch = upload.take().unwrap_or_else(UploadWatch::finished);
            let in_flight = pool.start(index);
            let started = std::time::Instant::now();
            // With `proxy_protocol`, the client connection's own client to this server.
            let private = server.private.as_ref().map(|recipe| {
                conn.private.client(Slot::Server(pool.name.clone(), index), recipe, || client_facts(conn))
            });
            let client = private.as_ref().unwrap_or(&server.client);
            let via = Via { direct: server.direct.as_ref(), client, base: &server.base };
            let result = self.send_via(via, (request, upgrade), watch, pool.settings.response_timeout).await;
            drop(in_flight);
            let failure = match &result {
                Ok(_) => {
                    pool.succeeded(index, started.elapsed());
                    return result;
                }
                Err(Failed::Connect(_)) => Failure::Connect,
                Err(Failed::Other(_)) => Failure::Reset,
                Err(Failed::Timeout(_)) => Failure::Timeout,
                Err(Failed::Busy) => Failure::Busy,
                Err(Failed::UploadTimeout | Failed::NoServer) => return result,
            };
            pool.failed(index, failure);
            let retries_left = tried.len() <= pool.settings.retries as usize;
            // Nothing of the response has reached the client yet: an idempotent request without a body may go to
            // another server (nginx's `proxy_next_upstream error`). A timeout is not retried: the work may still
            // be running.
            let again = matches!(failure, Failure::Connect | Failure::Reset);
            if !again || retry.is_none() || !retries_left {
                return result;
            }
            if let Err(failed) = result {
                last = failed;
            }
            tracing::debug!(pool = %pool.name, server = %server.address, ?failure, "retrying on another server");
        }
    }

    /// With `listener.backend_proxy_protocol`, the client connection's own client to the listener's backend.
    pub(super) fn private_backend(&self, conn: &Connection) -> Option<HttpClient> {
        let recipe = self.backend_private.as_ref()?;
        Some(conn.private.client(Slot::Backend, recipe, || client_facts(conn)))
    }

    /// The response, counter and log line of a request that got no response head.
    pub(super) fn refuse(&self, failed: Failed, route: &Route) -> Response<Body> {
        if failed != Failed::UploadTimeout {
            inc(&self.metrics.backend_status[0]);
        }
        let backend = match route {
            Route::Listener => self.backend.to_string(),
            other => other.describe(),
        };
        match failed {
            Failed::UploadTimeout => {
                inc(&self.metrics.request_body_timeouts);
                simple(StatusCode::REQUEST_TIMEOUT, "request body timeout\n")
            }
            Failed::Busy => {
                inc(&self.metrics.backend_connections_exhausted);
                tracing::warn!(%backend, wait = ?self.connect_timeout, "backend connection limit reached");
                simple(StatusCode::SERVICE_UNAVAILABLE, "backend busy\n")
            }
            Failed::NoServer => {
                tracing::warn!(%backend, "no server of the pool is up");
                simple(StatusCode::SERVICE_UNAVAILABLE, "no backend server available\n")
            }
            Failed::Connect(error) | Failed::Other(error) => {
                tracing::warn!(%backend, %error, "backend unreachable");
                simple(StatusCode::BAD_GATEWAY, "bad gateway\n")
            }
            Failed::Timeout(timeout) => {
                tracing::warn!(%backend, ?timeout, "backend did not answer");
                simple(StatusCode::GATEWAY_TIMEOUT, "gateway timeout\n")
            }
        }
    }
}

/// What a client error means for the request: the budget spent, no connection, or a failure after connecting.
fn failed_of(err: &(dyn std::error::Error + 'static), connecting: bool) -> Failed {
    if crate::backend::is_exhausted(err) {
        Failed::Busy
    } else if connecting {
        Failed::Connect(err.to_string())
    } else {
        Failed::Other(err.to_string())
    }
}

/// One upstream's ways in: its [`Direct`] connections (cleartext HTTP/1.1 without PROXY protocol), the client
/// for everything else, and the base of its request URIs.
pub(super) struct Via<'a> {
    pub(super) direct: Option<&'a Arc<Direct>>,
    pub(super) client: &'a HttpClient,
    pub(super) base: &'a Uri,
}

/// Where a request was sent, for its access-log line.
#[derive(Debug)]
pub(super) enum Sent {
    /// Nowhere (refused by tern itself).
    Nowhere,
    /// The listener's backend.
    Listener,
    /// An origin.
    Origin(Arc<crate::route::Origin>),
    /// A pool's server (the last one tried).
    Pool(Arc<str>, String),
}

/// A [`Sent`] as the access log shows it, the listener's backend by its URL.
pub(super) struct SentTo<'a>(pub(super) &'a Sent, pub(super) &'a Uri);

impl std::fmt::Display for SentTo<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Sent::Nowhere => f.write_str("-"),
            Sent::Listener => write!(f, "{}", self.1),
            Sent::Origin(origin) => write!(f, "{origin}"),
            Sent::Pool(pool, server) => write!(f, "{pool}/{server}"),
        }
    }
}

/// Why a request got no response head from upstream.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Failed {
    /// The client paused its upload past `server.request_body_timeout`.
    UploadTimeout,
    /// The connection budget was spent and nothing came free in time.
    Busy,
    /// No server of the pool is up.
    NoServer,
    /// No connection could be made.
    Connect(String),
    /// The connection failed after it was made.
    Other(String),
    /// No response head within the response timeout.
    Timeout(std::time::Duration),
}

/// What the PROXY protocol header of a client connection says: who the client is, what it connected to, the
/// server name it asked for and the protocol ALPN chose.
fn client_facts(conn: &Connection) -> ClientFacts<'_> {
    ClientFacts {
        source: conn.peer,
        destination: conn.local,
        authority: conn.servername.as_ref().map(|name| name.as_str()),
        alpn: conn.tls.alpn.map(str::as_bytes),
    }
}

/// Sets the scheme and authority of an upstream request's URI (`base` is `scheme://host:port`).
pub(super) fn with_base(mut request: Request<UpBody>, base: &Uri) -> Request<UpBody> {
    let mut parts = base.clone().into_parts();
    parts.path_and_query = request.uri().path_and_query().cloned();
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    request
}

/// What it takes to send a bodiless request again.
struct RetryTemplate {
    method: http::Method,
    uri: Uri,
    headers: HeaderMap,
}

impl RetryTemplate {
    fn rebuild(&self) -> Request<UpBody> {
        let mut request = Request::new(Either::Right(Empty::new()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// Requests that may go to a second server after a connect failure: idempotent methods (RFC 9110 §9.2.2)
/// without a body. Nothing reached the first server, but a body could not be sent again.
fn retry_template(request: &Request<UpBody>) -> Option<RetryTemplate> {
    let idempotent = request.method().is_idempotent();
    let bodiless = matches!(request.body(), Either::Right(_));
    (idempotent && bodiless).then(|| RetryTemplate {
        method: request.method().clone(),
        uri: request.uri().clone(),
        headers: request.headers().clone(),
    })
}
