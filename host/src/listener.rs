//! One listener at work: its accept loop (a listener slot and a process-wide client slot before each accept),
//! and each connection's handshake, refusal or proxying.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use crate::clip::Clip;
use crate::counters::Key as _;
use crate::failure::{Blame, event_at};
use crate::metrics::{Metrics, inc};
use crate::proxy::Proxy;
use crate::select::{Policy, Selector};
use crate::tls::{self, Outcome, Refusal, TlsTemplate};

/// A bound listener and what its connections share.
#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) name: Arc<str>,
    pub(crate) tcp: TcpListener,
    pub(crate) ctx: Arc<ListenerCtx>,
    pub(crate) connections: Arc<Semaphore>,
    pub(crate) max_connections: usize,
    /// Client connections of all listeners together (the file-descriptor budget's share).
    pub(crate) all_clients: Arc<Semaphore>,
}

/// What every connection of one listener needs.
#[derive(Debug)]
pub(crate) struct ListenerCtx {
    pub(crate) name: Arc<str>,
    pub(crate) policy: Policy,
    pub(crate) tls: TlsTemplate,
    pub(crate) proxy: Arc<Proxy>,
    pub(crate) selector: Arc<Selector>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) handshake_timeout: Duration,
    /// Connecting to a passthrough target gives up after this long (`proxy.connect_timeout`).
    pub(crate) passthrough_connect_timeout: Duration,
    pub(crate) limits: crate::config::ClientLimits,
    /// PROXY protocol from trusted peers, if the listener takes it.
    pub(crate) proxy_protocol: Option<crate::config::ProxyProtocolSettings>,
    /// Per-client limits on new and open connections, checked before the ClientHello is read.
    pub(crate) admission: Arc<crate::admission::Admission>,
    /// The request header that carries the client's JA4 fingerprint upstream (`listener.ja4_header`), if any.
    pub(crate) ja4_header: Option<http::HeaderName>,
    pub(crate) drain_signal: tokio::sync::watch::Receiver<bool>,
}

pub(crate) async fn accept_loop(listener: Listener) {
    // A socket bound to one address accepts every connection on it: only a wildcard bind needs `getsockname` per
    // connection to learn which address the client reached.
    let bound = listener.tcp.local_addr().ok().filter(|addr| !addr.ip().is_unspecified());
    loop {
        // Taking the slots before accepting leaves excess connections in the kernel's backlog: back-pressure, so
        // the process never runs out of descriptors and `accept` never fails for everyone.
        let Ok(permit) = listener.connections.clone().acquire_owned().await else {
            return;
        };
        let Ok(global) = listener.all_clients.clone().acquire_owned().await else {
            return;
        };
        let permit = (permit, global);
        match listener.tcp.accept().await {
            Ok((tcp, peer)) => {
                let ctx = listener.ctx.clone();
                tokio::spawn(async move {
                    ctx.handle(tcp, peer, bound).await;
                    drop(permit);
                });
            }
            Err(err) => {
                // Out of file descriptors and similar: back off instead of spinning on the error.
                tracing::warn!(listener = %listener.name, error = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl ListenerCtx {
    async fn handle(&self, mut tcp: TcpStream, tcp_peer: SocketAddr, bound: Option<SocketAddr>) {
        let _ = tcp.set_nodelay(true);
        // The client's hold on its admission counts: taken below, released when this connection's task ends
        // (after proxying, an upgrade or a passthrough alike).
        let mut _admitted = None;
        let handshake = async {
            // Behind a trusted load balancer, the client is who its PROXY protocol header says.
            let peer = match &self.proxy_protocol {
                None => tcp_peer,
                Some(settings) => match crate::proxy_protocol::client_of(&mut tcp, tcp_peer, settings).await {
                    Ok(client) => client,
                    Err(why) => {
                        self.metrics.proxy_protocol_refused.inc(why);
                        tracing::info!(listener = %self.name, peer = %tcp_peer, cause = %why, "connection refused");
                        return None;
                    }
                },
            };
            // Per-client limits, before the ClientHello costs anything (counted and logged by admission).
            match self.admission.admit(peer.ip()) {
                Ok(admitted) => _admitted = Some(admitted),
                Err(_) => {
                    crate::admission::close(tcp);
                    return None;
                }
            }
            match tls::accept(tcp, Some(peer.ip()), &self.selector, &self.policy, &self.tls).await {
                Ok(Outcome::Accepted(accepted)) => Some((accepted, peer)),
                Ok(Outcome::Passthrough(passthrough)) => {
                    // Boxed: the splice's future is only needed by passthrough connections.
                    Box::pin(self.pass_through(*passthrough, peer)).await;
                    None
                }
                Ok(Outcome::Challenge(servername)) => {
                    tracing::info!(listener = %self.name, %peer, %servername, "ACME TLS-ALPN-01 challenge answered");
                    None
                }
                Ok(Outcome::Refused(refusal)) => {
                    self.refused(peer, &refusal);
                    refusal.send_alert().await;
                    None
                }
                Err((servername, err)) => {
                    inc(&self.metrics.handshakes_tls_error);
                    let servername = Clip(servername.as_deref().unwrap_or(""));
                    tracing::info!(listener = %self.name, %peer, %servername, cause = %err, "handshake failed");
                    None
                }
            }
        };
        let (accepted, peer) = match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(Some(accepted)) => accepted,
            Ok(None) => return,
            Err(_) => {
                inc(&self.metrics.handshakes_timeout);
                let timeout = self.handshake_timeout;
                tracing::info!(listener = %self.name, peer = %tcp_peer, ?timeout, "handshake timed out");
                return;
            }
        };
        inc(&self.metrics.handshakes_ok);
        let tls = accepted.stream.get_ref().1;
        match tls.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_2) => inc(&self.metrics.tls12),
            Some(rustls::ProtocolVersion::TLSv1_3) => inc(&self.metrics.tls13),
            _ => {}
        }
        if tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            inc(&self.metrics.resumed);
        }
        let suite = tls.negotiated_cipher_suite().map(|s| s.suite());
        self.metrics.negotiated.record(suite, tls.negotiated_key_exchange_group().map(|g| g.name()));
        let h2 = tls.alpn_protocol() == Some(b"h2");
        tracing::debug!(listener = %self.name, %peer, servername = ?accepted.servername, source = ?accepted.source, h2, "handshake done");
        let tls::Accepted { stream, servername, source, served, hello, handshake, .. } = accepted;
        // Two SHA-256s and two sorts: only when a log field or the listener's header shows it.
        let wants_ja4 = self.ja4_header.is_some() || crate::proxy::access::wants_ja4();
        let ja4 = if wants_ja4 { crate::ja4::of_records(&hello) } else { None };
        drop(hello);
        let facts =
            crate::proxy::access::HandshakeFacts::of(stream.get_ref().1, self.name.clone(), source, handshake, ja4);
        let local = bound.or_else(|| stream.get_ref().0.get_ref().local_addr().ok());
        let conn = crate::proxy::Connection {
            peer,
            local,
            private: Default::default(),
            h2,
            servername,
            served,
            limits: self.limits.clone(),
            tls: facts,
            ja4_header: self.ja4_header.clone(),
        };
        if let Err(err) = self.proxy.clone().serve(stream, conn, self.drain_signal.clone()).await {
            tracing::debug!(listener = %self.name, %peer, error = %err, "connection ended with an error");
        }
    }

    /// Forwards a connection the plugin passes through: connects to the target (within the handshake deadline,
    /// which bounds this call), replays the client's bytes, then splices both ways until either side closes or
    /// nothing moves for `server.tunnel_idle_timeout`. The client's connection slot stays taken until then.
    async fn pass_through(&self, passthrough: tls::Passthrough, peer: SocketAddr) {
        use tokio::io::AsyncWriteExt;
        let tls::Passthrough { io, hello, target, servername, .. } = passthrough;
        let servername = servername.as_ref().map_or("", |n| n.as_str());
        let connect = tokio::net::TcpStream::connect((target.host.as_str(), target.port));
        let mut upstream = match tokio::time::timeout(self.passthrough_connect_timeout, connect).await {
            Ok(Ok(upstream)) => upstream,
            Ok(Err(err)) => {
                inc(&self.metrics.passthrough_failed);
                tracing::warn!(listener = %self.name, %peer, servername, %target, error = %err, "passthrough target unreachable");
                return;
            }
            Err(_) => {
                inc(&self.metrics.passthrough_failed);
                tracing::warn!(listener = %self.name, %peer, servername, %target, "passthrough target did not accept in time");
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        if let Err(err) = upstream.write_all(&hello).await {
            inc(&self.metrics.passthrough_failed);
            tracing::warn!(listener = %self.name, %peer, servername, %target, error = %err, "passthrough target closed");
            return;
        }
        inc(&self.metrics.passthrough);
        tracing::debug!(listener = %self.name, %peer, servername, %target, "passing through");
        let idle = self.limits.tunnel_idle_timeout;
        let spliced = crate::watchdog::splice_with_idle_timeout(io, upstream, idle);
        if let Err(err) = spliced.await {
            tracing::debug!(listener = %self.name, %peer, error = %err, "passthrough ended");
        }
    }

    /// One log line and one counter per refused handshake, at the level the failure calls for.
    fn refused(&self, peer: SocketAddr, refusal: &Refusal) {
        let err = &refusal.error;
        inc(self.metrics.handshake_failures.by(err.kind()));
        let (listener, servername, kind) =
            (&*self.name, Clip(refusal.servername.as_deref().unwrap_or("")), err.kind().label());
        // The cause may quote the name (malformed SNI): clip it too.
        let cause = err.to_string();
        let cause = crate::clip::ClipCause(&cause);
        let what = if err.blame() == Blame::Client { "handshake refused" } else { "handshake failed" };
        event_at!(err.level(), listener, %peer, %servername, kind, %cause, "{what}");
    }
}
