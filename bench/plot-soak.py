"""Plot of a soak run (`soak` from bench/src/soak/): tern's RSS and open file descriptors over time, and the
handshake and plugin-call rates, with the Redis outages shaded and plugin swaps marked. Writes soak.png into the
run's folder.

Usage, with matplotlib in the venv bench/plot.sh uses (target/plot-venv):
    python3 -m venv target/plot-venv && target/plot-venv/bin/pip install 'matplotlib==3.9.*'   # once
    target/plot-venv/bin/python bench/plot-soak.py bench/results/soak-<stamp>
"""

import csv
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
rows = list(csv.DictReader((folder / "samples.csv").open()))
if len(rows) < 2:
    sys.exit(f"{folder / 'samples.csv'}: fewer than two samples")
summary_path = folder / "summary.json"
summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}


def col(name, scale=1.0):
    return [float(r[name]) * scale for r in rows]


t = [x / 60.0 for x in col("t_s")]  # minutes
last_t = t[-1]

# Outages from the summary (exact times); otherwise from the redis_up column (sample resolution).
outages = []
for o in summary.get("redis_outages", []):
    end = o.get("end_s")
    outages.append((o["start_s"] / 60.0, (end if end is not None else last_t * 60.0) / 60.0))
if not outages:
    start = None
    for x, r in zip(t, rows):
        if r["redis_up"] == "0" and start is None:
            start = x
        elif r["redis_up"] == "1" and start is not None:
            outages.append((start, x))
            start = None
    if start is not None:
        outages.append((start, last_t))
swaps = [e["t_s"] / 60.0 for e in summary.get("swaps", {}).get("events", []) if e.get("swapped")]
rejected = [e["t_s"] / 60.0 for e in summary.get("swaps", {}).get("events", []) if not e.get("swapped")]


def rate(name):
    """Per-second rate between consecutive samples of a cumulative column (plotted at the interval's middle)."""
    values, secs = col(name), col("t_s")
    return [(b - a) / max(tb - ta, 1e-9) for a, b, ta, tb in zip(values, values[1:], secs, secs[1:])]


mid = [(a + b) / 2 for a, b in zip(t, t[1:])]
fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
rss, fds, load = axes

rss.plot(t, col("rss_kib", 1 / 1024), label="VmRSS", color="tab:blue")
rss.plot(t, col("hwm_kib", 1 / 1024), label="VmHWM (peak)", color="tab:blue", linestyle=":", linewidth=1)
rss.set_ylabel("tern RSS (MiB)")
rss.set_ylim(bottom=0)

fds.plot(t, col("fds"), label="open fds", color="tab:green")
fds.plot(t, col("threads"), label="threads", color="tab:olive", linewidth=1)
fds.set_ylabel("count")
fds.set_ylim(bottom=0)

load.plot(mid, rate("hot_ok"), label="hot handshakes/s (ok)", color="tab:purple")
load.plot(mid, rate("flood_ok"), label="random-name handshakes/s (ok)", color="tab:orange")
failed = [a + b for a, b in zip(rate("hot_failed"), rate("hot_requests_failed"))]
if any(f > 0 for f in failed):
    load.plot(mid, failed, label="hot failures/s", color="tab:red")
calls = [a + b + c for a, b, c in zip(rate("calls_found"), rate("calls_not_found"), rate("calls_store_unavailable"))]
load.plot(mid, calls, label="plugin calls/s (found, not found, store down)", color="tab:gray", linewidth=1)
load.plot(mid, rate("calls_circuit_open"), label="plugin calls shed by the breaker/s", color="tab:gray",
          linewidth=1, linestyle="--")
load.plot(mid, rate("sel_stale"), label="served stale/s", color="tab:brown", linewidth=1)
load.set_ylabel("per second")
load.set_xlabel("minutes")
load.set_ylim(bottom=0)

for ax in axes:
    for i, (a, b) in enumerate(outages):
        ax.axvspan(a, b, color="tab:red", alpha=0.12, label="Redis down" if i == 0 else None)
    for i, x in enumerate(swaps):
        ax.axvline(x, color="black", alpha=0.25, linewidth=0.8, label="plugin swap" if i == 0 else None)
    for i, x in enumerate(rejected):
        ax.axvline(x, color="tab:red", alpha=0.5, linewidth=0.8, linestyle="--",
                   label="swap rejected" if i == 0 else None)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=7, ncol=3, framealpha=0.8)

hot = summary.get("hot", {})
title = "tern soak"
if summary:
    title += (f": {summary.get('seconds_run', 0) / 60:.0f} min, hot {hot.get('handshakes_ok', 0):,} ok / "
              f"{summary.get('cached_name_failures', 0)} cached-name failures, "
              f"{len(outages)} Redis outages, {len(swaps)} swaps")
fig.suptitle(title, fontsize=11)
fig.tight_layout()
fig.savefig(folder / "soak.png", dpi=110)
print(folder / "soak.png")
