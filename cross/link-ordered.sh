#!/bin/sh
# The final link of cross/build.sh when cross/order/<target>.txt exists: links as
# cargo-zigbuild's `zig cc` wrapper would, then links again with the same ld.lld
# command plus lld's --symbol-ordering-file, which `zig cc` refuses to pass on. The
# functions named in the file (those the agent runs, in the order it first runs
# them; made by cross/order.sh) are laid out first and together, so far fewer of the
# binary's pages are touched and resident (docs/benchmarks.md, "code layout").
#
#   EDGEFLEET_TARGET        the target triple (for cargo-zigbuild's zig cc wrapper)
#   EDGEFLEET_ZIG           a command that runs zig (the venv's python-zig)
#   EDGEFLEET_ORDER         the ordering file
#   EDGEFLEET_ORDER_REPORT  where to write how many of its symbols this build has (and,
#                           beside it with .lld added, what lld said)
set -eu
# cargo-zigbuild's zig cc wrapper for the target, made when cargo-zigbuild starts.
zigcc=$(ls "$XDG_CACHE_HOME"/cargo-zigbuild/*/wrappers/*/zigcc-"$EDGEFLEET_TARGET"-*.sh | head -n 1)
log=$(mktemp)
trap 'rm -f "$log"' EXIT
"$zigcc" -v "$@" 2>"$log" || { cat "$log" >&2; exit 1; }
line=$(grep '^ld.lld ' "$log" | tail -n 1)
[ -n "$line" ] || { echo "link-ordered.sh: zig printed no ld.lld command" >&2; exit 1; }
# The command line is split into its arguments on purpose (zig prints no quoting;
# the paths involved contain no spaces).
# shellcheck disable=SC2086
$EDGEFLEET_ZIG ld.lld ${line#ld.lld } --symbol-ordering-file="$EDGEFLEET_ORDER" 2>"$log" \
  || { cat "$log" >&2; exit 1; }
cp "$log" "$EDGEFLEET_ORDER_REPORT.lld"
listed=$(grep -c . "$EDGEFLEET_ORDER")
missing=$(grep -c 'symbol ordering file: no such symbol' "$log" || true)
echo "$((listed - missing)) of the $listed functions in $(basename "$EDGEFLEET_ORDER") are in this build" \
  >"$EDGEFLEET_ORDER_REPORT"
