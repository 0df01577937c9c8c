//! Connections to backends, counted: every open backend connection holds a permit of its backend's budget and
//! of the process-wide one, so clients (HTTP/2 streams, clients that never read) cannot make tern open file
//! descriptors without bound. A request that finds the budget spent waits for a pooled connection or a permit,
//! up to the connect timeout, and then gets a 503: back-pressure instead of `accept` failing for everyone.
//!
//! A connector may also write a PROXY protocol header as the first bytes of every connection it opens (before TLS,
//! for `https` upstreams): see [`crate::upstream::proxy_header`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::body::BoxError;

/// Permits for backend connections: one budget per backend, one for the process.
#[derive(Debug, Clone)]
pub struct Budget {
    backend: Arc<Semaphore>,
    total: Arc<Semaphore>,
}

impl Budget {
    /// A backend's budget of `per_backend` connections within the process-wide `total`.
    pub fn new(per_backend: usize, total: Arc<Semaphore>) -> Self {
        Self { backend: Arc::new(Semaphore::new(per_backend)), total }
    }
}

/// The backend's connection budget is spent and no pooled connection came free in time.
#[derive(Debug, thiserror::Error)]
#[error("backend connection limit reached: no connection free within {0:?}")]
pub struct Exhausted(pub Duration);

/// An [`HttpConnector`] that takes permits before connecting; the connection gives them back when it closes.
#[derive(Debug, Clone)]
pub struct BoundedConnector {
    inner: HttpConnector,
    budget: Budget,
    wait: Duration,
    /// Written first on every new connection (a PROXY protocol header), if any.
    header: Option<Arc<[u8]>>,
}

impl BoundedConnector {
    /// Connects with `inner` within `budget`, waiting at most `wait` for a permit.
    pub fn new(inner: HttpConnector, budget: Budget, wait: Duration) -> Self {
        Self { inner, budget, wait, header: None }
    }

    /// Writes `header` as the first bytes of every connection (within `wait`; a failure is a connect error).
    pub fn with_header(mut self, header: Option<Arc<[u8]>>) -> Self {
        self.header = header;
        self
    }
}

impl tower_service::Service<Uri> for BoundedConnector {
    type Response = Permitted;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Permitted, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut inner = self.inner.clone();
        let (budget, wait, header) = (self.budget.clone(), self.wait, self.header.clone());
        Box::pin(async move {
            let permits = tokio::time::timeout(wait, async {
                let backend = budget.backend.acquire_owned().await?;
                let total = budget.total.acquire_owned().await?;
                Ok::<_, tokio::sync::AcquireError>((backend, total))
            })
            .await
            .map_err(|_| Box::new(Exhausted(wait)) as BoxError)?
            .map_err(|e| Box::new(e) as BoxError)?;
            let mut io = tower_service::Service::call(&mut inner, uri).await?;
            if let Some(header) = header {
                use tokio::io::AsyncWriteExt;
                // A few dozen bytes into a fresh socket's empty buffer: bounded all the same.
                tokio::time::timeout(wait, io.inner_mut().write_all(&header))
                    .await
                    .map_err(|_| Box::new(HeaderNotSent(wait)) as BoxError)??;
            }
            Ok(Permitted { io, _permits: permits })
        })
    }
}

/// The PROXY protocol header could not be written within the connect timeout.
#[derive(Debug, thiserror::Error)]
#[error("PROXY protocol header not sent within {0:?}")]
pub struct HeaderNotSent(pub Duration);

/// A backend connection and the permits it holds.
#[derive(Debug)]
pub struct Permitted {
    io: TokioIo<TcpStream>,
    _permits: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

impl Connection for Permitted {
    fn connected(&self) -> Connected {
        self.io.connected()
    }
}

impl hyper::rt::Read for Permitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Permitted {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// Whether a client error from hyper was caused by [`Exhausted`].
pub fn is_exhausted(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(e) = source {
        if e.is::<Exhausted>() {
            return true;
        }
        source = e.source();
    }
    false
}
