//! The results: one line per configuration as it finishes, and `results.json` and `results.md` at the end.

use anyhow::Result;
use serde_json::{Value, json};

use crate::Results;
use crate::args::Args;
use crate::configs::{FLOOR_DIRECT, FLOOR_PROXY};

pub fn print_row(row: &Value) {
    let top = &row["top_concurrency"];
    let hot = &row["phases"][format!("hot_c{top}")];
    let uniform = &row["phases"][format!("uniform_c{top}")];
    let api = match hot["api_requests_per_handshake"].as_f64() {
        Some(per) => {
            format!(" | cert API {per:.2} requests/hs, {:.3} CPU-s/1k", hot["api_cpu_s_per_1k"].as_f64().unwrap_or(0.0))
        }
        None => String::new(),
    };
    println!(
        "{:<15} n={:<7} {:<10} start {:>7.2}s rss {:>7.1}MiB pss {:>7.1}MiB | hot {:>6.0}/s p50 {:>5.2} p99 {:>6.2}ms cpu/1k {:.3}s | uniform {:>6.0}/s | cold p99 {:.2}ms warm p99 {:.2}ms | resumed x{:.2} rate, x{:.2} CPU | keep-alive {:.0} req/s | {}{api}",
        row["config"].as_str().unwrap_or(""),
        row["n"],
        row["key"].as_str().unwrap_or(""),
        row["startup_s"].as_f64().unwrap_or(0.0),
        row["rss_start_mib"].as_f64().unwrap_or(0.0),
        row["pss_start_mib"].as_f64().unwrap_or(0.0),
        hot["rate"].as_f64().unwrap_or(0.0),
        hot["p50_ms"].as_f64().unwrap_or(0.0),
        hot["p99_ms"].as_f64().unwrap_or(0.0),
        hot["server_cpu_s_per_1k"].as_f64().unwrap_or(0.0),
        uniform["rate"].as_f64().unwrap_or(0.0),
        row["cold_p99_ms"].as_f64().unwrap_or(0.0),
        row["warm_p99_ms"].as_f64().unwrap_or(0.0),
        row["resumed_over_full"].as_f64().unwrap_or(0.0),
        row["resumed_cost_ratio"].as_f64().unwrap_or(0.0),
        row["keepalive"]["rate"].as_f64().unwrap_or(0.0),
        row["negotiated"].as_str().unwrap_or(""),
    );
}

pub fn write_results(args: &Args, machine: &str, results: &Results) -> Result<()> {
    let Results { rows, comparisons, failures, memory_floors } = results;
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
    let json = json!({
        "machine": machine,
        "seconds_per_phase": args.seconds,
        "rows": rows,
        "interleaved": comparisons,
        "failures": failures,
        "memory_floors": memory_floors,
    });
    let mut md = format!("Machine: {machine}\n\n");
    md += "| config | N | key | start (s) | RSS (MiB) | PSS (MiB) | hot full hs/s | p50 / p99 (ms) | server CPU-s / 1k | uniform hs/s (c=max) | zipf hs/s | cold p50 / p99 (ms) | warm p50 / p99 (ms) | resumed ÷ full (hs/s) | resumed ÷ full (server CPU) | keep-alive req/s |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    for row in rows {
        md += &row_markdown(row);
    }
    md += &api_markdown(rows);
    if !failures.is_empty() {
        md += "\nNot measured:\n\n";
        for f in failures {
            md += &format!(
                "- {} n={} {}: {}\n",
                f["config"].as_str().unwrap_or(""),
                f["n"],
                f["key"].as_str().unwrap_or(""),
                f["error"].as_str().unwrap_or("")
            );
        }
    }
    if !comparisons.is_empty() {
        md += "\nCache hits, each configuration ÷ its baseline (tern-static; tern-file for tern-routed and for the peer servers), interleaved rounds (all servers up at once, hot set warmed): ratio of the totals over all rounds, then the median and range of the per-round ratios:\n\n";
        md += "| N | key | config ÷ baseline | handshakes/s ratio, all rounds (median; range) | server CPU per handshake ratio, all rounds (median; range) | rounds × seconds |\n|---|---|---|---|---|---|\n";
        for c in comparisons {
            md += &comparison_markdown(c);
        }
    }
    md += &floors_markdown(memory_floors, comparisons);
    for folder in [args.out.join(stamp.to_string()), args.out.join("latest")] {
        std::fs::create_dir_all(&folder)?;
        std::fs::write(folder.join("results.json"), serde_json::to_string_pretty(&json)?)?;
        std::fs::write(folder.join("results.md"), &md)?;
    }
    println!(
        "\n{md}\nwritten to {} and {}",
        args.out.join(stamp.to_string()).display(),
        args.out.join("latest").display()
    );
    Ok(())
}

/// What the configurations that ask the certificate API cost it (hot set), and what every row negotiated.
fn api_markdown(rows: &[Value]) -> String {
    let mut md = String::new();
    for row in rows {
        let hot = &row["phases"][format!("hot_c{}", row["top_concurrency"])];
        if let Some(per) = hot["api_requests_per_handshake"].as_f64() {
            if md.is_empty() {
                md += "\nCertificate API (tern-http, caddy-http; hot set; its CPU is neither the server's nor counted in the table):\n\n";
            }
            md += &format!(
                "- {} n={} {}: {per:.3} API requests per handshake, {:.3} API CPU-s per 1,000 handshakes\n",
                row["config"].as_str().unwrap_or(""),
                row["n"],
                row["key"].as_str().unwrap_or(""),
                hot["api_cpu_s_per_1k"].as_f64().unwrap_or(0.0),
            );
        }
    }
    let negotiated: std::collections::BTreeSet<String> = rows
        .iter()
        .map(|r| format!("{}: {}", r["config"].as_str().unwrap_or(""), r["negotiated"].as_str().unwrap_or("?")))
        .collect();
    if !negotiated.is_empty() {
        md += "\nNegotiated (one verified handshake after start): ";
        md += &negotiated.into_iter().collect::<Vec<_>>().join("; ");
        md += "\n";
    }
    md
}

/// One configuration's line of the results table.
fn row_markdown(row: &Value) -> String {
    let top = &row["top_concurrency"];
    let pick = |prefix: &str| row["phases"][format!("{prefix}_c{top}")].clone();
    let (hot, uniform, zipf) = (pick("hot"), pick("uniform"), pick("zipf"));
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    format!(
        "| {} | {} | {} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} / {:.2} | {:.3} | {:.0} | {:.0} | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} | {:.2} | {:.0} |\n",
        row["config"].as_str().unwrap_or(""),
        row["n"],
        row["key"].as_str().unwrap_or(""),
        f(&row["startup_s"]),
        f(&row["rss_start_mib"]),
        f(&row["pss_start_mib"]),
        f(&hot["rate"]),
        f(&hot["p50_ms"]),
        f(&hot["p99_ms"]),
        f(&hot["server_cpu_s_per_1k"]),
        f(&uniform["rate"]),
        f(&zipf["rate"]),
        f(&row["cold_p50_ms"]),
        f(&row["cold_p99_ms"]),
        f(&row["warm_p50_ms"]),
        f(&row["warm_p99_ms"]),
        f(&row["resumed_over_full"]),
        f(&row["resumed_cost_ratio"]),
        f(&row["keepalive"]["rate"]),
    )
}

/// The lines of one certificate set's interleaved comparison, one per dynamic configuration.
fn comparison_markdown(c: &Value) -> String {
    let mut md = String::new();
    if let Some(map) = c["vs_static"].as_object() {
        for (config, r) in map {
            let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
            md += &format!(
                "| {} | {} | {config} ÷ {} | {:.3} ({:.3}; {:.3}–{:.3}) | {:.3} ({:.3}; {:.3}–{:.3}) | {} × {} |\n",
                c["n"],
                c["key"].as_str().unwrap_or(""),
                c["baseline"].as_str().unwrap_or("tern-static"),
                f("rate_ratio_total"),
                f("rate_ratio_median"),
                f("rate_ratio_min"),
                f("rate_ratio_max"),
                f("cpu_ratio_total"),
                f("cpu_ratio_median"),
                f("cpu_ratio_min"),
                f("cpu_ratio_max"),
                c["rounds"],
                c["seconds"],
            );
        }
    }
    if let Some(map) = c["memory_all_cached"].as_object() {
        for (config, r) in map {
            let f = |k: &str| r[k].as_f64().unwrap_or(0.0);
            md += &format!(
                "| {} | {} | {config}: PSS with every name cached | {:.0} MiB ({:.2} KiB per name) | at start {:.0} MiB | |\n",
                c["n"],
                c["key"].as_str().unwrap_or(""),
                f("pss_all_cached_mib"),
                f("kib_per_name"),
                f("pss_start_mib"),
            );
        }
    }
    md
}

/// The floors of each certificate set: the in-memory floor, and from the interleaved floor comparison the server
/// CPU per full handshake of floor-direct and of tern, with tern's ratios to both floors.
fn floors_markdown(memory_floors: &[Value], comparisons: &[Value]) -> String {
    let mut md = String::new();
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    for floor in memory_floors {
        if md.is_empty() {
            md += "\nFloors: server CPU per full TLS 1.3 handshake with one small request (µs):\n\n";
            md += "| N | key | server | µs per handshake | ÷ floor-direct | ÷ floor-proxy | ÷ in-memory |\n";
            md += "|---|---|---|---|---|---|---|\n";
        }
        let (n, key) = (&floor["n"], floor["key"].as_str().unwrap_or(""));
        let memory = f(&floor["server_us"]);
        md += &format!(
            "| {n} | {key} | in-memory rustls ({} handshakes; signature {:.1}, one key-exchange side {:.1}; {}) | {memory:.1} | | | 1 |\n",
            floor["handshakes"],
            f(&floor["sign_us"]),
            f(&floor["kx_side_us"]),
            floor["negotiated"].as_str().unwrap_or(""),
        );
        let compared = comparisons.iter().find(|c| c["n"] == *n && c["key"] == key && c["baseline"] == FLOOR_DIRECT);
        let Some(c) = compared else { continue };
        let direct = f(&c["baseline_cpu_us_per_handshake"]);
        let proxy = c["vs_static"].get(FLOOR_PROXY).map(|r| f(&r["cpu_us_per_handshake"]));
        let vs_proxy = |us: f64| proxy.map(|p| format!("{:.2}", us / p.max(1e-9))).unwrap_or_default();
        md += &format!(
            "| {n} | {key} | {FLOOR_DIRECT} (interleaved, {} × {} s, c={}) | {direct:.1} | 1 | | {:.2} |\n",
            c["rounds"],
            c["seconds"],
            c["concurrency"],
            direct / memory.max(1e-9)
        );
        for (config, r) in c["vs_static"].as_object().into_iter().flatten() {
            let us = f(&r["cpu_us_per_handshake"]);
            md += &format!(
                "| {n} | {key} | {config} (interleaved) | {us:.1} | {:.2} | {} | {:.2} |\n",
                us / direct.max(1e-9),
                vs_proxy(us),
                us / memory.max(1e-9)
            );
        }
    }
    md
}
