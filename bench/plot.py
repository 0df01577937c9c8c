"""Plots for a tls-bench results folder: start-up vs N, memory vs N, handshakes/s and server CPU per handshake by
configuration.

Usage: bench/plot.sh results/latest     (installs matplotlib into target/plot-venv on first use)
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

folder = Path(sys.argv[1] if len(sys.argv) > 1 else "results/latest")
data = json.loads((folder / "results.json").read_text())
rows = [r for r in data["rows"] if r["key"] == "ecdsa-p256"]
configs = sorted({r["config"] for r in rows}, key=lambda c: (not c.startswith("tern"), c))
sizes = sorted({r["n"] for r in rows})


def series(config, field):
    points = sorted((r["n"], field(r)) for r in rows if r["config"] == config)
    return [p[0] for p in points], [p[1] for p in points]


def line_plot(field, ylabel, title, name, log_y=True):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for config in configs:
        xs, ys = series(config, field)
        ax.plot(xs, ys, marker="o", label=config, linestyle="-" if config.startswith("tern") else "--")
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("hosts (N), ECDSA P-256")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)


line_plot(lambda r: max(r["startup_s"], 1e-3), "seconds to first handshake", "Start-up time vs N", "startup.png")
line_plot(lambda r: r["pss_start_mib"], "PSS after start (MiB)", "Memory vs N (all processes)", "memory.png")


def bar_chart(groups, group_label, field, ylabel, title, name):
    """Bars per configuration for each (key, N) group; `field` reads the hot-set phase of a row."""
    chart_configs = sorted({r["config"] for r in data["rows"]}, key=lambda c: (not c.startswith("tern"), c))
    chart_configs = [c for c in chart_configs if any(r["config"] == c and (r["key"], r["n"]) in groups for r in data["rows"])]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(len(chart_configs), 1)
    for i, config in enumerate(chart_configs):
        values = []
        for key, n in groups:
            row = next((r for r in data["rows"] if r["config"] == config and r["n"] == n and r["key"] == key), None)
            values.append(field(row["phases"][f"hot_c{row['top_concurrency']}"]) if row else 0)
        ax.bar([j + i * width for j in range(len(groups))], values, width, label=config)
    ax.set_xticks([j + width * (len(chart_configs) - 1) / 2 for j in range(len(groups))])
    ax.set_xticklabels([group_label(key, n) for key, n in groups], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    plt.close(fig)


bar_chart(
    [("ecdsa-p256", n) for n in sizes],
    lambda key, n: f"N={n:,}",
    lambda phase: phase["rate"],
    "full handshakes/s (one request each)",
    "Handshakes/s by configuration (hot set, warmed; client on the same 2 cores)",
    "handshakes.png",
)
# Server CPU per full handshake, every key type and N: the figure that does not depend on how the two shared cores
# were split between client and server.
bar_chart(
    sorted({(r["key"], r["n"]) for r in data["rows"]}, key=lambda g: (g[0] != "ecdsa-p256", g[1])),
    lambda key, n: f"{key}\nN={n:,}",
    lambda phase: phase["server_cpu_s_per_1k"],
    "server CPU-ms per full handshake",
    "Server CPU per handshake (hot set, one request each; lower is better)",
    "cpu.png",
)
print(f"plots written to {folder}")
