//! What kind of failure a refused certificate selection was, whose fault, and how loudly to log it: the one list
//! that the handshake counters (`tern_handshakes_total{outcome}`), log fields and log levels are derived from.

/// The kind of a failed selection; one per [`crate::select::SelectError`] variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The client sent no server name and the listener is strict.
    NoSni,
    /// The server name is not a valid host name.
    MalformedSni,
    /// Nobody has a certificate for the name and the listener is strict.
    UnknownName,
    /// The plugin failed.
    Plugin,
    /// The plugin's store is down, or its rate cap or breaker shed the call, and the listener is strict.
    PluginUnavailable,
    /// The plugin's certificate is unusable.
    BadCertificate,
    /// The plugin's route or passthrough target is malformed or not granted.
    BadRoute,
    /// The name's ACME certificate is not there yet: its order is running, a budget is spent, or it backs off
    /// after a failure (what a client choosing permitted names can cause), and the listener is strict.
    AcmePending,
    /// The name's ACME order failed at the CA or in storage, and the listener is strict.
    AcmeFailed,
    /// A TLS-ALPN-01 handshake (ALPN `acme-tls/1`) for a name no order validates.
    NoChallenge,
}

impl crate::counters::Key for FailureKind {
    const ALL: &'static [FailureKind] = &[
        FailureKind::NoSni,
        FailureKind::MalformedSni,
        FailureKind::UnknownName,
        FailureKind::Plugin,
        FailureKind::PluginUnavailable,
        FailureKind::BadCertificate,
        FailureKind::BadRoute,
        FailureKind::AcmePending,
        FailureKind::AcmeFailed,
        FailureKind::NoChallenge,
    ];

    fn label(self) -> &'static str {
        match self {
            FailureKind::NoSni => "no_sni",
            FailureKind::MalformedSni => "malformed_sni",
            FailureKind::UnknownName => "unknown_name",
            FailureKind::Plugin => "plugin",
            FailureKind::PluginUnavailable => "plugin_unavailable",
            FailureKind::BadCertificate => "bad_certificate",
            FailureKind::BadRoute => "bad_route",
            FailureKind::AcmePending => "acme_pending",
            FailureKind::AcmeFailed => "acme_failed",
            FailureKind::NoChallenge => "no_challenge",
        }
    }
}

impl FailureKind {
    /// Whose fault a failure of this kind is.
    pub fn blame(self) -> Blame {
        match self {
            FailureKind::NoSni
            | FailureKind::MalformedSni
            | FailureKind::UnknownName
            | FailureKind::AcmePending
            | FailureKind::NoChallenge => Blame::Client,
            FailureKind::Plugin | FailureKind::BadCertificate | FailureKind::BadRoute => Blame::Plugin,
            FailureKind::PluginUnavailable | FailureKind::AcmeFailed => Blame::Store,
        }
    }
}

/// Whose fault a failed selection was: decides the log level (client faults are routine noise on the internet,
/// plugin faults need an operator).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// The client asked for something we do not serve.
    Client,
    /// The plugin, or what it read, misbehaved.
    Plugin,
    /// A store the plugin depends on is down.
    Store,
}

/// Emits a `tracing` event at a level chosen at run time (the macros want it fixed at compile time).
macro_rules! event_at {
    ($level:expr, $($rest:tt)+) => {
        match $level {
            tracing::Level::ERROR => tracing::error!($($rest)+),
            tracing::Level::WARN => tracing::warn!($($rest)+),
            tracing::Level::INFO => tracing::info!($($rest)+),
            tracing::Level::DEBUG => tracing::debug!($($rest)+),
            _ => tracing::trace!($($rest)+),
        }
    };
}
pub(crate) use event_at;
