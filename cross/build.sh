#!/usr/bin/env bash
# Builds edgefleet-agent as a static, stripped, size-optimised binary (profile
# `edge` in Cargo.toml) for each device target, into cross/out/<target>/:
#
#   cross/build.sh                      # aarch64, armv7 and x86-64 (musl)
#   cross/build.sh aarch64-unknown-linux-musl
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
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf x86_64-unknown-linux-musl)

"$HERE/setup.sh"

# Debian's toolchain only: rustup's proxies stay off PATH (they would pick the
# pinned 1.95 toolchain, which cannot build std for these targets here).
export PATH="$W/venv/bin:/usr/bin:/bin:/usr/sbin:/sbin"
unset RUSTUP_TOOLCHAIN RUSTFLAGS CARGO_BUILD_TARGET || true
export RUSTC=/usr/bin/rustc CARGO_HOME="$W/cargo-home" XDG_CACHE_HOME="$W/cache"
export ZIG_GLOBAL_CACHE_DIR="$W/zig-cache" CARGO_TARGET_DIR="$W/target"
export RUSTC_BOOTSTRAP=1 RUST_LIB_BACKTRACE=0

cd "$ROOT"
for T in "${TARGETS[@]}"; do
  case $T in
    aarch64-unknown-linux-musl | armv7-unknown-linux-musleabihf | x86_64-unknown-linux-musl) ;;
    *) echo "cross/build.sh: unknown target $T" >&2; exit 2 ;;
  esac
  U=$(echo "$T" | tr 'a-z-' 'A-Z_')
  # The linker (zig) supplies crt1.o and libc.a; rustc must not add its own.
  # No unwind tables: with panic=abort nothing unwinds, and .eh_frame was 1.4-1.8 MB
  # of each binary (docs/benchmarks.md); a panic still prints its message.
  export "CARGO_TARGET_${U}_RUSTFLAGS=-C link-self-contained=no -C force-unwind-tables=no"
  start=$(date +%s)
  echo "cross/build.sh: building edgefleet-agent for $T"
  # Always link the binary again: cargo does not see a change of the link flags or of
  # the ordering file below, and cross/order.sh builds the same binary unstripped.
  rm -f "$CARGO_TARGET_DIR/$T/edge/edgefleet-agent"
  find "$CARGO_TARGET_DIR/$T/edge/deps" -maxdepth 1 -name 'edgefleet_agent-*' ! -name '*.*' -delete 2>/dev/null || true
  if [ -f "$HERE/order/$T.txt.gz" ]; then
    # Functions the agent runs laid out first, in the order they first run
    # (cross/order.sh made the list; cross/link-ordered.sh links with it).
    gunzip -c "$HERE/order/$T.txt.gz" >"$W/order-$T.txt"
    export EDGEFLEET_ORDER="$W/order-$T.txt" EDGEFLEET_ORDER_REPORT="$W/order-$T.report"
    export EDGEFLEET_ZIG="$W/venv/bin/python-zig"
    rm -f "$EDGEFLEET_ORDER_REPORT"
    # The zig cc wrapper cargo-zigbuild makes for the target (created when it starts).
    export EDGEFLEET_ZIGCC="$W/zigcc-$T.sh"
    cat >"$EDGEFLEET_ZIGCC" <<SH
#!/bin/sh
exec "\$(ls "$XDG_CACHE_HOME"/cargo-zigbuild/*/wrappers/*/zigcc-$T-*.sh | head -n 1)" "\$@"
SH
    chmod +x "$EDGEFLEET_ZIGCC"
    cargo-zigbuild rustc -Zbuild-std=std,panic_abort --profile edge --target "$T" \
      -p edgefleet-agent --bin edgefleet-agent -- -C linker="$HERE/link-ordered.sh"
    if [ -f "$EDGEFLEET_ORDER_REPORT" ]; then
      echo "cross/build.sh: code layout: $(cat "$EDGEFLEET_ORDER_REPORT") (cross/order.sh $T renews the list)"
    fi
  else
    cargo zigbuild -Zbuild-std=std,panic_abort --profile edge --target "$T" \
      -p edgefleet-agent --bin edgefleet-agent
  fi
  mkdir -p "$HERE/out/$T"
  cp "$CARGO_TARGET_DIR/$T/edge/edgefleet-agent" "$HERE/out/$T/edgefleet-agent"
  echo "cross/build.sh: $T: $(stat -c %s "$HERE/out/$T/edgefleet-agent") bytes in $(( $(date +%s) - start )) s"
done
