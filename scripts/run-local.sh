#!/usr/bin/env bash
# Starts the whole llorch stack on this machine: tokenizer, engine and gateway as three
# processes on 127.0.0.1, with the model in $LLORCH_MODEL (default: models/default, which ships
# with the repo). Prints a ready-to-paste curl once the gateway is healthy. Ctrl-C stops all
# three (each drains and exits 0).
#
# Environment (all optional): LLORCH_MODEL, LLORCH_TOKENIZER_PORT (50051),
# LLORCH_ENGINE_PORT (50052), LLORCH_GATEWAY_PORT (8080), LLORCH_THREADS (0 = all cores),
# RUST_LOG (info).
set -euo pipefail
cd "$(dirname "$0")/.."

model=${LLORCH_MODEL:-models/default}
tok_port=${LLORCH_TOKENIZER_PORT:-50051}
eng_port=${LLORCH_ENGINE_PORT:-50052}
gw_port=${LLORCH_GATEWAY_PORT:-8080}
threads=${LLORCH_THREADS:-0}

echo "run: building release binaries (first time: a few minutes)" >&2
cargo build --release --locked -p llorch-tokenizer -p llorch-engine -p llorch-gateway >&2
bin=target/release

pids=()
stop() {
    trap - INT TERM EXIT
    if [ "${#pids[@]}" -gt 0 ]; then
        echo "run: stopping" >&2
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
}
trap 'stop; exit 0' INT TERM
trap stop EXIT

"$bin/llorch-tokenizer" serve --model "$model" --port "$tok_port" &
pids+=($!)
"$bin/llorch-engine" serve --model "$model" --port "$eng_port" --threads "$threads" &
pids+=($!)
"$bin/llorch-gateway" --port "$gw_port" \
    --tokenizer-url "http://127.0.0.1:$tok_port" --engine-url "http://127.0.0.1:$eng_port" &
pids+=($!)

for _ in $(seq 1 600); do
    if health=$(curl -fsS "http://127.0.0.1:$gw_port/health" 2>/dev/null); then
        # The served name (`llorch_model_name` in config.json, else the folder's name).
        name=$(printf '%s' "$health" | sed -n 's/.*"model":"\([^"]*\)".*/\1/p')
        cat <<MSG

llorch is ready: gateway http://127.0.0.1:$gw_port serving ${name:-?} from $model. Try:

  curl -N http://127.0.0.1:$gw_port/execute -H 'content-type: application/json' \\
    -d '{"job_id":"demo-1","prompt":"And God said,","max_tokens":48,"temperature":0.7,"top_p":0.9,"repetition_penalty":1.2}'

Ctrl-C stops all three services.
MSG
        wait -n "${pids[@]}" || true
        echo "run: a service exited; stopping the others" >&2
        exit 1
    fi
    for pid in "${pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "run: a service failed to start" >&2; exit 1; }
    done
    sleep 0.1
done
echo "run: the gateway did not become healthy within 60 s" >&2
exit 1
