//! JA4 against published vectors (real ClientHellos with the fingerprints other implementations give them, and the
//! specification's own example), GREASE, ALPN's hex rule, and hostile input.

use super::*;

/// A Firefox ClientHello (handshake message, ECH and a post-quantum-free key share), published with its JA4 by the
/// smithproxy project's JA4 tests.
const FIREFOX_1: &str = "010002880303b1454f846bd902745d988d870726ef0c313ce90f17984d51557964c3e606fa91200b509f238e6769dd3ad25fe6ed13020e3f7b64738a226fc0158ef2b59ba19b2c0022130113031302c02bc02fcca9cca8c02cc030c00ac009c013c014009c009d002f00350100021d0000000e000c0000096a613464622e636f6d00170000ff01000100000a000e000c001d00170018001901000101000b00020100002300000010000e000c02683208687474702f312e310005000501000000000022000a000804030503060302030033006b0069001d0020cb5494b8b6fffd904f2c18eecc978ae6ef7c9c89d347498dae1b66799176554900170041040bbdc463c55494edca30649e6c48e51261c4d61843e7cf607fffddca1d7cf7d8ae69ced9796f6403565655906bbcd7dffc103db95889d5d6774114b6793c4132002b00050403040303000d0018001604030503060308040805080604010501060102030201002d00020101001c00024001fe0d01190000010003d10020b8cdfd2a9b9924e45471c4ebb24514d71a231a49d8d314fbcb75af0214a2e67c00efd356cf2704ea9bb5e85579856bf473cb9b5ae1657b33929c86f5ee4b57cafcac74ecb8fe201f5d9e883efdd391395639d9e42eafa8eae467601838c23c3e239907da1a6983f4e966e4990ff13f74e0159fe37d60535b76d308caea1e114170ce3e3fd67c14a2f5e3e8fe540895e3d6a66fec86e88d2e403f9ff299681748c664572a7e889fe274ec142b2f5eb9445142c16dd98034f92d47be96ead6b030536ca37506cc44c94fd7d1f1b2178b71d5fc5e5339b1c91cf9db67c82099a0f0168ce228947c600a1cd48ee9d9b481c87f052999431bd4b91d2aac4a7dab3090578a64087a3d7cd9c603c6e75c7d878f9d";
const FIREFOX_1_JA4: &str = "t13d1715h2_5b57614c22b0_5c2c66f702b0";

/// A client offering 31 suites and no ALPN, padded (extension 0x0015), from the same published set.
const NO_ALPN: &str = "010001fc0303e4422635180a6d52305577414519930d2eb4b714ecbaffc7aa4ef762421df37920a89626d7567923c523a5255cfc150232e8491a92f4d85e848d5f8432baf6d273003e130213031301c02cc030009fcca9cca8ccaac02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff010001750000001c001a00001772656d6f74652e7069786965647573742e6f6e6c696e65000b000403000102000a000c000a001d0017001e0019001800230000001600000017000000310000000d002a0028040305030603080708080809080a080b080408050806040105010601030303010302040205020602002b00050403040303002d00020101003300260024001d0020d8a1f885af25dd99f2c6a123fae44fadc43bc5d9c123e0ec0fbbdc0a90a6b24e001500c20000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000";
const NO_ALPN_JA4: &str = "t13d311200_e8f1e7e78f70_d339722ba4af";

fn unhex(text: &str) -> Vec<u8> {
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).unwrap()).collect()
}

/// `message` in one handshake record.
fn record(message: &[u8]) -> Vec<u8> {
    let mut out = vec![22, 3, 1];
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
    out
}

#[test]
fn published_client_hellos_give_their_published_fingerprints() {
    for (hello, want) in [(FIREFOX_1, FIREFOX_1_JA4), (NO_ALPN, NO_ALPN_JA4)] {
        let message = unhex(hello);
        assert_eq!(of_handshake(&message).map(|j| j.to_string()).as_deref(), Some(want));
        assert_eq!(of_records(&record(&message)).map(|j| j.to_string()).as_deref(), Some(want));
    }
}

#[test]
fn a_hello_split_across_records_and_followed_by_more_bytes_gives_the_same_fingerprint() {
    let message = unhex(FIREFOX_1);
    for split in [1, 3, 4, 5, 100, message.len() - 1] {
        let mut bytes = record(&message[..split]);
        bytes.extend(record(&message[split..]));
        bytes.extend_from_slice(b"\x14\x03\x03\x00\x01\x01"); // a ChangeCipherSpec after it
        assert_eq!(of_records(&bytes).map(|j| j.to_string()).as_deref(), Some(FIREFOX_1_JA4), "split at {split}");
    }
}

/// A ClientHello built from parts: legacy version 0x0303, the suites, and the extensions as (type, data).
fn hello(ciphers: &[u16], extensions: &[(u16, Vec<u8>)]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend([7; 32]);
    body.push(0);
    body.extend(((ciphers.len() * 2) as u16).to_be_bytes());
    ciphers.iter().for_each(|c| body.extend(c.to_be_bytes()));
    body.extend([1, 0]);
    let mut all = Vec::new();
    for (kind, data) in extensions {
        all.extend(kind.to_be_bytes());
        all.extend((data.len() as u16).to_be_bytes());
        all.extend(data);
    }
    body.extend((all.len() as u16).to_be_bytes());
    body.extend(all);
    let mut message = vec![1, 0, (body.len() >> 8) as u8, body.len() as u8];
    message.extend(body);
    message
}

fn list16(prefix_len: usize, values: &[u16]) -> Vec<u8> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_be_bytes()).collect();
    let mut out = if prefix_len == 1 { vec![bytes.len() as u8] } else { (bytes.len() as u16).to_be_bytes().to_vec() };
    out.extend(bytes);
    out
}

fn alpn(values: &[&[u8]]) -> Vec<u8> {
    let list: Vec<u8> = values.iter().flat_map(|v| std::iter::once(v.len() as u8).chain(v.iter().copied())).collect();
    let mut out = (list.len() as u16).to_be_bytes().to_vec();
    out.extend(list);
    out
}

const SPEC_CIPHERS: [u16; 15] = [
    0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030, 0xcca9, 0xcca8, 0xc013, 0xc014, 0x009c, 0x009d, 0x002f,
    0x0035,
];
const SPEC_SIGNATURES: [u16; 8] = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601];

/// The specification's example: its 15 suites, 16 extensions in its order (SNI and ALPN `h2` included) and 8
/// signature algorithms, TLS 1.3 by `supported_versions`; with `grease`, GREASE values among each list.
fn spec_example(grease: bool) -> Vec<u8> {
    let mut ciphers = SPEC_CIPHERS.to_vec();
    let mut signatures = SPEC_SIGNATURES.to_vec();
    let mut versions = vec![0x0304, 0x0303];
    if grease {
        ciphers.insert(0, 0x5a5a);
        signatures.insert(3, 0x8a8a);
        versions.insert(0, 0xfafa);
    }
    let sni = {
        let name = b"example.com";
        let mut entry = vec![0];
        entry.extend((name.len() as u16).to_be_bytes());
        entry.extend(name);
        let mut list = (entry.len() as u16).to_be_bytes().to_vec();
        list.extend(entry);
        list
    };
    let mut extensions: Vec<(u16, Vec<u8>)> = vec![
        (0x001b, vec![2, 0, 2]),
        (0x0000, sni),
        (0x0033, vec![0, 0]),
        (0x0010, alpn(&[b"h2", b"http/1.1"])),
        (0x4469, vec![0, 3, 2, b'h', b'2']),
        (0x0017, vec![]),
        (0x002d, vec![1, 1]),
        (0x000d, list16(2, &signatures)),
        (0x0005, vec![1, 0, 0, 0, 0]),
        (0x0023, vec![]),
        (0x0012, vec![]),
        (0x002b, list16(1, &versions)),
        (0xff01, vec![0]),
        (0x000b, vec![1, 0]),
        (0x000a, list16(2, &[0x001d, 0x0017])),
        (0x0015, vec![0; 10]),
    ];
    if grease {
        extensions.insert(0, (0x0a0a, vec![]));
        extensions.push((0xdada, vec![0]));
    }
    hello(&ciphers, &extensions)
}

#[test]
fn the_specifications_example_gives_its_fingerprint() {
    let ja4 = of_handshake(&spec_example(false)).unwrap();
    assert_eq!(ja4.as_str(), "t13d1516h2_8daaf6152771_e5627efa2ab1");
}

#[test]
fn grease_is_ignored_in_suites_extensions_versions_and_signatures() {
    let plain = of_handshake(&spec_example(false)).unwrap();
    assert_eq!(of_handshake(&spec_example(true)), Some(plain));
    // A GREASE version above every real one is not the version.
    let only_grease = hello(&[0x1301], &[(0x002b, list16(1, &[0x7a7a, 0x0303]))]);
    assert!(of_handshake(&only_grease).unwrap().as_str().starts_with("t12i0101"));
}

#[test]
fn without_supported_versions_the_legacy_version_counts_and_empty_lists_hash_to_zeros() {
    let bare = hello(&[], &[]);
    assert_eq!(of_handshake(&bare).unwrap().as_str(), "t12i000000_000000000000_000000000000");
    let sni_and_alpn_only = hello(&[0x002f], &[(0x0000, vec![]), (0x0010, alpn(&[b"h2"]))]);
    let ja4 = of_handshake(&sni_and_alpn_only).unwrap();
    assert!(ja4.as_str().starts_with("t12d0102h2_") && ja4.as_str().ends_with("_000000000000"), "{ja4}");
    // Extensions but no signature algorithms: the list alone, no underscore (the specification's `6d807ffa2a79`
    // is for its 14 extensions).
    let no_signatures = hello(&[0x002f], &[(0x0017, vec![])]);
    let mut hash = digest::Context::new(&digest::SHA256);
    hash.update(b"0017");
    let mut want = [0u8; 12];
    hex12(&mut want, hash);
    assert!(of_handshake(&no_signatures).unwrap().as_str().ends_with(std::str::from_utf8(&want).unwrap()));
}

#[test]
fn alpn_uses_its_first_and_last_character_or_their_hex_digits() {
    let code = |value: &[u8]| String::from_utf8(alpn_code(Some(value)).to_vec()).unwrap();
    assert_eq!(code(b"h2"), "h2");
    assert_eq!(code(b"http/1.1"), "h1");
    assert_eq!(code(b"x"), "xx");
    assert_eq!(code(b""), "00");
    assert_eq!(String::from_utf8(alpn_code(None).to_vec()).unwrap(), "00");
    // The specification's examples.
    assert_eq!(code(&[0xab]), "ab");
    assert_eq!(code(&[0xab, 0xcd]), "ad");
    assert_eq!(code(&[0x30, 0xab]), "3b");
    assert_eq!(code(&[0x30, 0x31, 0xab, 0xcd]), "3d");
    assert_eq!(code(&[0x30, 0xab, 0xcd, 0x31]), "01");
}

#[test]
fn counts_stop_at_99() {
    let ciphers: Vec<u16> = (1..=150).collect();
    assert!(of_handshake(&hello(&ciphers, &[])).unwrap().as_str().starts_with("t12i9900"));
}

#[test]
fn every_truncation_and_other_garbage_gives_none_or_a_fingerprint_never_a_panic() {
    for vector in [FIREFOX_1, NO_ALPN] {
        let message = unhex(vector);
        for end in 0..message.len() {
            assert_eq!(of_handshake(&message[..end]), None, "truncated at {end}");
            assert_eq!(of_records(&record(&message)[..end + 5]), None, "record truncated at {end}");
        }
        // Random corruption: whatever comes out is a well-formed fingerprint.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut bytes = record(&message);
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % bytes.len();
                bytes[at] = next() as u8;
            }
            if let Some(ja4) = of_records(&bytes) {
                assert_eq!(ja4.as_str().len(), LEN);
                assert!(ja4.as_str().bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'), "{ja4}");
            }
        }
    }
    assert_eq!(of_records(b""), None);
    assert_eq!(of_records(b"GET / HTTP/1.1\r\n\r\n"), None);
    assert_eq!(of_records(&[22, 3, 1, 0, 0]), None, "an empty handshake record");
    let endless: Vec<u8> = std::iter::repeat_n(record(&[1, 0xff]), 5000).flatten().collect();
    assert_eq!(of_records(&endless), None, "a hello claiming 64 KiB+ never completes");
}
