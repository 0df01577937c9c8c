//! Outgoing HTTP for plugins (`wasi:http`), limited by the plugin's `grants.http`: only listed authorities,
//! bounded timeouts, a cap on the response body. Without a grant every request is refused.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use crate::config::HttpGrant;

/// The per-call hooks: they see every request the plugin sends.
pub struct HttpHooks {
    pub(super) grant: Option<Arc<HttpGrant>>,
    /// The API could not be reached (connect failure or timeout), or a request is waiting for its response head.
    pub(super) store: Arc<super::bindings::StoreSeen>,
}

type ResponseFuture = Box<
    dyn Future<Output = Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>), Error>>
        + Send,
>;

impl WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> ResponseFuture {
        let Some(grant) = self.grant.clone() else { return Box::new(async { Err(Error::HttpRequestDenied) }) };
        let authority = authority_of(request.uri());
        if !authority.as_ref().is_some_and(|a| grant.allow.contains(a)) {
            tracing::debug!(authority = ?authority, "plugin HTTP request outside its allow-list refused");
            return Box::new(async { Err(Error::HttpRequestDenied) });
        }
        // The plugin's own options cannot loosen the operator's limits.
        let options = RequestOptions {
            connect_timeout: Some(grant.timeout),
            first_byte_timeout: Some(grant.timeout),
            between_bytes_timeout: Some(grant.timeout),
        };
        let store = self.store.clone();
        Box::new(async move {
            let sent =
                store.clone().waiting_for(wasmtime_wasi_http::default_send_request(request, Some(options))).await;
            let (response, io) = sent.inspect_err(|_| store.down.store(true, std::sync::atomic::Ordering::Relaxed))?;
            let cap = grant.max_response_bytes;
            let declared = response.body().size_hint().exact();
            if declared.is_some_and(|len| len > cap) {
                return Err(Error::HttpResponseBodySize(declared));
            }
            let response = response.map(|body| CappedBody { inner: body.boxed_unsync(), left: cap }.boxed_unsync());
            Ok((response, Box::new(io) as Box<dyn Future<Output = Result<(), Error>> + Send>))
        })
    }
}

/// `host:port` of a request URI, lowercased, with the scheme's default port filled in.
fn authority_of(uri: &http::Uri) -> Option<String> {
    let authority = uri.authority()?;
    let port = authority.port_u16().or(match uri.scheme_str() {
        Some("http") => Some(80),
        _ => Some(443),
    })?;
    Some(format!("{}:{port}", authority.host().to_ascii_lowercase()))
}

/// A response body that fails once it has delivered more than its cap.
struct CappedBody {
    inner: WasiBody,
    left: u64,
}

impl Body for CappedBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        if let Some(data) = frame.data_ref() {
            let len = data.len() as u64;
            if len > self.left {
                return Poll::Ready(Some(Err(Error::HttpResponseBodySize(None))));
            }
            self.left -= len;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authority_gets_the_default_port_of_its_scheme() {
        let of = |s: &str| authority_of(&s.parse().unwrap());
        assert_eq!(of("https://API.example.com/x").as_deref(), Some("api.example.com:443"));
        assert_eq!(of("http://api.example.com/x").as_deref(), Some("api.example.com:80"));
        assert_eq!(of("http://127.0.0.1:8080/x").as_deref(), Some("127.0.0.1:8080"));
    }
}
