//! Sealing with AES-256-GCM: ticket contents, session state at rest in Redis, and ticket keys at rest.
//!
//! Keys live in [`Zeroizing`] buffers and the AES round keys are wiped on drop (the `aes` crate's `zeroize`
//! feature), so a dropped key leaves no copy behind in memory tern owns.
//!
//! Nonces count up from a random 96-bit start drawn once per process ([`next_nonce`]). Keys are shared by every
//! node of a fleet, so what must never repeat is a nonce under one key across all nodes: a node's nonces are a run
//! of consecutive values from its own random start, and two nodes collide only if their runs overlap, with
//! probability (count₁ + count₂) / 2⁹⁶ per pair of nodes; nonces drawn at random per message instead collide
//! after ~2⁴⁸ messages in all (birthday bound), and long before that pass NIST's 2³² per key. The count also
//! spares a call to the system's random source per ticket.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use zeroize::Zeroizing;

/// Bytes of nonce in front of every sealed message.
pub const NONCE_LEN: usize = 12;
/// Bytes of authentication tag after every sealed message.
pub const TAG_LEN: usize = 16;

/// An AES-256-GCM key.
pub struct SealingKey {
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for SealingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealingKey(..)")
    }
}

impl SealingKey {
    /// A key from 32 secret bytes (the caller's copy stays the caller's to wipe).
    pub fn new(bytes: &[u8; 32]) -> Self {
        Self { cipher: Aes256Gcm::new(bytes.into()) }
    }

    /// `nonce || ciphertext || tag`, authenticated together with `aad`. `None` only if the system's random source
    /// fails.
    pub fn seal(&self, plain: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        let nonce = next_nonce()?;
        let sealed = self.cipher.encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad }).ok()?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(out)
    }

    /// The plaintext of a [`seal`](Self::seal)ed message, or `None` if it was not sealed by this key with this
    /// `aad`, or was altered.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        self.cipher.decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad }).ok().map(Zeroizing::new)
    }
}

/// This process's next nonce: its random start plus the count of nonces taken before, modulo 2⁹⁶ (big-endian).
/// `None` only if the system's random source failed when the start was drawn (then it is tried again next time).
fn next_nonce() -> Option<[u8; NONCE_LEN]> {
    static START: OnceLock<u128> = OnceLock::new();
    static TAKEN: AtomicU64 = AtomicU64::new(0);
    let start = match START.get() {
        Some(start) => *start,
        None => {
            let mut bytes = [0u8; 16];
            SystemRandom::new().fill(&mut bytes[16 - NONCE_LEN..]).ok()?;
            *START.get_or_init(|| u128::from_be_bytes(bytes))
        }
    };
    Some(nonce_at(start, TAKEN.fetch_add(1, Ordering::Relaxed)))
}

/// The nonce `taken` places after `start`, modulo 2⁹⁶.
fn nonce_at(start: u128, taken: u64) -> [u8; NONCE_LEN] {
    let value = start.wrapping_add(u128::from(taken)) & ((1u128 << 96) - 1);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&value.to_be_bytes()[16 - NONCE_LEN..]);
    nonce
}

/// 32 random bytes, e.g. a fresh ticket key.
pub fn random_key() -> Option<Zeroizing<[u8; 32]>> {
    let mut key = Zeroizing::new([0u8; 32]);
    SystemRandom::new().fill(key.as_mut()).ok()?;
    Some(key)
}

/// `n` random bytes (key names, node ids).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    // The system random source does not fail on Linux once the kernel's pool is initialised; if it ever did, an
    // all-zero name only costs uniqueness of a label, never secrecy.
    let _ = SystemRandom::new().fill(&mut out);
    out
}

/// A purpose-specific key from the operator's shared secret: SHA-256 over a label and the secret. Different labels
/// give independent keys, so sealing session state and sealing ticket keys never share a key.
pub fn derive(secret: &[u8], label: &str) -> Zeroizing<[u8; 32]> {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    context.update(b"tern resumption v1\0");
    context.update(label.as_bytes());
    context.update(b"\0");
    context.update(secret);
    let digest = context.finish();
    let mut key = Zeroizing::new([0u8; 32]);
    key.copy_from_slice(digest.as_ref());
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_messages_open_only_with_the_same_key_and_aad() {
        let key = SealingKey::new(&derive(b"a shared secret of some length", "sessions"));
        let other = SealingKey::new(&derive(b"a shared secret of some length", "ticket-keys"));
        let sealed = key.seal(b"session state", b"scope-a").unwrap();
        assert_eq!(key.open(&sealed, b"scope-a").unwrap().as_slice(), b"session state");
        assert!(key.open(&sealed, b"scope-b").is_none(), "another scope's AAD must not open it");
        assert!(other.open(&sealed, b"scope-a").is_none(), "another purpose's key must not open it");
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(key.open(&tampered, b"scope-a").is_none());
        assert!(key.open(&sealed[..20], b"scope-a").is_none());
        assert_ne!(key.seal(b"session state", b"scope-a").unwrap(), sealed, "nonces are fresh");
        assert!(!sealed.windows(13).any(|w| w == b"session state"), "nothing in clear");
    }

    #[test]
    fn nonces_count_up_from_the_process_start_and_wrap_at_96_bits() {
        let first = next_nonce().unwrap();
        let second = next_nonce().unwrap();
        let value =
            |n: [u8; NONCE_LEN]| u128::from_be_bytes([[0u8; 4].as_slice(), n.as_slice()].concat().try_into().unwrap());
        // Other tests may seal in between, but never take a nonce twice.
        assert!(value(second).wrapping_sub(value(first)) & ((1 << 96) - 1) >= 1);
        let top = (1u128 << 96) - 1;
        assert_eq!(nonce_at(top, 0), [0xff; NONCE_LEN]);
        assert_eq!(nonce_at(top, 1), [0; NONCE_LEN], "wraps within 96 bits");
        assert_eq!(nonce_at(5, 3)[NONCE_LEN - 1], 8);
        let sealed: Vec<_> = (0..3)
            .map(|_| {
                let key = SealingKey::new(&derive(b"secret", "x"));
                key.seal(b"m", b"").unwrap()[..NONCE_LEN].to_vec()
            })
            .collect();
        assert!(sealed[0] != sealed[1] && sealed[1] != sealed[2], "a sealed message carries a fresh nonce");
    }
}
