//! PROXY protocol v2 headers tern sends to upstreams (`upstream.proxy_protocol`, `listener.backend_proxy_protocol`),
//! built with the `ppp` crate that parses the headers tern receives: the client's address as the source, the
//! address it connected to as the destination, and TLVs for the server name it asked for (`PP2_TYPE_AUTHORITY`) and
//! the protocol ALPN chose (`PP2_TYPE_ALPN`); `LOCAL` for health checks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ppp::v2::{AddressFamily, Builder, Command, Protocol, Type, Version};

/// The longest TLV value sent; server names (at most 253 bytes) and ALPN protocols (255) are far below it.
const MAX_TLV: usize = 255;

/// What one client connection's header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientFacts<'a> {
    /// The client's address (after PROXY protocol in, the address its own header gave).
    pub(crate) source: SocketAddr,
    /// The address the client connected to; `None` if the socket could not tell (the header then says
    /// `0.0.0.0:0` or `[::]:0`).
    pub(crate) destination: Option<SocketAddr>,
    /// The SNI of the handshake, if the client sent one.
    pub(crate) authority: Option<&'a str>,
    /// The protocol ALPN chose, if any.
    pub(crate) alpn: Option<&'a [u8]>,
}

/// The v2 `PROXY` header of one client connection.
pub(crate) fn client(facts: ClientFacts<'_>) -> Arc<[u8]> {
    let (source, destination) = same_family(facts.source, facts.destination);
    let mut builder = Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (source, destination));
    // Written first, the order HAProxy uses.
    let tlvs = [(Type::ALPN, facts.alpn), (Type::Authority, facts.authority.map(str::as_bytes))];
    for (kind, value) in tlvs {
        if let Some(value) = value.filter(|v| !v.is_empty() && v.len() <= MAX_TLV) {
            builder = match builder.write_tlv(kind, value) {
                Ok(builder) => builder,
                // Writing to a Vec fails only past u16::MAX bytes, which MAX_TLV rules out.
                Err(_) => return local(),
            };
        }
    }
    // Addresses and at most two 255-byte TLVs: far below the u16 length limit.
    builder.build().map_or_else(|_| local(), Arc::from)
}

/// The v2 `LOCAL` header (no addresses): a connection tern makes on its own behalf, such as a health check. The
/// receiver treats the connection as coming from tern itself.
pub(crate) fn local() -> Arc<[u8]> {
    let builder = Builder::new(Version::Two | Command::Local, AddressFamily::Unspecified | Protocol::Unspecified);
    // Sixteen fixed bytes: nothing to overflow.
    Arc::from(builder.build().unwrap_or_default())
}

/// Both addresses in one family, as the header requires: IPv4 when both are IPv4 (IPv4-mapped IPv6 counts, as on
/// a dual-stack listener), else both IPv6 (an IPv4 address in its mapped form).
fn same_family(source: SocketAddr, destination: Option<SocketAddr>) -> (SocketAddr, SocketAddr) {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(v6) => v6.to_ipv4_mapped(),
    };
    let v6 = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    let destination = destination.unwrap_or_else(|| match v4(source.ip()) {
        Some(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        None => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    });
    match (v4(source.ip()), v4(destination.ip())) {
        (Some(s), Some(d)) => (SocketAddr::from((s, source.port())), SocketAddr::from((d, destination.port()))),
        _ => (
            SocketAddr::from((v6(source.ip()), source.port())),
            SocketAddr::from((v6(destination.ip()), destination.port())),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `ppp` reads back from a header: command, addresses, and the TLVs by type.
    fn parse(header: &[u8]) -> (Command, ppp::v2::Addresses, Vec<(u8, Vec<u8>)>) {
        let parsed = ppp::v2::Header::try_from(header).expect("ppp parses what tern sends");
        assert_eq!(parsed.len(), header.len(), "the length field covers exactly the header");
        let tlvs = parsed.tlvs().map(|t| t.expect("well-formed TLV")).map(|t| (t.kind, t.value.to_vec())).collect();
        (parsed.command, parsed.addresses, tlvs)
    }

    #[test]
    fn a_client_header_carries_addresses_authority_and_alpn() {
        let facts = ClientFacts {
            source: "192.0.2.7:40000".parse().unwrap(),
            destination: Some("203.0.113.1:443".parse().unwrap()),
            authority: Some("shop.example.test"),
            alpn: Some(b"h2"),
        };
        let (command, addresses, tlvs) = parse(&client(facts));
        assert_eq!(command, Command::Proxy);
        assert_eq!(
            addresses,
            ppp::v2::IPv4::new([192, 0, 2, 7], [203, 0, 113, 1], 40000, 443).into(),
            "source is the client, destination what it connected to"
        );
        assert_eq!(tlvs, [(0x01, b"h2".to_vec()), (0x02, b"shop.example.test".to_vec())]);
    }

    #[test]
    fn families_are_made_to_match_and_missing_facts_leave_tlvs_out() {
        let mapped = |text: &str| ClientFacts {
            source: text.parse().unwrap(),
            destination: Some("[::ffff:127.0.0.1]:443".parse().unwrap()),
            authority: None,
            alpn: None,
        };
        let (_, addresses, tlvs) = parse(&client(mapped("[::ffff:10.0.0.9]:5000")));
        assert_eq!(addresses, ppp::v2::IPv4::new([10, 0, 0, 9], [127, 0, 0, 1], 5000, 443).into(), "dual stack");
        assert!(tlvs.is_empty());
        let (_, addresses, _) = parse(&client(mapped("[2001:db8::1]:5000")));
        let want = ppp::v2::IPv6::new(
            "2001:db8::1".parse::<Ipv6Addr>().unwrap(),
            "::ffff:127.0.0.1".parse::<Ipv6Addr>().unwrap(),
            5000,
            443,
        );
        assert_eq!(addresses, want.into(), "an IPv6 client and an IPv4 destination: both as IPv6");
        let unknown = ClientFacts { destination: None, ..mapped("198.51.100.2:1") };
        assert_eq!(parse(&client(unknown)).1, ppp::v2::IPv4::new([198, 51, 100, 2], [0, 0, 0, 0], 1, 0).into());
    }

    #[test]
    fn the_local_header_is_sixteen_bytes_without_addresses() {
        let header = local();
        assert_eq!(header.len(), 16);
        let (command, addresses, tlvs) = parse(&header);
        assert_eq!((command, addresses, tlvs.len()), (Command::Local, ppp::v2::Addresses::Unspecified, 0));
    }

    /// Random facts, round-tripped through `ppp`'s parser and through tern's own PROXY protocol reader
    /// (`proxy_protocol::fuzz_classify_and_parse` asserts the length it finds fits the bytes).
    #[test]
    fn random_facts_round_trip_through_the_parser() {
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..20_000 {
            let address = |bits: u64, port: u64| -> SocketAddr {
                let ip = match bits % 3 {
                    0 => IpAddr::V4(Ipv4Addr::from(bits as u32)),
                    1 => IpAddr::V6(Ipv6Addr::from(u128::from(bits) << 64 | u128::from(bits.rotate_left(17)))),
                    _ => IpAddr::V6(Ipv4Addr::from((bits >> 8) as u32).to_ipv6_mapped()),
                };
                SocketAddr::new(ip, port as u16)
            };
            let source = address(next(), next());
            let destination = (!next().is_multiple_of(8)).then(|| address(next(), next()));
            let name_len = (next() % 300) as usize;
            let name: String = (0..name_len).map(|i| char::from(b'a' + ((next() >> (i % 50)) % 26) as u8)).collect();
            let authority = (!next().is_multiple_of(4)).then_some(name.as_str());
            let alpn: Option<&[u8]> = match next() % 3 {
                0 => None,
                1 => Some(b"h2"),
                _ => Some(b"http/1.1"),
            };
            let header = client(ClientFacts { source, destination, authority, alpn });
            crate::proxy_protocol::fuzz_classify_and_parse(&header);
            let (command, addresses, tlvs) = parse(&header);
            assert_eq!(command, Command::Proxy);
            let (got_source, got_destination) = match addresses {
                ppp::v2::Addresses::IPv4(a) => (
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                ),
                ppp::v2::Addresses::IPv6(a) => (
                    SocketAddr::from((a.source_address, a.source_port)),
                    SocketAddr::from((a.destination_address, a.destination_port)),
                ),
                other => panic!("one family of IP addresses, not {other:?}"),
            };
            // The same addresses, whatever form (IPv4 or IPv4-mapped IPv6) the family forced on them.
            let canonical = |a: SocketAddr| (a.ip().to_canonical(), a.port());
            assert_eq!(canonical(got_source), canonical(source));
            let unknown = if source.ip().to_canonical().is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
            let want_destination = destination.unwrap_or_else(|| unknown.parse().unwrap());
            assert_eq!(canonical(got_destination), canonical(want_destination));
            let mut want = Vec::new();
            if let Some(alpn) = alpn {
                want.push((0x01, alpn.to_vec()));
            }
            if let Some(name) = authority.filter(|n| !n.is_empty() && n.len() <= MAX_TLV) {
                want.push((0x02, name.as_bytes().to_vec()));
            }
            assert_eq!(tlvs, want);
        }
    }
}
