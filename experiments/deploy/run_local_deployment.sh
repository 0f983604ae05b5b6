#!/usr/bin/env bash
# The raw commands of a real Flower deployment, all on 127.0.0.1: a SuperLink, N SuperNodes
# (one per device, told its partition through --node-config), a CLI connection in FLWR_HOME,
# then `flwr run`. On real machines, run the SuperLink on the edge server and one SuperNode
# per device with --superlink EDGE_HOST:PORT (and the CA certificate copied to the device).
#
#   experiments/deploy/run_local_deployment.sh            # 3 SuperNodes, TLS
#   N=5 TLS=0 RUN_CONFIG="num-rounds=5" experiments/deploy/run_local_deployment.sh
#
# Stops every process it started (by process group) and removes its temporary files.
set -euo pipefail

APP=$(cd "$(dirname "$0")/../.." && pwd)          # the Flower app: this repository
N=${N:-3}                                          # SuperNodes = devices
TLS=${TLS:-1}
RUN_CONFIG=${RUN_CONFIG:-"num-rounds=2 exchange-batches=1000"}
OUT=${OUT:-$PWD/outputs}                           # results; absolute: the ServerApp runs elsewhere
RUN_NAME=${RUN_NAME:-deploy-$(date +%Y%m%d-%H%M%S)}
free_port() { python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT=${PORT:-$(free_port)}

WORK=$(mktemp -d)
export FLWR_HOME=$WORK/flwr-home                  # CLI connections; the nodes' unpacked apps
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1   # the apps use this Python's packages
mkdir -p "$FLWR_HOME"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ "$TLS" = 1 ]; then
    # A CA, and a server certificate it signs for the address the SuperNodes dial.
    mkdir -p "$WORK/certs" && cd "$WORK/certs"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
        -subj "/CN=fedsplitkd CA" -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -subj "/CN=localhost" -keyout server.key -out server.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' > server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 \
        -extfile server.ext -out server.pem 2>/dev/null
    cd - > /dev/null
    LINK_SECURITY=(--ssl-ca-certfile "$WORK/certs/ca.crt" --ssl-certfile "$WORK/certs/server.pem"
                   --ssl-keyfile "$WORK/certs/server.key")
    NODE_SECURITY=(--root-certificates "$WORK/certs/ca.crt")
    CLI_SECURITY="root-certificates = \"$WORK/certs/ca.crt\""
else
    LINK_SECURITY=(--insecure) NODE_SECURITY=(--insecure) CLI_SECURITY="insecure = true"
fi

# setsid: each process leads its own group, so the clean-up also stops the SuperExec and
# the ServerApp / ClientApp processes it starts.
setsid flower-superlink "${LINK_SECURITY[@]}" --host 127.0.0.1 --port "$PORT" \
    --disable-runtime-dependency-installation > "$WORK/superlink.log" 2>&1 &
PIDS+=($!)
for i in $(seq 0 $((N - 1))); do
    setsid flower-supernode "${NODE_SECURITY[@]}" --superlink "127.0.0.1:$PORT" \
        --port "$(free_port)" --node-config "partition-id=$i num-partitions=$N" \
        > "$WORK/supernode-$i.log" 2>&1 &
    PIDS+=($!)
done

cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "local-deployment"

[superlink.local-deployment]
address = "127.0.0.1:$PORT"
$CLI_SECURITY
EOF

online() {
    flwr supernode ls local-deployment --format json 2>/dev/null |
        python -c 'import json, sys; print(sum(n["status"] == "online" for n in json.load(sys.stdin)["nodes"]))' 2>/dev/null ||
        echo 0
}
for _ in $(seq 120); do [ "$(online)" -ge "$N" ] && break; sleep 1; done
echo "SuperLink 127.0.0.1:$PORT, $(online)/$N SuperNodes online"

flwr run "$APP" local-deployment --stream \
    --run-config "$RUN_CONFIG min-nodes=$N output-dir='$OUT' run-name='$RUN_NAME'" | tee "$WORK/run.log"

# `flwr run --stream` exits 0 even when the run failed: judge it by its status and results.
RUN_ID=$(sed -n 's/.*started run \([0-9]*\).*/\1/p' "$WORK/run.log" | head -n 1)
STATUS=$(flwr ls local-deployment --run-id "$RUN_ID" --format json |
         python -c 'import json, sys; print(json.load(sys.stdin)["runs"][0]["status"])')
echo "run $RUN_ID: $STATUS; results in $OUT/$RUN_NAME"
[ "$STATUS" = "finished:completed" ] && [ -f "$OUT/$RUN_NAME/summary.json" ]
