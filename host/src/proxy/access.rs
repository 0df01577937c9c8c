//! The access log: one line per request, with the fields `log.access_fields` chooses, as text or JSON
//! (`log.access_format`), written when the response body has been sent or abandoned (so that `response_bytes` and
//! `duration_us` cover the whole response).
//!
//! Lines do not go through `tracing`: their fields are chosen at run time and their format may differ from the
//! process log's. They go to standard error like the process log, through a bounded queue (`log.access_queue`
//! lines) to one writer thread, so a slow or blocked standard error never stalls a tokio worker; a line that finds
//! the queue full is dropped and counted (`tern_access_log_dropped_total`). A JSON line has the process log's JSON
//! shape (`timestamp`, `level`, `fields`, `target` = `tern::access`), a text line its text shape; client text
//! (server name, host, path) is clipped, JSON strings are escaped by serde_json, so a line stays one line.
//!
//! What the handshake negotiated is gathered once per connection ([`HandshakeFacts`], in the proxy's
//! `Connection`); a request adds its own facts, and nothing is formatted unless the access log is on.

use std::io::Write as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Version};
use http_body::{Frame, SizeHint};

use super::send::Sent;
use super::{Body, Connection};
use crate::clip::Clip;
use crate::config::{AccessField, LogFormat, LogSettings};
use crate::ja4::Ja4;
use crate::metrics::{Metrics, inc};
use crate::select::Source;

/// What one connection's handshake negotiated, gathered once when it completes.
#[derive(Debug, Clone)]
pub struct HandshakeFacts {
    /// The listener's name.
    pub listener: Arc<str>,
    /// The protocol ALPN chose, if any.
    pub alpn: Option<&'static str>,
    /// `TLSv1.3` or `TLSv1.2`.
    pub tls_version: Option<&'static str>,
    /// The cipher suite's name.
    pub cipher: Option<&'static str>,
    /// The key-exchange group's name (none on a resumed TLS 1.2 connection).
    pub group: Option<&'static str>,
    /// Whether a session was resumed.
    pub resumed: bool,
    /// From the first ClientHello read to the end of the handshake.
    pub handshake: Duration,
    /// Where the certificate came from.
    pub cert_source: Source,
    /// The ClientHello's fingerprint, if a log field or the listener's `ja4_header` asked for it.
    pub ja4: Option<Ja4>,
}

impl HandshakeFacts {
    /// The facts of a completed handshake on `tls`.
    pub(crate) fn of(
        tls: &rustls::ServerConnection,
        listener: Arc<str>,
        cert_source: Source,
        handshake: Duration,
        ja4: Option<Ja4>,
    ) -> Self {
        let alpn = match tls.alpn_protocol() {
            Some(b"h2") => Some("h2"),
            Some(b"http/1.1") => Some("http/1.1"),
            _ => None, // the listener offers only those two
        };
        let tls_version = match tls.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => Some("TLSv1.3"),
            Some(rustls::ProtocolVersion::TLSv1_2) => Some("TLSv1.2"),
            _ => None,
        };
        Self {
            listener,
            alpn,
            tls_version,
            cipher: tls.negotiated_cipher_suite().and_then(|s| s.suite().as_str()),
            group: tls.negotiated_key_exchange_group().and_then(|g| g.name().as_str()),
            resumed: tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            handshake,
            cert_source,
            ja4,
        }
    }
}

/// The access log's writer and line shape, installed once for the process by [`install`].
#[derive(Debug)]
pub struct AccessLog {
    format: LogFormat,
    fields: Box<[AccessField]>,
    queue: std::sync::mpsc::SyncSender<Vec<u8>>,
}

static ACCESS_LOG: OnceLock<AccessLog> = OnceLock::new();

/// Starts the access log of `settings` (nothing when `log.access` is off): its writer thread and queue. Called
/// once by the binary at start-up; a library user that never calls it gets no access lines.
pub fn install(settings: &LogSettings) -> std::io::Result<()> {
    if !settings.access || ACCESS_LOG.get().is_some() {
        return Ok(());
    }
    let (queue, lines) = std::sync::mpsc::sync_channel(settings.access_queue);
    std::thread::Builder::new().name("tern-access-log".into()).spawn(move || write_lines(lines))?;
    let _ = ACCESS_LOG.set(AccessLog {
        format: settings.access_format,
        fields: settings.access_fields.clone().into_boxed_slice(),
        queue,
    });
    Ok(())
}

/// The installed access log, if any.
pub(crate) fn get() -> Option<&'static AccessLog> {
    ACCESS_LOG.get()
}

/// Whether the installed access log shows `ja4` (so that handshakes must compute it).
pub(crate) fn wants_ja4() -> bool {
    get().is_some_and(|log| log.fields.contains(&AccessField::Ja4))
}

/// Writes queued lines to standard error, several at a time when they pile up, until the process ends.
fn write_lines(lines: std::sync::mpsc::Receiver<Vec<u8>>) {
    const BATCH: usize = 64 << 10;
    while let Ok(mut batch) = lines.recv() {
        while batch.len() < BATCH {
            match lines.try_recv() {
                Ok(line) => batch.extend_from_slice(&line),
                Err(_) => break,
            }
        }
        // Nowhere to report a failed write to; the process log shares the stream.
        let _ = std::io::stderr().lock().write_all(&batch);
    }
}

/// Where a request went and what came back, filled in while it is forwarded.
#[derive(Debug)]
pub(super) struct Trace {
    /// Where it was sent.
    pub(super) sent: Sent,
    /// The request body's byte count, once it is being uploaded.
    pub(super) uploaded: Option<Arc<AtomicU64>>,
    /// From sending it upstream to the response head.
    pub(super) upstream: Option<Duration>,
}

impl Trace {
    /// Nothing sent yet.
    pub(super) fn new() -> Self {
        Self { sent: Sent::Nowhere, uploaded: None, upstream: None }
    }
}

/// A request's own facts, taken before it is forwarded (only when the access log is on).
#[derive(Debug)]
pub(super) struct RequestFacts {
    started: Instant,
    method: Method,
    host: String,
    path: String,
    version: Version,
}

impl RequestFacts {
    /// The facts of `req`, which arrived now.
    pub(super) fn of<B>(req: &http::Request<B>) -> Self {
        let headers = req.headers();
        let host = headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).map(str::to_owned);
        let host = host.or_else(|| req.uri().authority().map(|a| a.to_string())).unwrap_or_default();
        let path = req.uri().path_and_query().map_or_else(|| "/".to_string(), |pq| pq.to_string());
        Self { started: Instant::now(), method: req.method().clone(), host, path, version: req.version() }
    }
}

/// Everything a line needs but the response's byte count, carried by the response body until it ends.
#[derive(Debug)]
pub(super) struct Pending {
    log: &'static AccessLog,
    conn: Arc<Connection>,
    request: RequestFacts,
    status: u16,
    upstream: String,
    trace: Trace,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// Wraps `response` so that its line is written when its body ends or is dropped.
    pub(super) fn follow(
        &'static self,
        response: http::Response<Body>,
        conn: Arc<Connection>,
        request: RequestFacts,
        trace: Trace,
        backend: &http::Uri,
        metrics: Arc<Metrics>,
    ) -> http::Response<Body> {
        let upstream = super::send::SentTo(&trace.sent, backend).to_string();
        let status = response.status().as_u16();
        let pending = Pending { log: self, conn, request, status, upstream, trace, metrics };
        response.map(|inner| http_body_util::BodyExt::boxed(Logged { inner, sent: 0, pending: Some(pending) }))
    }
}

impl Pending {
    /// Formats the line and queues it.
    fn finish(self, response_bytes: u64) {
        let line = self.line(response_bytes, SystemTime::now());
        if self.log.queue.try_send(line).is_err() {
            inc(&self.metrics.access_log_dropped);
        }
    }

    fn line(&self, response_bytes: u64, now: SystemTime) -> Vec<u8> {
        let mut line = Line::start(self.log.format, now);
        for &field in self.log.fields.iter() {
            line.field(field.name(), self.value(field, response_bytes));
        }
        line.finish()
    }

    fn value(&self, field: AccessField, response_bytes: u64) -> Value {
        let (conn, tls, request) = (&*self.conn, &self.conn.tls, &self.request);
        let micros = |d: Duration| Value::Number(u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let text = |t: Option<&'static str>| t.map_or(Value::Missing, |t| Value::Text(t.into()));
        match field {
            AccessField::Client => Value::Text(conn.peer.to_string()),
            AccessField::Listener => Value::Text(tls.listener.to_string()),
            AccessField::Sni => {
                conn.servername.as_ref().map_or(Value::Missing, |n| Value::Text(Clip(n.as_str()).to_string()))
            }
            AccessField::Alpn => text(tls.alpn),
            AccessField::TlsVersion => text(tls.tls_version),
            AccessField::Cipher => text(tls.cipher),
            AccessField::Group => text(tls.group),
            AccessField::Resumed => Value::Bool(tls.resumed),
            AccessField::HandshakeUs => micros(tls.handshake),
            AccessField::CertSource => Value::Text(source_label(tls.cert_source).into()),
            AccessField::Ja4 => tls.ja4.map_or(Value::Missing, |j| Value::Text(j.to_string())),
            AccessField::Method => Value::Text(Clip(request.method.as_str()).to_string()),
            AccessField::Host => Value::Text(Clip(&request.host).to_string()),
            AccessField::Path => Value::Text(Clip(&request.path).to_string()),
            AccessField::HttpVersion => Value::Text(format!("{:?}", request.version)),
            AccessField::Status => Value::Number(u64::from(self.status)),
            AccessField::Upstream => Value::Text(self.upstream.clone()),
            AccessField::RequestBytes => {
                Value::Number(self.trace.uploaded.as_ref().map_or(0, |n| n.load(Ordering::Relaxed)))
            }
            AccessField::ResponseBytes => Value::Number(response_bytes),
            AccessField::DurationUs => micros(request.started.elapsed()),
            AccessField::UpstreamUs => self.trace.upstream.map_or(Value::Missing, micros),
        }
    }
}

/// `cert_source` as the line shows it.
fn source_label(source: Source) -> &'static str {
    match source {
        Source::Static => "static",
        Source::CacheHit => "cache",
        Source::Stale => "stale",
        Source::Plugin => "plugin",
        Source::Default => "default",
        Source::Acme => "acme",
    }
}

/// One field's value.
#[derive(Debug, PartialEq)]
enum Value {
    Text(String),
    Number(u64),
    Bool(bool),
    /// Not known for this request: `null` in JSON, `-` in text.
    Missing,
}

/// A line being written.
struct Line {
    format: LogFormat,
    out: Vec<u8>,
}

impl Line {
    /// The line's head: the time, the level and the target, as the process log writes them.
    fn start(format: LogFormat, now: SystemTime) -> Self {
        let mut out = Vec::with_capacity(512);
        let stamp = timestamp(now);
        match format {
            LogFormat::Json => {
                out.extend_from_slice(b"{\"timestamp\":\"");
                out.extend_from_slice(stamp.as_bytes());
                out.extend_from_slice(b"\",\"level\":\"INFO\",\"fields\":{\"message\":\"request\"");
            }
            LogFormat::Text => {
                out.extend_from_slice(stamp.as_bytes());
                out.extend_from_slice(b"  INFO tern::access: request");
            }
        }
        Self { format, out }
    }

    fn field(&mut self, name: &str, value: Value) {
        let out = &mut self.out;
        match self.format {
            LogFormat::Json => {
                let _ = write!(out, ",\"{name}\":");
                let written = match &value {
                    Value::Text(text) => serde_json::to_writer(&mut *out, text),
                    Value::Number(n) => serde_json::to_writer(&mut *out, n),
                    Value::Bool(b) => serde_json::to_writer(&mut *out, b),
                    Value::Missing => serde_json::to_writer(&mut *out, &()),
                };
                // Writing strings, numbers and unit to a Vec cannot fail.
                debug_assert!(written.is_ok());
            }
            LogFormat::Text => {
                let _ = write!(out, " {name}=");
                match value {
                    Value::Text(text) => text_value(out, &text),
                    Value::Number(n) => {
                        let _ = write!(out, "{n}");
                    }
                    Value::Bool(b) => {
                        let _ = write!(out, "{b}");
                    }
                    Value::Missing => out.push(b'-'),
                }
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        if self.format == LogFormat::Json {
            self.out.extend_from_slice(b"},\"target\":\"tern::access\"}");
        }
        self.out.push(b'\n');
        self.out
    }
}

/// A text value as is, or quoted (`"` and `\` escaped) when it is empty or holds a space, a quote, a backslash or
/// an `=`, so that `name=value` pairs split unambiguously. Control characters were escaped by [`Clip`] already.
fn text_value(out: &mut Vec<u8>, text: &str) {
    let plain = !text.is_empty() && !text.bytes().any(|b| matches!(b, b' ' | b'"' | b'\\' | b'=' | b'\t'));
    if plain {
        out.extend_from_slice(text.as_bytes());
        return;
    }
    out.push(b'"');
    for b in text.bytes() {
        if b == b'"' || b == b'\\' {
            out.push(b'\\');
        }
        out.push(b);
    }
    out.push(b'"');
}

/// `now` as RFC 3339 in UTC with microseconds (`2026-12-01T09:30:00.123456Z`), as the process log writes it.
fn timestamp(now: SystemTime) -> String {
    let since = now.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = i64::try_from(since.as_secs()).unwrap_or(i64::MAX);
    let (year, month, day, rem) = crate::civil::utc(secs);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// A response body that counts the bytes sent and writes the request's line when it ends or is dropped.
struct Logged {
    inner: Body,
    sent: u64,
    pending: Option<Pending>,
}

impl Logged {
    fn done(&mut self) {
        if let Some(pending) = self.pending.take() {
            pending.finish(self.sent);
        }
    }
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.sent += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.done();
                }
            }
            Poll::Ready(None | Some(Err(_))) => this.done(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        self.done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at =
            |secs: u64, micros: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros);
        assert_eq!(timestamp(at(0, 0)), "1970-01-01T00:00:00.000000Z");
        assert_eq!(timestamp(at(951_782_400, 5)), "2000-02-29T00:00:00.000005Z");
        assert_eq!(timestamp(at(1_796_121_045, 123_456)), "2026-12-01T10:30:45.123456Z");
    }

    fn line(format: LogFormat, fields: &[(&str, Value)]) -> String {
        let mut line = Line::start(format, SystemTime::UNIX_EPOCH);
        for (name, value) in fields {
            line.field(
                name,
                match value {
                    Value::Text(t) => Value::Text(t.clone()),
                    Value::Number(n) => Value::Number(*n),
                    Value::Bool(b) => Value::Bool(*b),
                    Value::Missing => Value::Missing,
                },
            );
        }
        String::from_utf8(line.finish()).unwrap()
    }

    #[test]
    fn json_lines_escape_client_text_and_stay_one_line() {
        let hostile = Clip("a\"b\\c\nd\u{1b}é").to_string();
        let text = line(
            LogFormat::Json,
            &[
                ("path", Value::Text(hostile)),
                ("status", Value::Number(200)),
                ("resumed", Value::Bool(true)),
                ("ja4", Value::Missing),
            ],
        );
        assert_eq!(text.matches('\n').count(), 1);
        assert!(text.ends_with('\n'));
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["target"], "tern::access");
        assert_eq!(json["level"], "INFO");
        assert_eq!(json["fields"]["message"], "request");
        assert_eq!(json["fields"]["path"], "a\"b\\c\\nd\\u{1b}é");
        assert_eq!(json["fields"]["status"], 200);
        assert_eq!(json["fields"]["resumed"], true);
        assert!(json["fields"]["ja4"].is_null());
    }

    #[test]
    fn text_lines_quote_what_would_split_a_pair() {
        let text = line(
            LogFormat::Text,
            &[
                ("host", Value::Text("a.test".into())),
                ("path", Value::Text("/x y=\"z\"".into())),
                ("empty", Value::Text(String::new())),
                ("upstream_us", Value::Missing),
                ("resumed", Value::Bool(false)),
            ],
        );
        assert_eq!(
            text,
            "1970-01-01T00:00:00.000000Z  INFO tern::access: request host=a.test path=\"/x y=\\\"z\\\"\" empty=\"\" \
             upstream_us=- resumed=false\n"
        );
    }

    #[test]
    fn every_certificate_source_has_its_label() {
        let labels: Vec<_> =
            [Source::Static, Source::CacheHit, Source::Stale, Source::Plugin, Source::Default, Source::Acme]
                .into_iter()
                .map(source_label)
                .collect();
        assert_eq!(labels, ["static", "cache", "stale", "plugin", "default", "acme"]);
    }
}
