#!/usr/bin/env bash
# Counts the instructions of the drift update on the tabular model against the
# inference's own, with callgrind (counts, not seconds: the same whatever else
# the machine is doing). Three runs of the agent bench in its counting mode:
#   plain:0  (setup only)   plain:N  (N inferences)   with:N  (N inferences + updates)
# inference = (plain:N - plain:0) / N;  update = (with:N - plain:N) / N.
# N = 2000 covers two window closes (1000 rows each).
#
#   bench/drift-instructions.sh            # builds the bench (release) if needed
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/edgefleet-target}" RUST_LIB_BACKTRACE=0
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
N=${N:-2000}
bin=$(cargo bench -p edgefleet-agent --bench agent --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*\/agent-[0-9a-f]*\)".*/\1/p' | tail -1)
[ -x "$bin" ] || { echo "bench binary not found" >&2; exit 1; }
count() {
  EDGEFLEET_BENCH_DRIFT_COUNT=$1 valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" 2>&1 \
    | sed -n 's/.*Collected : \([0-9]*\).*/\1/p'
}
base=$(count plain:0); plain=$(count "plain:$N"); with=$(count "with:$N")
awk -v b="$base" -v p="$plain" -v w="$with" -v n="$N" 'BEGIN {
  inf = (p - b) / n; upd = (w - p) / n;
  printf "inference %.0f instructions, drift update %.0f instructions: %.2f%% (target < 5%%; %d requests, callgrind)\n", inf, upd, upd / inf * 100, n }'
