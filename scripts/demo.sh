#!/usr/bin/env bash
# The main job: start `pie-trio serve` with the embedded default model, run the built-in
# text-completion inferlet against it (its tokens stream to this terminal as they are made),
# then stop the server with SIGTERM, which drains it gracefully.
# Usage: scripts/demo.sh ["PROMPT"] [MAX_TOKENS]      (after scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPT="${1:-Write a short story about a robot who learns to paint.}"
MAX_TOKENS="${2:-96}"
PORT="${PIE_TRIO_DEMO_PORT:-8080}"
BIN="${PIE_TRIO_BIN:-.venv/bin/pie-trio}"
LOG="$(mktemp -t pie-trio-demo.XXXXXX.log)"

"$BIN" serve --http-port "$PORT" --tcp-port off >"$LOG" 2>&1 &
SERVER=$!
stop_server() { kill -TERM "$SERVER" 2>/dev/null && wait "$SERVER" || true; }
trap stop_server EXIT

echo "demo: starting pie-trio serve on port $PORT (log: $LOG)" >&2
for _ in $(seq 1 300); do
    if grep -q "pie-trio serving" "$LOG"; then break; fi
    if ! kill -0 "$SERVER" 2>/dev/null; then cat "$LOG" >&2; exit 1; fi
    sleep 0.2
done
grep "pie-trio serving" "$LOG" >&2

echo "demo: streaming from the text-completion inferlet" >&2
"$BIN" run text-completion --server "ws://127.0.0.1:$PORT/ws" -- \
    --chat --prompt "$PROMPT" --max-tokens "$MAX_TOKENS"
echo
