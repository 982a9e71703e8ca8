#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS seconds each (default 20) and prints the
# executions. Needs a nightly toolchain and cargo-fuzz (.ci/run installs both).
# Longer runs by hand: FUZZ_SECONDS=600 fuzz/run-all.sh
set -euo pipefail
cd "$(dirname "$0")"
seconds="${FUZZ_SECONDS:-20}"
# A separate target directory: sanitizer builds must not evict the main one.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-/var/tmp/edgefleet-fuzz-target}"
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^edgefleet-fuzz$')
cargo +nightly fuzz build -O
for t in $targets; do
    mkdir -p "corpus/$t"
    log=$(mktemp)
    if ! cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 >"$log" 2>&1; then
        tail -n 40 "$log"
        echo "fuzz target $t FAILED (crash input in fuzz/artifacts/$t)"
        exit 1
    fi
    runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -n 1 || true)
    cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1 || true)
    echo "fuzz $t: ${runs:-no summary} in ${seconds}s, $cov, no crash"
    rm -f "$log"
done
