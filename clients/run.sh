#!/usr/bin/env bash
# Starts the three real services (the debug binaries of this build; the engine on the tiny
# test model fixtures/models/tiny, the tokenizer on models/default) on free local ports, runs the Python clients against them (the official `openai` client's tests and
# the gRPC example), then stops them. Needs the venv `.ci/setup --test` makes (.venv-clients)
# and a built workspace (`cargo build --workspace`). Usage: clients/run.sh  (or `make clients`)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LLORCH_CLIENTS_VENV:-.venv-clients}
bin=${CARGO_TARGET_DIR:-target}/debug
for b in llorch-tokenizer llorch-engine llorch-gateway; do
    [ -x "$bin/$b" ] || { echo "clients: $bin/$b missing: run cargo build --workspace" >&2; exit 1; }
done
[ -x "$venv/bin/python" ] || { echo "clients: $venv missing: run .ci/setup --test" >&2; exit 1; }

# Three free ports (bound, read and released; nothing else on this machine races for them).
read -r tok_port eng_port gw_port < <("$venv/bin/python" - <<'PY'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
PY
)
logs=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

"$bin/llorch-tokenizer" serve --model models/default --port "$tok_port" >"$logs/tokenizer.log" 2>&1 &
pids+=($!)
"$bin/llorch-engine" serve --model fixtures/models/tiny --port "$eng_port" --threads 1 >"$logs/engine.log" 2>&1 &
pids+=($!)
"$bin/llorch-gateway" --port "$gw_port" --tokenizer-url "http://127.0.0.1:$tok_port" \
    --engine-url "http://127.0.0.1:$eng_port" >"$logs/gateway.log" 2>&1 &
pids+=($!)

gateway="http://127.0.0.1:$gw_port"
for _ in $(seq 300); do
    curl -fsS "$gateway/health" >/dev/null 2>&1 && break
    sleep 0.1
done
if ! curl -fsS "$gateway/health" >/dev/null; then
    echo "clients: the stack did not become healthy; logs:" >&2
    tail -n 20 "$logs"/*.log >&2
    exit 1
fi

status=0
LLORCH_GATEWAY_URL=$gateway "$venv/bin/python" -m pytest -q -p no:cacheprovider \
    clients/python/test_openai.py || status=1
LLORCH_TOKENIZER_ADDR=127.0.0.1:$tok_port LLORCH_ENGINE_ADDR=127.0.0.1:$eng_port \
    "$venv/bin/python" clients/python/grpc_example.py "Hello." || status=1
if [ "$status" -ne 0 ]; then
    echo "clients: failed; service logs in $logs" >&2
fi
exit "$status"
