#!/usr/bin/env bash
# Builds edgefleet-agent as a static, stripped, size-optimised binary (profile
# `edge` in Cargo.toml) for each device target, into cross/out/<target>/:
#
#   cross/build.sh                      # aarch64, armv7 and x86-64 (musl)
#   cross/build.sh aarch64-unknown-linux-musl
#   EDGEFLEET_CROSS_PROFILE=edge-o3 cross/build.sh aarch64-unknown-linux-musl
#                                       # the same at opt-level 3 everywhere, into
#                                       # cross/out/<target>-edge-o3/ (a comparison
#                                       # build for the benchmarks, not shipped)
#
# Runs cross/setup.sh first (installs what is missing). Uses Debian's cargo/rustc
# 1.96 (the workspace's rust-version must stay at or below it) with the standard
# library built from source, and zig as the linker. The build is then checked by
# cross/check.sh, not assumed.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
W=${EDGEFLEET_CROSS_DIR:-/var/tmp/edgefleet-cross}
TARGETS=("$@")
PROFILE=${EDGEFLEET_CROSS_PROFILE:-edge}
case $PROFILE in
  edge | edge-o3) ;;
  *) echo "cross/build.sh: unknown profile $PROFILE (edge or edge-o3)" >&2; exit 2 ;;
esac
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf x86_64-unknown-linux-musl)

"$HERE/setup.sh"

# shellcheck source=cross/env.sh
. "$HERE/env.sh"
# The comparison build keeps the standard library's fast algorithms, and rustfft
# its SIMD kernels, too.
EDGE_PATCH=()
if [ "$PROFILE" = edge ]; then
  edge_patch
else
  BUILD_STD=(-Zbuild-std=std,panic_abort)
fi

cd "$ROOT"
for T in "${TARGETS[@]}"; do
  case $T in
    aarch64-unknown-linux-musl | armv7-unknown-linux-musleabihf | x86_64-unknown-linux-musl) ;;
    *) echo "cross/build.sh: unknown target $T" >&2; exit 2 ;;
  esac
  edge_target "$T" "$PROFILE"
  start=$(date +%s)
  echo "cross/build.sh: building edgefleet-agent for $T"
  if [ -f "$HERE/order/$T.txt.gz" ]; then
    # Functions the agent runs laid out first, in the order they first run
    # (cross/order.sh made the list; cross/link-ordered.sh links with it).
    gunzip -c "$HERE/order/$T.txt.gz" >"$W/order-$T.txt"
    export EDGEFLEET_ORDER="$W/order-$T.txt" EDGEFLEET_ORDER_REPORT="$W/order-$T.report"
    export EDGEFLEET_ZIG="$W/venv/bin/python-zig" EDGEFLEET_TARGET="$T"
    rm -f "$EDGEFLEET_ORDER_REPORT"
    cargo-zigbuild rustc "${EDGE_PATCH[@]}" "${EDGE_TARGET_CONFIG[@]}" "${BUILD_STD[@]}" --profile "$PROFILE" --target "$T" \
      -p edgefleet-agent --bin edgefleet-agent -- -C linker="$HERE/link-ordered.sh"
    if [ -f "$EDGEFLEET_ORDER_REPORT" ]; then
      echo "cross/build.sh: code layout: $(cat "$EDGEFLEET_ORDER_REPORT") (cross/order.sh $T renews the list)"
    fi
  else
    cargo zigbuild "${EDGE_PATCH[@]}" "${EDGE_TARGET_CONFIG[@]}" "${BUILD_STD[@]}" --profile "$PROFILE" --target "$T" \
      -p edgefleet-agent --bin edgefleet-agent
  fi
  OUT="$HERE/out/$T"
  [ "$PROFILE" = edge ] || OUT="$OUT-$PROFILE"
  mkdir -p "$OUT"
  cp "$CARGO_TARGET_DIR/$T/$PROFILE/edgefleet-agent" "$OUT/edgefleet-agent"
  echo "cross/build.sh: $T ($PROFILE): $(stat -c %s "$OUT/edgefleet-agent") bytes in $(( $(date +%s) - start )) s"
done
