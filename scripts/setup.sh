#!/usr/bin/env bash
# Installs what building and testing tern needs on a machine that has only rustup/cargo and Debian:
# the wasm32-wasip2 Rust target (plugins) and, for the test suite, the openssl and curl clients and
# redis-server / redis-cli (the tests start their own Redis servers and clusters), and node/npm and python3-venv
# (the JavaScript and Python example plugins the tests build, see scripts/build-polyglot.sh), and haproxy (the real
# peer in front of tern in the PROXY protocol tests) and systemd-analyze (checks the shipped unit), and pebble and
# pebble-challtestsrv (Let's Encrypt's ACME test server and its mock DNS, one Debian package: the ACME tests issue
# real certificates from it, see tests/e2e/support/pebble.rs).
# and chromium (headless: the browser side of the certificate-compression test and benchmark), and testssl.sh
# (its view of the server's cipher order). `bench` mode is
# the same set today.
# Usage: scripts/setup.sh [demo|test|bench]    (idempotent; quiet when everything is present)
set -euo pipefail
mode="${1:-demo}"
cd "$(dirname "$0")/.."

# The toolchain rust-toolchain.toml pins (wasmtime 50 needs Rust 1.97), with the wasm32-wasip2 target, clippy and
# rustfmt. Asked for by name, so that any rustup installs it, whatever its auto-install setting.
channel="$(sed -n 's/^channel = "\(.*\)"$/\1/p' rust-toolchain.toml)"
if ! rustup run "$channel" rustc --version >/dev/null 2>&1 \
  || ! rustup target list --toolchain "$channel" --installed | grep -qx wasm32-wasip2; then
  echo "setup: installing the Rust $channel toolchain (rust-toolchain.toml)" >&2
  rustup toolchain install "$channel" --profile minimal --component clippy,rustfmt --target wasm32-wasip2
fi

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "setup: adding the wasm32-wasip2 Rust target" >&2
  rustup target add wasm32-wasip2
fi

if [ "$mode" = test ] || [ "$mode" = bench ]; then
  missing=()
  for tool in openssl curl redis-server redis-cli node npm python3 haproxy systemd-analyze pebble; do
    if ! command -v "$tool" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$tool" ]; then
      case "$tool" in
        redis-cli) missing+=(redis-tools) ;;
        systemd-analyze) missing+=(systemd) ;;
        node) missing+=(nodejs) ;;
        python3) missing+=(python3 python3-venv) ;;
        *) missing+=("$tool") ;;
      esac
    fi
  done
  if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
  fi
  if ! command -v chromium >/dev/null 2>&1; then
    missing+=(chromium)
  fi
  if ! command -v testssl >/dev/null 2>&1; then
    missing+=(testssl.sh)
  fi
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]} from Debian packages" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
  fi
fi
