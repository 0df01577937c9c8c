//! The access log of a real `tern run`: the fields a config chooses, as JSON and as text, for requests from curl
//! (HTTP/1.1 and HTTP/2) and a rustls client, held against what the clients saw; the JA4 fingerprint in the log
//! and in the header the backend gets (never the client's own); a bad field name refused by `tern check`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use crate::support::*;

/// A backend that answers every request with the headers it got (`name: value` lines) and, after a POST, the
/// size of the body it read.
async fn header_echo_backend() -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                    let mut text = String::new();
                    for (name, value) in req.headers() {
                        text.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())));
                    }
                    let body = req.into_body().collect().await?.to_bytes();
                    text.push_str(&format!("body: {}\n", body.len()));
                    Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::from(text))))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
            });
        }
    });
    Ok(addr)
}

/// A running `tern run` behind the header-echo backend, with `log` as its `[log]` section and `listener` added to
/// its listener.
struct Setup {
    pki: Pki,
    tern: TernProcess,
    ca_file: std::path::PathBuf,
}

async fn start(log: &str, listener: &str) -> Result<Setup> {
    let pki = Pki::new(&["default.test", "a.test"])?;
    let backend = header_echo_backend().await?;
    let keys = format!("default_certificate = \"default\"\n{listener}");
    let config = pki.path("tern.toml");
    std::fs::write(&config, format!("{}\n[log]\n{log}\n", basic_config(&pki, backend, &keys)))?;
    let tern = TernProcess::start(&config).await?;
    let ca_file = pki.path("ca.pem");
    std::fs::write(&ca_file, pki.ca.pem())?;
    Ok(Setup { pki, tern, ca_file })
}

impl Setup {
    /// curl to `https://a.test/<path>` with `args` (`--http1.1`, `--http2`, `-d`...): the body it printed.
    async fn curl(&self, path: &str, args: &[&str]) -> Result<String> {
        let port = self.tern.addr.port();
        let mut curl = std::process::Command::new("curl");
        curl.args(["-sS", "--cacert"]).arg(&self.ca_file);
        curl.args(["--resolve", &format!("a.test:{port}:127.0.0.1")]).args(args);
        curl.arg(format!("https://a.test:{port}{path}"));
        let output = run_command(curl).await?;
        anyhow::ensure!(output.status.success(), "curl failed: {}", String::from_utf8_lossy(&output.stderr));
        Ok(String::from_utf8(output.stdout)?)
    }

    /// The access line of the request for `path` (waiting for it: lines are written once the response ended).
    async fn json_line(&self, path: &str) -> Result<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.tern.log.lock().expect("test lock").clone();
            let found = lines
                .iter()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|r| r["target"] == "tern::access" && r["fields"]["path"] == path)
                .collect::<Vec<_>>();
            match found.as_slice() {
                [one] => return Ok(one["fields"].clone()),
                [] if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => anyhow::bail!("{} access lines for {path} in {lines:#?}", found.len()),
            }
        }
    }
}

/// A GET with extra headers over an established connection (HTTP/2 if ALPN chose it): status and body.
async fn get_with(
    stream: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String)> {
    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let io = TokioIo::new(stream);
    let mut request = http::Request::get(if h2 { format!("https://a.test{path}") } else { path.to_string() });
    if !h2 {
        request = request.header("host", "a.test");
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request.body(http_body_util::Empty::<Bytes>::new())?;
    let response = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        sender.send_request(request).await?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn);
        sender.send_request(request).await?
    };
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.context("response body")?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Every field, ja4 included.
const ALL_FIELDS: &str = "access_fields = [\"client\", \"listener\", \"sni\", \"alpn\", \"tls_version\", \"cipher\", \
    \"group\", \"resumed\", \"handshake_us\", \"cert_source\", \"ja4\", \"method\", \"host\", \"path\", \"http_version\", \
    \"status\", \"upstream\", \"request_bytes\", \"response_bytes\", \"duration_us\", \"upstream_us\"]";

/// The shape of a JA4 fingerprint: `t13d1516h2_8daaf6152771_e5627efa2ab1`.
fn assert_ja4_shape(ja4: &serde_json::Value) -> String {
    let text = ja4.as_str().unwrap_or_else(|| panic!("no ja4: {ja4}")).to_string();
    let parts: Vec<&str> = text.split('_').collect();
    assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [10, 12, 12], "{text}");
    assert!(text.starts_with("t1") && text.is_ascii(), "{text}");
    assert!(parts[1..].iter().all(|p| p.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())), "{text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_lines_show_each_handshake_and_request_as_the_clients_saw_them() -> Result<()> {
    let setup = start(&format!("format = \"text\"\naccess_format = \"json\"\n{ALL_FIELDS}"), "").await?;
    let addr = setup.tern.addr;

    // rustls over HTTP/2, twice with one session cache: a full handshake (the plugin's certificate), then a
    // resumed one (the cached answer).
    let client = setup.pki.client(&[b"h2", b"http/1.1"]);
    let first = connect(addr, &client, "a.test").await?;
    let (suite, group) = {
        let tls = first.get_ref().1;
        (tls.negotiated_cipher_suite().context("suite")?.suite(), tls.negotiated_key_exchange_group().context("group")?)
    };
    let (status, _, body) = get(first, "a.test", "/rustls-first").await?;
    assert_eq!(status, 200);
    let line = setup.json_line("/rustls-first").await?;
    assert_eq!(line["listener"], "main");
    assert_eq!(line["sni"], "a.test");
    assert_eq!(line["alpn"], "h2");
    assert_eq!(line["http_version"], "HTTP/2.0");
    assert_eq!(line["tls_version"], "TLSv1.3");
    assert_eq!(line["cipher"], suite.as_str().context("suite name")?);
    assert_eq!(line["group"], group.name().as_str().context("group name")?);
    assert_eq!(line["resumed"], false);
    assert_eq!(line["cert_source"], "plugin");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["host"], "a.test");
    assert_eq!(line["status"], 200);
    assert_eq!(line["response_bytes"], body.len() as u64, "the bytes the client got");
    assert_eq!(line["request_bytes"], 0);
    assert!(line["client"].as_str().is_some_and(|c| c.starts_with("127.0.0.1:")), "{line}");
    assert!(line["upstream"].as_str().is_some_and(|u| u.starts_with("http://127.0.0.1:")), "{line}");
    for micros in ["handshake_us", "duration_us", "upstream_us"] {
        assert!(line[micros].as_u64().is_some_and(|us| us > 0 && us < 10_000_000), "{micros}: {line}");
    }
    let rustls_ja4 = assert_ja4_shape(&line["ja4"]);
    assert!(rustls_ja4.starts_with("t13d") && rustls_ja4[8..10] == *"h2", "{rustls_ja4}");

    let resumed = connect(addr, &client, "a.test").await?;
    assert_eq!(resumed.get_ref().1.handshake_kind(), Some(rustls::HandshakeKind::Resumed));
    assert_eq!(get(resumed, "a.test", "/rustls-resumed").await?.0, 200);
    let line = setup.json_line("/rustls-resumed").await?;
    assert_eq!(line["resumed"], true);
    assert_eq!(line["cert_source"], "cache");

    // The same client settings without a session: the same fingerprint as the first connection.
    let fresh = setup.pki.client(&[b"h2", b"http/1.1"]);
    assert_eq!(get(connect(addr, &fresh, "a.test").await?, "a.test", "/rustls-again").await?.0, 200);
    assert_eq!(setup.json_line("/rustls-again").await?["ja4"], rustls_ja4.as_str(), "same client, same JA4");

    // No SNI: the default certificate, and JA4 says `i`.
    let bare = handshake(addr, &setup.pki.client(&[]), None, "default.test").await?;
    assert_eq!(get(bare, "default.test", "/no-sni").await?.0, 200);
    let line = setup.json_line("/no-sni").await?;
    assert_eq!((line["cert_source"].as_str(), line["sni"].is_null()), (Some("default"), true), "{line}");
    assert!(line["alpn"].is_null() && line["http_version"] == "HTTP/1.1", "{line}");
    assert_eq!(assert_ja4_shape(&line["ja4"])[3..4], *"i");

    // curl: HTTP/1.1 twice (the same fingerprint), HTTP/2 with a body.
    let body = setup.curl("/curl-h1", &["--http1.1"]).await?;
    let line = setup.json_line("/curl-h1").await?;
    assert_eq!((line["alpn"].as_str(), line["http_version"].as_str()), (Some("http/1.1"), Some("HTTP/1.1")));
    assert_eq!(line["response_bytes"], body.len() as u64);
    let curl_ja4 = assert_ja4_shape(&line["ja4"]);
    assert_eq!(curl_ja4[8..10], *"h1", "curl --http1.1 offers only http/1.1: {curl_ja4}");
    setup.curl("/curl-h1-again", &["--http1.1"]).await?;
    assert_eq!(setup.json_line("/curl-h1-again").await?["ja4"], curl_ja4.as_str(), "same client, same JA4");
    let upload = "x".repeat(3000);
    let body = setup.curl("/curl-h2", &["--http2", "--data-binary", &upload]).await?;
    assert!(body.contains("body: 3000\n"), "{body}");
    let line = setup.json_line("/curl-h2").await?;
    assert_eq!((line["alpn"].as_str(), line["http_version"].as_str()), (Some("h2"), Some("HTTP/2.0")));
    assert_eq!((line["method"].as_str(), line["request_bytes"].as_u64()), (Some("POST"), Some(3000)));
    assert_eq!(line["response_bytes"], body.len() as u64);
    assert_eq!(line["cert_source"], "cache");
    let curl_h2_ja4 = assert_ja4_shape(&line["ja4"]);
    assert_ne!(curl_h2_ja4[11..], rustls_ja4[11..], "curl (OpenSSL) and rustls are told apart");

    // A request tern answers itself: 421, sent nowhere.
    let stream = connect(addr, &client, "a.test").await?;
    assert_eq!(get(stream, "default.test", "/elsewhere").await?.0, 421);
    let line = setup.json_line("/elsewhere").await?;
    assert_eq!((line["status"].as_u64(), line["upstream"].as_str()), (Some(421), Some("-")));
    assert!(line["upstream_us"].is_null(), "{line}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_access_lines_carry_the_chosen_fields_in_order_beside_a_json_process_log() -> Result<()> {
    let fields = "access_fields = [\"sni\", \"status\", \"path\", \"resumed\", \"upstream_us\", \"ja4\"]";
    let setup = start(&format!("format = \"json\"\naccess_format = \"text\"\n{fields}"), "").await?;
    setup.curl("/text-line?q=1", &["--http1.1"]).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let line = loop {
        let lines = setup.tern.log.lock().expect("test lock").clone();
        if let Some(line) = lines.iter().find(|l| l.contains("tern::access")) {
            break line.clone();
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "no access line in {lines:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (head, pairs) = line.split_once(" INFO tern::access: request ").context("text line head")?;
    let head = head.trim_end();
    assert!(head.ends_with('Z') && head.len() == 27, "RFC 3339 time first: {line}");
    // A value holding `=` is quoted (logfmt).
    let pairs: Vec<(&str, &str)> = pairs.split(' ').filter_map(|p| p.split_once('=')).collect();
    let names: Vec<&str> = pairs.iter().map(|(k, _)| *k).collect();
    assert_eq!(names, ["sni", "status", "path", "resumed", "upstream_us", "ja4"], "{line}");
    assert_eq!(
        &pairs[..4],
        [("sni", "a.test"), ("status", "200"), ("path", "\"/text-line?q=1\""), ("resumed", "false")]
    );
    assert!(pairs[4].1.parse::<u64>().is_ok(), "{line}");
    assert_ja4_shape(&serde_json::Value::from(pairs[5].1));
    // The process log stays JSON.
    let ready = setup.tern.log.lock().expect("test lock").iter().find(|l| l.contains("\"ready\"")).cloned();
    let ready: serde_json::Value = serde_json::from_str(&ready.context("no ready line")?)?;
    assert_eq!(ready["fields"]["message"], "ready");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backend_gets_terns_ja4_header_and_never_the_one_a_client_sent() -> Result<()> {
    let setup =
        start("access_format = \"json\"\naccess_fields = [\"path\", \"ja4\"]", "ja4_header = \"x-ja4\"").await?;
    let addr = setup.tern.addr;
    for (alpn, path) in [(&b"h2"[..], "/forged-h2"), (&b"http/1.1"[..], "/forged-h1")] {
        let stream = connect(addr, &setup.pki.client(&[alpn]), "a.test").await?;
        let forged = [("x-ja4", "t13d0000h2_000000000000_000000000000"), ("X-JA4", "second")];
        let (status, body) = get_with(stream, path, &forged).await?;
        assert_eq!(status, 200, "{body}");
        let logged = assert_ja4_shape(&setup.json_line(path).await?["ja4"]);
        let sent: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("x-ja4: ")).collect();
        assert_eq!(sent, [logged.as_str()], "only tern's fingerprint reaches the backend: {body}");
    }
    let body = setup.curl("/curl-forged", &["-H", "X-JA4: forged"]).await?;
    let logged = setup.json_line("/curl-forged").await?["ja4"].clone();
    assert!(body.contains(&format!("x-ja4: {}\n", logged.as_str().context("ja4")?)), "{body}");
    assert!(!body.contains("forged"), "{body}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_access_field_is_refused_naming_the_file_the_key_and_the_field() -> Result<()> {
    let pki = Pki::new(&["default.test"])?;
    let config = pki.path("tern.toml");
    let base = basic_config(&pki, header_echo_backend().await?, "default_certificate = \"default\"");
    std::fs::write(&config, format!("{base}\n[log]\naccess_fields = [\"status\", \"bytes_sent\"]\n"))?;
    let output = run_command(tern(&["check", "-c", &config.to_string_lossy()])).await?;
    assert!(!output.status.success(), "tern check accepted it");
    let text = text(&output);
    assert!(text.contains(&config.display().to_string()) && text.contains("log.access_fields"), "{text}");
    assert!(text.contains("\"bytes_sent\"") && text.contains("valid fields: client, listener, sni"), "{text}");
    Ok(())
}
