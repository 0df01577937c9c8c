//! One ACME order through instant-acme: the account (created once per directory and shared through storage),
//! the challenge (its answer published in storage, so whichever node the CA reaches can answer it), the key and
//! CSR, and the issued chain.

use std::time::Duration;

use instant_acme::{
    Account, AuthorizationStatus, ChallengeType, ExternalAccountKey, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use zeroize::Zeroizing;

use super::record::{hex, unhex};
use super::storage::Storage;
use crate::config::{AcmeSettings, ChallengeKind, KeyType};

/// How long a published challenge answer lives (an order that takes longer has failed anyway).
pub(crate) const CHALLENGE_TTL: Duration = Duration::from_secs(600);

/// The HTTP client instant-acme talks to the CA with: system roots, or `acme.ca` for a test CA. Reads the CA file:
/// call it off the async workers.
pub(crate) fn builder(settings: &AcmeSettings) -> Result<instant_acme::AccountBuilder, String> {
    match &settings.ca {
        None => Account::builder().map_err(|e| format!("ACME HTTP client: {e}")),
        Some(ca) => Account::builder_with_root(ca).map_err(|e| format!("acme.ca {}: {e}", ca.display())),
    }
}

/// A new account on the directory (External Account Binding if configured); its credentials as JSON.
pub(crate) async fn create_account(
    settings: &AcmeSettings,
    builder: instant_acme::AccountBuilder,
) -> Result<(Account, Zeroizing<Vec<u8>>), String> {
    let contact: Vec<&str> = settings.contact.iter().map(String::as_str).collect();
    let eab = match &settings.eab {
        None => None,
        Some(eab) => {
            use base64::Engine as _;
            let text = std::str::from_utf8(eab.hmac.bytes()).map_err(|_| "acme.eab_hmac: not text".to_string())?;
            let key = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(text.trim().trim_end_matches('='))
                .map_err(|_| "acme.eab_hmac: not base64url".to_string())?;
            Some(ExternalAccountKey::new(eab.kid.clone(), &key))
        }
    };
    let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
    let (account, credentials) = builder
        .create(&new, settings.directory.clone(), eab.as_ref())
        .await
        .map_err(|e| format!("creating the ACME account: {e}"))?;
    let json = serde_json::to_vec(&credentials).map_err(|e| format!("serialising the account: {e}"))?;
    Ok((account, Zeroizing::new(json)))
}

/// An account from stored credentials.
pub(crate) async fn restore_account(builder: instant_acme::AccountBuilder, json: &[u8]) -> Result<Account, String> {
    let credentials: instant_acme::AccountCredentials =
        serde_json::from_slice(json).map_err(|e| format!("stored ACME account unreadable: {e}"))?;
    builder.from_credentials(credentials).await.map_err(|e| format!("restoring the ACME account: {e}"))
}

/// What an order produced.
pub(crate) struct Issued {
    /// PEM chain.
    pub chain: String,
    /// PEM private key.
    pub key: Zeroizing<String>,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued").field("chain_bytes", &self.chain.len()).field("key", &"<redacted>").finish()
    }
}

/// The storage key of a challenge answer.
pub(crate) fn tls_challenge(name: &str) -> String {
    format!("tls:{name}")
}

/// The storage key of an HTTP-01 answer.
pub(crate) fn http_challenge(token: &str) -> String {
    format!("http:{token}")
}

/// Orders a certificate for `name` and waits for it (the caller bounds the whole order with
/// `acme.order_timeout`). Challenge answers are withdrawn whatever happens.
pub(crate) async fn order(
    account: &Account,
    settings: &AcmeSettings,
    storage: &Storage,
    name: &str,
) -> Result<Issued, String> {
    let identifiers = [Identifier::Dns(name.to_string())];
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await.map_err(|e| format!("new order: {e}"))?;
    let mut published = Vec::new();
    let outcome = async {
        let mut authorizations = order.authorizations();
        while let Some(authz) = authorizations.next().await {
            let mut authz = authz.map_err(|e| format!("authorization: {e}"))?;
            match authz.status {
                AuthorizationStatus::Pending => {}
                AuthorizationStatus::Valid => continue,
                other => return Err(format!("authorization is {other:?}")),
            }
            let kind = match settings.challenge {
                ChallengeKind::TlsAlpn01 => ChallengeType::TlsAlpn01,
                ChallengeKind::Http01 => ChallengeType::Http01,
            };
            let wanted = format!("{kind:?}");
            let mut challenge = authz.challenge(kind).ok_or_else(|| format!("the CA offers no {wanted} challenge"))?;
            let key_authorization = challenge.key_authorization();
            let (what, value) = match settings.challenge {
                ChallengeKind::TlsAlpn01 => (tls_challenge(name), hex(key_authorization.digest().as_ref())),
                ChallengeKind::Http01 => (http_challenge(&challenge.token), key_authorization.as_str().to_string()),
            };
            storage.put_challenge(&what, &value, CHALLENGE_TTL).await.map_err(|e| e.to_string())?;
            published.push(what);
            challenge.set_ready().await.map_err(|e| format!("challenge: {e}"))?;
        }
        let retries = RetryPolicy::new().initial_delay(Duration::from_millis(200)).timeout(settings.order_timeout);
        let status = order.poll_ready(&retries).await.map_err(|e| format!("waiting for validation: {e}"))?;
        if status != OrderStatus::Ready {
            return Err(format!("order is {status:?} after validation{}", problem_of(&mut order)));
        }
        let key_type = settings.key_type;
        let name_owned = name.to_string();
        // Key generation (RSA takes tens of milliseconds) and signing the CSR are CPU work: off the workers.
        let (csr, key) = tokio::task::spawn_blocking(move || csr_for(&name_owned, key_type))
            .await
            .map_err(|e| format!("generating the key: {e}"))??;
        order.finalize_csr(&csr).await.map_err(|e| format!("finalize: {e}"))?;
        let chain = order.poll_certificate(&retries).await.map_err(|e| format!("downloading the certificate: {e}"))?;
        Ok(Issued { chain, key })
    }
    .await;
    for what in published {
        let _ = storage.delete_challenge(&what).await;
    }
    outcome
}

fn problem_of(order: &mut instant_acme::Order) -> String {
    order.state().error.as_ref().map_or(String::new(), |p| format!(": {p}"))
}

/// A fresh key of `key_type` and a CSR for `name` signed with it.
fn csr_for(name: &str, key_type: KeyType) -> Result<(Vec<u8>, Zeroizing<String>), String> {
    let algorithm = match key_type {
        KeyType::EcdsaP256 => &rcgen::PKCS_ECDSA_P256_SHA256,
        KeyType::Rsa2048 => &rcgen::PKCS_RSA_SHA256,
    };
    let key = match key_type {
        KeyType::EcdsaP256 => rcgen::KeyPair::generate_for(algorithm),
        KeyType::Rsa2048 => rcgen::KeyPair::generate_rsa_for(algorithm, rcgen::RsaKeySize::_2048),
    }
    .map_err(|e| format!("generating the key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| format!("CSR: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params.serialize_request(&key).map_err(|e| format!("CSR: {e}"))?;
    Ok((csr.der().to_vec(), Zeroizing::new(key.serialize_pem())))
}

/// The self-signed certificate that answers a TLS-ALPN-01 challenge (RFC 8737): the name, and the SHA-256 of
/// the key authorization in the critical `acmeIdentifier` extension. `digest_hex` comes from storage.
pub(crate) fn challenge_certificate(name: &str, digest_hex: &str) -> Result<rustls::sign::CertifiedKey, String> {
    let digest = unhex(digest_hex).filter(|d| d.len() == 32).ok_or("stored challenge digest is malformed")?;
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(&digest)];
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let signing = crate::crypto::provider().key_provider.load_private_key(der).map_err(|e| e.to_string())?;
    Ok(rustls::sign::CertifiedKey::new(vec![cert.der().clone()], signing))
}

/// The certificate identifier ACME Renewal Information is asked about.
pub(crate) fn certificate_id(chain_pem: &str) -> Option<instant_acme::CertificateIdentifier<'static>> {
    use rustls::pki_types::pem::PemObject;
    let leaf = rustls::pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes()).next()?.ok()?;
    instant_acme::CertificateIdentifier::try_from(&leaf).ok().map(|id| id.into_owned())
}
