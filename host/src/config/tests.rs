use super::*;
use crate::sni::ServerName;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, Path::new("/etc/tern/tern.toml"))
}

/// The smallest useful config (also seeds the config fuzz target).
pub(crate) const MINIMAL: &str = r#"
    [[certificate]]
    name = "fallback"
    cert = "certs/fallback.crt"
    key = "certs/fallback.key"

    [[plugin]]
    name = "files"
    path = "plugins/file_path.wasm"
    grants.files = "/srv/certs"
    settings = { cert_template = "{name}.pem", ttl_seconds = 30 }

    [[listener]]
    bind = "127.0.0.1:8443"
    plugin = "files"
    default_certificate = "fallback"
    backend = "http://127.0.0.1:8080"
"#;

#[test]
fn minimal_file_gets_defaults_and_resolved_paths() {
    let config = load(MINIMAL).unwrap();
    assert_eq!(config.server.handshake_timeout, defaults::HANDSHAKE_TIMEOUT);
    assert_eq!(config.cache.max_entries, defaults::CACHE_MAX_ENTRIES);
    assert_eq!(config.cache.max_negative_entries, defaults::CACHE_MAX_NEGATIVE_ENTRIES);
    let plugin = &config.plugins[0];
    assert_eq!(plugin.path, Path::new("/etc/tern/plugins/file_path.wasm"));
    assert_eq!(plugin.grants.files.as_deref(), Some(Path::new("/srv/certs")));
    assert_eq!(plugin.settings["ttl_seconds"], "30");
    assert_eq!(plugin.timeout, defaults::PLUGIN_TIMEOUT);
    // Granted a directory, it opens it per call: no spare unless asked for.
    assert_eq!(plugin.spare_instances, 0);
    let listener = &config.listeners[0];
    assert_eq!(listener.name, "listener-0");
    assert_eq!(listener.fallback, Fallback::DefaultCertificate("fallback".into()));
    assert_eq!(listener.alpn, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    assert_eq!(config.certificates[0].cert, Path::new("/etc/tern/certs/fallback.crt"));
}

fn error_of(text: &str) -> String {
    load(text).unwrap_err().to_string()
}

#[test]
fn resumption_through_redis_needs_a_long_secret_that_debug_never_prints() {
    let with =
        |section: &str| format!("{MINIMAL}\n[[redis]]\nname = \"r\"\nurls = [\"redis://127.0.0.1:6379\"]\n{section}");
    let err = error_of(&with("[resumption]\nredis = \"r\""));
    assert!(err.contains("resumption.secret: missing"), "{err}");
    let err = error_of(&with("[resumption]\nredis = \"r\"\nsecret = \"short\""));
    assert!(err.contains("resumption.secret: too short"), "{err}");
    let err = error_of(&with("[resumption]\nredis = \"nope\"\nsecret = \"0123456789abcdef0123456789abcdef\""));
    assert!(err.contains("resumption.redis: no [[redis]] named \"nope\""), "{err}");
    let err = error_of(&with("[resumption]\nticket_rotation = \"2h\"\nticket_lifetime = \"1h\""));
    assert!(err.contains("resumption.ticket_lifetime: is shorter"), "{err}");
    let err = error_of(&with("[resumption]\ntls13_tickets = 9"));
    assert!(err.contains("resumption.tls13_tickets: 9: at most 8"), "{err}");
    assert_eq!(load(&with("[resumption]\ntls13_tickets = 0")).unwrap().resumption.tls13_tickets, 0);
    assert_eq!(load(MINIMAL).unwrap().resumption.tls13_tickets, 1);
    let secret = "0123456789abcdef0123456789abcdef-secret";
    let config = load(&with(&format!("[resumption]\nredis = \"r\"\nsecret = \"{secret}\""))).unwrap();
    assert_eq!(config.resumption.secret.as_ref().unwrap().bytes(), secret.as_bytes());
    assert!(!format!("{config:?}").contains(secret), "Debug must not print the secret");
    assert_eq!(load(MINIMAL).unwrap().resumption.store, None, "local resumption by default");
}

#[test]
fn unknown_key_names_file_and_line() {
    let err = error_of(&MINIMAL.replace("bind =", "bnid ="));
    assert!(err.starts_with("/etc/tern/tern.toml: "), "{err}");
    assert!(err.contains("unknown field `bnid`"), "{err}");
    assert!(err.contains("line 14 `bnid = \"127.0.0.1:8443\"`"), "{err}");
}

#[test]
fn spare_instances_default_to_one_except_for_plugins_granted_a_directory() {
    let spares = |text: &str| load(text).unwrap().plugins[0].spare_instances;
    assert_eq!(spares(&MINIMAL.replace("grants.files = \"/srv/certs\"\n", "")), defaults::PLUGIN_SPARE_INSTANCES);
    assert_eq!(spares(&MINIMAL.replace("[[plugin]]", "[[plugin]]\nspare_instances = 2")), 2);
    assert_eq!(spares(&MINIMAL.replace("[[plugin]]", "[[plugin]]\nmax_concurrency = 1\nspare_instances = 0")), 0);
}

#[test]
fn bad_values_name_the_key() {
    let cases = [
        (MINIMAL.replace("127.0.0.1:8443", "localhost"), "listener \"listener-0\".bind"),
        (MINIMAL.replace("[[plugin]]", "[[plugin]]\ntimeout = \"soon\""), "plugin \"files\".timeout"),
        (MINIMAL.replace("[[plugin]]", "[[plugin]]\nmemory_limit = \"1TiB\""), "plugin \"files\".memory_limit"),
        (
            MINIMAL.replace("[[plugin]]", "[[plugin]]\nmax_concurrency = 2\nspare_instances = 3"),
            "plugin \"files\".spare_instances",
        ),
        (MINIMAL.replace("plugin = \"files\"", "plugin = \"nope\""), "listener \"listener-0\".plugin"),
        (
            MINIMAL.replace("default_certificate = \"fallback\"", "default_certificate = \"x\""),
            "listener \"listener-0\".default_certificate",
        ),
        (MINIMAL.replace("default_certificate = \"fallback\"", ""), "listener \"listener-0\".default_certificate"),
        (MINIMAL.replace("http://127.0.0.1:8080", "https://b:1"), "listener \"listener-0\".backend"),
        (MINIMAL.replace("http://127.0.0.1:8080", "http://b:1/api"), "listener \"listener-0\".backend"),
        (format!("{MINIMAL}\n[cache]\nttl = \"0x\""), "cache.ttl"),
        (format!("{MINIMAL}\n[cache]\nmax_entries = 0"), "cache.max_entries"),
        (format!("{MINIMAL}\n[cache]\nmax_negative_entries = 0"), "cache.max_negative_entries"),
        (format!("{MINIMAL}\n[server]\nhandshake_timeout = \"0s\""), "server.handshake_timeout"),
        (
            MINIMAL.replace("key = \"certs/fallback.key\"", "key = \"k\"\nnames = [\"a/b\"]"),
            "certificate \"fallback\".names",
        ),
    ];
    for (text, key) in cases {
        let err = error_of(&text);
        assert!(err.contains(&format!(": {key}: ")), "expected key {key} in: {err}");
    }
}

#[test]
fn strict_and_default_certificate_exclude_each_other() {
    let err = error_of(&MINIMAL.replace("plugin = \"files\"", "plugin = \"files\"\nstrict = true"));
    assert!(err.contains(".strict: "), "{err}");
    let config = load(&MINIMAL.replace("default_certificate = \"fallback\"", "strict = true")).unwrap();
    assert_eq!(config.listeners[0].fallback, Fallback::Strict);
}

#[test]
fn kv_grant_names_an_existing_store_and_prefixes() {
    let with_store = format!("{MINIMAL}\n[[redis]]\nname = \"certs\"\nurls = [\"redis://127.0.0.1:6379\"]\n");
    let grant = |g: &str| with_store.replace("grants.files = \"/srv/certs\"", g);
    let config = load(&grant("grants.kv = { redis = \"certs\", prefixes = [\"cert:\"] }")).unwrap();
    let kv = config.plugins[0].grants.kv.as_ref().unwrap();
    assert_eq!((kv.store.as_str(), kv.prefixes.as_slice()), ("certs", &["cert:".to_string()][..]));
    assert_eq!(config.redis[0].timeout, defaults::REDIS_TIMEOUT);
    let err = load(&grant("grants.kv = { redis = \"nope\", prefixes = [\"\"] }")).unwrap_err().to_string();
    assert!(err.contains("plugin \"files\".grants.kv.redis: no [[redis]] named \"nope\""), "{err}");
    let err = load(&grant("grants.kv = { redis = \"certs\", prefixes = [] }")).unwrap_err().to_string();
    assert!(err.contains(".grants.kv.prefixes"), "{err}");
    let err = load(&with_store.replace("redis://127.0.0.1:6379", "127.0.0.1:6379")).unwrap_err().to_string();
    assert!(err.contains("redis \"certs\".urls"), "{err}");
}

#[test]
fn upstreams_and_route_grants_are_checked_with_their_keys() {
    let pool = "\n[[upstream]]\nname = \"blue\"\nservers = [\"127.0.0.1:8081\", \"[::1]:8082\"]\nbalance = \"least_requests\"\n\
                health_check = { path = \"/healthz\", interval = \"2s\" }\n";
    let grant = |g: &str| MINIMAL.replace("grants.files = \"/srv/certs\"", g) + pool;
    let config = load(&grant(
        "grants.routes = { pools = [\"blue\"], origins = [\"https://*.origin.test:443\"], passthrough = [\"*:8443\"], origin_ca = \"ca.pem\" }",
    ))
    .unwrap();
    let upstream = &config.upstreams[0];
    assert_eq!(
        (upstream.balance, upstream.servers.len(), upstream.max_fails),
        (Balance::LeastRequests, 2, defaults::UPSTREAM_MAX_FAILS)
    );
    let check = upstream.health_check.as_ref().unwrap();
    assert_eq!(
        (check.path.as_str(), check.interval, check.rise, check.fall),
        ("/healthz", Duration::from_secs(2), 2, 3)
    );
    let grants = &config.plugins[0].grants;
    assert!(grants.routes.pool("blue").is_ok() && grants.routes.pool("green").is_err());
    assert!(grants.origin_ca.as_ref().is_some_and(|p| p.ends_with("ca.pem")));
    for (bad, key) in [
        ("grants.routes = { pools = [\"green\"] }", "grants.routes.pools"),
        ("grants.routes = { origins = [\"a.test:443\"] }", "grants.routes.origins"),
        ("grants.routes = { passthrough = [\"a*.test:1\"] }", "grants.routes.passthrough"),
    ] {
        let err = load(&grant(bad)).unwrap_err().to_string();
        assert!(err.contains(&format!("plugin \"files\".{key}: ")), "{bad}: {err}");
    }
    let empty = MINIMAL.to_string() + "\n[[upstream]]\nname = \"x\"\nservers = []\n";
    assert!(load(&empty).unwrap_err().to_string().contains("upstream \"x\".servers: "));
    let no_port = MINIMAL.to_string() + "\n[[upstream]]\nname = \"x\"\nservers = [\"a.test\"]\n";
    assert!(load(&no_port).unwrap_err().to_string().contains("upstream \"x\".servers: "));
    let bad_path = MINIMAL.to_string()
        + "\n[[upstream]]\nname = \"x\"\nservers = [\"a.test:80\"]\nhealth_check = { path = \"healthz\" }\n";
    assert!(load(&bad_path).unwrap_err().to_string().contains("upstream \"x\".health_check.path: "));
}

#[test]
fn settings_can_come_from_the_environment_and_http_grants_need_ports() {
    // PATH is set in every environment tests run in; the variable below in none.
    let with =
        |settings: &str| MINIMAL.replace("settings = { cert_template = \"{name}.pem\", ttl_seconds = 30 }", settings);
    let config = load(&with("settings = { token = { env = \"PATH\" } }")).unwrap();
    assert_eq!(config.plugins[0].settings["token"], std::env::var("PATH").unwrap());
    let err = load(&with("settings = { token = { env = \"TERN_TEST_SURELY_UNSET_VARIABLE\" } }")).unwrap_err();
    assert!(err.to_string().contains(".settings.token: environment variable TERN_TEST_SURELY_UNSET_VARIABLE"), "{err}");
    let grant = |g: &str| MINIMAL.replace("grants.files = \"/srv/certs\"", g);
    let config = load(&grant("grants.http = { allow = [\"API.example.com:443\"] }")).unwrap();
    let http = config.plugins[0].grants.http.as_ref().unwrap();
    assert_eq!(http.allow, ["api.example.com:443"]);
    assert_eq!((http.timeout, http.max_response_bytes), (defaults::HTTP_TIMEOUT, defaults::HTTP_MAX_RESPONSE_BYTES));
    let err = load(&grant("grants.http = { allow = [\"api.example.com\"] }")).unwrap_err().to_string();
    assert!(err.contains(".grants.http.allow: \"api.example.com\": give host:port"), "{err}");
}

#[test]
fn no_listener_is_an_error() {
    assert!(error_of("").contains(": listener: "));
}

#[test]
fn two_sockets_on_one_address_are_refused() {
    let second = "[[listener]]\nname = \"b\"\nbind = \"BIND\"\nstrict = true\nbackend = \"http://127.0.0.1:1\"\n";
    for (bind, clash) in [("127.0.0.1:8443", true), ("0.0.0.0:8443", true), ("127.0.0.2:8443", false)] {
        let result = load(&format!("{MINIMAL}\n{}", second.replace("BIND", bind)));
        assert_eq!(result.is_err(), clash, "{bind}: {result:?}");
        if clash {
            let err = result.unwrap_err().to_string();
            assert!(
                err.contains("listener \"b\".bind: ") && err.contains("already used by listener \"listener-0\""),
                "{err}"
            );
        }
    }
    let err = error_of(&format!("{MINIMAL}\n[admin]\nbind = \"127.0.0.1:8443\"\n"));
    assert!(err.contains("admin.bind: 127.0.0.1:8443 is already used"), "{err}");
    let ephemeral = MINIMAL.replace("127.0.0.1:8443", "127.0.0.1:0");
    assert!(load(&format!("{ephemeral}\n{}", second.replace("BIND", "127.0.0.1:0"))).is_ok(), "port 0 never clashes");
}

/// Random values for every numeric, duration and size key: validation never panics, and every value it
/// accepts can be used by what consumes it (semaphores, budgets, the clock), so no config value can panic
/// the server later.
const NUMBERS: [&str; 10] =
    ["1", "7", "1000", "10000000", "0", "10000001", "4294967296", "9223372036854775807", "-1", "18446744073709551615"];
const DURATIONS: [&str; 11] = [
    "\"1ms\"",
    "\"10s\"",
    "\"3650d\"",
    "\"2h\"",
    "\"0s\"",
    "\"3651d\"",
    "\"18446744073709551615ms\"",
    "\"99999999999999d\"",
    "\"1.5s\"",
    "\"\"",
    "5",
];
const SIZES: [&str; 9] = [
    "\"64KiB\"",
    "\"1MiB\"",
    "\"16MiB\"",
    "\"1TiB\"",
    "0",
    "1",
    "\"18446744073709551615GiB\"",
    "\"-1B\"",
    "4294967296",
];
/// Every numeric key with the values it is tried with.
const KEYS: [(&str, &str, &[&str]); 43] = [
    ("server", "max_connections", &NUMBERS),
    ("server", "session_cache_entries", &NUMBERS),
    ("server", "h2_max_concurrent_streams", &NUMBERS),
    ("server", "handshake_timeout", &DURATIONS),
    ("server", "request_head_timeout", &DURATIONS),
    ("server", "keepalive_timeout", &DURATIONS),
    ("server", "request_body_timeout", &DURATIONS),
    ("server", "send_timeout", &DURATIONS),
    ("server", "tunnel_idle_timeout", &DURATIONS),
    ("server", "h2_keepalive_interval", &DURATIONS),
    ("server", "shutdown_grace", &DURATIONS),
    ("server", "max_request_header_bytes", &SIZES),
    ("server", "plugin_memory_total", &SIZES),
    ("server", "plugin_keep_resident", &SIZES),
    ("server", "certificate_compression_cache_entries", &NUMBERS),
    ("server", "certificate_compression_cache_bytes", &SIZES),
    ("cache", "max_entries", &NUMBERS),
    ("cache", "max_bytes", &SIZES),
    ("cache", "max_negative_entries", &NUMBERS),
    ("cache", "ttl", &DURATIONS),
    ("cache", "negative_ttl", &DURATIONS),
    ("cache", "max_stale", &DURATIONS),
    ("cache", "invalid_ttl", &DURATIONS),
    ("proxy", "connect_timeout", &DURATIONS),
    ("proxy", "response_timeout", &DURATIONS),
    ("proxy", "pool_idle_timeout", &DURATIONS),
    ("proxy", "max_connections_per_backend", &NUMBERS),
    ("proxy", "max_backend_connections", &NUMBERS),
    ("proxy", "max_idle_per_client", &NUMBERS),
    ("proxy", "max_idle_per_backend", &NUMBERS),
    ("acme", "renew_check_interval", &DURATIONS),
    ("acme", "handshake_wait", &DURATIONS),
    ("acme", "order_timeout", &DURATIONS),
    ("acme", "failure_backoff", &DURATIONS),
    ("acme", "failure_backoff_max", &DURATIONS),
    ("acme", "lock_lease", &DURATIONS),
    ("acme", "orders_per_hour", &NUMBERS),
    ("acme", "orders_per_hour_per_domain", &NUMBERS),
    ("acme", "max_concurrent_orders", &NUMBERS),
    ("acme", "max_pending", &NUMBERS),
    ("listener.admission", "address_concurrent", &NUMBERS),
    ("listener.admission", "prefix_burst", &NUMBERS),
    ("listener.admission", "max_tracked", &NUMBERS),
];
/// What an `[acme]` section needs besides the keys tried.
const ACME_REQUIRED: &str =
    "directory = \"https://ca.test/dir\"\ndirectory_path = \"acme\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n";

/// A config with a random subset of [`KEYS`] set, mostly to plausible values (the first four of each list).
fn random_config(next: &mut impl FnMut() -> u64) -> String {
    let mut sections: BTreeMap<&str, String> = BTreeMap::new();
    for (section, key, values) in KEYS {
        if next().is_multiple_of(4) {
            let pool = if next().is_multiple_of(4) { values.len() } else { 4 };
            let value = values[(next() % pool as u64) as usize];
            sections.entry(section).or_default().push_str(&format!("{key} = {value}\n"));
        }
    }
    let mut text = MINIMAL.to_string();
    for (section, body) in &sections {
        let required = if *section == "acme" { ACME_REQUIRED } else { "" };
        text.push_str(&format!("\n[{section}]\n{required}{body}"));
    }
    text
}

/// Hands an accepted config's values to what uses them: clocks, semaphores, the descriptor budget, the cache.
fn assert_usable(config: &Config, text: &str, runtime: &tokio::runtime::Runtime) {
    let now = std::time::Instant::now();
    let c = &config.server.client;
    for d in [
        config.server.handshake_timeout,
        config.server.shutdown_grace,
        c.request_head_timeout,
        c.keepalive_timeout,
        c.request_body_timeout,
        c.send_timeout,
        c.tunnel_idle_timeout,
        c.h2_keepalive_interval,
        config.cache.ttl,
        config.cache.negative_ttl,
        config.cache.max_ttl + config.cache.max_stale,
        config.cache.invalid_ttl,
        config.proxy.connect_timeout,
        config.proxy.response_timeout,
    ] {
        assert!(now.checked_add(d).is_some(), "{d:?} overflows the clock:\n{text}");
    }
    for n in [config.server.max_connections, config.proxy.max_connections_per_backend] {
        assert!(n <= tokio::sync::Semaphore::MAX_PERMITS, "{n}:\n{text}");
    }
    let budget = crate::fdlimit::budget(config, 1 << 20);
    assert!(
        budget.clients <= tokio::sync::Semaphore::MAX_PERMITS && budget.backends <= tokio::sync::Semaphore::MAX_PERMITS
    );
    // The cache turns TTLs into expiry times (moka keeps nanoseconds in a u64): fill and read an entry.
    let cache = crate::cache::CertCache::new(&config.cache, std::sync::Arc::default());
    let key = crate::cache::CacheKey { plugin: "p".into(), listener: None, name: ServerName::parse("a.test").unwrap() };
    let filled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(async {
            let load = async { Ok::<_, ()>(crate::cache::Answer::NotFound) };
            let first = cache.get_or_load(key.clone(), load).await.is_ok();
            cache.run_pending_tasks().await;
            let _ = cache.get_or_load(key, async { Err::<crate::cache::Answer, ()>(()) }).await;
            first
        })
    }));
    assert!(filled.unwrap_or_else(|_| panic!("the cache panicked under:\n{text}")), "{text}");
    // The memo of compressed certificates: fill an entry and hit it.
    let compressed = std::panic::catch_unwind(|| {
        let settings = &config.server.certificate_compression;
        let compression = crate::compression::Compression::new(settings, std::sync::Arc::default());
        let compressor = compression.compressor(CertCompression::Brotli)?;
        let level = rustls::compress::CompressionLevel::Interactive;
        (0..2).map(|_| compressor.compress(vec![7; 3000], level).ok()).last().flatten()
    });
    assert!(compressed.is_ok(), "certificate compression panicked under:\n{text}");
    if let Some(acme) = &config.acme {
        for d in [acme.renew_check_interval, acme.order_timeout + acme.lock_lease, acme.failure_backoff_max] {
            assert!(now.checked_add(d).is_some(), "{d:?} overflows the clock:\n{text}");
        }
        let built = std::panic::catch_unwind(|| crate::acme::Acme::new(acme.clone(), None, "node"));
        assert!(built.is_ok(), "the ACME subsystem panicked under:\n{text}");
    }
    for listener in &config.listeners {
        let admitted = std::panic::catch_unwind(|| {
            let admission = std::sync::Arc::new(crate::admission::Admission::new("l".into(), &listener.admission));
            (0..3).filter(|_| admission.admit(std::net::Ipv4Addr::new(192, 0, 2, 1).into()).is_ok()).count()
        });
        assert!(admitted.is_ok(), "admission panicked under:\n{text}");
    }
}

#[test]
fn no_accepted_value_can_panic_the_runtime() {
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (mut accepted, mut with_acme) = (0, 0);
    for _ in 0..3000 {
        let text = random_config(&mut next);
        let Ok(config) = std::panic::catch_unwind(|| load(&text)).unwrap_or_else(|_| panic!("panicked on:\n{text}"))
        else {
            continue;
        };
        accepted += 1;
        with_acme += usize::from(config.acme.is_some());
        assert_usable(&config, &text, &runtime);
    }
    assert!(accepted > 100, "only {accepted} random configs were accepted: the test explores too little");
    assert!(with_acme > 20, "only {with_acme} accepted random configs had [acme]");
}

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert!(parse_duration("1.5s").is_err());
    assert!(parse_duration("10").is_err());
    assert_eq!(parse_size("64MiB"), Ok(64 << 20));
    assert_eq!(parse_size("1000"), Ok(1000));
    assert!(parse_size("12XB").is_err());
}

#[test]
fn proxy_protocol_takes_trusted_networks_and_names_a_bad_one() {
    let with = |value: &str| {
        MINIMAL.replace("bind = \"127.0.0.1:8443\"", &format!("bind = \"127.0.0.1:8443\"\nproxy_protocol = {value}"))
    };
    let config = load(&with(r#"{ trusted = ["10.0.0.0/8", "2001:db8::/32", "127.0.0.1"] }"#)).unwrap();
    let pp = config.listeners[0].proxy_protocol.as_ref().unwrap();
    assert!(pp.required, "required unless said otherwise");
    let trusts = |ip: &str| pp.trusted.iter().any(|net| net.contains(ip.parse().unwrap()));
    assert!(trusts("10.200.0.1") && trusts("2001:db8:ffff::1") && trusts("127.0.0.1") && trusts("::ffff:10.1.1.1"));
    assert!(!trusts("11.0.0.1") && !trusts("127.0.0.2") && !trusts("2001:db9::1"));
    assert!(load(MINIMAL).unwrap().listeners[0].proxy_protocol.is_none(), "off unless configured");
    let optional = load(&with(r#"{ trusted = ["0.0.0.0/0"], required = false }"#)).unwrap();
    assert!(!optional.listeners[0].proxy_protocol.as_ref().unwrap().required);
    for (bad, want) in
        [(r#"{ trusted = [] }"#, "list the load balancers"), (r#"{ trusted = ["10.0.0.0/33"] }"#, "prefix length")]
    {
        let err = error_of(&with(bad));
        assert!(err.contains("proxy_protocol.trusted") && err.contains(want), "{err}");
    }
}

#[test]
fn acme_settings_get_defaults_and_every_mistake_names_its_key_and_secrets_never_print() {
    let secret = "0123456789abcdef0123456789abcdef-acme";
    let acme = |keys: &str| {
        format!("{MINIMAL}\n[acme]\ndirectory = \"https://ca.example/dir\"\nsecret = \"{secret}\"\n{keys}")
    };
    let config = load(&acme("directory_path = \"acme\"\nnames = [\"WWW.Example.com\"]")).unwrap();
    let settings = config.acme.as_ref().unwrap();
    assert!(matches!(&settings.storage, AcmeStorage::Directory(p) if p == Path::new("/etc/tern/acme")));
    assert_eq!(settings.names[0].as_str(), "www.example.com");
    assert_eq!(settings.key_type, KeyType::EcdsaP256);
    assert_eq!(settings.challenge, ChallengeKind::TlsAlpn01);
    assert_eq!(settings.handshake_wait, defaults::ACME_HANDSHAKE_WAIT);
    assert_eq!(settings.orders_per_hour, defaults::ACME_ORDERS_PER_HOUR);
    assert!(!format!("{config:?}").contains(secret), "Debug must not print acme.secret");
    let hmac = "c2VjcmV0LWhtYWMta2V5LWZvci1lYWI";
    let eab = load(&acme(&format!(
        "directory_path = \"a\"\neab_kid = \"k\"\neab_hmac = \"{hmac}\"\nkey_type = \"rsa-2048\""
    )));
    let eab = eab.unwrap();
    assert_eq!(eab.acme.as_ref().unwrap().key_type, KeyType::Rsa2048);
    assert!(!format!("{eab:?}").contains(hmac), "Debug must not print acme.eab_hmac");

    let cases = [
        ("", "acme.redis: missing"),
        ("redis = \"nope\"", "acme.redis: no [[redis]] named \"nope\""),
        ("directory_path = \"a\"\nnames = [\"*.example.com\"]", "acme.names: *.example.com: wildcards need DNS-01"),
        ("directory_path = \"a\"\nhandshake_wait = \"30s\"", "acme.handshake_wait: must be shorter than"),
        ("directory_path = \"a\"\nrenewal_window = 1.5", "acme.renewal_window"),
        ("directory_path = \"a\"\norders_per_hour = 0", "acme.orders_per_hour: must be greater than zero"),
        ("directory_path = \"a\"\neab_kid = \"k\"", "acme.eab_kid: set both"),
        ("directory_path = \"a\"\nchallenge = \"http-01\"", "acme.challenge: \"http-01\" needs an [[http_listener]]"),
        ("directory_path = \"a\"\nchallenge = \"dns-01\"", "unknown variant `dns-01`"),
    ];
    for (keys, wanted) in cases {
        let err = error_of(&acme(keys));
        assert!(err.contains(wanted) && err.contains("/etc/tern/tern.toml"), "{keys:?}: {err}");
    }
    let short =
        error_of(&format!("{MINIMAL}\n[acme]\ndirectory = \"https://ca/dir\"\ndirectory_path = \"a\"\nsecret = \"x\""));
    assert!(short.contains("acme.secret: too short"), "{short}");
    let http = load(&format!("{MINIMAL}\n[[http_listener]]\nbind = \"127.0.0.1:8080\"")).unwrap();
    assert_eq!(http.http_listeners[0].https_port, 443);
    let clash = error_of(&format!("{MINIMAL}\n[[http_listener]]\nbind = \"127.0.0.1:8443\""));
    assert!(clash.contains("already used"), "{clash}");
}

#[test]
fn certificate_compression_takes_known_algorithms_once_and_a_bounded_memo() {
    let with = |keys: &str| format!("{MINIMAL}\n[server]\n{keys}\n");
    let config = load(MINIMAL).unwrap();
    assert_eq!(config.server.certificate_compression, CompressionSettings::default());
    assert_eq!(config.server.certificate_compression.algorithms, [CertCompression::Brotli, CertCompression::Zlib]);
    let config =
        load(&with("certificate_compression = [\"zlib\"]\ncertificate_compression_cache_bytes = \"1MiB\"")).unwrap();
    let settings = &config.server.certificate_compression;
    assert_eq!((settings.algorithms.as_slice(), settings.cache_bytes), (&[CertCompression::Zlib][..], 1 << 20));
    assert!(load(&with("certificate_compression = []")).unwrap().server.certificate_compression.algorithms.is_empty());
    for (bad, key, says) in [
        ("certificate_compression = [\"zstd\"]", "server.certificate_compression", "\"zstd\": give"),
        ("certificate_compression = [\"zlib\", \"zlib\"]", "server.certificate_compression", "listed twice"),
        ("certificate_compression_cache_entries = 0", "server.certificate_compression_cache_entries", "between 1"),
        ("certificate_compression_cache_bytes = \"1KiB\"", "server.certificate_compression_cache_bytes", "between"),
    ] {
        let err = error_of(&with(bad));
        assert!(
            err.contains("/etc/tern/tern.toml") && err.contains(&format!("{key}: ")) && err.contains(says),
            "{bad}: {err}"
        );
    }
}

#[test]
fn cipher_suites_are_known_names_once_with_tls13_and_the_server_order_by_default() {
    use rustls::CipherSuite;
    let with = |keys: &str| format!("{MINIMAL}\n[server]\n{keys}\n");
    let config = load(MINIMAL).unwrap();
    assert_eq!(config.server.ciphers, CipherSettings { suites: None, order: CipherOrder::Server });
    let config = load(&with(
        "cipher_suites = [\"TLS_CHACHA20_POLY1305_SHA256\", \"TLS13_AES_128_GCM_SHA256\", \
         \"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\"]\ncipher_order = \"client\"",
    ))
    .unwrap();
    let chosen = [
        CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        CipherSuite::TLS13_AES_128_GCM_SHA256,
        CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    ];
    assert_eq!(config.server.ciphers, CipherSettings { suites: Some(chosen.to_vec()), order: CipherOrder::Client });
    for (bad, key, says) in [
        ("cipher_suites = [\"TLS_RSA_WITH_RC4_128_SHA\"]", "server.cipher_suites", "not a suite tern offers"),
        ("cipher_suites = [\"TLS_AES_128_GCM_SHA256\", \"tls13_aes_128_gcm_sha256\"]", "server.cipher_suites", "twice"),
        ("cipher_suites = [\"TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256\"]", "server.cipher_suites", "no TLS 1.3"),
        ("cipher_suites = []", "server.cipher_suites", "no TLS 1.3"),
        ("cipher_order = \"random\"", "server.cipher_order", "\"random\": give"),
    ] {
        let err = error_of(&with(bad));
        assert!(
            err.contains("/etc/tern/tern.toml") && err.contains(&format!("{key}: ")) && err.contains(says),
            "{bad}: {err}"
        );
    }
}

#[test]
fn proxy_protocol_to_upstreams_is_off_unless_set_and_only_v2_is_known() {
    let config = load(MINIMAL).unwrap();
    assert_eq!(config.listeners[0].backend_proxy_protocol, None);
    assert_eq!(config.proxy.max_idle_per_client, defaults::MAX_IDLE_PER_CLIENT);
    let pool = "\n[[upstream]]\nname = \"pp\"\nservers = [\"127.0.0.1:8081\"]\nproxy_protocol = \"v2\"\n";
    let listener = |value: &str| {
        MINIMAL.replace(
            "bind = \"127.0.0.1:8443\"",
            &format!("bind = \"127.0.0.1:8443\"\nbackend_proxy_protocol = {value}"),
        )
    };
    let config = load(&(listener("\"v2\"") + pool + "\n[proxy]\nmax_idle_per_client = 2\n")).unwrap();
    assert_eq!(config.listeners[0].backend_proxy_protocol, Some(SendProxyProtocol::V2));
    assert_eq!(config.upstreams[0].proxy_protocol, Some(SendProxyProtocol::V2));
    assert_eq!(config.proxy.max_idle_per_client, 2);
    for (bad, key) in [
        (listener("\"v1\""), "backend_proxy_protocol"),
        (MINIMAL.to_string() + &pool.replace("\"v2\"", "\"v3\""), "proxy_protocol"),
    ] {
        let err = error_of(&bad);
        assert!(err.contains("/etc/tern/tern.toml") && err.contains(key) && err.contains("`v2`"), "{err}");
    }
    let err = error_of(&(MINIMAL.to_string() + "\n[proxy]\nmax_idle_per_client = 0\n"));
    assert!(err.contains("proxy.max_idle_per_client") && err.contains("between 1 and 1024"), "{err}");
}
