//! A listener backend's HTTP/1.1 connections, driven by the request that uses them.
//!
//! hyper-util's pooled client runs every connection in a task of its own: a request goes to that task through a
//! channel, the task writes it, reads the response and hands head and body back through more channels, each
//! hand-over a wake-up of another task, often on the other worker. For the common route (the listener's cleartext
//! backend, no PROXY protocol header, no upgrade) [`Direct`] instead keeps hyper's HTTP/1.1 connection state
//! itself and polls it from the request's own task: while the response head is awaited, then from the response
//! body (which the client connection's task polls as it writes the body out). When the body has ended the
//! connection goes back to an idle stack (newest first, at most `proxy.max_idle_per_backend`, closed after
//! `proxy.pool_idle_timeout`); a connection dropped before its response ended is closed, never reused.
//!
//! An idle connection is polled by nobody, so a backend's close is noticed when the connection is next taken
//! (it is polled once then, and a closed one is dropped) or by the sweep that runs every half idle timeout. A
//! request that a reused connection could not even send (the backend closed it meanwhile) goes again on a fresh
//! one, as hyper-util's client does. New connections come from the same [`BoundedConnector`] as every other
//! client's, so they hold the same budget permits.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use tokio::sync::oneshot;

use super::UpBody;
use crate::backend::{BoundedConnector, Permitted};
use crate::body::BoxError;

/// hyper's state of one connection: it reads and writes only when polled.
type Driver = Pin<Box<http1::Connection<Permitted, UpBody>>>;

/// One backend connection: where requests go in, and the state that moves them.
struct Conn {
    sender: http1::SendRequest<UpBody>,
    /// `None` once the connection has ended. Dropping it then is what fails the requests queued to it (a request
    /// never written comes back to be sent elsewhere): hyper cancels them only when its state is dropped.
    driver: Option<Driver>,
}

impl Conn {
    /// Moves the connection along; whether it is still open.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(driver) = &mut self.driver
            && driver.as_mut().poll(cx).is_ready()
        {
            self.driver = None;
        }
        self.driver.is_some()
    }

    /// Polls the connection once without a task to wake (for a connection nobody waits on): whether it is still
    /// open and ready for a request (a previous request's upload is not still going, nor its response).
    fn still_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.drive(&mut cx) && matches!(self.sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Why a request got no response head.
#[derive(Debug)]
pub(crate) enum DirectError {
    /// No connection: refused, timed out, or the connection budget stayed spent (see [`crate::backend`]).
    Connect(BoxError),
    /// The connection failed while the request was sent or the response head awaited.
    Http(hyper::Error),
}

/// Idle connections, newest last, and the requests waiting for one.
#[derive(Default)]
struct Stack {
    idle: Vec<Idle>,
    /// Requests that found nothing idle and are connecting meanwhile: a connection given back goes to the oldest
    /// one still waiting (with the budget spent, that is how a waiting request gets served at all).
    waiting: VecDeque<oneshot::Sender<Conn>>,
}

/// The connections to one cleartext HTTP/1.1 backend, driven by their requests.
pub(crate) struct Direct {
    connector: Mutex<BoundedConnector>,
    backend: Uri,
    idle: Mutex<Stack>,
    max_idle: usize,
    idle_timeout: Duration,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct").field("backend", &self.backend).field("max_idle", &self.max_idle).finish()
    }
}

impl Direct {
    /// Connections to `backend` (`http://host:port`) made by `connector`, at most `max_idle` kept idle, each for
    /// at most `idle_timeout`. Inside a tokio runtime, a task sweeps expired and closed idle connections.
    pub(crate) fn new(connector: BoundedConnector, backend: Uri, max_idle: usize, idle_timeout: Duration) -> Arc<Self> {
        let direct = Arc::new(Self {
            connector: Mutex::new(connector),
            backend,
            idle: Mutex::default(),
            max_idle,
            idle_timeout,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&direct)));
        }
        direct
    }

    /// Sends `request` (origin-form URI, Host header set) and waits for the response head. The response's body
    /// drives the connection until it ends.
    pub(crate) async fn request(
        self: &Arc<Self>,
        mut request: Request<UpBody>,
    ) -> Result<Response<DirectBody>, DirectError> {
        loop {
            let (mut conn, reused) = match self.take_idle() {
                Ok(conn) => (conn, true),
                // A new connection, or one given back first, whichever comes first.
                Err(given) => tokio::select! {
                    biased;
                    Ok(conn) = given => (conn, true),
                    made = self.connect() => (made?, false),
                },
            };
            // A connection just given back may not have settled into its idle state yet: drive it until it takes
            // a request (at once, nearly always), or ends (then the sender reports it closed).
            let ready = std::future::poll_fn(|cx| {
                conn.drive(cx);
                conn.sender.poll_ready(cx)
            })
            .await;
            if let Err(err) = ready {
                if reused {
                    continue;
                }
                return Err(DirectError::Http(err));
            }
            let mut sending = std::pin::pin!(conn.sender.try_send_request(request));
            let sent = std::future::poll_fn(|cx| {
                // If the connection ends, the request's own future reports how.
                conn.drive(cx);
                sending.as_mut().poll(cx)
            })
            .await;
            match sent {
                Ok(response) => {
                    let home = Arc::downgrade(self);
                    let conn = conn.driver.is_some().then_some(conn);
                    return Ok(response.map(|inner| DirectBody { inner, conn, home, ended: false }));
                }
                Err(mut failed) => match failed.take_message() {
                    // Never written: the reused connection had been closed. Once more, on another connection.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(DirectError::Http(failed.into_error())),
                },
            }
        }
    }

    /// The newest idle connection still open, dropping expired and closed ones on the way; with none, a place in
    /// the queue for the next one given back.
    fn take_idle(&self) -> Result<Conn, oneshot::Receiver<Conn>> {
        loop {
            let Idle { mut conn, since } = {
                let mut stack = lock(&self.idle);
                match stack.idle.pop() {
                    Some(idle) => idle,
                    None => {
                        let (tx, rx) = oneshot::channel();
                        stack.waiting.retain(|w| !w.is_closed());
                        stack.waiting.push_back(tx);
                        return Err(rx);
                    }
                }
            };
            if since.elapsed() < self.idle_timeout && conn.still_usable() {
                return Ok(conn);
            }
        }
    }

    async fn connect(&self) -> Result<Conn, DirectError> {
        let connecting = tower_service::Service::call(&mut *lock(&self.connector), self.backend.clone());
        let io = connecting.await.map_err(DirectError::Connect)?;
        let (sender, driver) = http1::Builder::new().handshake(io).await.map_err(DirectError::Http)?;
        Ok(Conn { sender, driver: Some(Box::pin(driver)) })
    }

    /// Hands a connection whose response has ended to the oldest waiting request, or keeps it for the next one
    /// (unless enough are idle). With `max_idle` 0 nothing is reused.
    fn give_back(&self, mut conn: Conn) {
        if self.max_idle == 0 {
            return; // no reuse: closing it frees its permit for whoever waits
        }
        let mut stack = lock(&self.idle);
        while let Some(waiting) = stack.waiting.pop_front() {
            match waiting.send(conn) {
                Ok(()) => return,
                Err(unwanted) => conn = unwanted, // that request got its own connection, or is gone
            }
        }
        if stack.idle.len() < self.max_idle {
            stack.idle.push(Idle { conn, since: Instant::now() });
        }
    }

    /// Drops idle connections past the idle timeout or closed by the backend; how many are left.
    fn sweep_once(&self) -> usize {
        let taken = std::mem::take(&mut lock(&self.idle).idle);
        let kept: Vec<Idle> = taken
            .into_iter()
            .filter_map(|mut idle| {
                (idle.since.elapsed() < self.idle_timeout && idle.conn.still_usable()).then_some(idle)
            })
            .collect();
        let mut stack = lock(&self.idle);
        // Connections given back meanwhile are newer: they stay on top.
        let newer = std::mem::replace(&mut stack.idle, kept);
        stack.idle.extend(newer);
        let excess = stack.idle.len().saturating_sub(self.max_idle);
        stack.idle.drain(..excess); // the oldest
        stack.waiting.retain(|w| !w.is_closed());
        stack.idle.len()
    }

    /// Idle connections kept.
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        lock(&self.idle).idle.len()
    }
}

/// Every half idle timeout (at least 1 s apart), until the [`Direct`] is gone.
async fn sweep(direct: Weak<Direct>) {
    let Some(every) = direct.upgrade().map(|d| (d.idle_timeout / 2).max(Duration::from_secs(1))) else { return };
    loop {
        tokio::time::sleep(every).await;
        let Some(direct) = direct.upgrade() else { return };
        direct.sweep_once();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Idle stacks stay consistent across a panic elsewhere: recover the lock.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A response body from a [`Direct`] connection: polling it moves the connection; once it has ended, the
/// connection is given back when the body is dropped.
pub(crate) struct DirectBody {
    inner: Incoming,
    /// `None` once the connection has ended (the body then ends or fails by itself).
    conn: Option<Conn>,
    home: Weak<Direct>,
    /// The last frame has been read.
    ended: bool,
}

impl Body for DirectBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let mut frame = Pin::new(&mut this.inner).poll_frame(cx);
        if frame.is_pending()
            && let Some(conn) = &mut this.conn
        {
            if !conn.drive(cx) {
                this.conn = None;
            }
            // Reading may have handed the body its next frame.
            frame = Pin::new(&mut this.inner).poll_frame(cx);
        }
        match &frame {
            // hyper's servers stop polling a body after its trailers.
            Poll::Ready(None) => this.ended = true,
            Poll::Ready(Some(Ok(frame))) if frame.is_trailers() => this.ended = true,
            Poll::Ready(Some(Err(_))) => this.conn = None,
            _ => {}
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for DirectBody {
    fn drop(&mut self) {
        // An early answer (a 413 to an upload still being sent) ends before its request: such a connection is not
        // ready for another request, and goes.
        if let Some(mut conn) = self.conn.take()
            && (self.ended || self.inner.is_end_stream())
            && conn.still_usable()
            && let Some(home) = self.home.upgrade()
        {
            home.give_back(conn);
        }
    }
}

impl std::fmt::Debug for DirectBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectBody").field("ended", &self.ended).field("open", &self.conn.is_some()).finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::{BodyExt, Either, Empty};
    use hyper_util::client::legacy::connect::HttpConnector;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::backend::Budget;

    /// A backend that answers every request head with `body`, counting the connections it accepted and the ones
    /// it saw end; with `close_after`, it closes each connection that long after its first answer.
    struct Backend {
        addr: std::net::SocketAddr,
        accepted: Arc<AtomicUsize>,
        closed: Arc<AtomicUsize>,
    }

    async fn backend(body: &'static [u8], close_after: Option<Duration>) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, closed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (counting, ending) = (accepted.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                counting.fetch_add(1, Ordering::SeqCst);
                let ending = ending.clone();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
                            if tcp.write_all(head.as_bytes()).await.is_err() || tcp.write_all(body).await.is_err() {
                                break;
                            }
                            if let Some(after) = close_after {
                                tokio::time::sleep(after).await;
                                ending.fetch_add(1, Ordering::SeqCst);
                                return;
                            }
                        }
                    }
                    ending.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Backend { addr, accepted, closed }
    }

    fn direct_to(backend: &Backend, idle_timeout: Duration) -> Arc<Direct> {
        budgeted(backend, idle_timeout, 16)
    }

    fn budgeted(backend: &Backend, idle_timeout: Duration, connections: usize) -> Arc<Direct> {
        let budget = Budget::new(connections, Arc::new(tokio::sync::Semaphore::new(connections)));
        let connector = BoundedConnector::new(HttpConnector::new(), budget, Duration::from_secs(2));
        let uri: Uri = format!("http://{}", backend.addr).parse().unwrap();
        Direct::new(connector, uri, 8, idle_timeout)
    }

    fn get() -> Request<UpBody> {
        Request::get("/").header(http::header::HOST, "a.test").body(Either::Right(Empty::new())).unwrap()
    }

    async fn body_of(direct: &Arc<Direct>) -> Bytes {
        let response = direct.request(get()).await.unwrap();
        assert_eq!(response.status(), 200);
        response.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let backend = backend(b"hello", None).await;
        let direct = direct_to(&backend, Duration::from_secs(60));
        for _ in 0..5 {
            assert_eq!(body_of(&direct).await, "hello");
        }
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(direct.idle_count(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn with_the_budget_spent_waiting_requests_get_connections_given_back() {
        let backend = backend(b"hello", None).await;
        // One connection allowed, waited for at most 2 s: eight requests at once are all served over it.
        let direct = budgeted(&backend, Duration::from_secs(60), 1);
        let requests: Vec<_> = (0..8)
            .map(|_| {
                let direct = direct.clone();
                tokio::spawn(async move { body_of(&direct).await })
            })
            .collect();
        for request in requests {
            assert_eq!(request.await.unwrap(), "hello");
        }
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn with_no_idle_connections_allowed_every_request_opens_its_own() {
        let backend = backend(b"hello", None).await;
        let budget = Budget::new(16, Arc::new(tokio::sync::Semaphore::new(16)));
        let connector = BoundedConnector::new(HttpConnector::new(), budget, Duration::from_secs(2));
        let direct =
            Direct::new(connector, format!("http://{}", backend.addr).parse().unwrap(), 0, Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(body_of(&direct).await, "hello");
        }
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 3);
        assert_eq!(direct.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        static LARGE: [u8; 1 << 20] = [b'x'; 1 << 20];
        let backend = backend(&LARGE, None).await;
        let direct = direct_to(&backend, Duration::from_secs(60));
        let mut body = direct.request(get()).await.unwrap().into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert!(first.data_ref().is_some_and(|d| d.len() < LARGE.len()), "the body came in more than one frame");
        drop(body);
        assert_eq!(direct.idle_count(), 0, "a connection with an unread response is never reused");
        assert_eq!(body_of(&direct).await.len(), LARGE.len());
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_backend_closed_is_replaced_without_failing_the_request() {
        let backend = backend(b"hello", Some(Duration::from_millis(20))).await;
        let direct = direct_to(&backend, Duration::from_secs(60));
        assert_eq!(body_of(&direct).await, "hello");
        assert_eq!(direct.idle_count(), 1);
        while backend.closed.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(body_of(&direct).await, "hello", "the closed idle connection was not used");
        assert_eq!(backend.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_after_the_idle_timeout() {
        let backend = backend(b"hello", None).await;
        let direct = direct_to(&backend, Duration::from_secs(1));
        assert_eq!(body_of(&direct).await, "hello");
        assert_eq!(direct.idle_count(), 1);
        // The sweep runs every second (half the timeout, at least 1 s): within 3 s the backend sees the close.
        let deadline = Instant::now() + Duration::from_secs(3);
        while backend.closed.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(backend.closed.load(Ordering::SeqCst), 1, "the idle connection was closed");
        assert_eq!(direct.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_backend_that_closes_a_fresh_connection_fails_the_request_at_once() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                drop(tcp);
            }
        });
        let backend = Backend { addr, accepted: Default::default(), closed: Default::default() };
        let direct = direct_to(&backend, Duration::from_secs(60));
        let answered = tokio::time::timeout(Duration::from_secs(5), direct.request(get())).await;
        assert!(matches!(answered, Ok(Err(DirectError::Http(_)))), "{answered:?}");
    }

    #[tokio::test]
    async fn an_unreachable_backend_is_a_connect_error() {
        let unused = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = unused.local_addr().unwrap();
        drop(unused);
        let backend = Backend { addr, accepted: Default::default(), closed: Default::default() };
        let direct = direct_to(&backend, Duration::from_secs(60));
        assert!(matches!(direct.request(get()).await, Err(DirectError::Connect(_))));
    }
}
