# Sourced by cross/build.sh and cross/order.sh (with W set to the work directory):
# Debian's toolchain only, rustup's proxies off PATH (they would pick the pinned
# 1.95 toolchain, which cannot build std for these targets here), zig as linker.
export PATH="$W/venv/bin:/usr/bin:/bin:/usr/sbin:/sbin"
unset RUSTUP_TOOLCHAIN RUSTFLAGS CARGO_BUILD_TARGET || true
export RUSTC=/usr/bin/rustc CARGO_HOME="$W/cargo-home" XDG_CACHE_HOME="$W/cache"
export ZIG_GLOBAL_CACHE_DIR="$W/zig-cache" CARGO_TARGET_DIR="$W/target"
export RUSTC_BOOTSTRAP=1 RUST_LIB_BACKTRACE=0

# The standard library, built for the target with the agent. `optimize_for_size`
# gives core and alloc their small algorithms: the sorts alone were 392 KB of the
# x86-64 agent (105 stable-sort instantiations at 2-4 KB each); none is on the
# inference path (docs/benchmarks.md, issue 25). Listing the features drops cargo's
# defaults, `backtrace` (symbolizing a backtrace: 80 KB of gimli and addr2line, of no
# use in a stripped binary) and `panic-unwind` (the profile aborts).
BUILD_STD=(-Zbuild-std=std,panic_abort -Zbuild-std-features=optimize_for_size)

# edge_target TARGET [PROFILE]: the target's compiler flags, and the agent binary forgotten so
# the next build links it again (cargo does not notice a change of link flags, of the
# ordering file or of stripping between cross/build.sh and cross/order.sh).
edge_target() {
  local u
  u=$(echo "$1" | tr 'a-z-' 'A-Z_')
  # The linker (zig) supplies crt1.o and libc.a; rustc must not add its own.
  # No unwind tables: with panic=abort nothing unwinds, and .eh_frame was 1.4-1.8 MB
  # of each binary (docs/benchmarks.md); a panic still prints its message.
  # Panic locations keep their file but not line and column: the 7,370
  # locations of the aarch64 agent were 177 KB of 24-byte records and 92 KB of
  # file names; with `file` they merge to one per file (issue 25: the aarch64
  # build was 8.12 MB, over its 8 MB target). A panic still says its message and
  # the source file ("panicked at agent/src/api.rs:0:0: ...").
  export "CARGO_TARGET_${u}_RUSTFLAGS=-C link-self-contained=no -C force-unwind-tables=no -Z location-detail=file"
  # mimalloc (the device build's allocator) commits its arenas lazily: with its
  # default (eager on Linux) the agent's idle RSS was 8.9 MB and 15.7 MB with the
  # CNN loaded, over the memory targets; lazily 5.4 and 9.7 MB, at the same speed
  # (docs/benchmarks.md, issue 25). cc reads CFLAGS_<target>.
  # The C code (mimalloc, ring) without unwind tables either, as the Rust code.
  export "CFLAGS_$(echo "$1" | tr '-' '_')=-DMI_DEFAULT_ARENA_EAGER_COMMIT=0 -fno-asynchronous-unwind-tables -fno-unwind-tables"
  local profile=${2:-edge}
  # x86-64: tract-core at "s" instead of "z" (the CNN in-process 1.23x the release
  # build's time at "z", 1.02-1.03x at "s"; 0.9 MB, paid for by rustfft without its
  # x86 SIMD kernels, edge_patch). The ARM builds keep "z": aarch64 is 7.9 MB of
  # its 8 MB, and rustfft's NEON kernels are asked for by tract itself.
  EDGE_TARGET_CONFIG=()
  if [ "$profile" = edge ] && [[ $1 == x86_64-* ]]; then
    EDGE_TARGET_CONFIG=(--config 'profile.edge.package.tract-core.opt-level="s"')
  fi
  rm -f "$CARGO_TARGET_DIR/$1/$profile/edgefleet-agent"
  find "$CARGO_TARGET_DIR/$1/$profile/deps" -maxdepth 1 -name 'edgefleet_agent-*' ! -name '*.*' \
    -delete 2>/dev/null || true
}

# rustfft without its x86 SIMD kernels, for the device build only: tract-core asks
# for rustfft's default features (AVX and SSE butterflies, 0.82 MB of the x86-64
# agent), used by tract's STFT/DFT operators and by none of the models we ship or
# benchmark; the scalar FFT stays. The bytes pay for tract-core at a higher
# opt-level (issue 25, docs/benchmarks.md). A copy of the registry's source with no
# default features, given to cargo as a patch; the patched resolution goes to a
# copy of Cargo.lock in the work directory (`-Zlockfile-path`), the repository's
# stays as it is. Sets EDGE_PATCH to the arguments for cargo.
edge_patch() {
  local v src dst
  v=$(awk '/^name = "rustfft"$/ {getline; gsub(/[^0-9.]/, ""); print}' "$ROOT/Cargo.lock")
  dst="$W/patched/rustfft-$v"
  # Made once per version (a new copy would rebuild tract on every build).
  if [ ! -f "$dst/.edgefleet-patched" ]; then
    (cd "$ROOT" && cargo fetch -q)
    src=$(ls -d "$CARGO_HOME"/registry/src/*/"rustfft-$v" | head -n 1)
    rm -rf "$dst"
    mkdir -p "$W/patched"
    cp -r "$src" "$dst"
    # `default = [ "avx", "sse", "neon", ]` over several lines, to `default = []`.
    python3 - "$dst/Cargo.toml" <<'PY'
import re, sys
p = sys.argv[1]
s = open(p).read()
s, n = re.subn(r"(?m)^default = \[[^\]]*\]", "default = []", s)
assert n == 1, "rustfft's Cargo.toml has no default feature list"
open(p, "w").write(s)
PY
    touch "$dst/.edgefleet-patched"
  fi
  mkdir -p "$W/patched/lock"
  cp "$ROOT/Cargo.lock" "$W/patched/lock/Cargo.lock"
  EDGE_PATCH=(-Zlockfile-path --config "resolver.lockfile-path=\"$W/patched/lock/Cargo.lock\""
    --config "patch.crates-io.rustfft.path=\"$dst\"")
}
