#!/usr/bin/env bash
# Makes cross/order/<target>.txt.gz, the function order cross/build.sh links the
# agent with: builds the agent unstripped (same profile, same code), runs it under
# qemu-user logging every block of code it runs, through what a device does (sideload
# the tabular, tree and CNN models with their health checks, then `run` with the CNN,
# connected to Mosquitto over mutual TLS, sending telemetry and answering local API
# requests in JSON and binary), and lists the functions that ran in the order they
# first ran (cross/order.py).
#
#   cross/order.sh                      # x86-64
#   cross/order.sh aarch64-unknown-linux-musl
#
# With EDGEFLEET_ORDER_MEASURE=BINARY it builds nothing and writes no list: it runs
# that agent binary (built for the one target given) through the same day and prints
# how many 4-KB pages and 64-KB windows of its code ran (cross/touched.py), the proxy
# for the resident code of a binary whose RSS cannot be measured here (ARM under
# qemu-user). Compare a binary linked with the list against one without it.
#
# Needs what cross/build.sh needs, plus mosquitto and openssl. Run it again after a
# dependency or compiler update (cross/build.sh reports how many of the listed
# functions it found); a stale list only costs memory, never correctness.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
W=${EDGEFLEET_CROSS_DIR:-/var/tmp/edgefleet-cross}
TARGETS=("$@")
[ ${#TARGETS[@]} -gt 0 ] || TARGETS=(x86_64-unknown-linux-musl)
MEASURE=""
if [ -n "${EDGEFLEET_ORDER_MEASURE:-}" ]; then
  MEASURE=$(realpath -e "$EDGEFLEET_ORDER_MEASURE") \
    || { echo "cross/order.sh: EDGEFLEET_ORDER_MEASURE: no file $EDGEFLEET_ORDER_MEASURE" >&2; exit 2; }
  [ ${#TARGETS[@]} -eq 1 ] \
    || { echo "cross/order.sh: EDGEFLEET_ORDER_MEASURE takes the one target it was built for" >&2; exit 2; }
fi
for p in mosquitto openssl; do
  command -v "$p" >/dev/null || { apt-get install -y -qq --no-install-recommends "$p" >/dev/null; }
done
"$HERE/setup.sh"

# Host tools (the rustup toolchain): keys, trust root and bundles.
HOST_TARGET=${CARGO_TARGET_DIR:-/var/tmp/edgefleet-target}
(cd "$ROOT" && CARGO_TARGET_DIR=$HOST_TARGET cargo build -q -p edgefleet)
EF="$HOST_TARGET/debug/edgefleet"
T_DIR=$(mktemp -d)
cleanup() {
  pkill -f "mosquitto -c $T_DIR" 2>/dev/null || true
  rm -rf "$T_DIR"
}
trap cleanup EXIT
cd "$T_DIR"
"$EF" keys generate --out keys --name alice >/dev/null
"$EF" trust init --key keys/alice.key --threshold 1 --out root.cbor >/dev/null
for m in iris_logreg:iris forest_cancer:forest digits_cnn:digits; do
  "$EF" bundle build --model "$ROOT/models/${m%%:*}.onnx" --channel "${m##*:}" --version 1.0.0 \
    --release 1 --key keys/alice.key --out "${m##*:}.efb" >/dev/null
done

# A CA, a server certificate for Mosquitto and a client certificate for the device.
issue() {
  printf 'basicConstraints=CA:FALSE\n%b\n' "$2" >"$1.ext"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$1.key" \
    -out "$1.csr" -subj "/CN=$1" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -out "$1.pem" \
    -days 2 -extfile "$1.ext" 2>/dev/null
}
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key \
  -out ca.pem -days 2 -subj /CN=order-ca -addext basicConstraints=critical,CA:TRUE \
  -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
issue server 'subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth'
issue order-dev 'extendedKeyUsage=clientAuth'
# The controller's command key: an agent with a broker needs its public half.
openssl genpkey -algorithm ed25519 -out command.key 2>/dev/null
openssl pkey -in command.key -pubout -out controller.pub 2>/dev/null
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >mosquitto.conf <<CONF
listener $PORT 127.0.0.1
cafile $T_DIR/ca.pem
certfile $T_DIR/server.pem
keyfile $T_DIR/server.key
require_certificate true
use_identity_as_username true
log_type all
CONF
[ "$(id -u)" != 0 ] || echo "user root" >>mosquitto.conf
cat >agent.toml <<CONF
device_id = "order-dev"
[broker]
url = "mqtts://localhost:$PORT"
ca = "$T_DIR/ca.pem"
cert = "$T_DIR/order-dev.pem"
key = "$T_DIR/order-dev.key"
controller_key = "$T_DIR/controller.pub"
[telemetry]
interval_s = 1
[limits]
disk_reserve_bytes = 0
CONF
# Local API requests: health, metadata, inference in JSON and in binary, a bad shape.
cat >requests.py <<'PY'
import json, struct, sys, urllib.request, urllib.error
base = sys.argv[1]
def call(path, body=None, headers={}):
    req = urllib.request.Request(base + path, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
pixels = [((i * 37) % 256) / 255 for i in range(784)]
tensor = {"name": "image", "shape": [1, 1, 28, 28], "datatype": "FP32"}
statuses = [call(p) for p in ("/v2/health/live", "/v2/health/ready", "/v2", "/v2/models/digits", "/v2/models/digits/ready")]
statuses.append(call("/v2/models/digits/infer", json.dumps({"inputs": [dict(tensor, data=pixels)]}).encode()))
header = json.dumps({"inputs": [dict(tensor, parameters={"binary_data_size": 784 * 4})],
                     "parameters": {"binary_data_output": True}}).encode()
statuses.append(call("/v2/models/digits/infer", header + struct.pack("<784f", *pixels),
                     {"Inference-Header-Content-Length": str(len(header))}))
statuses.append(call("/v2/models/digits/infer", json.dumps({"inputs": [dict(tensor, shape=[1, 28, 28], data=pixels)]}).encode()))
assert statuses == [200] * 7 + [400], statuses
PY

# shellcheck source=cross/env.sh
. "$HERE/env.sh"

for T in "${TARGETS[@]}"; do
  case $T in
    aarch64-*) Q=qemu-aarch64-static ;;
    armv7-*) Q=qemu-arm-static ;;
    x86_64-*) Q=qemu-x86_64-static ;;
    *) echo "cross/order.sh: unknown target $T" >&2; exit 2 ;;
  esac
  if [ -n "$MEASURE" ]; then
    cp "$MEASURE" "agent-$T"
  else
    edge_target "$T"
    echo "cross/order.sh: building edgefleet-agent for $T with its symbols"
    edge_patch
    (cd "$ROOT" && cargo-zigbuild rustc "${EDGE_PATCH[@]}" "${EDGE_TARGET_CONFIG[@]}" "${BUILD_STD[@]}" --profile edge --target "$T" \
      -p edgefleet-agent --bin edgefleet-agent -- -C strip=none)
    cp "$CARGO_TARGET_DIR/$T/edge/edgefleet-agent" "agent-$T"
  fi
  # trace LOG ARGS...: runs the agent under qemu, logging each block of code. It
  # execs qemu, so call it in a subshell: run in the background, that subshell is
  # then qemu itself, and killing $! stops the agent (a subshell around qemu
  # died alone and left the agent running, writing its trace).
  trace() {
    local log=$1
    shift
    exec "$Q" -cpu max -d in_asm,nochain -D "$log" "./agent-$T" --data-dir "data-$T" --trust root.cbor "$@"
  }
  logs=()
  for b in iris forest digits; do
    (trace "install-$b.log" install "$b.efb") >/dev/null
    logs+=("install-$b.log")
  done
  mosquitto -c "$T_DIR/mosquitto.conf" >"mosquitto-$T.log" 2>&1 &
  broker=$!
  trace run.log --config agent.toml run --http 127.0.0.1:0 >"run-$T.out" 2>&1 &
  agent=$!
  for _ in $(seq 1 120); do grep -q "local API listening" "run-$T.out" && break; sleep 1; done
  api=$(grep -o 'http://127.0.0.1:[0-9]*' "run-$T.out" | head -n 1)
  python3 requests.py "$api"
  for _ in $(seq 1 60); do
    [ "$(grep -c 'Received PUBLISH from order-dev' "mosquitto-$T.log")" -ge 3 ] && break
    sleep 1
  done
  kill "$agent" "$broker"
  wait "$agent" "$broker" 2>/dev/null || true
  grep -q 'Received PUBLISH from order-dev' "mosquitto-$T.log" \
    || { echo "cross/order.sh: the agent did not publish over mutual TLS" >&2; cat "run-$T.out" >&2; exit 1; }
  logs+=(run.log)
  if [ -n "$MEASURE" ]; then
    python3 "$HERE/touched.py" "agent-$T" "${logs[@]}"
    rm -f ./*.log
    continue
  fi
  mkdir -p "$HERE/order"
  python3 "$HERE/order.py" "agent-$T" "order-$T.txt" "${logs[@]}"
  gzip -9n <"order-$T.txt" >"$HERE/order/$T.txt.gz"
  echo "cross/order.sh: wrote cross/order/$T.txt.gz"
  rm -f ./*.log
done
