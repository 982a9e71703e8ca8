#!/usr/bin/env bash
# Checks the binaries cross/build.sh made, rather than assuming them: `file` must
# show the right architecture and static linking, and each binary must run under
# qemu-user (x86-64 natively): --version, `config check` on the printed default,
# then a real install of a signed iris bundle and a one-shot inference whose
# outputs must equal the host build's (labels exactly, probabilities within 1e-5).
#
#   cross/check.sh                      # every target in cross/out/
#   cross/check.sh aarch64-unknown-linux-musl
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  for d in "$HERE"/out/*/; do [ -x "$d/edgefleet-agent" ] && TARGETS+=("$(basename "$d")"); done
fi
[ ${#TARGETS[@]} -gt 0 ] || { echo "cross/check.sh: nothing built; run cross/build.sh first" >&2; exit 2; }

# Host tools (the rustup toolchain): the controller CLI makes keys and bundles, the
# host agent gives the reference outputs.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/edgefleet-target} RUST_LIB_BACKTRACE=0
(cd "$ROOT" && cargo build -q -p edgefleet -p edgefleet-agent)
EF="$CARGO_TARGET_DIR/debug/edgefleet"
HOST_AGENT="$CARGO_TARGET_DIR/debug/edgefleet-agent"

T_DIR=$(mktemp -d)
trap 'rm -rf "$T_DIR"' EXIT
cd "$T_DIR"
"$EF" keys generate --out keys --name alice >/dev/null
"$EF" trust init --key keys/alice.key --threshold 1 --out root.cbor >/dev/null
"$EF" bundle build --model "$ROOT/models/iris_logreg.onnx" --channel iris --version 1.0.0 \
  --release 1 --reference "$ROOT/models/iris_reference.csv" --key keys/alice.key \
  --out iris.efb >/dev/null
cat > request.json <<'JSON'
{"inputs": [{"name": "features", "shape": [3, 4], "datatype": "FP32",
  "data": [5.1, 3.5, 1.4, 0.2, 6.0, 2.7, 5.1, 1.6, 6.3, 3.3, 6.0, 2.5]}]}
JSON
"$HOST_AGENT" --data-dir host --trust root.cbor install iris.efb >/dev/null
"$HOST_AGENT" --data-dir host --trust root.cbor infer --input request.json > host.json

runner_for() {
  case $1 in
    aarch64-*) echo qemu-aarch64-static ;;
    armv7-*) echo qemu-arm-static ;;
    x86_64-*) echo "" ;;
  esac
}
arch_for() {
  case $1 in
    aarch64-*) echo "ARM aarch64" ;;
    armv7-*) echo "ARM, EABI5" ;;
    x86_64-*) echo "x86-64" ;;
  esac
}

failed=0
for T in "${TARGETS[@]}"; do
  B="$HERE/out/$T/edgefleet-agent"
  R=$(runner_for "$T")
  run() { ${R:+$R} "$B" "$@"; }
  echo "== $T ($(stat -c %s "$B") bytes)"
  desc=$(file -b "$B")
  echo "   file: $desc"
  if [[ $desc != *"$(arch_for "$T")"* ]] || [[ $desc != *"statically linked"* && $desc != *"static-pie linked"* ]]; then
    echo "   FAIL: not a static $(arch_for "$T") binary"; failed=1; continue
  fi
  echo "   --version: $(run --version)"
  run config print-default > "agent-$T.toml"
  run --config "agent-$T.toml" config check >/dev/null || { echo "   FAIL: config check"; failed=1; continue; }
  echo "   config check: ok"
  run --data-dir "data-$T" --trust root.cbor install iris.efb > "install-$T.txt" \
    || { echo "   FAIL: install"; cat "install-$T.txt"; failed=1; continue; }
  echo "   install: $(cat "install-$T.txt")"
  run --data-dir "data-$T" --trust root.cbor infer --input request.json > "out-$T.json"
  if python3 - "host.json" "out-$T.json" <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
for x, y in zip(a["outputs"], b["outputs"]):
    assert x["name"] == y["name"] and x["shape"] == y["shape"], (x, y)
    for u, v in zip(x["data"], y["data"]):
        if isinstance(u, int):
            assert u == v, (x["name"], u, v)
        else:
            assert abs(u - v) <= 1e-5 + 1e-5 * abs(u), (x["name"], u, v)
assert len(a["outputs"]) == len(b["outputs"])
PY
  then
    echo "   infer: same outputs as the host build ($(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["outputs"][0]["data"])' "out-$T.json"))"
  else
    echo "   FAIL: outputs differ from the host build"; failed=1
  fi
done
exit $failed
