//! The client socket under TLS, holding back what a TLS 1.3 handshake writes last: the session tickets.
//!
//! A TLS 1.3 server sends its tickets once the client's Finished has arrived, and rustls's acceptor writes them at
//! once, in a write (and a TCP segment) of their own; on loopback a write costs ~8 µs of server CPU, about as much
//! as the tickets themselves. When the client's first request came with its Finished (browsers send them
//! together), the tickets can as well leave with the first bytes of the answer, in the same write: nothing the
//! client does waits on them.
//!
//! So during the handshake [`Coalescing`] keeps what rustls writes until rustls next reads, which it always does
//! when it waits for the client: the client has every handshake byte before it is waited for, and the bytes written
//! by the handshake's last step are still held when the handshake completes. [`crate::tls::accept`] then either
//! sends them at once (TLS 1.2, where the client waits for the server's Finished) or, over TLS 1.3, leaves them for
//! the first write or the shutdown ([`Coalescing::handshake_done`]); a flush does not send them (hyper flushes each
//! time it polls a connection, with nothing written). After that the wrapper writes through.
//!
//! Many clients write their Finished and their request apart (curl, Python, tokio-rustls: two writes, often two
//! segments), so the request is often not there yet when the handshake ends. The tickets still wait for the answer,
//! but for at most [`TICKET_HOLD`] of waiting on the client: a client that asks nothing before it has its ticket
//! (a preconnect, a client that reads first) gets it then. Nothing is held longer, and nothing but these bytes.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Duration, Sleep};

/// How long deferred TLS 1.3 tickets wait for the answer once tern waits on the client (nothing to read): the
/// request of a client that writes it after its Finished comes within this nearly always; a client that waits for
/// its ticket first gets it after this.
pub const TICKET_HOLD: Duration = Duration::from_millis(10);

/// What the wrapper does with writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Held until the next read.
    Handshake,
    /// The handshake's last bytes wait for the first write, flush or shutdown.
    Deferred,
    /// Written through (anything still held goes first).
    Through,
}

/// A transport whose handshake writes are held back as the module documentation says.
#[derive(Debug)]
pub struct Coalescing<IO> {
    io: IO,
    held: Vec<u8>,
    /// Bytes of `held` already written.
    sent: usize,
    mode: Mode,
    /// While deferred bytes wait on a client that has sent nothing to read: when they go anyway.
    hold: Option<Pin<Box<Sleep>>>,
}

impl<IO> Coalescing<IO> {
    /// `io` before its handshake.
    pub fn new(io: IO) -> Self {
        Self { io, held: Vec::new(), sent: 0, mode: Mode::Handshake, hold: None }
    }

    /// The transport.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Ends the handshake: with `defer`, the bytes still held wait for the first write or the shutdown, at most
    /// [`TICKET_HOLD`] from the first read or flush that finds nothing to do; without it, the caller sends them
    /// with [`Coalescing::release`] before it waits on the client.
    pub(crate) fn handshake_done(&mut self, defer: bool) {
        self.mode = if defer && self.holds() { Mode::Deferred } else { Mode::Through };
    }

    /// Whether bytes are waiting to be written.
    pub(crate) fn holds(&self) -> bool {
        self.sent < self.held.len()
    }
}

impl<IO: AsyncWrite + Unpin> Coalescing<IO> {
    /// Writes everything held.
    pub(crate) fn poll_release(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.holds() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.forget_held();
        Poll::Ready(Ok(()))
    }

    /// While deferred bytes are held: sends them if [`TICKET_HOLD`] is over, else has `cx` woken when it is.
    fn poll_hold(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.mode != Mode::Deferred || !self.holds() {
            return Poll::Ready(Ok(()));
        }
        let hold = self.hold.get_or_insert_with(|| Box::pin(tokio::time::sleep(TICKET_HOLD)));
        if hold.as_mut().poll(cx).is_ready() {
            return self.poll_release(cx);
        }
        Poll::Ready(Ok(()))
    }

    /// Writes everything held.
    pub(crate) async fn release(&mut self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_release(cx)).await
    }

    fn forget_held(&mut self) {
        self.held = Vec::new();
        self.sent = 0;
        self.hold = None;
        if self.mode == Mode::Deferred {
            self.mode = Mode::Through;
        }
    }

    /// Writes what is held and then `bufs` in one vectored write where the transport allows; returns how much of
    /// `bufs` went (never 0 for non-empty `bufs` unless the transport wrote nothing).
    fn poll_write_after_held(&mut self, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        while self.holds() {
            let mut slices = Vec::with_capacity(bufs.len() + 1);
            slices.push(IoSlice::new(&self.held[self.sent..]));
            slices.extend(bufs.iter().map(|b| IoSlice::new(b)));
            let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            let pending = self.held.len() - self.sent;
            if n < pending {
                self.sent += n;
                continue;
            }
            self.forget_held();
            if n > pending {
                return Poll::Ready(Ok(n - pending));
            }
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalescing<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // Whoever reads may be about to wait for the peer: it must have everything first (but the tickets of a
        // deferred handshake, which the peer does not wait for, for up to TICKET_HOLD).
        if this.mode != Mode::Deferred && this.holds() {
            ready!(this.poll_release(cx))?;
        }
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if read.is_pending() {
            // The read above registered for the client's bytes; what is left is the tickets' hold.
            ready!(this.poll_hold(cx))?;
        }
        read
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Coalescing<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match this.mode {
            Mode::Handshake => {
                this.held.extend_from_slice(buf);
                Poll::Ready(Ok(buf.len()))
            }
            _ if this.holds() => this.poll_write_after_held(cx, &[IoSlice::new(buf)]),
            _ => Pin::new(&mut this.io).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        match this.mode {
            Mode::Handshake => {
                let before = this.held.len();
                bufs.iter().for_each(|b| this.held.extend_from_slice(b));
                Poll::Ready(Ok(this.held.len() - before))
            }
            _ if this.holds() => this.poll_write_after_held(cx, bufs),
            _ => Pin::new(&mut this.io).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        // Held bytes and the caller's always go together in one vectored write.
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        match this.mode {
            // rustls flushes after every handshake write: the bytes go with the next read instead.
            Mode::Handshake => return Poll::Ready(Ok(())),
            // hyper flushes whenever it has polled, written or not: deferred tickets wait for the answer's bytes
            // (or the hold's end), which a flush of nothing must not send ahead alone.
            Mode::Deferred => ready!(this.poll_hold(cx))?,
            Mode::Through => ready!(this.poll_release(cx))?,
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_release(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
