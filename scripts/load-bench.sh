#!/usr/bin/env bash
# The load benchmark of docs/serving.md: for each model, start `lacuna serve`, wait until /ready,
# run scripts/load-test.py with one client and then with N clients (each for D seconds), and stop
# the server with SIGTERM (it drains). One JSON line per run on stdout.
#
#   LACUNA=target/release/lacuna scripts/load-bench.sh smollm2-135m runs/smollm2-70-bitmask
#   SERVE_ARGS=--int8-lm-head scripts/load-bench.sh runs/m70-w8a8-bitmask   # flags for every server
set -euo pipefail
cd "$(dirname "$0")/.."
LACUNA=${LACUNA:-target/release/lacuna}
CLIENTS=${CLIENTS:-32}
DURATION=${DURATION:-60}
MAX_TOKENS=${MAX_TOKENS:-64}
PORT=${PORT:-8391}
read -r -a serve_args <<<"${SERVE_ARGS:-}"
for model in "$@"; do
  "$LACUNA" serve --model "$model" --port "$PORT" --max-batch "$CLIENTS" --served-model-name bench "${serve_args[@]}" >&2 &
  server=$!
  for _ in $(seq 300); do
    curl -fs "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
    kill -0 "$server" 2>/dev/null || { echo "lacuna serve exited" >&2; exit 1; }
    sleep 1
  done
  for clients in 1 "$CLIENTS"; do
    result=$(python3 scripts/load-test.py --url "http://127.0.0.1:$PORT" --model bench \
      --clients "$clients" --duration "$DURATION" --max-tokens "$MAX_TOKENS")
    echo "{\"model\": \"$(basename "$model")\", \"result\": $result}"
  done
  kill -TERM "$server"
  wait "$server"
done
