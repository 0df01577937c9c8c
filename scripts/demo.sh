#!/usr/bin/env bash
# Quick start: builds tern and the file-path plugin (release), then runs `tern demo`: certificates generated
# under target/tern-demo, HTTPS on 127.0.0.1:8443, a built-in echo backend. Extra arguments go to `tern demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml
exec cargo run --release -p tern -- demo "$@"
