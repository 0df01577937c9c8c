#!/usr/bin/env bash
# Builds the JavaScript and Python example plugins (examples/plugins/js-redis, examples/plugins/py-redis) into
# Wasm components under plugins/target/polyglot/: componentize-js from the npm registry (versions locked by
# examples/plugins/js-redis/package-lock.json), componentize-py from PyPI (pinned in requirements.txt), both
# installed inside plugins/target/polyglot/, nothing global. Rebuilds only what changed.
# Needs node/npm and python3 with venv (scripts/setup.sh test installs them from Debian if missing).
# Usage: scripts/build-polyglot.sh        (prints the two component paths)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/plugins/target/polyglot"
wit="$root/wit/tern-plugin-0.1.0"
mkdir -p "$out"

for tool in node npm python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "build-polyglot: $tool missing (scripts/setup.sh test installs it)" >&2; exit 1; }
done

# JavaScript: componentize-js (SpiderMonkey + a Wizer snapshot of the initialised module).
js="$root/examples/plugins/js-redis"
if ! cmp -s "$js/package-lock.json" "$out/js/package-lock.json" || [ ! -e "$out/js/node_modules/.bin/componentize-js" ]; then
  rm -rf "$out/js" && mkdir -p "$out/js"
  cp "$js/package.json" "$js/package-lock.json" "$out/js/"
  # `npm ci` rejects this lock (optional per-platform packages it omits); `npm install` honours its versions.
  (cd "$out/js" && npm install --no-audit --no-fund --loglevel=error >&2)
fi
if [ "$js/plugin.js" -nt "$out/js-redis.wasm" ] || [ "$wit/plugin.wit" -nt "$out/js-redis.wasm" ]; then
  (cd "$out/js" && node node_modules/@bytecodealliance/componentize-js/src/cli.js "$js/plugin.js" \
    --wit "$wit" --world-name cert-selector --disable http fetch-event --out "$out/js-redis.wasm.tmp" >&2)
  mv "$out/js-redis.wasm.tmp" "$out/js-redis.wasm"
fi

# Python: componentize-py (CPython with the app pre-imported and snapshotted).
py="$root/examples/plugins/py-redis"
if ! cmp -s "$py/requirements.txt" "$out/venv/requirements.txt"; then
  rm -rf "$out/venv"
  python3 -m venv "$out/venv"
  "$out/venv/bin/pip" install --quiet --disable-pip-version-check -r "$py/requirements.txt" >&2
  cp "$py/requirements.txt" "$out/venv/requirements.txt"
fi
if [ "$py/app.py" -nt "$out/py-redis.wasm" ] || [ "$wit/plugin.wit" -nt "$out/py-redis.wasm" ]; then
  # componentize-py imports the app from the current directory; keep its bytecode out of the source tree.
  (cd "$py" && PYTHONDONTWRITEBYTECODE=1 "$out/venv/bin/componentize-py" -d "$wit" -w cert-selector \
    componentize app -o "$out/py-redis.wasm.tmp" >&2)
  mv "$out/py-redis.wasm.tmp" "$out/py-redis.wasm"
fi
echo "$out/js-redis.wasm"
echo "$out/py-redis.wasm"
