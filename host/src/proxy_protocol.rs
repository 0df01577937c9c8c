//! PROXY protocol v1 and v2 on accepted connections (what HAProxy's `send-proxy` and `send-proxy-v2` and most load
//! balancers send before the TLS bytes), read before the handshake and under its deadline.
//!
//! Only peers in the listener's trusted networks may speak it: a header from anyone else is a forgery and the
//! connection is closed; a trusted peer must send one when `required` (the default). A `LOCAL` header (health
//! checks) or an address family without IP addresses leaves the TCP peer as the client. The header is peeked, then
//! exactly its bytes are read, so the TLS bytes behind it stay in the socket untouched. Parsing is the `ppp` crate's.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 signature, the first 12 bytes of every v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The first bytes of every v1 header.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// The longest v1 header (the specification's bound, CRLF included).
const V1_MAX: usize = 107;
/// The longest v2 header accepted: 16 fixed bytes and addresses plus TLVs. HAProxy sends well under this; a longer
/// one is refused rather than buffered.
const V2_MAX: usize = 16 + 2048;
/// How long to wait before looking again when the bytes so far are the start of a header (a peer that sends it in
/// pieces). The handshake deadline bounds the whole wait.
const RETRY: Duration = Duration::from_millis(5);

/// `listener.proxy_protocol`: who may tell tern the client's real address, and whether they must.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyProtocolSettings {
    /// Peers that may (and, with `required`, must) send a PROXY protocol v1 or v2 header.
    pub trusted: Vec<Cidr>,
    /// Refuse a trusted peer's connection that comes without a header.
    pub required: bool,
}

/// An IP network (`10.0.0.0/8`, `2001:db8::/32`, or one address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the network (an IPv4 address in IPv6-mapped form counts as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    /// Parses `address/prefix` or a single address.
    fn from_str(text: &str) -> Result<Self, String> {
        let (address, prefix) = text.split_once('/').map_or((text, None), |(a, p)| (a, Some(p)));
        let network: IpAddr =
            address.trim().parse().map_err(|_| format!("{text:?}: expected an IP address or network (10.0.0.0/8)"))?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("{text:?}: prefix length 0 to {bits}"))?,
        };
        Ok(Self { network, prefix })
    }
}

/// Why a connection was closed before its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// A peer outside the trusted networks sent a header.
    #[error("PROXY protocol header from an untrusted peer")]
    Untrusted,
    /// A trusted peer sent no header and one is required.
    #[error("no PROXY protocol header from a trusted peer")]
    Missing,
    /// The header does not parse.
    #[error("malformed PROXY protocol header")]
    Malformed,
    /// The header is longer than tern reads.
    #[error("PROXY protocol header too long")]
    TooLong,
    /// The peer closed or the read failed before the header was complete.
    #[error("connection closed before the PROXY protocol header was complete")]
    Closed,
}

impl crate::counters::Key for Refused {
    const ALL: &'static [Refused] =
        &[Refused::Untrusted, Refused::Missing, Refused::Malformed, Refused::TooLong, Refused::Closed];

    fn label(self) -> &'static str {
        match self {
            Refused::Untrusted => "untrusted",
            Refused::Missing => "missing",
            Refused::Malformed => "malformed",
            Refused::TooLong => "too_long",
            Refused::Closed => "closed",
        }
    }
}

/// What the first bytes of a connection are.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// A complete header of this many bytes.
    Header(usize),
    /// Possibly the start of a header: more bytes are needed to tell.
    Partial,
    /// Not a PROXY protocol header.
    Other,
}

/// Classifies the first bytes of a connection.
fn classify(bytes: &[u8]) -> Result<Start, Refused> {
    if bytes.starts_with(V2_SIGNATURE) {
        if bytes.len() < 16 {
            return Ok(Start::Partial);
        }
        let total = 16 + usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        return if total > V2_MAX {
            Err(Refused::TooLong)
        } else if bytes.len() >= total {
            Ok(Start::Header(total))
        } else {
            Ok(Start::Partial)
        };
    }
    if bytes.starts_with(V1_PREFIX) {
        let window = &bytes[..bytes.len().min(V1_MAX)];
        return match window.windows(2).position(|pair| pair == b"\r\n") {
            Some(end) => Ok(Start::Header(end + 2)),
            None if bytes.len() >= V1_MAX => Err(Refused::TooLong),
            None => Ok(Start::Partial),
        };
    }
    let is_prefix_of = |signature: &[u8]| !bytes.is_empty() && signature.starts_with(bytes);
    Ok(if is_prefix_of(V2_SIGNATURE) || is_prefix_of(V1_PREFIX) { Start::Partial } else { Start::Other })
}

/// The client's address from a complete header; `None` for `LOCAL` and for families without IP addresses.
fn source_of(header: &[u8]) -> Result<Option<SocketAddr>, Refused> {
    match ppp::HeaderResult::parse(header) {
        ppp::HeaderResult::V2(Ok(h)) => Ok(match (h.command, h.addresses) {
            (ppp::v2::Command::Local, _) => None,
            (_, ppp::v2::Addresses::IPv4(a)) => Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
            (_, ppp::v2::Addresses::IPv6(a)) => Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
            _ => None,
        }),
        ppp::HeaderResult::V1(Ok(h)) => Ok(match h.addresses {
            ppp::v1::Addresses::Tcp4(a) => Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port)),
            ppp::v1::Addresses::Tcp6(a) => Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port)),
            ppp::v1::Addresses::Unknown => None,
        }),
        _ => Err(Refused::Malformed),
    }
}

/// Fuzz entry: classifies `data` as the start of a connection and parses the header it holds, if complete. A
/// header's length never exceeds the input.
#[doc(hidden)]
pub fn fuzz_classify_and_parse(data: &[u8]) {
    if let Ok(Start::Header(length)) = classify(data) {
        assert!(length <= data.len());
        let _ = source_of(&data[..length]);
    }
}

/// Reads the PROXY protocol header a connection from `peer` starts with, as `settings` allow, and returns the
/// client's address (`peer` itself when there is no header, or a `LOCAL` one). The caller bounds it with the
/// handshake deadline.
pub async fn client_of(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    settings: &ProxyProtocolSettings,
) -> Result<SocketAddr, Refused> {
    let trusted = settings.trusted.iter().any(|net| net.contains(peer.ip()));
    let mut buf = vec![0u8; V2_MAX];
    let length = loop {
        let seen = tcp.peek(&mut buf).await.map_err(|_| Refused::Closed)?;
        if seen == 0 {
            return Err(Refused::Closed);
        }
        match classify(&buf[..seen])? {
            Start::Header(length) => break Some(length),
            Start::Other => break None,
            Start::Partial => tokio::time::sleep(RETRY).await,
        }
    };
    match (length, trusted) {
        (Some(_), false) => Err(Refused::Untrusted),
        (None, true) if settings.required => Err(Refused::Missing),
        (None, _) => Ok(peer),
        (Some(length), true) => {
            let mut header = vec![0u8; length];
            tcp.read_exact(&mut header).await.map_err(|_| Refused::Closed)?;
            Ok(source_of(&header)?.unwrap_or(peer))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (source, destination),
        )
        .build()
        .unwrap()
    }

    #[test]
    fn headers_are_told_from_tls_and_their_length_found() {
        let from: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let header = v2(from, "127.0.0.1:443".parse().unwrap());
        assert_eq!(classify(&header), Ok(Start::Header(header.len())));
        assert_eq!(classify(&header[..10]), Ok(Start::Partial));
        assert_eq!(source_of(&header), Ok(Some(from)));
        let v1 = b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 443\r\n\x16\x03\x01";
        assert_eq!(classify(v1), Ok(Start::Header(v1.len() - 3)));
        assert_eq!(source_of(&v1[..v1.len() - 3]), Ok(Some("[2001:db8::1]:40000".parse().unwrap())));
        assert_eq!(classify(b"PROXY TCP4 1.2.3.4"), Ok(Start::Partial));
        assert_eq!(classify(&[b'P'; 200]), Ok(Start::Other));
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02, 0x00]), Ok(Start::Other), "a TLS record");
        let mut long = V2_SIGNATURE.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xff, 0xff]);
        assert_eq!(classify(&long), Err(Refused::TooLong));
        assert_eq!(classify(format!("PROXY {}", "9".repeat(200)).as_bytes()), Err(Refused::TooLong));
        assert_eq!(source_of(b"PROXY TCP4 nonsense\r\n"), Err(Refused::Malformed));
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_classifier_or_parser() {
        let mut rng = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..20_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let len = (rng % 120) as usize;
            // Half the inputs start like a header, so the parser sees them too.
            let mut bytes: Vec<u8> = (0..len).map(|i| (rng >> (i % 56)) as u8).collect();
            if rng.is_multiple_of(2) {
                let start: &[u8] = if rng.is_multiple_of(4) { V2_SIGNATURE } else { V1_PREFIX };
                bytes.splice(0..0, start.iter().copied());
            }
            fuzz_classify_and_parse(&bytes);
        }
    }
}
