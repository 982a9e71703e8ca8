#!/usr/bin/env bash
# Runs an aarch64 (or armv7) program under Debian's qemu-user with the guest
# instruction counter (insn.c) and passes its output through; the count goes
# to stderr as "guest instructions: N". For issue 25's aarch64 comparison:
# time under emulation means nothing, instruction counts do.
#
#   bench/qemu-insn/count.sh aarch64 cross/out/aarch64-unknown-linux-musl/edgefleet-agent --version
#
# Installs what it needs the first time (Debian's qemu-user unpacked into its
# work directory, beside cross/'s qemu-user-static rather than replacing it;
# its libraries; gcc for the plugin).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
W=${EDGEFLEET_QEMU_INSN_DIR:-/var/tmp/edgefleet-qemu-insn}
ARCH=$1
shift
case $ARCH in aarch64 | arm) ;; *) echo "count.sh: arch must be aarch64 or arm" >&2; exit 2 ;; esac

if [ ! -x "$W/root/usr/bin/qemu-$ARCH" ] || [ ! -f "$W/libinsn.so" ] || [ "$HERE/insn.c" -nt "$W/libinsn.so" ]; then
  mkdir -p "$W"
  need=()
  command -v gcc >/dev/null || need+=(gcc)
  dpkg -s libcapstone4 >/dev/null 2>&1 || need+=(libcapstone4)
  dpkg -s liburing2 >/dev/null 2>&1 || need+=(liburing2)
  dpkg -s libnuma1 >/dev/null 2>&1 || need+=(libnuma1)
  if [ ${#need[@]} -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
  fi
  if [ ! -x "$W/root/usr/bin/qemu-$ARCH" ]; then
    (cd "$W" && rm -f qemu-user_*.deb && apt-get download qemu-user >/dev/null 2>&1)
    dpkg-deb -x "$W"/qemu-user_*.deb "$W/root"
  fi
  gcc -shared -fPIC -O2 -Wall -o "$W/libinsn.so" "$HERE/insn.c"
fi
exec "$W/root/usr/bin/qemu-$ARCH" -plugin "$W/libinsn.so" "$@"
