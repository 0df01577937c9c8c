//! gRPC through tern: a real gRPC client and server (Python grpcio, from PyPI into a venv under plugins/target),
//! the client over TLS and HTTP/2 to tern, tern over cleartext HTTP/2 to a pool with `protocol = "h2"`, routed
//! by the plugin. Unary and server-streaming calls, with trailers (grpc-status and custom trailing metadata)
//! arriving intact.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::support::*;

/// Pinned so that the test does not change under us (a wheel for this machine's CPython is on PyPI).
const GRPCIO: &str = "grpcio==1.85.3";

/// A gRPC server without generated code: byte-string messages through generic handlers.
const SERVER: &str = r#"
import sys, grpc
from concurrent import futures

def unary(request, context):
    context.set_trailing_metadata((("x-tern-trailer", "unary"),))
    return request + b" from grpc"

def stream(request, context):
    context.set_trailing_metadata((("x-tern-trailer", "stream"),))
    for i in range(3):
        yield request + b" #%d" % i

def failing(request, context):
    context.abort(grpc.StatusCode.PERMISSION_DENIED, "denied by the test server")

identity = lambda b: b
handlers = grpc.method_handlers_generic_handler("tern.test.Echo", {
    "Unary": grpc.unary_unary_rpc_method_handler(unary, identity, identity),
    "Stream": grpc.unary_stream_rpc_method_handler(stream, identity, identity),
    "Fail": grpc.unary_unary_rpc_method_handler(failing, identity, identity),
})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handlers,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination(timeout=120)
"#;

/// The client: TLS to tern with the test CA, the tenant's name as SNI and authority; prints what it got.
const CLIENT: &str = r#"
import json, sys, grpc
address, ca, name = sys.argv[1], open(sys.argv[2], "rb").read(), sys.argv[3]
credentials = grpc.ssl_channel_credentials(root_certificates=ca)
channel = grpc.secure_channel(address, credentials, options=(("grpc.ssl_target_name_override", name), ("grpc.default_authority", name)))
identity = lambda b: b
unary = channel.unary_unary("/tern.test.Echo/Unary", request_serializer=identity, response_deserializer=identity)
reply, call = unary.with_call(b"hello", timeout=10)
stream = channel.unary_stream("/tern.test.Echo/Stream", request_serializer=identity, response_deserializer=identity)
responses = stream(b"tick", timeout=10)
items = [r.decode() for r in responses]
failing = channel.unary_unary("/tern.test.Echo/Fail", request_serializer=identity, response_deserializer=identity)
try:
    failing(b"x", timeout=10)
    failed = None
except grpc.RpcError as e:
    failed = [e.code().name, e.details()]
print(json.dumps({
    "unary": reply.decode(),
    "unary_trailers": dict(call.trailing_metadata()),
    "stream": items,
    "stream_trailers": dict(responses.trailing_metadata()),
    "stream_code": responses.code().name,
    "failed": failed,
}))
"#;

/// A venv with grpcio, made once under plugins/target (like the polyglot plugins' toolchains).
async fn python_with_grpc() -> Result<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/target/grpc-venv");
    let python = venv.join("bin/python3");
    let marker = venv.join(GRPCIO);
    if marker.exists() {
        return Ok(python);
    }
    let mut create = std::process::Command::new("python3");
    create.args(["-m", "venv", "--clear"]).arg(&venv);
    let out = run_command(create).await?;
    anyhow::ensure!(out.status.success(), "python3 -m venv: {}", text(&out));
    let mut pip = std::process::Command::new(venv.join("bin/pip"));
    pip.args(["install", "--quiet", "--disable-pip-version-check", GRPCIO]);
    let out = run_command(pip).await?;
    anyhow::ensure!(out.status.success(), "pip install {GRPCIO}: {}", text(&out));
    std::fs::write(&marker, "")?;
    Ok(python)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_streaming_calls_pass_through_tern_with_their_trailers() -> Result<()> {
    let python = python_with_grpc().await?;
    let pki = Pki::new(&["default.test", "grpc.tenant.test"])?;
    std::fs::write(pki.path("server.py"), SERVER)?;
    std::fs::write(pki.path("client.py"), CLIENT)?;
    std::fs::write(pki.path("ca.pem"), pki.ca.pem())?;

    let mut server = tokio::process::Command::new(&python)
        .arg(pki.path("server.py"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("starting the gRPC server")?;
    let mut lines = BufReader::new(server.stdout.take().context("server stdout")?).lines();
    let port = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("the gRPC server did not start")??
        .context("the gRPC server exited")?;
    let port: u16 = port.trim().parse().context("the gRPC server printed its port")?;

    std::fs::write(pki.certs().join("grpc.tenant.test.route"), "pool grpc\n")?;
    let backend = tern_fixtures::spawn_echo_backend().await?;
    let config = config_with(
        &pki,
        backend,
        FILE_PATH_PLUGIN,
        "grants.routes = { pools = [\"grpc\"] }",
        "default_certificate = \"default\"",
    ) + &format!("\n[[upstream]]\nname = \"grpc\"\nservers = [\"127.0.0.1:{port}\"]\nprotocol = \"h2\"\n");
    let tern = TestServer::start(&config, pki.dir.path()).await?;

    let mut client = std::process::Command::new(&python);
    client.arg(pki.path("client.py")).arg(tern.addr.to_string()).arg(pki.path("ca.pem")).arg("grpc.tenant.test");
    let out = run_command(client).await?;
    anyhow::ensure!(out.status.success(), "gRPC client failed: {}", text(&out));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).context("client output is JSON")?;
    assert_eq!(result["unary"], "hello from grpc", "{result}");
    assert_eq!(result["unary_trailers"]["x-tern-trailer"], "unary", "{result}");
    assert_eq!(result["stream"], serde_json::json!(["tick #0", "tick #1", "tick #2"]), "{result}");
    assert_eq!(result["stream_trailers"]["x-tern-trailer"], "stream", "{result}");
    assert_eq!(result["stream_code"], "OK", "{result}");
    assert_eq!(result["failed"], serde_json::json!(["PERMISSION_DENIED", "denied by the test server"]), "{result}");
    Ok(())
}
