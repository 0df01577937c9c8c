//! `tern acme list|renew|revoke`: the running node's ACME certificates, through its admin API (the node owns the
//! storage, the account and the challenge answers; a renewal the operator asks for is an order like any other).

use anyhow::{Context, Result, bail};
use http_body_util::{BodyExt, Full};

/// `tern acme ...`
#[derive(Debug, clap::Subcommand)]
pub enum AcmeCommand {
    /// Managed names with their issuer, expiry, renewal time and last error (never keys).
    List(Target),
    /// Renew a name now, whatever its schedule; prints the new expiry.
    Renew {
        /// The server name.
        name: String,
        #[command(flatten)]
        target: Target,
    },
    /// Revoke a name's certificate at the CA and delete it from storage.
    Revoke {
        /// The server name.
        name: String,
        #[command(flatten)]
        target: Target,
    },
}

/// Which node to ask.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// The node's admin address (`[admin] bind`).
    #[arg(long, default_value = tern::config::defaults::ADMIN_BIND)]
    admin: String,
    /// The admin token, if the node requires one (read from this environment variable).
    #[arg(long, default_value = "TERN_ADMIN_TOKEN")]
    token_env: String,
}

pub async fn run(command: AcmeCommand) -> Result<()> {
    let (method, path, target) = match &command {
        AcmeCommand::List(target) => ("GET", "/acme/certificates".to_string(), target),
        AcmeCommand::Renew { name, target } => ("POST", format!("/acme/renew?name={name}"), target),
        AcmeCommand::Revoke { name, target } => ("POST", format!("/acme/revoke?name={name}"), target),
    };
    let (status, body) = call(target, method, &path).await?;
    if !(200..300).contains(&status) {
        bail!("{} answered {status}: {}", target.admin, body.trim());
    }
    let value: serde_json::Value = serde_json::from_str(&body).context("the admin API's answer is not JSON")?;
    match command {
        AcmeCommand::List(_) => print_list(&value),
        _ => println!("{}", serde_json::to_string_pretty(&value)?),
    }
    Ok(())
}

fn print_list(value: &serde_json::Value) {
    let empty = Vec::new();
    let list = value.get("certificates").and_then(|c| c.as_array()).unwrap_or(&empty);
    println!("{:<40} {:<22} {:<22} {:<8} issuer / last error", "name", "not after", "renew at", "failures");
    for entry in list {
        let time = |key: &str| entry.get(key).and_then(serde_json::Value::as_i64).map_or("-".to_string(), utc);
        let issuer = entry.get("issuer").and_then(|v| v.as_str()).unwrap_or("-");
        let error = entry.get("last_error").and_then(|v| v.as_str()).filter(|e| !e.is_empty());
        println!(
            "{:<40} {:<22} {:<22} {:<8} {}{}",
            entry.get("name").and_then(|v| v.as_str()).unwrap_or("?"),
            time("not_after"),
            time("renew_at"),
            entry.get("failures").and_then(serde_json::Value::as_u64).unwrap_or(0),
            issuer,
            error.map_or(String::new(), |e| format!(" / {e}")),
        );
    }
    println!("{} certificate(s)", list.len());
}

/// Unix seconds as `YYYY-MM-DD hh:mm:ss` UTC.
fn utc(seconds: i64) -> String {
    let (year, month, day, rest) = tern::civil::utc(seconds);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}", rest / 3600, rest % 3600 / 60, rest % 60)
}

async fn call(target: &Target, method: &str, path: &str) -> Result<(u16, String)> {
    let tcp = tokio::time::timeout(std::time::Duration::from_secs(5), tokio::net::TcpStream::connect(&target.admin))
        .await
        .with_context(|| format!("{}: no connection within 5 s", target.admin))?
        .with_context(|| format!("cannot reach the admin API at {}", target.admin))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(connection);
    let mut request = http::Request::builder().method(method).uri(path).header("host", &target.admin);
    if let Ok(token) = std::env::var(&target.token_env) {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request.body(Full::new(bytes::Bytes::new()))?;
    // A renewal is an order: give it the time one takes.
    let response = tokio::time::timeout(std::time::Duration::from_secs(300), sender.send_request(request))
        .await
        .context("no answer within 300 s")??;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
