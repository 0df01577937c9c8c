//! The headers of a request as it goes upstream: hop-by-hop ones removed, `X-Forwarded-*` and `Forwarded`
//! appended, `TE: trailers` kept, a body-less request given an empty body so that it can be sent again.

use std::net::SocketAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, StatusCode, Version};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;

use super::{Connection, Proxy};
use crate::body::{Upload, UploadWatch};
use crate::upstream::UpBody;

/// Headers that describe one hop, not the message (RFC 9110 §7.6.1); never forwarded as they are.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    // Only meaningful with `Upgrade: h2c`, which tern never forwards (RFC 7540 §3.2.1).
    HeaderName::from_static("http2-settings"),
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

impl Proxy {
    /// The request as it goes upstream, URI without scheme and authority (the route adds them). A request
    /// without a body goes with an empty one, so that it can be sent again after a connect failure.
    pub(super) fn upstream_request(
        &self,
        req: Request<Incoming>,
        conn: &Connection,
        upgrade: bool,
    ) -> Result<(Request<UpBody>, UploadWatch), StatusCode> {
        let (mut parts, body) = req.into_parts();
        // HTTP/2 carries the host in :authority; HTTP/1.1 in the Host header.
        let host = parts
            .headers
            .get(header::HOST)
            .cloned()
            .or_else(|| parts.uri.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()))
            .ok_or(StatusCode::BAD_REQUEST)?;
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = path.parse().map_err(|_| StatusCode::BAD_REQUEST)?;
        parts.version = Version::HTTP_11;

        let headers = &mut parts.headers;
        // `TE: trailers` says the client takes trailers, which tern streams end to end; gRPC servers require it.
        let trailers = headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
        strip_hop_by_hop(headers, upgrade);
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        headers.insert(header::HOST, host.clone());
        headers.insert(X_FORWARDED_HOST, host.clone());
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        let client_ip = conn.peer.ip().to_string();
        let forwarded_for = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(earlier) => format!("{earlier}, {client_ip}"),
            None => client_ip,
        };
        headers.insert(X_FORWARDED_FOR, HeaderValue::from_str(&forwarded_for).map_err(|_| StatusCode::BAD_REQUEST)?);
        append_forwarded(headers, conn.peer, &host)?;
        if let Some(name) = &conn.ja4_header {
            // tern's own value only: whatever the client sent under that name is dropped first.
            headers.remove(name);
            if let Some(value) = conn.tls.ja4.and_then(|ja4| HeaderValue::from_str(ja4.as_str()).ok()) {
                headers.insert(name.clone(), value);
            }
        }
        if upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        if http_body::Body::is_end_stream(&body) {
            return Ok((Request::from_parts(parts, Either::Right(Empty::new())), UploadWatch::finished()));
        }
        let (body, watch) = Upload::new(body, conn.limits.request_body_timeout);
        Ok((Request::from_parts(parts, Either::Left(body)), watch))
    }
}

/// Appends this hop's element to `Forwarded` (RFC 7239), as `X-Forwarded-For` is appended to: the backend can
/// trust the last element, which tern wrote, and ignore what the client claimed before it.
fn append_forwarded(headers: &mut HeaderMap, peer: SocketAddr, host: &HeaderValue) -> Result<(), StatusCode> {
    let node = match peer.ip() {
        std::net::IpAddr::V4(ip) => ip.to_string(),
        std::net::IpAddr::V6(ip) => format!("\"[{ip}]\""),
    };
    let host = host.to_str().map_err(|_| StatusCode::BAD_REQUEST)?;
    let ours = format!("for={node};host=\"{}\";proto=https", host.replace(['"', '\\'], ""));
    let joined = match headers.get_all(header::FORWARDED).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>() {
        earlier if earlier.is_empty() => ours,
        earlier => format!("{}, {ours}", earlier.join(", ")),
    };
    headers.insert(header::FORWARDED, HeaderValue::from_str(&joined).map_err(|_| StatusCode::BAD_REQUEST)?);
    Ok(())
}

/// Removes hop-by-hop headers, including those the Connection header names. `Upgrade` survives only on an
/// upgrade request.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
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
