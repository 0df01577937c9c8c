//! The end of a soak: `summary.json`, its printed form, `events.csv`, and tern's WARN and ERROR line counts.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Result;
use serde_json::{Value, json};

use crate::args::Args;
use crate::sampling::{OUTCOMES, SELECTIONS, Sample, percentile};
use crate::state::{Churn, Class, Shared, lock};

fn stats_u64(values: &[u64]) -> Value {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    let pick = |q: f64| sorted.get(((sorted.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0);
    json!({
        "min": sorted.first().copied().unwrap_or(0),
        "median": pick(0.5),
        "max": sorted.last().copied().unwrap_or(0),
        "first": values.first().copied().unwrap_or(0),
        "last": values.last().copied().unwrap_or(0),
    })
}

/// Least-squares slope of `ys` over `xs`, per hour.
fn slope_per_hour(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len() as f64;
    if xs.len() < 3 {
        return 0.0;
    }
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let cov: f64 = xs.iter().zip(ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    if var == 0.0 { 0.0 } else { cov / var * 3600.0 }
}

pub fn summarize(
    args: &Args,
    shared: &Shared,
    samples: &[Sample],
    elapsed: Duration,
    exit: &str,
    log_levels: &BTreeMap<&str, usize>,
    early: Option<&str>,
    seed: u64,
) -> Value {
    let last = samples.iter().rev().find(|s| !s.admin_failed).cloned().unwrap_or_default();
    let first = samples.first().cloned().unwrap_or_default();
    let events = lock(&shared.events).clone();
    let (rss_slope, fds_slope) = second_half_slopes(samples, elapsed);
    let live: Vec<&Sample> = samples.iter().filter(|s| s.rss_kib > 0).collect();
    let rss: Vec<u64> = live.iter().map(|s| s.rss_kib).collect();
    let fds: Vec<u64> = live.iter().map(|s| s.fds).collect();
    let threads: Vec<u64> = live.iter().map(|s| s.threads).collect();
    let cached_failures = shared.hot.handshakes_failed.load(Relaxed)
        + shared.hot.requests_failed.load(Relaxed)
        + shared.churn.probe_failed.load(Relaxed);
    json!({
        "seed": seed,
        "minutes_planned": args.minutes,
        "seconds_run": elapsed.as_secs_f64(),
        "early_stop": early,
        "settings": settings(args),
        "cached_name_failures": cached_failures,
        "hot": class_summary(&shared.hot, elapsed),
        "flood": class_summary(&shared.flood, elapsed),
        "churn": churn_summary(&shared.churn),
        "plugin_calls": deltas(&OUTCOMES, &first.calls, &last.calls),
        "selections": deltas(&SELECTIONS, &first.selections, &last.selections),
        "tern_handshakes_failed": last.tern_handshakes_failed - first.tern_handshakes_failed,
        "redis_outages": outages(&events),
        "swaps": swaps_summary(&events, last.swaps),
        "rss_kib": stats_u64(&rss),
        "rss_hwm_kib": live.last().map_or(0, |s| s.hwm_kib),
        "rss_slope_mib_per_hour_second_half": rss_slope,
        "fds": stats_u64(&fds),
        "fds_slope_per_hour_second_half": fds_slope,
        "threads": stats_u64(&threads),
        "cache_entries_last": last.cache_entries,
        "tern_exit": exit,
        "tern_log_lines": log_levels,
        "samples": samples.len(),
    })
}

/// The options the soak ran with.
fn settings(args: &Args) -> Value {
    json!({
        "certs": args.certs, "hot": args.hot, "hot_rate": args.hot_rate, "hot_clients": args.hot_clients,
        "flood_rate": args.flood_rate, "flood_clients": args.flood_clients, "redis_every_s": args.redis_every,
        "redis_down_s": [args.redis_down_min, args.redis_down_max], "swap_every_s": args.swap_every,
        "churn_every_s": args.churn_every, "sample_every_s": args.sample_every, "cache_ttl_s": args.cache_ttl,
        "max_stale_s": args.max_stale,
    })
}

/// One load class over the whole run (takes its latencies).
fn class_summary(c: &Class, elapsed: Duration) -> Value {
    let mut all = std::mem::take(&mut *lock(&c.all));
    let p50 = percentile(&mut all, 0.5);
    let p99 = percentile(&mut all, 0.99);
    json!({
        "handshakes_ok": c.handshakes_ok.load(Relaxed),
        "handshakes_failed": c.handshakes_failed.load(Relaxed),
        "wrong_certificate": c.wrong_certificate.load(Relaxed),
        "requests_ok": c.requests_ok.load(Relaxed),
        "requests_failed": c.requests_failed.load(Relaxed),
        "handshake_p50_ms": p50,
        "handshake_p99_ms": p99,
        "rate_per_s": (c.handshakes_ok.load(Relaxed) + c.handshakes_failed.load(Relaxed) + c.wrong_certificate.load(Relaxed)) as f64 / elapsed.as_secs_f64().max(1e-9),
    })
}

fn churn_summary(churn: &Churn) -> Value {
    let mut churn_ms = lock(&churn.latencies_ms).clone();
    churn_ms.sort_by(f64::total_cmp);
    let churn_pick =
        |q: f64| churn_ms.get(((churn_ms.len().max(1) - 1) as f64 * q).round() as usize).copied().unwrap_or(0.0);
    json!({
        "issued": churn.issued.load(Relaxed),
        "observed": churn.observed.load(Relaxed),
        "not_observed": churn.not_observed.load(Relaxed),
        "invalidation_unheard": churn.unheard.load(Relaxed),
        "probe_failed": churn.probe_failed.load(Relaxed),
        "write_failed": churn.write_failed.load(Relaxed),
        "new_leaf_ms": { "p50": churn_pick(0.5), "p99": churn_pick(0.99), "max": churn_ms.last().copied().unwrap_or(0.0) },
    })
}

/// How much each of tern's counters `keys` grew from `first` to `last`.
fn deltas(keys: &[&str], first: &[f64], last: &[f64]) -> serde_json::Map<String, Value> {
    keys.iter().enumerate().map(|(i, o)| (o.to_string(), json!(last[i] - first[i]))).collect()
}

/// The Redis outages in the events: start, end and length (an outage still open has no end).
fn outages(events: &[(f64, String, String)]) -> Vec<Value> {
    let mut outages = Vec::new();
    let mut down_since = None;
    for (t, kind, _) in events {
        match kind.as_str() {
            "redis_down" => down_since = Some(*t),
            "redis_up" => {
                if let Some(start) = down_since.take() {
                    outages.push(json!({ "start_s": start, "end_s": t, "seconds": t - start }));
                }
            }
            _ => {}
        }
    }
    if let Some(start) = down_since {
        outages.push(json!({ "start_s": start, "end_s": null, "seconds": null }));
    }
    outages
}

/// The plugin swaps in the events, swapped or rejected, beside tern's own count.
fn swaps_summary(events: &[(f64, String, String)], tern_swaps_total: f64) -> Value {
    let swaps: Vec<_> = events
        .iter()
        .filter(|(_, k, _)| k == "swap" || k == "swap_rejected")
        .map(|(t, k, d)| json!({ "t_s": t, "swapped": k == "swap", "detail": d }))
        .collect();
    let swapped = swaps.iter().filter(|s| s["swapped"] == true).count();
    json!({ "swapped": swapped, "rejected": swaps.len() - swapped, "tern_swaps_total": tern_swaps_total, "events": swaps })
}

/// Slopes of RSS (MiB) and fds per hour over the second half of the run: by then the flood has filled the cache
/// to its bound.
fn second_half_slopes(samples: &[Sample], elapsed: Duration) -> (f64, f64) {
    let half = elapsed.as_secs_f64() / 2.0;
    let settled: Vec<&Sample> = samples.iter().filter(|s| s.t >= half && s.rss_kib > 0).collect();
    let ts: Vec<f64> = settled.iter().map(|s| s.t).collect();
    let rss_slope = slope_per_hour(&ts, &settled.iter().map(|s| s.rss_kib as f64 / 1024.0).collect::<Vec<_>>());
    let fds_slope = slope_per_hour(&ts, &settled.iter().map(|s| s.fds as f64).collect::<Vec<_>>());
    (rss_slope, fds_slope)
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

pub fn print_summary(s: &Value) {
    println!("\nsummary ({:.0} s of load, seed {})", num(&s["seconds_run"]), s["seed"]);
    print_classes(s);
    println!(
        "cached-name failures (hot handshakes + hot requests + churned-name handshakes): {}",
        s["cached_name_failures"]
    );
    print_churn(&s["churn"]);
    print_plugin(s);
    print_resources(s);
    if let Some(reason) = s["early_stop"].as_str() {
        println!("stopped early: {reason}");
    }
}

/// The table of the load classes.
fn print_classes(s: &Value) {
    println!(
        "{:<8} {:>12} {:>10} {:>10} {:>12} {:>10} {:>9} {:>9} {:>9}",
        "class", "handshakes", "failed", "wrong cert", "requests", "failed", "rate/s", "p50 ms", "p99 ms"
    );
    for class in ["hot", "flood"] {
        let c = &s[class];
        let u = |v: &Value| v.as_u64().unwrap_or(0);
        let requests = |v: &Value| if class == "hot" { u(v).to_string() } else { "-".to_string() };
        println!(
            "{:<8} {:>12} {:>10} {:>10} {:>12} {:>10} {:>9.1} {:>9.2} {:>9.2}",
            class,
            u(&c["handshakes_ok"]),
            u(&c["handshakes_failed"]),
            u(&c["wrong_certificate"]),
            requests(&c["requests_ok"]),
            requests(&c["requests_failed"]),
            num(&c["rate_per_s"]),
            num(&c["handshake_p50_ms"]),
            num(&c["handshake_p99_ms"]),
        );
    }
}

fn print_churn(c: &Value) {
    println!(
        "certificate churn: {} issued, new leaf seen {} (p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms), not seen {}, \
         invalidation heard by nobody {}, write failures {}",
        c["issued"],
        c["observed"],
        num(&c["new_leaf_ms"]["p50"]),
        num(&c["new_leaf_ms"]["p99"]),
        num(&c["new_leaf_ms"]["max"]),
        c["not_observed"],
        c["invalidation_unheard"],
        c["write_failed"],
    );
}

/// `key value, …` of the counters above zero in a JSON object.
fn above_zero(counts: &Value) -> String {
    let list = counts.as_object().map(|m| {
        m.iter().filter(|(_, v)| num(v) > 0.0).map(|(k, v)| format!("{k} {}", num(v))).collect::<Vec<_>>().join(", ")
    });
    list.unwrap_or_default()
}

/// Plugin calls, selections, failed handshakes by tern's count, Redis outages and plugin swaps.
fn print_plugin(s: &Value) {
    println!("plugin calls by outcome (error includes store_unavailable): {}", above_zero(&s["plugin_calls"]));
    println!("selections: {}", above_zero(&s["selections"]));
    println!("tern's own failed-handshake count: {}", num(&s["tern_handshakes_failed"]));
    let outages = s["redis_outages"].as_array().cloned().unwrap_or_default();
    let down: f64 = outages.iter().map(|o| num(&o["seconds"])).sum();
    println!("redis outages: {} ({down:.0} s down in total)", outages.len());
    println!("plugin swaps: {} swapped, {} rejected", s["swaps"]["swapped"], s["swaps"]["rejected"]);
    for e in s["swaps"]["events"].as_array().into_iter().flatten() {
        if e["swapped"] == false {
            println!("  rejected at {:.0}s: {}", num(&e["t_s"]), e["detail"].as_str().unwrap_or(""));
        }
    }
}

/// tern's memory, fds, threads, log and exit.
fn print_resources(s: &Value) {
    let kib = |v: &Value| num(v) / 1024.0;
    let r = &s["rss_kib"];
    println!(
        "tern RSS MiB: min {:.1}, median {:.1}, max {:.1}, first {:.1}, last {:.1}; second-half slope {:+.1} MiB/h; peak (VmHWM) {:.1}",
        kib(&r["min"]),
        kib(&r["median"]),
        kib(&r["max"]),
        kib(&r["first"]),
        kib(&r["last"]),
        num(&s["rss_slope_mib_per_hour_second_half"]),
        kib(&s["rss_hwm_kib"]),
    );
    let f = &s["fds"];
    println!(
        "tern fds: min {}, max {}, first {}, last {}; second-half slope {:+.1}/h; threads {}–{}",
        f["min"],
        f["max"],
        f["first"],
        f["last"],
        num(&s["fds_slope_per_hour_second_half"]),
        s["threads"]["min"],
        s["threads"]["max"]
    );
    println!(
        "tern log: {} WARN, {} ERROR lines; exit after SIGTERM: {}",
        s["tern_log_lines"]["WARN"],
        s["tern_log_lines"]["ERROR"],
        s["tern_exit"].as_str().unwrap_or("")
    );
}

pub fn write_events(shared: &Shared, path: &Path) -> Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(file, "t_s,kind,detail")?;
    for (t, kind, detail) in lock(&shared.events).iter() {
        writeln!(file, "{t:.3},{kind},\"{}\"", detail.replace('"', "'"))?;
    }
    file.flush()?;
    Ok(())
}

/// How many WARN and ERROR lines tern logged.
pub fn log_levels(log: &Path) -> BTreeMap<&'static str, usize> {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    ["WARN", "ERROR"]
        .into_iter()
        .map(|level| (level, log.lines().filter(|l| l.contains(&format!(" {level} "))).count()))
        .collect()
}
