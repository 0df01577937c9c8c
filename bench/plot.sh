#!/usr/bin/env bash
# Draws the PNG plots of a tls-bench results folder (default results/latest) with matplotlib from PyPI,
# installed into target/plot-venv on first use.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/target/plot-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import matplotlib' >/dev/null 2>&1; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check 'matplotlib==3.9.*'
fi
exec "$venv/bin/python" "$root/bench/plot.py" "${1:-results/latest}"
