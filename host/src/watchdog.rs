//! Time bounds on a client connection after its handshake: how long a request head may take, how long a
//! connection may sit idle, how long a response write may wait for a client that stopped reading, and how long an
//! upgraded connection may carry nothing.
//!
//! hyper's own header timer only runs when it is given a timer, and it cannot tell the first request from a
//! keep-alive pause, so tern tracks the connection itself: the IO wrapper [`Tracked`] notes when bytes arrive and
//! when writes stall, the service notes requests in flight ([`Activity::begin`]), and [`Activity::expired`]
//! sleeps until the earliest deadline that applies. Deadlines are computed, not polled: an idle connection costs
//! one timer, not a wake-up per tick.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::ClientLimits;

/// Marks "not set" in the millisecond fields.
const UNSET: u64 = u64::MAX;

/// Why a connection was closed by its watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// No complete request head within `request_head_timeout`.
    RequestHead,
    /// No request in flight for `keepalive_timeout`.
    Idle,
    /// A response write waited `send_timeout` for the client to read.
    Send,
}

impl crate::counters::Key for Expired {
    const ALL: &'static [Expired] = &[Expired::RequestHead, Expired::Idle, Expired::Send];

    fn label(self) -> &'static str {
        match self {
            Expired::RequestHead => "request_head",
            Expired::Idle => "idle",
            Expired::Send => "send",
        }
    }
}

/// What one client connection is doing, as far as its deadlines are concerned.
#[derive(Debug)]
pub(crate) struct Activity {
    origin: Instant,
    limits: ClientLimits,
    /// HTTP/2: bytes arriving while idle are pings and settings, not a request head.
    h2: bool,
    in_flight: AtomicUsize,
    /// Whether a request head was ever completed on this connection.
    served: AtomicBool,
    /// Milliseconds since `origin` when the connection last had no request in flight.
    idle_since: AtomicU64,
    /// Milliseconds since `origin` of the first byte read while idle (a request head arriving), or [`UNSET`].
    head_started: AtomicU64,
    /// Milliseconds since `origin` when a write first found the client not reading, or [`UNSET`].
    write_blocked_since: AtomicU64,
    /// Wakes the watchdog when a state change may have moved the deadline earlier.
    changed: tokio::sync::Notify,
    /// Wakes whoever waits for the first request ([`Activity::first_request`]).
    began: tokio::sync::Notify,
}

impl Activity {
    /// A connection whose handshake just completed.
    pub(crate) fn new(limits: ClientLimits, h2: bool) -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            limits,
            h2,
            in_flight: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(UNSET),
            write_blocked_since: AtomicU64::new(UNSET),
            changed: tokio::sync::Notify::new(),
            began: tokio::sync::Notify::new(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(UNSET - 1)
    }

    /// A request head is complete: the request is in flight until the returned guard drops (with its response
    /// body, once that is written or abandoned).
    pub(crate) fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Release);
        self.head_started.store(UNSET, Ordering::Release);
        self.changed.notify_one();
        self.began.notify_waiters();
        InFlight(self.clone())
    }

    /// Resolves once a request head has been completed on this connection (at once if one was).
    pub(crate) async fn first_request(&self) {
        let notified = self.began.notified();
        let mut notified = std::pin::pin!(notified);
        // Registered before the check, so a request beginning in between is not missed.
        notified.as_mut().enable();
        if !self.served.load(Ordering::Acquire) {
            notified.await;
        }
    }

    fn end(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since.store(self.now_ms(), Ordering::Release);
            self.head_started.store(UNSET, Ordering::Release);
            self.changed.notify_one();
        }
    }

    fn read_some(&self) {
        if !self.h2 && self.in_flight.load(Ordering::Acquire) == 0 && self.head_started.load(Ordering::Acquire) == UNSET
        {
            self.head_started.store(self.now_ms(), Ordering::Release);
            // The head deadline may come before the keep-alive one the watchdog sleeps towards.
            self.changed.notify_one();
        }
    }

    fn write_blocked(&self, blocked: bool) {
        let current = self.write_blocked_since.load(Ordering::Acquire);
        if blocked && current == UNSET {
            self.write_blocked_since.store(self.now_ms(), Ordering::Release);
            self.changed.notify_one();
        } else if !blocked && current != UNSET {
            self.write_blocked_since.store(UNSET, Ordering::Release);
        }
    }

    /// The deadline in force now (milliseconds since `origin`) and what it guards; `None` while requests are in
    /// flight and writes flow (their own timeouts apply: body idle, backend response).
    fn deadline(&self) -> Option<(u64, Expired)> {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(UNSET / 2);
        if self.in_flight.load(Ordering::Acquire) > 0 {
            let blocked = self.write_blocked_since.load(Ordering::Acquire);
            return (blocked != UNSET).then(|| (blocked.saturating_add(ms(self.limits.send_timeout)), Expired::Send));
        }
        let idle_since = self.idle_since.load(Ordering::Acquire);
        if !self.served.load(Ordering::Acquire) {
            // The first request must come within the head timeout of the handshake, with or without bytes.
            return Some((idle_since.saturating_add(ms(self.limits.request_head_timeout)), Expired::RequestHead));
        }
        let head = self.head_started.load(Ordering::Acquire);
        if head != UNSET {
            return Some((head.saturating_add(ms(self.limits.request_head_timeout)), Expired::RequestHead));
        }
        Some((idle_since.saturating_add(ms(self.limits.keepalive_timeout)), Expired::Idle))
    }

    /// Resolves when a deadline passes, saying which. Re-reads the state at every wake-up: requests that
    /// started or ended in between move the deadline.
    pub(crate) async fn expired(&self) -> Expired {
        // With requests in flight and nothing stalled there is no deadline; a change of state (a request
        // starting or ending, a write stalling) wakes the loop to compute the new one.
        loop {
            let now = self.now_ms();
            match self.deadline() {
                Some((at, why)) if at <= now => return why,
                Some((at, _)) => tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(at - now)) => {}
                    _ = self.changed.notified() => {}
                },
                // No timer at all: a notification is kept until awaited, so none is lost in between.
                None => self.changed.notified().await,
            }
        }
    }
}

/// A request in flight; dropping it may make the connection idle.
#[derive(Debug)]
pub(crate) struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A client stream that reports reads and stalled writes to its connection's [`Activity`].
#[derive(Debug)]
pub(crate) struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Tracked<S> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: S, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read_some();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.activity.write_blocked(polled.is_pending());
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.activity.write_blocked(polled.is_pending());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.activity.write_blocked(polled.is_pending());
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Copies bytes both ways until either side closes or nothing moves for `idle` (upgraded connections).
pub(crate) async fn splice_with_idle_timeout<A, B>(a: A, b: B, idle: Duration) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last = Arc::new(Touched::clock());
    let mut a = TouchOnIo { inner: a, last: last.clone() };
    let mut b = TouchOnIo { inner: b, last: last.clone() };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        let quiet = last.quiet_for();
        if quiet >= idle {
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "tunnel idle timeout"));
        }
        tokio::select! {
            done = &mut copy => return done.map(|_| ()),
            _ = tokio::time::sleep(idle - quiet) => {}
        }
    }
}

/// When bytes last moved through a tunnel.
#[derive(Debug)]
struct Touched {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Touched {
    fn clock() -> Self {
        Self { origin: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        self.last_ms.store(u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(0), Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }
}

struct TouchOnIo<S> {
    inner: S,
    last: Arc<Touched>,
}

impl<S: AsyncRead + Unpin> AsyncRead for TouchOnIo<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.last.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TouchOnIo<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.last.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ClientLimits {
        ClientLimits {
            request_head_timeout: Duration::from_secs(2),
            keepalive_timeout: Duration::from_secs(10),
            send_timeout: Duration::from_secs(4),
            ..ClientLimits::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn first_request_head_timeout_then_keepalive_then_head_again() {
        let activity = Activity::new(limits(), false);
        assert_eq!(activity.deadline(), Some((2000, Expired::RequestHead)));
        let request = activity.begin();
        assert_eq!(activity.deadline(), None, "in flight, writes flowing");
        activity.write_blocked(true);
        assert!(matches!(activity.deadline(), Some((_, Expired::Send))));
        activity.write_blocked(false);
        drop(request);
        let (at, why) = activity.deadline().unwrap();
        assert_eq!(why, Expired::Idle);
        assert!(at >= 10_000);
        activity.read_some();
        assert!(matches!(activity.deadline(), Some((_, Expired::RequestHead))));
    }

    #[tokio::test(start_paused = true)]
    async fn h2_pings_while_idle_do_not_count_as_a_request_head() {
        let activity = Activity::new(limits(), true);
        drop(activity.begin());
        activity.read_some();
        assert!(matches!(activity.deadline(), Some((_, Expired::Idle))));
    }
}
