#!/usr/bin/env bash
# Installs what cross/build.sh needs on a fresh Debian 12 machine (idempotent):
# Debian's rustc-web/cargo-web 1.96 with its library source (the standard library is
# built for each target with -Zbuild-std; rustup targets cannot be downloaded here),
# zig and cargo-zigbuild from PyPI (static musl linking), qemu-user-static (running
# the ARM binaries). Facts behind each step: ../shared/cross/README.md.
#
#   EDGEFLEET_CROSS_DIR  work directory (venv, caches, target dir); default
#                        /var/tmp/edgefleet-cross
set -euo pipefail
W=${EDGEFLEET_CROSS_DIR:-/var/tmp/edgefleet-cross}
ZIGLANG_VER=0.17.1
CARGO_ZIGBUILD_VER=0.24.1
mkdir -p "$W"

need=()
for p in rustc-web cargo-web rust-web-src qemu-user-static binfmt-support file binutils; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "cross/setup.sh: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

RV=$(/usr/bin/rustc -V | awk '{print $2}')
[ -f "/usr/src/rustc-$RV/library/Cargo.lock" ] || {
  echo "cross/setup.sh: rust-web-src does not match rustc-web $RV" >&2
  exit 1
}

if ! "$W/venv/bin/cargo-zigbuild" --version 2>/dev/null | grep -q "$CARGO_ZIGBUILD_VER"; then
  echo "cross/setup.sh: installing ziglang $ZIGLANG_VER and cargo-zigbuild $CARGO_ZIGBUILD_VER"
  [ -x "$W/venv/bin/pip" ] || python3 -m venv "$W/venv"
  "$W/venv/bin/pip" install -q "ziglang==$ZIGLANG_VER" "cargo-zigbuild==$CARGO_ZIGBUILD_VER"
fi
echo "cross/setup.sh: ready: $(/usr/bin/rustc -V), zig $("$W/venv/bin/python" -m ziglang version), $("$W/venv/bin/cargo-zigbuild" --version)"
