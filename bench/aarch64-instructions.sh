#!/usr/bin/env bash
# Issue 25, aarch64: the device build (profile `edge`) against the same code at
# opt-level 3 everywhere (profile `edge-o3`), in guest instructions counted
# under qemu-user (bench/qemu-insn/count.sh): time under emulation means
# nothing, instruction counts do. Per model (iris: tabular, tract; forest:
# tabular, our tree evaluator; digits: the CNN):
#   one inference = (count of `infer --time 110` - count of `infer --time 10`) / 100
#   load + one inference + process start = count of `infer` (no --time)
#
#   cross/build.sh aarch64-unknown-linux-musl
#   EDGEFLEET_CROSS_PROFILE=edge-o3 cross/build.sh aarch64-unknown-linux-musl
#   bench/aarch64-instructions.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/edgefleet-target}" RUST_LIB_BACKTRACE=0
DEVICE=${1:-cross/out/aarch64-unknown-linux-musl/edgefleet-agent}
O3=${2:-cross/out/aarch64-unknown-linux-musl-edge-o3/edgefleet-agent}
for b in "$DEVICE" "$O3"; do
  [ -x "$b" ] || { echo "missing $b (see the usage at the top of $0)" >&2; exit 1; }
done
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
cargo build -q -p edgefleet
ef=$CARGO_TARGET_DIR/debug/edgefleet
(
  cd "$W"
  "$ef" keys generate --out keys --name bench >/dev/null
  "$ef" trust init --key keys/bench.key --threshold 1 --out root.cbor >/dev/null
  for m in iris:iris_logreg forest:forest_cancer digits:digits_cnn; do
    "$ef" bundle build --model "$ROOT/models/${m#*:}.onnx" --channel "${m%%:*}" --version 1.0.0 \
      --release 1 --out "${m%%:*}.efb" >/dev/null
    "$ef" bundle sign "${m%%:*}.efb" --key keys/bench.key >/dev/null
  done
)
python3 - "$ROOT/models/digits_cnn.expected.json" "$W" <<'PY'
import json, sys
image = json.load(open(sys.argv[1]))["image"][0]
flat = []
def walk(v):
    if isinstance(v, list):
        for x in v: walk(x)
    else:
        flat.append(v)
walk(image)
out = sys.argv[2]
json.dump({"inputs": [{"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32", "data": flat}]}, open(f"{out}/digits.json", "w"))
json.dump({"inputs": [{"name": "features", "shape": [1, 4], "datatype": "FP32", "data": [5.0, 3.4, 1.5, 0.2]}]}, open(f"{out}/iris.json", "w"))
row = json.load(open(sys.argv[1].replace("digits_cnn", "forest_cancer")))["features"][1]
json.dump({"inputs": [{"name": "features", "shape": [1, len(row)], "datatype": "FP32", "data": row}]}, open(f"{out}/forest.json", "w"))
PY
count() { # BINARY DATA MODEL [--time N]
  local bin=$1 data=$2 model=$3
  shift 3
  bench/qemu-insn/count.sh aarch64 "$bin" --data-dir "$data" --trust "$W/root.cbor" infer \
    --input "$W/$model.json" "$@" 2>&1 >/dev/null | sed -n 's/^guest instructions: //p'
}
printf '%-8s %-26s %18s %22s\n' model build "one inference" "load+1 inference+start"
for model in iris forest digits; do
  declare -A per=() whole=()
  for which in device o3; do
    bin=$DEVICE
    [ "$which" = o3 ] && bin=$O3
    data="$W/$which-$model"
    qemu-aarch64-static "$bin" --data-dir "$data" --trust "$W/root.cbor" install "$W/$model.efb" >/dev/null
    a=$(count "$bin" "$data" "$model" --time 10)
    b=$(count "$bin" "$data" "$model" --time 110)
    per[$which]=$(( (b - a) / 100 ))
    whole[$which]=$(count "$bin" "$data" "$model")
  done
  printf '%-8s %-26s %18s %22s\n' "$model" "device (edge)" "${per[device]}" "${whole[device]}"
  printf '%-8s %-26s %18s %22s\n' "$model" "opt-level 3 (edge-o3)" "${per[o3]}" "${whole[o3]}"
  awk -v d="${per[device]}" -v o="${per[o3]}" -v dw="${whole[device]}" -v ow="${whole[o3]}" -v m="$model" \
    'BEGIN { printf "%-8s device / opt-level 3: inference %.3fx, load+start %.3fx\n", m, d / o, dw / ow }'
  unset per whole
done
