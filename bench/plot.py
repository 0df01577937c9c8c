"""Plots for a tls-bench results folder: start-up vs N, memory vs N, handshakes/s by configuration.

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

fig, ax = plt.subplots(figsize=(8, 4.5))
width = 0.8 / max(len(configs), 1)
for i, config in enumerate(configs):
    values = []
    for n in sizes:
        row = next((r for r in rows if r["config"] == config and r["n"] == n), None)
        top = row["top_concurrency"] if row else 0
        values.append(row["phases"][f"hot_c{top}"]["rate"] if row else 0)
    ax.bar([j + i * width for j in range(len(sizes))], values, width, label=config)
ax.set_xticks([j + width * (len(configs) - 1) / 2 for j in range(len(sizes))])
ax.set_xticklabels([f"N={n:,}" for n in sizes])
ax.set_ylabel("full handshakes/s (one request each)")
ax.set_title("Handshakes/s by configuration (hot set, warmed; client on the same 2 cores)")
ax.legend(fontsize=8)
ax.grid(True, axis="y", alpha=0.3)
fig.tight_layout()
fig.savefig(folder / "handshakes.png", dpi=110)
plt.close(fig)
print(f"plots written to {folder}")
