#!/usr/bin/env bash
# Coverage-guided fuzzing of tern with cargo-fuzz (libFuzzer). Not part of CI: CI replays the committed corpus on
# the stable toolchain through `cargo test` (tests in host/src/fuzzing/). See docs/fuzzing.md.
#
#   scripts/fuzz.sh [seconds-per-target] [target...]
#
# Builds the targets in fuzz/ once, then runs every target (or the ones named) for the given time (default 60 s)
# over its corpus, one after the other, and prints per target the executions run (libFuzzer's final
# stat::number_of_executed_units), exec/s, coverage before and after, and the inputs it added.
#
# The committed corpus fuzz/corpus/<target> is only read. New inputs go to fuzz/target/corpus/<target>, which
# later runs start from too (never committed; FUZZ_FRESH=1 empties it first). FUZZ_MERGE=1 merges the inputs that
# add coverage into fuzz/corpus/<target> afterwards; keep the repository corpus small (see docs/fuzzing.md).
# A crash stops that target, leaves the input in fuzz/artifacts/<target>/ and makes the script exit 1 at the end.
#
# Environment:
#   FUZZ_TOOLCHAIN   rustup toolchain (default nightly, installed with --profile minimal if missing). `stable`
#                    works too: as is with FUZZ_SANITIZER=none, through RUSTC_BOOTSTRAP=1 with address.
#   FUZZ_SANITIZER   address (default) or none (about twice the executions; tern itself has no unsafe code).
#   FUZZ_FRESH=1     start from the committed corpus only.
#   FUZZ_MERGE=1     merge new coverage into fuzz/corpus/<target>.
#   FUZZ_ARGS        extra libFuzzer arguments, e.g. "-max_len=8192".
#   CARGO_BUILD_JOBS build parallelism (default 1).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

seconds=${1:-60}
[[ $# -gt 0 ]] && shift
if ! [[ $seconds =~ ^[0-9]+$ ]] || [[ $seconds -lt 1 ]]; then
    echo "usage: $0 [seconds-per-target] [target...]" >&2
    exit 2
fi
toolchain=${FUZZ_TOOLCHAIN:-nightly}
sanitizer=${FUZZ_SANITIZER:-address}
export CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1}

if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
    echo "== installing the $toolchain toolchain"
    rustup toolchain install "$toolchain" --profile minimal
fi
build_args=(-s "$sanitizer")
if [[ $toolchain != nightly* ]]; then
    # Its own target directory: switching toolchains in one would rebuild everything each time.
    build_args+=(--target-dir "target/$toolchain")
    if [[ $sanitizer != none ]]; then
        # cargo-fuzz passes -Zsanitizer; a stable rustc accepts it only in bootstrap mode. (Cargo caches the
        # compiler's answer in the target directory: a build tried once without this keeps failing until
        # target/<toolchain>/.rustc_info.json is deleted.)
        export RUSTC_BOOTSTRAP=1
    fi
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

cd fuzz
if [[ $# -gt 0 ]]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

echo "== building ${targets[*]} ($(rustup run "$toolchain" rustc --version), sanitizer $sanitizer)"
cargo "+$toolchain" fuzz build "${build_args[@]}"

mkdir -p target/logs
summary=()
failed=0
for target in "${targets[@]}"; do
    seeds=corpus/$target
    work=target/corpus/$target
    log=target/logs/$target.log
    [[ -d $seeds ]] || { echo "no corpus directory fuzz/$seeds" >&2; exit 2; }
    [[ ${FUZZ_FRESH:-0} == 1 ]] && rm -rf "$work"
    mkdir -p "$work"
    echo "== $target: $seconds s over fuzz/$seeds (log fuzz/$log)"
    status=0
    # The first corpus directory receives new inputs; the committed one is only read.
    # shellcheck disable=SC2086
    cargo "+$toolchain" fuzz run "${build_args[@]}" "$target" "$work" "$seeds" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 ${FUZZ_ARGS:-} >"$log" 2>&1 || status=$?
    final_stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
    cov() { { grep -E "^#[0-9]+[[:space:]]+$1 " "$log" || true; } | tail -1 | sed -E 's/.* cov: ([0-9]+) ft: ([0-9]+).*/\1 edges, \2 features/'; }
    execs=$(final_stat number_of_executed_units)
    rate=$(final_stat average_exec_per_sec)
    added=$(final_stat new_units_added)
    rss=$(final_stat peak_rss_mb)
    inited=$(cov INITED)
    done_=$(cov DONE)
    if [[ $status -ne 0 ]]; then
        failed=1
        crash=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        result="CRASH (exit $status) ${crash:+input fuzz/${crash#"$root"/fuzz/}}"
        grep -m1 -E "panicked at|ERROR: (AddressSanitizer|libFuzzer)" "$log" || true
    else
        result=ok
    fi
    line="$target: ${execs:-?} executions, ${rate:-?} exec/s, coverage ${inited:-?} -> ${done_:-?}, \
${added:-?} new inputs, peak RSS ${rss:-?} MB: $result"
    echo "$line"
    summary+=("$line")
    if [[ ${FUZZ_MERGE:-0} == 1 && $status -eq 0 ]]; then
        cargo "+$toolchain" fuzz run "${build_args[@]}" "$target" "$seeds" "$work" -- -merge=1 >>"$log" 2>&1
        echo "   merged into fuzz/$seeds: $(find "$seeds" -type f | wc -l) files"
    fi
done

echo
echo "== summary ($seconds s per target, sanitizer $sanitizer)"
printf '%s\n' "${summary[@]}"
exit "$failed"
