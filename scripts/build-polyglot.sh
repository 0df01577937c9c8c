#!/usr/bin/env bash
# Builds the JavaScript and Python example plugins (examples/plugins/js-redis, examples/plugins/py-redis) into
# Wasm components under plugins/target/polyglot/: componentize-js from the npm registry (versions locked by
# examples/plugins/js-redis/package-lock.json), componentize-py from PyPI (pinned in requirements.txt), both
# installed inside plugins/target/polyglot/, nothing global. The examples are built against the current contract
# (wit/tern-plugin-0.2.0); their frozen 0.1 sources (tests/fixtures/contract-0.1) against wit/tern-plugin-0.1.0
# with the same tools, so that the tests can prove 0.1 components keep running. Rebuilds only what changed.
# Needs node/npm and python3 with venv (scripts/setup.sh test installs them from Debian if missing).
# Usage: scripts/build-polyglot.sh
#   prints five component paths, one a line: js-redis, py-redis (0.2), js-redis-v0.1, py-redis-v0.1, and
#   js-redis-qjs (the 0.2 JavaScript built with componentize-qjs)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="$root/plugins/target/polyglot"
wit_current="$root/wit/tern-plugin-0.2.0"
wit_v0_1="$root/wit/tern-plugin-0.1.0"
js="$root/examples/plugins/js-redis"
py="$root/examples/plugins/py-redis"
fixtures="$root/tests/fixtures/contract-0.1"
mkdir -p "$out"

for tool in node npm python3; do
  command -v "$tool" >/dev/null 2>&1 || { echo "build-polyglot: $tool missing (scripts/setup.sh test installs it)" >&2; exit 1; }
done

# One run at a time: a run by hand must not reinstall a toolchain under the feet of the one cargo started.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$out/.lock"
  flock 9
fi

# stale OUTPUT INPUT...: true when OUTPUT is missing or older than one of the inputs.
stale() {
  local output="$1" input
  shift
  [ -e "$output" ] || return 0
  for input in "$@"; do
    [ "$input" -nt "$output" ] && return 0
  done
  return 1
}

# JavaScript: componentize-js (SpiderMonkey + a Wizer snapshot of the initialised module).
# `npm install` rewrites the package-lock.json it is given, so the lock it was installed from is kept beside it,
# as the stamp of this toolchain.
js_tools="$out/js/package-lock.source.json"
if ! cmp -s "$js/package-lock.json" "$js_tools" || [ ! -e "$out/js/node_modules/.bin/componentize-js" ]; then
  rm -rf "$out/js" && mkdir -p "$out/js"
  cp "$js/package.json" "$js/package-lock.json" "$out/js/"
  # `npm ci` rejects this lock (optional per-platform packages it omits); `npm install` honours its versions.
  (cd "$out/js" && npm install --no-audit --no-fund --loglevel=error >&2)
  cp "$js/package-lock.json" "$js_tools"
fi

# build_js SOURCE WIT_DIR OUTPUT
build_js() {
  local source="$1" wit="$2" output="$3"
  stale "$output" "$source" "$wit/plugin.wit" "$js_tools" || return 0
  local started=$SECONDS
  (cd "$out/js" && node node_modules/@bytecodealliance/componentize-js/src/cli.js "$source" \
    --wit "$wit" --world-name cert-selector --disable http fetch-event --out "$output.tmp" >&2)
  mv "$output.tmp" "$output"
  echo "build-polyglot: $(basename "$output") in $((SECONDS - started)) s" >&2
}

# build_qjs SOURCE WIT_DIR OUTPUT: the same JavaScript with componentize-qjs (QuickJS, from the same npm lock), a
# synchronous component (no component-model async ABI). A 1.6 MB component of ~1.4 MiB linear memory, where
# componentize-js makes 12 MB and ~9 MiB: its misses cost a third of the CPU (README, plugin cost).
build_qjs() {
  local source="$1" wit="$2" output="$3"
  stale "$output" "$source" "$wit/plugin.wit" "$js_tools" || return 0
  local started=$SECONDS
  (cd "$out/js" && node node_modules/componentize-qjs/cli.mjs --wit "$wit" --js "$source" --world cert-selector \
    --sync --output "$output.tmp" >&2)
  mv "$output.tmp" "$output"
  echo "build-polyglot: $(basename "$output") in $((SECONDS - started)) s" >&2
}

# Python: componentize-py (CPython with the app pre-imported and snapshotted).
py_tools="$out/venv/requirements.txt"
if ! cmp -s "$py/requirements.txt" "$py_tools"; then
  rm -rf "$out/venv"
  python3 -m venv "$out/venv"
  "$out/venv/bin/pip" install --quiet --disable-pip-version-check -r "$py/requirements.txt" >&2
  cp "$py/requirements.txt" "$py_tools"
fi

# build_py SOURCE WIT_DIR OUTPUT
build_py() {
  local source="$1" wit="$2" output="$3"
  stale "$output" "$source" "$wit/plugin.wit" "$py_tools" || return 0
  local started=$SECONDS
  # componentize-py imports the app (`app.py`) from the current directory, and its snapshotting interpreter writes
  # bytecode beside it whatever PYTHONDONTWRITEBYTECODE says: build from a copy, keeping the source tree clean.
  local staging
  staging="$out/py-src/$(basename "$output" .wasm)"
  rm -rf "$staging" && mkdir -p "$staging"
  cp "$source" "$staging/app.py"
  (cd "$staging" && PYTHONDONTWRITEBYTECODE=1 "$out/venv/bin/componentize-py" -d "$wit" -w cert-selector \
    componentize app -o "$output.tmp" >&2)
  mv "$output.tmp" "$output"
  echo "build-polyglot: $(basename "$output") in $((SECONDS - started)) s" >&2
}

build_js "$js/plugin.js" "$wit_current" "$out/js-redis.wasm"
build_py "$py/app.py" "$wit_current" "$out/py-redis.wasm"
build_js "$fixtures/js-redis/plugin.js" "$wit_v0_1" "$out/js-redis-v0.1.wasm"
build_py "$fixtures/py-redis/app.py" "$wit_v0_1" "$out/py-redis-v0.1.wasm"
build_qjs "$js/plugin.js" "$wit_current" "$out/js-redis-qjs.wasm"
echo "$out/js-redis.wasm"
echo "$out/py-redis.wasm"
echo "$out/js-redis-v0.1.wasm"
echo "$out/py-redis-v0.1.wasm"
echo "$out/js-redis-qjs.wasm"
