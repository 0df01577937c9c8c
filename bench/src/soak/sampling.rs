//! Sampling: tern's `/proc` figures, its `/metrics` counters and the soak's own, printed and in `samples.csv`.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::process::admin_request;
use crate::state::{Class, Ctx, lock, up};

/// Plugin-call outcomes in `/metrics`, in column order (an outcome this tern does not export reads 0). `error`
/// includes `store_unavailable`, and `trap` includes `memory_limit` and `memory_budget`.
pub const OUTCOMES: [&str; 11] = [
    "found",
    "not_found",
    "error",
    "store_unavailable",
    "rate_limited",
    "client_rate_limited",
    "circuit_open",
    "trap",
    "memory_limit",
    "memory_budget",
    "timeout",
];

fn outcome(name: &str) -> usize {
    OUTCOMES.iter().position(|o| *o == name).unwrap_or(0)
}
pub const SELECTIONS: [&str; 6] = ["static", "cache_hit", "cache_negative_hit", "cache_miss", "stale", "default"];

#[derive(Debug, Clone, Default)]
pub struct Sample {
    pub t: f64,
    pub redis_up: bool,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    pub fds: u64,
    pub threads: u64,
    pub cache_entries: f64,
    pub hot_ok: u64,
    pub hot_failed: u64,
    pub hot_requests_ok: u64,
    pub hot_requests_failed: u64,
    pub hot_p50_ms: f64,
    pub hot_p99_ms: f64,
    pub flood_ok: u64,
    pub flood_failed: u64,
    pub flood_wrong: u64,
    pub flood_p99_ms: f64,
    pub churn_issued: u64,
    pub churn_probe_failed: u64,
    pub calls: [f64; OUTCOMES.len()],
    pub selections: [f64; SELECTIONS.len()],
    pub swaps: f64,
    /// tern's own count of failed handshakes (every outcome but ok).
    pub tern_handshakes_failed: f64,
    /// /metrics could not be read.
    pub admin_failed: bool,
}

pub fn print_sample_header() {
    println!(
        "{:>7} {:>5} {:>8} {:>4} {:>4} {:>6} | {:>13} {:>7} | {:>13} {:>7} | {:>22} | {:>6} {:>5} {:>5}",
        "t",
        "redis",
        "rss MiB",
        "fds",
        "thr",
        "cache",
        "hot +ok/fail",
        "p99 ms",
        "flood +ok/fail",
        "p99 ms",
        "calls +found/nf/unav/open",
        "stale+",
        "swaps",
        "churn"
    );
}

fn print_sample(s: &Sample, prev: &Sample) {
    let d = |a: u64, b: u64| a.saturating_sub(b);
    let df = |i: usize| (s.calls[i] - prev.calls[i]).max(0.0);
    let stale = SELECTIONS.iter().position(|h| *h == "stale").map_or(0.0, |i| s.selections[i] - prev.selections[i]);
    println!(
        "{:>6.0}s {:>5} {:>8.1} {:>4} {:>4} {:>6} | {:>13} {:>7.1} | {:>13} {:>7.1} | {:>22} | {:>6} {:>5} {:>5}{}",
        s.t,
        up(s.redis_up),
        s.rss_kib as f64 / 1024.0,
        s.fds,
        s.threads,
        s.cache_entries,
        format!(
            "{}/{}",
            d(s.hot_ok, prev.hot_ok),
            d(s.hot_failed + s.hot_requests_failed, prev.hot_failed + prev.hot_requests_failed)
        ),
        s.hot_p99_ms,
        format!(
            "{}/{}",
            d(s.flood_ok, prev.flood_ok),
            d(s.flood_failed + s.flood_wrong, prev.flood_failed + prev.flood_wrong)
        ),
        s.flood_p99_ms,
        format!(
            "{}/{}/{}/{}",
            df(outcome("found")),
            df(outcome("not_found")),
            df(outcome("store_unavailable")),
            df(outcome("circuit_open"))
        ),
        stale,
        s.swaps,
        s.churn_issued,
        if s.admin_failed { "  (metrics unavailable)" } else { "" },
    );
}

fn csv_header() -> String {
    let mut columns: Vec<String> = "t_s,redis_up,rss_kib,hwm_kib,fds,threads,cache_entries,hot_ok,hot_failed,\
        hot_requests_ok,hot_requests_failed,hot_p50_ms,hot_p99_ms,flood_ok,flood_failed,flood_wrong,flood_p99_ms,\
        churn_issued,churn_probe_failed"
        .split(',')
        .map(|c| c.trim().to_string())
        .collect();
    columns.extend(OUTCOMES.iter().map(|o| format!("calls_{o}")));
    columns.extend(SELECTIONS.iter().map(|h| format!("sel_{h}")));
    columns.extend(["swaps", "tern_handshakes_failed", "admin_failed"].map(String::from));
    columns.join(",")
}

fn csv_line(s: &Sample) -> String {
    let mut fields = vec![
        format!("{:.1}", s.t),
        u8::from(s.redis_up).to_string(),
        s.rss_kib.to_string(),
        s.hwm_kib.to_string(),
        s.fds.to_string(),
        s.threads.to_string(),
        s.cache_entries.to_string(),
        s.hot_ok.to_string(),
        s.hot_failed.to_string(),
        s.hot_requests_ok.to_string(),
        s.hot_requests_failed.to_string(),
        format!("{:.2}", s.hot_p50_ms),
        format!("{:.2}", s.hot_p99_ms),
        s.flood_ok.to_string(),
        s.flood_failed.to_string(),
        s.flood_wrong.to_string(),
        format!("{:.2}", s.flood_p99_ms),
        s.churn_issued.to_string(),
        s.churn_probe_failed.to_string(),
    ];
    fields.extend(s.calls.iter().map(|v| v.to_string()));
    fields.extend(s.selections.iter().map(|v| v.to_string()));
    fields.push(s.swaps.to_string());
    fields.push(s.tern_handshakes_failed.to_string());
    fields.push(u8::from(s.admin_failed).to_string());
    fields.join(",")
}

/// One sample every `every` seconds until the stop, then a last one; each printed and appended to the CSV.
pub async fn sampler(mut ctx: Ctx, pid: u32, csv: PathBuf, every: f64) -> Result<Vec<Sample>> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(&csv)?);
    writeln!(file, "{}", csv_header())?;
    let mut samples = vec![take_sample(&ctx, pid).await];
    writeln!(file, "{}", csv_line(&samples[0]))?;
    file.flush()?;
    let mut next = Instant::now();
    loop {
        next += Duration::from_secs_f64(every);
        let running = ctx.pause(next.saturating_duration_since(Instant::now())).await;
        if !running {
            // Let the load drain, so the last sample counts everything.
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let sample = take_sample(&ctx, pid).await;
        if let Some(prev) = samples.last() {
            print_sample(&sample, prev);
        }
        writeln!(file, "{}", csv_line(&sample))?;
        file.flush()?;
        samples.push(sample);
        if !running {
            return Ok(samples);
        }
    }
}

async fn take_sample(ctx: &Ctx, pid: u32) -> Sample {
    let shared = &ctx.shared;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status.lines().find_map(|l| l.strip_prefix(name)?.split_whitespace().next()?.parse::<u64>().ok()).unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64);
    let (hot_p50_ms, hot_p99_ms) = take_percentiles(&shared.hot);
    let (_, flood_p99_ms) = take_percentiles(&shared.flood);
    let mut sample = Sample {
        t: shared.t(),
        redis_up: shared.redis_up.load(Relaxed),
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        fds,
        threads: field("Threads:"),
        hot_ok: shared.hot.handshakes_ok.load(Relaxed),
        hot_failed: shared.hot.handshakes_failed.load(Relaxed),
        hot_requests_ok: shared.hot.requests_ok.load(Relaxed),
        hot_requests_failed: shared.hot.requests_failed.load(Relaxed),
        hot_p50_ms,
        hot_p99_ms,
        flood_ok: shared.flood.handshakes_ok.load(Relaxed),
        flood_failed: shared.flood.handshakes_failed.load(Relaxed),
        flood_wrong: shared.flood.wrong_certificate.load(Relaxed),
        flood_p99_ms,
        churn_issued: shared.churn.issued.load(Relaxed),
        churn_probe_failed: shared.churn.probe_failed.load(Relaxed),
        ..Sample::default()
    };
    match admin_request(ctx.admin, "GET", "/metrics").await {
        Ok((200, body)) => add_metrics(&mut sample, &body),
        _ => sample.admin_failed = true,
    }
    sample
}

/// Fills in the sample's fields read from tern's `/metrics` text.
fn add_metrics(sample: &mut Sample, body: &str) {
    let metrics = parse_metrics(body);
    let get = |key: &str| metrics.get(key).copied().unwrap_or(0.0);
    for (i, outcome) in OUTCOMES.iter().enumerate() {
        sample.calls[i] = get(&format!("tern_plugin_calls_total{{plugin=\"redis\",outcome=\"{outcome}\"}}"));
    }
    for (i, how) in SELECTIONS.iter().enumerate() {
        sample.selections[i] = get(&format!("tern_selections_total{{how=\"{how}\"}}"));
    }
    sample.cache_entries = get("tern_cache_entries");
    sample.swaps = get("tern_plugin_swaps_total{plugin=\"redis\"}");
    sample.tern_handshakes_failed = metrics
        .iter()
        .filter(|(k, _)| k.starts_with("tern_handshakes_total{") && !k.contains("outcome=\"ok\""))
        .map(|(_, v)| v)
        .sum();
}

/// p50 and p99 (ms) of the latencies since the last call.
fn take_percentiles(class: &Class) -> (f64, f64) {
    let mut values = std::mem::take(&mut *lock(&class.interval));
    (percentile(&mut values, 0.50), percentile(&mut values, 0.99))
}

pub fn percentile(values: &mut [u32], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_unstable();
    values[((values.len() as f64 - 1.0) * q).round() as usize] as f64 / 1e3
}

/// Prometheus text to `name{labels}` → value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_string(), value.trim().parse().ok()?))
        })
        .collect()
}
