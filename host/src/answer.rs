//! What a handshake is answered with once selection is done: a set of certificates and the route of the
//! connection's requests, or a passthrough target. The one internal answer type: static certificates, the
//! listener's default, and plugins of either contract version all end up here.

use std::sync::Arc;
use std::time::Duration;

use rustls::SignatureScheme;

use crate::certs::ParsedCert;
use crate::route::{Route, Target};
use crate::sni::ServerName;

/// Terminate TLS with one of these certificates and send the requests along `route`.
#[derive(Debug)]
pub struct Served {
    /// Validated, in the plugin's order of preference; never empty.
    certs: Box<[Arc<ParsedCert>]>,
    /// Where requests go.
    pub route: Route,
}

impl Served {
    /// One certificate, to the listener's backend (static and default certificates, 0.1 plugins).
    pub fn single(cert: Arc<ParsedCert>) -> Self {
        Self { certs: Box::new([cert]), route: Route::Listener }
    }

    /// A validated set (at least one member) and its route. `None` if `certs` is empty.
    pub fn new(certs: Vec<Arc<ParsedCert>>, route: Route) -> Option<Self> {
        (!certs.is_empty()).then(|| Self { certs: certs.into_boxed_slice(), route })
    }

    /// Every certificate of the set.
    pub fn certs(&self) -> &[Arc<ParsedCert>] {
        &self.certs
    }

    /// The first certificate (the plugin's preference).
    pub fn primary(&self) -> &Arc<ParsedCert> {
        // `new` and `single` never build an empty set.
        &self.certs[0]
    }

    /// The first certificate whose key can sign with one of the client's signature schemes; the first of the set
    /// if none can (rustls then refuses the handshake with the right alert). A few comparisons: no I/O.
    pub fn for_client(&self, schemes: &[SignatureScheme]) -> &Arc<ParsedCert> {
        if self.certs.len() == 1 {
            return self.primary();
        }
        self.certs.iter().find(|cert| cert.certified.key.choose_scheme(schemes).is_some()).unwrap_or(self.primary())
    }

    /// Whether some member covers `name` (a request's host on this connection).
    pub fn covers(&self, name: &ServerName) -> bool {
        self.certs.iter().any(|cert| cert.check_covers(name).is_ok())
    }

    /// Until the first member expires.
    pub fn remaining_validity(&self) -> Duration {
        self.certs.iter().map(|c| c.remaining_validity()).min().unwrap_or_default()
    }

    /// Estimated bytes held (cache weighing).
    pub fn bytes(&self) -> usize {
        self.certs.iter().map(|c| c.bytes).sum::<usize>() + self.route.bytes() + 32
    }
}

/// What selection decided for one handshake.
#[derive(Debug, Clone)]
pub enum Choice {
    /// Terminate TLS.
    Serve(Arc<Served>),
    /// Forward the connection untouched.
    Passthrough(Arc<Target>),
}

impl Choice {
    /// The served set, unless this is a passthrough.
    pub fn served(&self) -> Option<&Arc<Served>> {
        match self {
            Choice::Serve(served) => Some(served),
            Choice::Passthrough(_) => None,
        }
    }
}
