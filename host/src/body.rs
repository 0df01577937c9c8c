//! Bodies that carry limits: a request body with an idle timeout that reports when the upload is complete, and
//! a response body that keeps its request counted as in flight until it has been written or dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::oneshot;
use tokio::time::Sleep;

use crate::watchdog::InFlight;

/// Errors of a body on its way through tern.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client's request body on its way to the backend. Fails if the client pauses longer than `idle` between
/// two pieces, and tells the proxy when the last byte was read, so the backend's response deadline starts only
/// once the upload is done (a slow upload is not a slow backend).
#[derive(Debug)]
pub struct Upload<B> {
    inner: B,
    idle: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    done: Option<oneshot::Sender<()>>,
    timed_out: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
}

/// The proxy's side of an [`Upload`].
#[derive(Debug)]
pub struct UploadWatch {
    /// Resolves when the body has been read to its end (or was dropped).
    pub done: oneshot::Receiver<()>,
    /// Set when the body failed because the client paused too long.
    pub timed_out: Arc<AtomicBool>,
    /// Bytes of body read from the client so far (the access log's `request_bytes`).
    pub received: Arc<AtomicU64>,
}

impl<B: Body> Upload<B> {
    /// Wraps a request body.
    pub fn new(inner: B, idle: Duration) -> (Self, UploadWatch) {
        let (tx, rx) = oneshot::channel();
        let timed_out = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let mut upload =
            Self { inner, idle, timer: None, done: Some(tx), timed_out: timed_out.clone(), received: received.clone() };
        if upload.inner.is_end_stream() {
            // Nothing to upload: the backend's deadline starts at once.
            upload.finished();
        }
        (upload, UploadWatch { done: rx, timed_out, received })
    }
}

impl UploadWatch {
    /// The watch of a request without a body: done at once.
    pub fn finished() -> Self {
        let (tx, done) = oneshot::channel();
        let _ = tx.send(());
        Self { done, timed_out: Arc::new(AtomicBool::new(false)), received: Arc::default() }
    }
}

impl<B> Upload<B> {
    fn finished(&mut self) {
        if let Some(tx) = self.done.take() {
            let _ = tx.send(());
        }
    }
}

/// The client paused longer than `server.request_body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("request body idle for more than {0:?}")]
pub struct BodyTimeout(pub Duration);

impl<B> Body for Upload<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.timer = None;
                if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()).and_then(Frame::data_ref) {
                    this.received.fetch_add(data.len() as u64, Ordering::Relaxed);
                }
                match &frame {
                    None | Some(Err(_)) => this.finished(),
                    Some(Ok(_)) if this.inner.is_end_stream() => this.finished(),
                    Some(Ok(_)) => {}
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending => {
                let idle = this.idle;
                let timer = this.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.timed_out.store(true, Ordering::Release);
                        this.finished();
                        Poll::Ready(Some(Err(Box::new(BodyTimeout(idle)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Upload<B> {
    fn drop(&mut self) {
        self.finished();
    }
}

/// A response body that holds its request's [`InFlight`] mark until it is written out or dropped.
#[derive(Debug)]
pub struct Counted<B> {
    inner: B,
    _in_flight: Option<InFlight>,
}

impl<B> Counted<B> {
    /// Wraps a response body.
    pub fn new(inner: B, in_flight: Option<InFlight>) -> Self {
        Self { inner, _in_flight: in_flight }
    }
}

impl<B: Body + Unpin> Body for Counted<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test(start_paused = true)]
    async fn a_pause_longer_than_idle_fails_the_body_and_marks_the_timeout() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(4);
        let stream = StreamBody::new(tokio_stream_from(rx));
        let (mut upload, watch) = Upload::new(stream, Duration::from_secs(5));
        tx.send(Ok(Frame::data(Bytes::from_static(b"a")))).await.unwrap();
        assert!(upload.frame().await.unwrap().is_ok());
        let err = upload.frame().await.unwrap().unwrap_err();
        assert!(err.to_string().contains("idle"), "{err}");
        assert!(watch.timed_out.load(Ordering::Acquire));
        drop(tx);
    }

    #[tokio::test]
    async fn an_empty_body_is_done_at_once() {
        let (_upload, watch) = Upload::new(http_body_util::Empty::<Bytes>::new(), Duration::from_secs(5));
        assert!(watch.done.await.is_ok());
    }

    fn tokio_stream_from<T>(mut rx: tokio::sync::mpsc::Receiver<T>) -> impl futures_util::Stream<Item = T> + Unpin {
        Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
    }
}
