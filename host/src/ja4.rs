//! JA4, the TLS client fingerprint of FoxIO's specification (`t13d1516h2_8daaf6152771_e5627efa2ab1`), computed from
//! the ClientHello bytes [`crate::tls::accept`] read from the client.
//!
//! `a_b_c`: *a* is the transport (`t`: TLS over TCP), the version (the highest of `supported_versions`, else the
//! hello's legacy version), `d` or `i` for an SNI extension present or not, the two-digit counts of cipher suites and
//! extensions, and the first and last character of the first ALPN value; *b* the first 12 hex digits of the SHA-256
//! of the sorted cipher suites (4 hex digits each, comma separated); *c* the same of the sorted extensions without
//! SNI (`0000`) and ALPN (`0010`), then `_` and the signature algorithms in the client's order. GREASE values
//! (RFC 8701) are skipped everywhere; an empty list hashes to `000000000000`.
//!
//! The input is whatever a client sent: any truncated or malformed hello gives `None`, never a panic. The cost is
//! two SHA-256s over a few hundred bytes and two small sorts per handshake, so callers compute it only when a log
//! field or an upstream header asks for it.

use std::fmt;

use aws_lc_rs::digest;

/// A JA4 fingerprint: always 36 ASCII characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ja4([u8; LEN]);

/// Length of a fingerprint: 10 + `_` + 12 + `_` + 12.
const LEN: usize = 36;

impl Ja4 {
    /// The fingerprint as text.
    pub fn as_str(&self) -> &str {
        // Every byte written is ASCII (see `build`); a failure here would be a bug, shown as an empty string.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for Ja4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Ja4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ja4({})", self.as_str())
    }
}

/// The fingerprint of the ClientHello at the start of `records`: TLS records as read from the wire (a hello split
/// across several handshake records is joined). Bytes after the hello are ignored.
pub fn of_records(records: &[u8]) -> Option<Ja4> {
    const HANDSHAKE: u8 = 22;
    let mut rest = records;
    let mut joined: Vec<u8> = Vec::new();
    loop {
        let mut record = Reader(rest);
        if record.u8()? != HANDSHAKE {
            return None;
        }
        let _legacy_version = record.u16()?;
        let length = usize::from(record.u16()?);
        let fragment = record.take(length)?;
        rest = record.0;
        // The common case, the whole hello in the first record, is read in place.
        if joined.is_empty() && message_len(fragment).is_some_and(|len| len <= fragment.len()) {
            return of_handshake(fragment);
        }
        if fragment.is_empty() {
            return None;
        }
        joined.extend_from_slice(fragment);
        match message_len(&joined) {
            Some(len) if len <= joined.len() => return of_handshake(&joined),
            // tls::accept reads at most 64 KiB; a message claiming more is never completed here.
            Some(len) if len > MAX_MESSAGE => return None,
            _ => {}
        }
    }
}

/// The longest ClientHello message considered (the handshake reader's own bound).
const MAX_MESSAGE: usize = 64 << 10;

/// The whole length (header included) a handshake message says it has, once its 4-byte header is there.
fn message_len(bytes: &[u8]) -> Option<usize> {
    let mut header = Reader(bytes);
    let _kind = header.u8()?;
    Some(4 + header.u24()?)
}

/// The fingerprint of one ClientHello handshake message (type 1, 24-bit length, body).
pub fn of_handshake(message: &[u8]) -> Option<Ja4> {
    const CLIENT_HELLO: u8 = 1;
    let mut r = Reader(message);
    if r.u8()? != CLIENT_HELLO {
        return None;
    }
    let length = r.u24()?;
    let mut hello = Reader(r.take(length)?);
    let legacy_version = hello.u16()?;
    hello.take(32)?; // random
    let session_id = usize::from(hello.u8()?);
    hello.take(session_id)?;
    let suites = usize::from(hello.u16()?);
    if suites % 2 != 0 {
        return None;
    }
    let mut ciphers = u16s(hello.take(suites)?);
    let compression = usize::from(hello.u8()?);
    hello.take(compression)?;
    let mut parsed = Extensions::default();
    if !hello.0.is_empty() {
        let length = usize::from(hello.u16()?);
        parsed = Extensions::parse(hello.take(length)?)?;
    }
    ciphers.retain(|&c| !is_grease(c));
    Some(build(legacy_version, &mut ciphers, &mut parsed))
}

/// What the fingerprint needs of the extensions.
#[derive(Default)]
struct Extensions<'a> {
    /// Extension types in the client's order, GREASE skipped.
    types: Vec<u16>,
    /// The highest non-GREASE version of `supported_versions`, if that extension was sent.
    version: Option<u16>,
    /// The first ALPN value, if any.
    alpn: Option<&'a [u8]>,
    /// Signature algorithms in the client's order, GREASE skipped.
    signatures: Vec<u16>,
}

impl<'a> Extensions<'a> {
    fn parse(bytes: &'a [u8]) -> Option<Self> {
        const SUPPORTED_VERSIONS: u16 = 0x002b;
        const ALPN: u16 = 0x0010;
        const SIGNATURE_ALGORITHMS: u16 = 0x000d;
        let mut all = Reader(bytes);
        let mut found = Self { types: Vec::with_capacity(20), ..Self::default() };
        while !all.0.is_empty() {
            let kind = all.u16()?;
            let length = usize::from(all.u16()?);
            let mut data = Reader(all.take(length)?);
            if is_grease(kind) {
                continue;
            }
            found.types.push(kind);
            match kind {
                SUPPORTED_VERSIONS => {
                    let length = usize::from(data.u8()?);
                    let listed = data.take(length)?;
                    found.version = u16s(listed).into_iter().filter(|&v| !is_grease(v)).max();
                }
                ALPN => {
                    let length = usize::from(data.u16()?);
                    let mut list = Reader(data.take(length)?);
                    if !list.0.is_empty() {
                        let length = usize::from(list.u8()?);
                        found.alpn = Some(list.take(length)?);
                    }
                }
                SIGNATURE_ALGORITHMS => {
                    let length = usize::from(data.u16()?);
                    found.signatures = u16s(data.take(length)?);
                    found.signatures.retain(|&s| !is_grease(s));
                }
                _ => {}
            }
        }
        Some(found)
    }
}

/// Assembles the fingerprint (sorting `ciphers` and the extension types in place).
fn build(legacy_version: u16, ciphers: &mut [u16], ext: &mut Extensions<'_>) -> Ja4 {
    const SNI: u16 = 0x0000;
    const ALPN: u16 = 0x0010;
    let mut out = [b'0'; LEN];
    out[0] = b't';
    out[1..3].copy_from_slice(version_code(ext.version.unwrap_or(legacy_version)));
    out[3] = if ext.types.contains(&SNI) { b'd' } else { b'i' };
    out[4..6].copy_from_slice(&two_digits(ciphers.len()));
    out[6..8].copy_from_slice(&two_digits(ext.types.len()));
    out[8..10].copy_from_slice(&alpn_code(ext.alpn));
    out[10] = b'_';
    ciphers.sort_unstable();
    if !ciphers.is_empty() {
        let mut hash = digest::Context::new(&digest::SHA256);
        hex_list(&mut hash, ciphers);
        hex12(&mut out[11..23], hash);
    }
    out[23] = b'_';
    ext.types.retain(|&t| t != SNI && t != ALPN);
    ext.types.sort_unstable();
    if !ext.types.is_empty() {
        let mut hash = digest::Context::new(&digest::SHA256);
        hex_list(&mut hash, &ext.types);
        if !ext.signatures.is_empty() {
            hash.update(b"_");
            hex_list(&mut hash, &ext.signatures);
        }
        hex12(&mut out[24..36], hash);
    }
    Ja4(out)
}

/// GREASE values (RFC 8701): `0x?a?a` with both bytes equal.
fn is_grease(value: u16) -> bool {
    value & 0x0f0f == 0x0a0a && value >> 8 == value & 0xff
}

/// The specification's two characters for a protocol version.
fn version_code(version: u16) -> &'static [u8; 2] {
    match version {
        0x0304 => b"13",
        0x0303 => b"12",
        0x0302 => b"11",
        0x0301 => b"10",
        0x0300 => b"s3",
        0x0200 | 0x0002 => b"s2",
        0x0100 => b"s1",
        0xfeff => b"d1",
        0xfefd => b"d2",
        0xfefc => b"d3",
        _ => b"00",
    }
}

/// A count as two digits, 99 at most.
fn two_digits(count: usize) -> [u8; 2] {
    let count = count.min(99) as u8;
    [b'0' + count / 10, b'0' + count % 10]
}

/// First and last character of the first ALPN value (`00` without one); when either is not an ASCII letter or
/// digit, the first and last hex digit of the value instead.
fn alpn_code(alpn: Option<&[u8]>) -> [u8; 2] {
    let (Some(&first), Some(&last)) = (alpn.and_then(<[u8]>::first), alpn.and_then(<[u8]>::last)) else {
        return *b"00";
    };
    if first.is_ascii_alphanumeric() && last.is_ascii_alphanumeric() {
        [first, last]
    } else {
        [HEX[usize::from(first >> 4)], HEX[usize::from(last & 0x0f)]]
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Feeds `values` to `hash` as `xxxx,xxxx,...` (lowercase hex).
fn hex_list(hash: &mut digest::Context, values: &[u16]) {
    for (i, value) in values.iter().enumerate() {
        let [hi, lo] = value.to_be_bytes();
        let text = [
            HEX[usize::from(hi >> 4)],
            HEX[usize::from(hi & 15)],
            HEX[usize::from(lo >> 4)],
            HEX[usize::from(lo & 15)],
        ];
        if i > 0 {
            hash.update(b",");
        }
        hash.update(&text);
    }
}

/// Writes the first 12 hex digits of the finished hash into `out` (12 bytes).
fn hex12(out: &mut [u8], hash: digest::Context) {
    let digest = hash.finish();
    for (pair, byte) in out.chunks_exact_mut(2).zip(digest.as_ref()) {
        pair[0] = HEX[usize::from(byte >> 4)];
        pair[1] = HEX[usize::from(byte & 15)];
    }
}

/// Big-endian 16-bit values (an odd trailing byte is ignored; callers check lengths where it matters).
fn u16s(bytes: &[u8]) -> Vec<u16> {
    bytes.chunks_exact(2).map(|pair| u16::from_be_bytes([pair[0], pair[1]])).collect()
}

/// A cursor over client bytes: every read checks the length and gives `None` past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }

    fn u24(&mut self) -> Option<usize> {
        self.take(3).map(|b| usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

#[cfg(test)]
mod tests;
