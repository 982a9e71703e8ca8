# Sourced by cross/build.sh and cross/order.sh (with W set to the work directory):
# Debian's toolchain only, rustup's proxies off PATH (they would pick the pinned
# 1.95 toolchain, which cannot build std for these targets here), zig as linker.
export PATH="$W/venv/bin:/usr/bin:/bin:/usr/sbin:/sbin"
unset RUSTUP_TOOLCHAIN RUSTFLAGS CARGO_BUILD_TARGET || true
export RUSTC=/usr/bin/rustc CARGO_HOME="$W/cargo-home" XDG_CACHE_HOME="$W/cache"
export ZIG_GLOBAL_CACHE_DIR="$W/zig-cache" CARGO_TARGET_DIR="$W/target"
export RUSTC_BOOTSTRAP=1 RUST_LIB_BACKTRACE=0

# edge_target TARGET [PROFILE]: the target's compiler flags, and the agent binary forgotten so
# the next build links it again (cargo does not notice a change of link flags, of the
# ordering file or of stripping between cross/build.sh and cross/order.sh).
edge_target() {
  local u
  u=$(echo "$1" | tr 'a-z-' 'A-Z_')
  # The linker (zig) supplies crt1.o and libc.a; rustc must not add its own.
  # No unwind tables: with panic=abort nothing unwinds, and .eh_frame was 1.4-1.8 MB
  # of each binary (docs/benchmarks.md); a panic still prints its message.
  export "CARGO_TARGET_${u}_RUSTFLAGS=-C link-self-contained=no -C force-unwind-tables=no"
  # mimalloc (the device build's allocator) commits its arenas lazily: with its
  # default (eager on Linux) the agent's idle RSS was 8.9 MB and 15.7 MB with the
  # CNN loaded, over the memory targets; lazily 5.4 and 9.7 MB, at the same speed
  # (docs/benchmarks.md, issue 25). cc reads CFLAGS_<target>.
  export "CFLAGS_$(echo "$1" | tr '-' '_')=-DMI_DEFAULT_ARENA_EAGER_COMMIT=0"
  local profile=${2:-edge}
  rm -f "$CARGO_TARGET_DIR/$1/$profile/edgefleet-agent"
  find "$CARGO_TARGET_DIR/$1/$profile/deps" -maxdepth 1 -name 'edgefleet_agent-*' ! -name '*.*' \
    -delete 2>/dev/null || true
}
