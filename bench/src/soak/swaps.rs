//! Plugin swaps: the config alternates between two builds of the plugin, reloaded by `POST /reload` and SIGHUP.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::process::{admin_request, signal};
use crate::setup::Setup;
use crate::state::{Ctx, up};

/// Alternates the plugin between its two builds, by `POST /reload` and SIGHUP in turn.
pub async fn swaps(mut ctx: Ctx, setup: Setup, config_path: PathBuf, pid: u32, every: f64) -> Result<()> {
    let mut serving = "plugin-a.wasm";
    let mut round = 0u64;
    while ctx.pause(Duration::from_secs_f64(every)).await {
        let target = if serving == "plugin-a.wasm" { "plugin-b.wasm" } else { "plugin-a.wasm" };
        let before = plugin_status(ctx.admin).await.ok();
        setup.write_config(&config_path, target)?;
        round += 1;
        let up_before = ctx.shared.redis_up.load(Relaxed);
        let (trigger, outcome) = if round % 2 == 1 {
            ("admin", reload_by_admin(ctx.admin).await)
        } else {
            signal(pid, "HUP")?;
            ("sighup", wait_for_swap(ctx.admin, target, before.as_ref()).await)
        };
        let up_after = ctx.shared.redis_up.load(Relaxed);
        let redis = if up_before == up_after {
            up(up_after).to_string()
        } else {
            format!("{}->{}", up(up_before), up(up_after))
        };
        match outcome {
            Ok(()) => {
                serving = target;
                ctx.shared.event("swap", &format!("{trigger} -> {target} (redis {redis})"));
            }
            Err(reason) => {
                let reason = reason.replace(['\n', ','], " ");
                ctx.shared.event("swap_rejected", &format!("{trigger} -> {target} (redis {redis}): {reason}"));
            }
        }
    }
    Ok(())
}

/// `POST /reload`: the plugin was swapped, or why not (the report's `rejected`).
async fn reload_by_admin(admin: SocketAddr) -> Result<(), String> {
    match admin_request(admin, "POST", "/reload").await {
        Ok((_, body)) => {
            let report: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let swapped = report["swapped"].as_array().is_some_and(|a| a.iter().any(|p| p == "redis"));
            if swapped { Ok(()) } else { Err(report["rejected"].to_string()) }
        }
        Err(err) => Err(format!("admin: {err:#}")),
    }
}

/// After a SIGHUP: the slot serves `target`, or the reload was rejected (a newer `last_error`).
async fn wait_for_swap(admin: SocketAddr, target: &str, before: Option<&serde_json::Value>) -> Result<(), String> {
    let old_error = before.map(|b| b["status"]["last_error"].clone());
    for _ in 0..150 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(status) = plugin_status(admin).await else { continue };
        if status["status"]["path"].as_str().is_some_and(|p| p.ends_with(target)) {
            return Ok(());
        }
        let error = &status["status"]["last_error"];
        if !error.is_null() && Some(error) != old_error.as_ref() {
            return Err(error[1].as_str().unwrap_or("rejected").to_string());
        }
    }
    Err("no swap and no rejection within 15 s of SIGHUP".to_string())
}

async fn plugin_status(admin: SocketAddr) -> Result<serde_json::Value> {
    let (_, body) = admin_request(admin, "GET", "/plugins").await?;
    let all: serde_json::Value = serde_json::from_str(&body)?;
    all.as_array()
        .and_then(|a| a.iter().find(|p| p["status"]["name"] == "redis"))
        .cloned()
        .context("no plugin named redis in /plugins")
}
