//! What is read from a running tern: its memory (`/proc/<pid>/smaps_rollup` and `status`) and its own cache
//! figures (`/metrics`).

use std::net::SocketAddr;

use anyhow::{Context, Result};
use tern_bench::{metric, scrape};

/// One reading of tern's memory and cache.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reading {
    /// Seconds since the phase began.
    pub at: f64,
    pub rss: u64,
    pub pss: u64,
    /// Anonymous memory (heap, stacks): what the cache grows.
    pub anon: u64,
    /// Peak RSS since start (`VmHWM`).
    pub hwm: u64,
    /// `tern_cache_entries`
    pub entries: u64,
    /// `tern_cache_weighted_bytes`: tern's estimate, each entry at least its slot.
    pub weighted: u64,
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    /// `tern_handshakes_total{outcome="ok"}`
    pub handshakes_ok: u64,
}

impl Reading {
    /// Memory of `pid` and the cache figures of the admin endpoint at `admin`, `at` seconds into a phase.
    pub async fn take(pid: u32, admin: SocketAddr, at: f64) -> Result<Self> {
        let text = scrape(admin).await.context("scraping /metrics")?;
        let (rss, pss, anon) = smaps_rollup(pid)?;
        let count = |series: &str| metric(&text, series) as u64;
        Ok(Self {
            at,
            rss,
            pss,
            anon,
            hwm: status_field(pid, "VmHWM:")?,
            entries: count("tern_cache_entries"),
            weighted: count("tern_cache_weighted_bytes"),
            hits: count("tern_selections_total{how=\"cache_hit\"}"),
            misses: count("tern_selections_total{how=\"cache_miss\"}"),
            evictions: count("tern_cache_evictions_total"),
            handshakes_ok: count("tern_handshakes_total{outcome=\"ok\"}"),
        })
    }
}

/// (Rss, Pss, Anonymous) of `pid` in bytes.
fn smaps_rollup(pid: u32) -> Result<(u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).context("smaps_rollup")?;
    let field = |name: &str| kib_field(&text, name);
    Ok((field("Rss:"), field("Pss:"), field("Anonymous:")))
}

/// A `kB` field of `/proc/<pid>/status`, in bytes.
fn status_field(pid: u32, name: &str) -> Result<u64> {
    Ok(kib_field(&std::fs::read_to_string(format!("/proc/{pid}/status")).context("status")?, name))
}

/// The value of the line starting with `name` (in kB), in bytes; 0 when absent.
fn kib_field(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}
