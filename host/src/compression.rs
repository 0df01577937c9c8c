//! Certificate compression (RFC 8879, TLS 1.3 only): the server's Certificate message sent brotli- or
//! zlib-compressed to clients that offer it, which saves about a kilobyte of the first flight of a typical chain.
//!
//! rustls compresses through `ServerConfig::cert_compressors` and remembers results in its own
//! `CompressionCache`, a linear scan over a handful of entries (4 by default): with a certificate per name that
//! is a miss nearly every time, and a large one would cost a scan per handshake. So rustls's cache is disabled
//! and each algorithm is a [`CertCompressor`] of ours that wraps rustls's compressor and remembers its output in
//! one bounded moka cache per server (count and bytes: `server.certificate_compression_cache_entries` /
//! `_bytes`), keyed by the algorithm and the SHA-256 of the uncompressed message (the chain, plus a stapled OCSP
//! response if any). A hit costs the digest and a lookup; a miss compresses inside the handshake, on the tokio
//! worker, at a level that takes tens of microseconds for a 3 KB chain (see `cert-compression` in bench/).
//!
//! rustls takes its compressors as `&'static`: [`Compression::new`] leaks one small [`Memoised`] per algorithm,
//! which reaches the cache through a `Weak`, so the cache itself goes when the server goes. A process starts one
//! server (tests start many; each leaks a few dozen bytes).

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};

use rustls::CertificateCompressionAlgorithm;
use rustls::ServerConfig;
use rustls::compress::{CertCompressor, CompressionCache, CompressionFailed, CompressionLevel};

use crate::config::{CertCompression, CompressionSettings};
use crate::counters::{Counters, Key};
use crate::metrics::{Exposition, inc};

/// Certificate messages larger than this are sent uncompressed: clients refuse larger ones anyway (rustls's limit
/// on a decompressed certificate message is 64 KiB), and compressing them would only cost time.
const MAX_INPUT: usize = 64 << 10;

/// The effort rustls's compressors are asked for on a miss. `Interactive` is brotli quality 4 and zlib's default
/// level: tens of microseconds for a 3 KB chain; `Amortized` (brotli 11, zlib 9) takes milliseconds for a few
/// bytes less (measured by `cert-compression` in bench/), too long to spend on a tokio worker.
const LEVEL: CompressionLevel = CompressionLevel::Interactive;

impl Key for CertCompression {
    const ALL: &'static [Self] = &[Self::Brotli, Self::Zlib];

    fn label(self) -> &'static str {
        CertCompression::label(self)
    }
}

/// Certificate compression counters, part of [`crate::metrics::Metrics`].
#[derive(Debug, Default)]
pub struct CompressionStats {
    /// Certificate messages sent compressed, by algorithm.
    pub compressed: Counters<CertCompression>,
    /// Compressions answered from the memo.
    pub hits: AtomicU64,
    /// Compressions computed (then remembered).
    pub misses: AtomicU64,
    /// Compressions that failed or were not attempted (too large): the certificate went uncompressed.
    pub failed: AtomicU64,
    /// Memo entries evicted for size.
    pub evictions: AtomicU64,
}

impl CompressionStats {
    /// Appends `tern_tls_certificates_compressed_total{algorithm}` and
    /// `tern_tls_certificate_compression_cache_total{outcome}`.
    pub(crate) fn render(&self, x: &mut Exposition) {
        x.family(
            "tern_tls_certificates_compressed_total",
            "counter",
            "TLS 1.3 certificate messages sent compressed (RFC 8879), by algorithm.",
        );
        x.counters("tern_tls_certificates_compressed_total", "algorithm", self.compressed.all());
        x.family(
            "tern_tls_certificate_compression_cache_total",
            "counter",
            "Certificate compressions by memo outcome; failed: sent uncompressed.",
        );
        x.counters(
            "tern_tls_certificate_compression_cache_total",
            "outcome",
            [("hit", &self.hits), ("miss", &self.misses), ("failed", &self.failed), ("evicted", &self.evictions)],
        );
    }
}

/// A server's certificate compression: the algorithms in preference order, each remembering its output in the
/// server's memo. Cloned into every listener's TLS template.
#[derive(Debug, Clone)]
pub struct Compression {
    compressors: Vec<&'static dyn CertCompressor>,
    /// Holds the memo alive; the compressors only reach it through a `Weak`.
    memo: Option<Arc<Memo>>,
}

impl Compression {
    /// The algorithms of `settings` (none: off) over one memo bounded by its entries and bytes, counting into
    /// `stats`.
    pub fn new(settings: &CompressionSettings, stats: Arc<crate::metrics::Metrics>) -> Self {
        if settings.algorithms.is_empty() {
            return Self::off();
        }
        let memo = Arc::new(Memo::new(settings, stats));
        let compressors = settings
            .algorithms
            .iter()
            .map(|&algorithm| {
                let memoised = Memoised { algorithm, inner: builtin(algorithm), memo: Arc::downgrade(&memo) };
                // rustls wants `&'static`; see the module documentation for why this leak is bounded.
                let leaked: &'static Memoised = Box::leak(Box::new(memoised));
                leaked as &'static dyn CertCompressor
            })
            .collect();
        Self { compressors, memo: Some(memo) }
    }

    /// No compression: every certificate is sent as it is.
    pub fn off() -> Self {
        Self { compressors: Vec::new(), memo: None }
    }

    /// Makes `config` compress with these algorithms, rustls's own cache disabled; compressed client
    /// certificates are not accepted (nothing asks for them, and decompressing is work a client could ask for).
    pub(crate) fn apply(&self, config: &mut ServerConfig) {
        config.cert_compressors = self.compressors.clone();
        config.cert_compression_cache = Arc::new(CompressionCache::Disabled);
        config.cert_decompressors = Vec::new();
    }

    /// The compressor rustls is given for `algorithm`, if it is configured (for benchmarks: the exact path a
    /// handshake takes).
    pub fn compressor(&self, algorithm: CertCompression) -> Option<&'static dyn CertCompressor> {
        let wanted = wire(algorithm);
        self.compressors.iter().copied().find(|c| c.algorithm() == wanted)
    }

    /// Compressed chains remembered, and their weighted bytes (after pending maintenance).
    pub fn memo_size(&self) -> (u64, u64) {
        self.memo.as_ref().map_or((0, 0), |memo| {
            memo.cache.run_pending_tasks();
            (memo.cache.entry_count(), memo.cache.weighted_size())
        })
    }
}

/// The memo key: the algorithm and the SHA-256 of the uncompressed certificate message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct MemoKey {
    algorithm: CertCompression,
    digest: [u8; 32],
}

/// Compressed certificate messages by [`MemoKey`], and the counters.
#[derive(Debug)]
struct Memo {
    cache: moka::sync::Cache<MemoKey, Arc<[u8]>>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Memo {
    fn new(settings: &CompressionSettings, metrics: Arc<crate::metrics::Metrics>) -> Self {
        // As in cache.rs: every entry weighs at least max_bytes / max_entries, so one weighted capacity bounds
        // both. Config validation keeps the slot within u32.
        let slot = u32::try_from((settings.cache_bytes / settings.cache_entries).max(1)).unwrap_or(u32::MAX);
        let evictions = metrics.clone();
        let cache = moka::sync::Cache::builder()
            .max_capacity(settings.cache_bytes)
            .weigher(move |_key: &MemoKey, value: &Arc<[u8]>| {
                let bytes = value.len().saturating_add(size_of::<MemoKey>() + 64);
                u32::try_from(bytes).unwrap_or(u32::MAX).max(slot)
            })
            .eviction_listener(move |_key, _value, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    inc(&evictions.certificate_compression.evictions);
                }
            })
            .build();
        Self { cache, metrics }
    }

    /// `input` compressed by `compressor` (of `algorithm`), from the memo or computed and remembered.
    fn compress(
        &self,
        algorithm: CertCompression,
        compressor: &dyn CertCompressor,
        input: Vec<u8>,
    ) -> Result<Vec<u8>, CompressionFailed> {
        let stats = &self.metrics.certificate_compression;
        if input.len() > MAX_INPUT {
            inc(&stats.failed);
            return Err(CompressionFailed);
        }
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &input);
        let mut key = MemoKey { algorithm, digest: [0; 32] };
        key.digest.copy_from_slice(digest.as_ref());
        if let Some(hit) = self.cache.get(&key) {
            inc(&stats.hits);
            stats.compressed.inc(algorithm);
            return Ok(hit.to_vec());
        }
        inc(&stats.misses);
        let compressed = compressor.compress(input, LEVEL).inspect_err(|_| inc(&stats.failed))?;
        self.cache.insert(key, Arc::from(compressed.as_slice()));
        stats.compressed.inc(algorithm);
        Ok(compressed)
    }
}

/// One algorithm's compressor as rustls sees it: rustls's own, remembered in the server's memo.
#[derive(Debug)]
struct Memoised {
    algorithm: CertCompression,
    inner: &'static dyn CertCompressor,
    memo: Weak<Memo>,
}

impl CertCompressor for Memoised {
    fn compress(&self, input: Vec<u8>, _level: CompressionLevel) -> Result<Vec<u8>, CompressionFailed> {
        match self.memo.upgrade() {
            Some(memo) => memo.compress(self.algorithm, self.inner, input),
            // The server is gone, a handshake of a draining connection is not: compress without remembering.
            None if input.len() <= MAX_INPUT => self.inner.compress(input, LEVEL),
            None => Err(CompressionFailed),
        }
    }

    fn algorithm(&self) -> CertificateCompressionAlgorithm {
        wire(self.algorithm)
    }
}

/// rustls's compressor of `algorithm` (the crate's `brotli` and `zlib` features).
fn builtin(algorithm: CertCompression) -> &'static dyn CertCompressor {
    match algorithm {
        CertCompression::Brotli => rustls::compress::BROTLI_COMPRESSOR,
        CertCompression::Zlib => rustls::compress::ZLIB_COMPRESSOR,
    }
}

/// The algorithm's code point on the wire.
fn wire(algorithm: CertCompression) -> CertificateCompressionAlgorithm {
    match algorithm {
        CertCompression::Brotli => CertificateCompressionAlgorithm::Brotli,
        CertCompression::Zlib => CertificateCompressionAlgorithm::Zlib,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{Metrics, get};

    fn settings(algorithms: &[CertCompression], entries: u64, bytes: u64) -> CompressionSettings {
        CompressionSettings { algorithms: algorithms.to_vec(), cache_entries: entries, cache_bytes: bytes }
    }

    /// Something shaped like a certificate message: repetitive enough to compress.
    fn message(seed: u8) -> Vec<u8> {
        (0..3000u32).map(|i| (i % 97) as u8 ^ seed).collect()
    }

    #[test]
    fn the_second_compression_of_a_message_is_a_hit_and_decompresses_to_the_input() {
        let metrics = Arc::new(Metrics::default());
        let compression = Compression::new(&settings(CertCompression::ALL, 10, 1 << 20), metrics.clone());
        for (algorithm, decompressor) in [
            (CertCompression::Brotli, rustls::compress::BROTLI_DECOMPRESSOR),
            (CertCompression::Zlib, rustls::compress::ZLIB_DECOMPRESSOR),
        ] {
            let compressor = compression.compressor(algorithm).unwrap();
            let first = compressor.compress(message(1), CompressionLevel::Interactive).unwrap();
            let second = compressor.compress(message(1), CompressionLevel::Interactive).unwrap();
            assert_eq!(first, second);
            assert!(first.len() < 3000 / 2, "{algorithm:?}: {}", first.len());
            let mut out = vec![0; 3000];
            decompressor.decompress(&second, &mut out).unwrap();
            assert_eq!(out, message(1));
            assert_eq!(metrics.certificate_compression.compressed.get(algorithm), 2);
        }
        let stats = &metrics.certificate_compression;
        assert_eq!((get(&stats.hits), get(&stats.misses), get(&stats.failed)), (2, 2, 0));
    }

    #[test]
    fn the_memo_is_bounded_and_oversized_messages_go_uncompressed() {
        let metrics = Arc::new(Metrics::default());
        // 64 KiB over 8 entries: a slot of 8 KiB each, so at most 8 messages are remembered.
        let compression = Compression::new(&settings(&[CertCompression::Zlib], 8, 64 << 10), metrics.clone());
        let compressor = compression.compressor(CertCompression::Zlib).unwrap();
        assert!(compression.compressor(CertCompression::Brotli).is_none());
        for seed in 0..50 {
            compressor.compress(message(seed), CompressionLevel::Interactive).unwrap();
        }
        let (entries, bytes) = compression.memo_size();
        assert!(entries <= 8 && bytes <= 64 << 10, "{entries} entries, {bytes} bytes");
        assert!(get(&metrics.certificate_compression.evictions) >= 42);
        assert!(compressor.compress(vec![0; MAX_INPUT + 1], CompressionLevel::Interactive).is_err());
        assert_eq!(get(&metrics.certificate_compression.failed), 1);
    }

    #[test]
    fn applying_disables_rustls_cache_and_off_means_no_compressor() {
        #[derive(Debug)]
        struct Nothing;
        impl rustls::server::ResolvesServerCert for Nothing {
            fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
                None
            }
        }
        let mut config = ServerConfig::builder_with_provider(crate::crypto::provider().clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(Nothing));
        Compression::off().apply(&mut config);
        assert!(config.cert_compressors.is_empty() && config.cert_decompressors.is_empty());
        let on = Compression::new(&CompressionSettings::default(), Arc::default());
        on.apply(&mut config);
        let offered: Vec<_> = config.cert_compressors.iter().map(|c| c.algorithm()).collect();
        assert_eq!(offered, [CertificateCompressionAlgorithm::Brotli, CertificateCompressionAlgorithm::Zlib]);
        assert!(matches!(*config.cert_compression_cache, CompressionCache::Disabled));
    }
}
