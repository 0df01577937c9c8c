//! Replays the committed corpus through every target, and regenerates the seeds on request.

use super::*;
use std::path::PathBuf;

fn corpus_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

/// Every file of `fuzz/corpus/<target>/`; fails if the directory is missing or empty.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_root().join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
    let mut files: Vec<(PathBuf, Vec<u8>)> = entries
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.is_file())
        .map(|path| {
            let data = std::fs::read(&path).unwrap();
            (path, data)
        })
        .collect();
    files.sort();
    assert!(!files.is_empty(), "corpus {} is empty", dir.display());
    files
}

fn replay(target: &str) {
    let (_, run) = TARGETS.iter().find(|(name, _)| *name == target).unwrap();
    for (path, data) in corpus(target) {
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "fuzz target {target} panicked on {}", path.display());
    }
}

#[test]
fn sni_corpus() {
    replay("sni");
}

#[test]
fn config_corpus() {
    replay("config");
}

#[test]
fn certificate_corpus() {
    replay("certificate");
}

#[test]
fn session_corpus() {
    replay("session");
}

#[test]
fn session_stream_corpus() {
    replay("session_stream");
}

#[test]
fn ticket_corpus() {
    replay("ticket");
}

#[test]
fn ticket_key_corpus() {
    replay("ticket_key");
}

#[test]
fn proxy_header_corpus() {
    replay("proxy_header");
}

#[test]
fn route_corpus() {
    replay("route");
}

#[test]
fn every_target_has_a_fuzz_target_file_and_nothing_else_does() {
    let dir = corpus_root().join("../fuzz_targets");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".rs"))
        .collect();
    files.sort();
    let mut want: Vec<String> = TARGETS.iter().map(|(name, _)| format!("{name}.rs")).collect();
    want.sort();
    assert_eq!(files, want);
}

/// The seeds must keep reaching past the first check: if a fixture key or a format changes, this fails
/// until the seeds are regenerated (`TERN_WRITE_SEED_CORPUS=1`).
#[test]
fn seeds_reach_the_deep_paths() {
    let f = fixtures();
    let any = |target: &str, pred: &dyn Fn(&[u8]) -> bool| corpus(target).iter().any(|(_, d)| pred(d));
    assert!(any("sni", &|d| std::str::from_utf8(d).is_ok_and(|s| ServerName::parse(s).is_ok())));
    assert!(any("config", &|d| Config::from_toml(&String::from_utf8_lossy(d), Path::new("/x/t.toml")).is_ok()));
    assert!(any("certificate", &|d| {
        let mut parts = d.splitn(2, |&b| b == 0);
        let chain = parts.next().unwrap_or_default();
        let key = parts.next().unwrap_or(chain);
        certs::parse(chain, key).is_ok_and(|p| p.check_covers(&ServerName::parse(COVERED_NAME).unwrap()).is_ok())
    }));
    assert!(any("session", &|d| sessions::decode(d).is_some()));
    assert!(any("session", &|d| f.sessions.sealing.open(d, &f.sessions.aad()).is_some()));
    assert!(any("session_stream", &|d| {
        redis::parse_redis_value(d).is_ok_and(|reply| {
            sessions::entries(reply).iter().any(|(_, fields)| {
                fields.iter().any(|(k, v)| k == b"d" && f.sessions.sealing.open(v, &f.sessions.aad()).is_some())
            })
        })
    }));
    assert!(any("ticket", &|d| d.starts_with(&KEY_CURRENT) && f.ticketer.decrypt(d).is_some()));
    assert!(any("ticket", &|d| d.starts_with(&KEY_RETIRED) && f.ticketer.decrypt(d).is_some()));
    assert!(any("ticket_key", &|d| {
        serde_json::from_slice::<Record>(d).is_ok_and(|r| f.keys.open(RECORD_SLOT, RECORD_GENERATION, &r).is_some())
    }));
}

// ---- Seed generation -------------------------------------------------------------------------------------

/// Generates the seed corpus and runs every seed through its target. With `TERN_WRITE_SEED_CORPUS=1` it also
/// replaces `fuzz/corpus` with the new seeds (keys and certificates are fresh on every run, so only do that
/// when a seed format changed): `TERN_WRITE_SEED_CORPUS=1 cargo test -p tern --lib fuzzing::tests::seed`.
#[test]
fn seed_generators_make_seeds_every_target_accepts() {
    let write = std::env::var_os("TERN_WRITE_SEED_CORPUS").is_some();
    let root = corpus_root();
    for (target, run) in TARGETS {
        let seeds = match target {
            "sni" => sni_seeds(),
            "config" => config_seeds(),
            "certificate" => certificate_seeds(),
            "session" => session_seeds(),
            "session_stream" => session_stream_seeds(),
            "ticket" => ticket_seeds(),
            "ticket_key" => ticket_key_seeds(),
            "proxy_header" => proxy_header_seeds(),
            "route" => route_seeds(),
            other => panic!("no seeds for {other}"),
        };
        assert!(!seeds.is_empty(), "{target}: no seeds");
        for (_, data) in &seeds {
            run(data);
        }
        if write {
            let dir = root.join(target);
            if dir.exists() {
                std::fs::remove_dir_all(&dir).unwrap();
            }
            std::fs::create_dir_all(&dir).unwrap();
            for (name, data) in seeds {
                std::fs::write(dir.join(name), data).unwrap();
            }
        }
    }
}

type Seeds = Vec<(String, Vec<u8>)>;

fn named(items: impl IntoIterator<Item = (impl Into<String>, Vec<u8>)>) -> Seeds {
    items.into_iter().map(|(n, d)| (n.into(), d)).collect()
}

fn sni_seeds() -> Seeds {
    let long_label = format!("{}.example.com", "a".repeat(63));
    let max_len = ["a".repeat(63), "b".repeat(63), "c".repeat(63), "d".repeat(61)].join(".");
    let too_long = format!("{max_len}e");
    let names: Vec<(&str, String)> = vec![
        ("plain", "example.com".into()),
        ("mixed-case-trailing-dot", "WWW.Example.COM.".into()),
        ("underscore", "_acme-challenge.example.com".into()),
        ("single-label", "localhost".into()),
        ("deep", "a.b.c.d.e.f.example.co.uk".into()),
        ("punycode", "xn--bcher-kva.example".into()),
        ("digits", "123.example.com".into()),
        ("label-63", long_label),
        ("name-253", max_len),
        ("name-254", too_long),
        ("empty", String::new()),
        ("dot", ".".into()),
        ("two-dots", "..".into()),
        ("double-trailing-dot", "example.com..".into()),
        ("empty-label", "a..b".into()),
        ("leading-dot", ".example.com".into()),
        ("traversal", "../../etc/passwd".into()),
        ("slash", "a/b.example.com".into()),
        ("space", "exa mple.com".into()),
        ("wildcard", "*.example.com".into()),
        ("umlaut", "ex\u{e4}mple.com".into()),
        ("leading-hyphen", "-a.example.com".into()),
        ("trailing-hyphen", "a-.example.com".into()),
        ("ipv4", "127.0.0.1".into()),
        ("ipv4-trailing-dot", "10.0.0.1.".into()),
        ("ipv4-leading-zero", "010.0.0.1".into()),
        ("ip-like-parent", "a.1.2.3.4".into()),
        ("ipv6", "[::1]".into()),
        ("nul", "a\0b.example.com".into()),
        ("port", "example.com:443".into()),
    ];
    let mut seeds = named(names.into_iter().map(|(n, s)| (n, s.into_bytes())));
    seeds.push(("invalid-utf8".into(), b"ex\xffample.com".to_vec()));
    seeds
}

use crate::config::tests::MINIMAL;

fn config_seeds() -> Seeds {
    let example = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/file-path.toml")).unwrap();
    let redis = "\n[[redis]]\nname = \"r\"\nurls = [\"redis://127.0.0.1:6379\"]\ntimeout = \"2s\"\n";
    let secret = "0123456789abcdef0123456789abcdef-secret";
    let with = |extra: &str| format!("{MINIMAL}{extra}").into_bytes();
    let replace = |from: &str, to: &str| MINIMAL.replace(from, to).into_bytes();
    named([
        ("example-file-path", example),
        ("minimal", MINIMAL.as_bytes().to_vec()),
        (
            "resumption-redis",
            with(&format!(
                "{redis}[resumption]\nredis = \"r\"\nsecret = \"{secret}\"\nticket_rotation = \"1h\"\n\
                 ticket_lifetime = \"6h\"\nsession_lifetime = \"10m\"\nprefix = \"t:\"\n"
            )),
        ),
        ("resumption-short-secret", with(&format!("{redis}[resumption]\nredis = \"r\"\nsecret = \"short\"\n"))),
        (
            "resumption-lifetime-shorter",
            with("[resumption]\nticket_rotation = \"2h\"\nticket_lifetime = \"1h\"\ntickets = false\n"),
        ),
        (
            "kv-grant",
            format!("{MINIMAL}{redis}")
                .replace("grants.files = \"/srv/certs\"", "grants.kv = { redis = \"r\", prefixes = [\"cert:\"] }")
                .into_bytes(),
        ),
        (
            "http-grant",
            replace(
                "grants.files = \"/srv/certs\"",
                "grants.http = { allow = [\"API.example.com:443\"], timeout = \"2s\", max_response_bytes = \"1MiB\" }",
            ),
        ),
        ("env-setting", replace("ttl_seconds = 30", "token = { env = \"PATH\" }")),
        ("strict", replace("default_certificate = \"fallback\"", "strict = true")),
        ("strict-and-default", replace("plugin = \"files\"", "plugin = \"files\"\nstrict = true")),
        ("unknown-key", replace("bind =", "bnid =")),
        ("bad-bind", replace("127.0.0.1:8443", "localhost")),
        ("bad-timeout", replace("[[plugin]]", "[[plugin]]\ntimeout = \"soon\"\nmemory_limit = \"1TiB\"")),
        ("backend-path", replace("http://127.0.0.1:8080", "http://b:1/api")),
        ("backend-https", replace("http://127.0.0.1:8080", "https://b:1")),
        (
            "cache-server",
            with(
                "[cache]\nmax_entries = 10\nmax_bytes = \"64MiB\"\nttl = \"1h\"\nnegative_ttl = \"250ms\"\n\
                 [server]\nhandshake_timeout = \"10s\"\nmax_connections = 100\nshutdown_grace = \"1d\"\n",
            ),
        ),
        ("cache-zero", with("[cache]\nmax_entries = 0\nttl = \"0x\"\n")),
        (
            "certificate-names",
            replace("key = \"certs/fallback.key\"", "key = \"k\"\nnames = [\"*.Example.com\", \"a/b\"]"),
        ),
        ("syntax-error", b"[[listener]\nbind = \"127.0.0.1:1\"\n".to_vec()),
        ("empty", Vec::new()),
    ])
}

fn pem_pair(chain: &str, key: &str) -> Vec<u8> {
    let mut out = chain.as_bytes().to_vec();
    out.push(0);
    out.extend_from_slice(key.as_bytes());
    out
}

fn certificate_seeds() -> Seeds {
    let self_signed = |names: &[&str], alg: &'static rcgen::SignatureAlgorithm| {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = rcgen::CertificateParams::new(names).unwrap().self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let p256 = &rcgen::PKCS_ECDSA_P256_SHA256;
    let (chain, key) = self_signed(&[COVERED_NAME, "*.example.net"], p256);
    let (_, other_key) = self_signed(&[COVERED_NAME], p256);
    let (p384_chain, p384_key) = self_signed(&["*.example.com"], &rcgen::PKCS_ECDSA_P384_SHA384);
    let (ed_chain, ed_key) = self_signed(&[COVERED_NAME], &rcgen::PKCS_ED25519);
    let (no_san_chain, no_san_key) = self_signed(&[], p256);
    let (ip_chain, ip_key) = self_signed(&["127.0.0.1", "B.Example.COM"], p256);
    let ca = tern_fixtures::TestCa::new("tern fuzz CA").unwrap();
    let (leaf, leaf_key) = ca.issue(&[COVERED_NAME, "www.example.com"]).unwrap();
    let full_chain = format!("{leaf}{}", ca.pem());
    let rsa = {
        use aws_lc_rs::encoding::AsDer;
        let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let der = rsa.as_der().unwrap();
        rcgen::KeyPair::try_from(der.as_ref()).unwrap()
    };
    let (rsa_chain, rsa_key) = ca.issue_with_key(&[COVERED_NAME], &rsa).unwrap();
    let truncated = &chain[..chain.len() / 2];
    named([
        ("p256-exact-and-wildcard", pem_pair(&chain, &key)),
        ("p256-combined-no-nul", format!("{chain}{key}").into_bytes()),
        ("p256-key-mismatch", pem_pair(&chain, &other_key)),
        ("p256-truncated-chain", pem_pair(truncated, &key)),
        ("p256-no-key", pem_pair(&chain, "SECRET-NOT-A-KEY")),
        ("p384-wildcard", pem_pair(&p384_chain, &p384_key)),
        ("ed25519", pem_pair(&ed_chain, &ed_key)),
        ("no-san", pem_pair(&no_san_chain, &no_san_key)),
        ("ip-and-uppercase-san", pem_pair(&ip_chain, &ip_key)),
        ("ca-issued-chain", pem_pair(&full_chain, &leaf_key)),
        ("ca-only", pem_pair(&ca.pem(), &leaf_key)),
        ("rsa2048-ca-issued", pem_pair(&format!("{rsa_chain}{}", ca.pem()), &rsa_key)),
        ("not-pem", b"not pem\0not a key".to_vec()),
        ("empty-blocks", b"-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n\0".to_vec()),
    ])
}

fn session_seeds() -> Seeds {
    let f = fixtures();
    let enc = |scope: &str, key: &[u8], value: &[u8]| sessions::encode(scope, key, value).unwrap().to_vec();
    let seal = |plain: &[u8]| f.sessions.sealing.seal(plain, &f.sessions.aad()).unwrap();
    let tls_state = vec![0x16u8; 120];
    let mut seeds = named([
        ("plain-none", enc("none", b"session-id-32-bytes-long........", &tls_state)),
        ("plain-mtls", enc("mtls:required:0123456789abcdef0123456789abcdef", &[7; 32], b"state")),
        ("plain-empty", enc("", b"", b"")),
        ("plain-truncated", enc("none", b"key", b"value")[..5].to_vec()),
        ("plain-bad-utf8-scope", vec![2, 0xff, 0xfe, 0, 1, b'k', b'v']),
        ("plain-key-too-long", vec![0, 0xff, 0xff, 1, 2, 3]),
        ("sealed-none", seal(&enc("none", &[1; 32], &tls_state))),
        ("sealed-mtls", seal(&enc("mtls:optional:ab", b"k", b"v"))),
        ("sealed-garbage", seal(b"\xffnot a record")),
    ]);
    let mut tampered = seal(&enc("none", b"k", b"v"));
    if let Some(last) = tampered.last_mut() {
        *last ^= 1;
    }
    seeds.push(("sealed-tampered".into(), tampered));
    seeds
}

/// RESP encoding, enough for `XREAD` replies.
enum Resp<'a> {
    Bulk(&'a [u8]),
    Array(Vec<Resp<'a>>),
    Map(Vec<(Resp<'a>, Resp<'a>)>),
    Nil,
}

impl Resp<'_> {
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Resp::Bulk(b) => {
                out.extend(format!("${}\r\n", b.len()).bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            }
            Resp::Array(items) => {
                out.extend(format!("*{}\r\n", items.len()).bytes());
                items.iter().for_each(|i| i.write(out));
            }
            Resp::Map(pairs) => {
                out.extend(format!("%{}\r\n", pairs.len()).bytes());
                for (k, v) in pairs {
                    k.write(out);
                    v.write(out);
                }
            }
            Resp::Nil => out.extend_from_slice(b"$-1\r\n"),
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }
}

fn session_stream_seeds() -> Seeds {
    use Resp::{Array, Bulk, Map, Nil};
    let f = fixtures();
    let seal = |scope: &str, key: &[u8], value: &[u8]| {
        f.sessions.sealing.seal(&sessions::encode(scope, key, value).unwrap(), &f.sessions.aad()).unwrap()
    };
    let a = seal("none", &[1; 32], &[0x16; 64]);
    let b = seal("mtls:required:ab", b"id", b"state");
    let stream = b"tern:resumption:sessions";
    let entry = |id: &'static [u8], node: &'static [u8], sealed: &[u8]| (id, node, sealed.to_vec());
    let entries = [entry(b"1764000000000-0", b"node-a", &a), entry(b"1764000000001-3", b"node-b", &b)];
    let resp_entries = || {
        Array(
            entries
                .iter()
                .map(|(id, node, sealed)| {
                    Array(vec![Bulk(id), Array(vec![Bulk(b"n"), Bulk(node), Bulk(b"d"), Bulk(sealed)])])
                })
                .collect(),
        )
    };
    let resp2 = Array(vec![Array(vec![Bulk(stream), resp_entries()])]).bytes();
    let resp3 = Map(vec![(Bulk(stream), resp_entries())]).bytes();
    let odd_fields =
        Array(vec![Array(vec![Bulk(stream), Array(vec![Array(vec![Bulk(b"bad-id"), Array(vec![Bulk(b"d")])])])])])
            .bytes();
    let simple = b"*1\r\n*2\r\n+s\r\n*1\r\n*2\r\n+9-0\r\n*2\r\n+d\r\n+x\r\n".to_vec();
    named([
        ("xread-resp2", resp2),
        ("xread-resp3", resp3),
        ("xread-timeout-nil", Nil.bytes()),
        ("xread-odd-fields", odd_fields),
        ("xread-simple-strings", simple),
        ("error-reply", b"-ERR unknown command\r\n".to_vec()),
    ])
}

fn ticket_seeds() -> Seeds {
    let f = fixtures();
    let current = f.ticketer.encrypt(b"resumption state of a TLS 1.3 session").unwrap();
    let with_key = |name: [u8; NAME_LEN], key_byte: u8| {
        let mut aad = name.to_vec();
        aad.extend_from_slice(SCOPE.as_bytes());
        let mut t = name.to_vec();
        t.extend(SealingKey::new(&[key_byte; 32]).seal(b"state", &aad).unwrap());
        t
    };
    let mut tampered = current.clone();
    if let Some(last) = tampered.last_mut() {
        *last ^= 0x80;
    }
    named([
        ("current-key", current.clone()),
        ("current-key-empty-state", f.ticketer.encrypt(b"").unwrap()),
        ("retired-key", with_key(KEY_RETIRED, 0x22)),
        ("expired-slot", with_key(KEY_EXPIRED, 0x33)),
        ("unknown-key", with_key(*b"unknown-key-name", 0x44)),
        ("tampered", tampered),
        ("name-only", KEY_CURRENT.to_vec()),
        ("name-and-nonce", current[..NAME_LEN + 12].to_vec()),
        ("short", b"short".to_vec()),
    ])
}

fn ticket_key_seeds() -> Seeds {
    let f = fixtures();
    let record = |name: &str, sealed: &str| {
        serde_json::json!({
            "name": name, "sealed": sealed, "node": "node-a", "created_ms": 1_764_000_000_000u64,
            "activate_ms": 1_764_000_000_000u64,
        })
        .to_string()
        .into_bytes()
    };
    let name = tickets::hex(b"0123456789abcdef");
    let sealed = |slot, generation| {
        tickets::hex(&f.keys.sealing.seal(&[0x5a; 32], &f.keys.aad(slot, generation, &name)).unwrap())
    };
    let good = sealed(RECORD_SLOT, RECORD_GENERATION);
    named([
        ("record-opens", record(&name, &good)),
        ("record-other-slot", record(&name, &sealed(RECORD_SLOT + 1, RECORD_GENERATION))),
        ("record-upper-hex", record(&name.to_uppercase(), &sealed(RECORD_SLOT, RECORD_GENERATION))),
        ("record-short-name", record("00ff", &good)),
        ("record-odd-hex", record(&name, &good[1..])),
        ("record-missing-field", br#"{"name":"00","sealed":"00","node":"n"}"#.to_vec()),
        ("record-wrong-types", br#"{"name":1,"sealed":[],"node":null,"created_ms":-1,"activate_ms":1e99}"#.to_vec()),
        ("hex-lower", name.clone().into_bytes()),
        ("hex-odd", b"abc".to_vec()),
        ("hex-non-ascii", "0\u{e9}0".as_bytes().to_vec()),
    ])
}

fn route_seeds() -> Seeds {
    named([
        ("origin-http", b"http://127.0.0.1:8080".to_vec()),
        ("origin-https-name", b"https://Tenant-7.Origins.Example/".to_vec()),
        ("origin-ipv6", b"https://[2001:db8::1]:8443".to_vec()),
        ("origin-path", b"http://a.example/path".to_vec()),
        ("target", b"self-tls.example:443".to_vec()),
        ("target-ipv6", b"[::1]:9443".to_vec()),
        ("pattern-wildcard", b"https://*.origins.example:*".to_vec()),
        ("pattern-bad", b"https://a*.example:1".to_vec()),
    ])
}

fn proxy_header_seeds() -> Seeds {
    let v2 = |source: &str, destination: &str| {
        let (source, destination): (std::net::SocketAddr, std::net::SocketAddr) =
            (source.parse().unwrap(), destination.parse().unwrap());
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (source, destination),
        )
        .write_tlv(ppp::v2::Type::Authority, b"a.example.com")
        .unwrap()
        .build()
        .unwrap()
    };
    let mut with_tls = v2("192.0.2.7:40000", "127.0.0.1:443");
    with_tls.extend_from_slice(&[0x16, 0x03, 0x01, 0x00, 0x05]);
    named([
        ("v2-ipv4", v2("192.0.2.7:40000", "127.0.0.1:443")),
        ("v2-ipv6", v2("[2001:db8::1]:40000", "[2001:db8::2]:443")),
        ("v2-then-tls", with_tls),
        ("v1-tcp4", b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 443\r\n".to_vec()),
        ("v1-tcp6", b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 443\r\n".to_vec()),
        ("v1-unknown", b"PROXY UNKNOWN\r\n".to_vec()),
        ("tls-record", vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01]),
    ])
}
