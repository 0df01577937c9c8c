#!/usr/bin/env bash
# The whole test suite: unit tests, doc tests, and end-to-end tests (which build the plugins for wasm32-wasip2
# through tests/build.rs). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test
exec cargo test --workspace "$@"
