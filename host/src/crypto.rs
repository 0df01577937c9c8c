//! The crypto provider, in one place below everything that needs it (TLS acceptance, client-certificate
//! verification, certificate parsing), so that certificate parsing does not reach up into the TLS module for it.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The crypto provider used everywhere in tern (aws-lc-rs). The first call also makes it the process default:
/// a dependency (wasmtime-wasi-http's outgoing HTTPS) compiles rustls's ring feature in and calls
/// `ClientConfig::builder()`, which panics when two providers are compiled in and none is installed.
pub fn provider() -> &'static Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        // Err only if something installed a default first; that one then stays.
        let _ = CryptoProvider::install_default(provider.as_ref().clone());
        provider
    })
}
