#!/usr/bin/env bash
# The container path, end to end (scripts/test.sh runs it after the tests): from a clean clone of
# this checkout's HEAD, build the image with scripts/container.sh, run it with the HTTP port
# published, ask /v1/completions for a greedy answer that must name Paris, and stop the container:
# `podman stop` must exit 0 within 5 s and the server itself must exit 0 (it handles SIGTERM as
# PID 1). Prints one verdict line; exits non-zero on any failure. It exits 0 with a SKIP line only
# when podman cannot run here at all (not installed, or `podman info` fails).
# Usage: scripts/container_check.sh
# Environment: CONTAINERS_CONF (podman's configuration; when unset, the check writes one that
# keeps the containers' ulimits within this host's own), CONTAINER_CHECK_KEEP_IMAGE=1 (keep the
# image afterwards; by default it is removed, the cached base image stays).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
IMAGE=localhost/pie-trio-check:latest
NAME="pie-trio-check-$$"
STOP_LIMIT_S=5
HEALTH_LIMIT_S=300

skip() {
    echo "container check: SKIP ($1)"
    exit 0
}

fail() {
    echo "container check: FAIL ($1)"
    exit 1
}

require_podman() {
    local tool
    for tool in podman mmdebstrap git python3; do
        command -v "$tool" >/dev/null || skip "$tool is not installed; as root, scripts/setup.sh \
installs podman, buildah, mmdebstrap and runc"
    done
    local why
    why=$(podman info 2>&1 >/dev/null) || skip "podman cannot run here: ${why##*$'\n'}"
}

# Podman's default ulimits (nofile 1048576) exceed the hard limits of many sandboxed hosts, and
# runc refuses to raise a limit, so the container would not start: keep them within this
# process's own hard limits. A process limit above pid_max is refused as well.
write_containers_conf() {
    local nofile nproc pid_max
    nofile=$(ulimit -Hn); nproc=$(ulimit -Hu); pid_max=$(cat /proc/sys/kernel/pid_max)
    [ "$nofile" = unlimited ] && nofile=65536
    if [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; then nproc=$pid_max; fi
    cat >"$1" <<EOF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
runtime = "runc"
EOF
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); \
print(s.getsockname()[1])'
}

wait_for_health() {
    local url=$1 waited=0
    until python3 -c "import urllib.request as u; u.urlopen('$url', timeout=2)" 2>/dev/null; do
        [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" = true ] \
            || { podman logs "$NAME" | tail -20; fail "the server exited before /health answered"; }
        [ "$waited" -lt "$HEALTH_LIMIT_S" ] \
            || { podman logs "$NAME" | tail -20; fail "no /health after ${HEALTH_LIMIT_S} s"; }
        sleep 1; waited=$((waited + 1))
    done
}

# Prints the text of a greedy completion of "The capital of France is" (8 tokens).
greedy_completion() {
    python3 - "$1" <<'EOF'
import json, sys, urllib.request
body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
request = urllib.request.Request(sys.argv[1], data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
with urllib.request.urlopen(request, timeout=120) as response:
    print(json.load(response)["choices"][0]["text"])
EOF
}

# A second container of the same image, both behind HAProxy with deploy/haproxy.cfg (rendered
# by scripts/replicas.py): a completion through the balancer, then the second container stopped
# and another completion, which the first must serve. Prints what it saw.
two_containers_behind_haproxy() {
    local http2 tcp2 lb_http lb_tcp balancer text
    http2=$(free_port); tcp2=$(free_port); lb_http=$(free_port); lb_tcp=$(free_port)
    podman run -d --name "$NAME-2" -p "127.0.0.1:$http2:8080" -p "127.0.0.1:$tcp2:8081" \
        "$IMAGE" >/dev/null
    NAME="$NAME-2" wait_for_health "http://127.0.0.1:$http2/health" >&2
    PYTHONPATH="$ROOT/scripts" python3 -c "$RENDER_CONFIG" "$WORK/haproxy.cfg" "$lb_http" \
        "$lb_tcp" "$port" "$tcp_port" "$http2" "$tcp2"
    haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
    balancer=$!
    NAME="$NAME-2" wait_for_health "http://127.0.0.1:$lb_http/health" >&2
    text=$(greedy_completion "http://127.0.0.1:$lb_http/v1/completions") \
        || { kill "$balancer"; echo "no answer through the balancer"; return 1; }
    [[ "$text" == *Paris* ]] || { kill "$balancer"; echo "answer ${text@Q}"; return 1; }
    podman stop -t 10 "$NAME-2" >/dev/null
    sleep 2  # two failed health checks, 500 ms apart, take it out of rotation
    text=$(greedy_completion "http://127.0.0.1:$lb_http/v1/completions") \
        || { kill "$balancer"; echo "no answer once one container stopped"; return 1; }
    kill "$balancer"; wait "$balancer" 2>/dev/null || true
    [[ "$text" == *Paris* ]] || { echo "answer ${text@Q} once one container stopped"; return 1; }
    echo "two containers behind HAProxy answered, and one alone once the other stopped"
}

# deploy/haproxy.cfg for the two containers: OUT LB_HTTP LB_TCP HTTP1 TCP1 HTTP2 TCP2.
RENDER_CONFIG='
import sys
from pathlib import Path
from replicas import TEMPLATE, Replica, render_config
out, lb_http, lb_tcp, *ports = sys.argv[1:]
replicas = [Replica(f"c{i + 1}", None, f"http://127.0.0.1:{ports[2 * i]}",
                    f"tcp://127.0.0.1:{ports[2 * i + 1]}", Path("/dev/null")) for i in range(2)]
Path(out).write_text(render_config(TEMPLATE.read_text(), replicas, f"127.0.0.1:{lb_http}",
                                   f"127.0.0.1:{lb_tcp}"))
'

cleanup() {
    podman rm -f -i "$NAME-2" >/dev/null 2>&1 || true
    podman rm -f -i "$NAME" >/dev/null 2>&1 || true
    [ "${CONTAINER_CHECK_KEEP_IMAGE:-0}" = 1 ] || podman rmi -f "$IMAGE" >/dev/null 2>&1 || true
    rm -rf "$WORK"
}

require_podman
WORK=$(mktemp -d)
trap cleanup EXIT
if [ -z "${CONTAINERS_CONF:-}" ]; then
    write_containers_conf "$WORK/containers.conf"
    export CONTAINERS_CONF="$WORK/containers.conf"
fi
# The clone has no virtual environment: its wheels are collected with this checkout's pip.
if [ -x "$ROOT/.venv/bin/python" ]; then export PYTHON="$ROOT/.venv/bin/python"; fi

# A clone, so that only committed files reach the image.
git clone -q "$ROOT" "$WORK/src"
commit=$(git -C "$WORK/src" rev-parse --short HEAD)
started=$SECONDS
"$WORK/src/scripts/container.sh" "$IMAGE" || fail "the image did not build from $commit"
build_s=$((SECONDS - started))

port=$(free_port); tcp_port=$(free_port)
podman run -d --name "$NAME" -p "127.0.0.1:$port:8080" -p "127.0.0.1:$tcp_port:8081" \
    "$IMAGE" >/dev/null
started=$SECONDS
wait_for_health "http://127.0.0.1:$port/health"
health_s=$((SECONDS - started))

text=$(greedy_completion "http://127.0.0.1:$port/v1/completions") \
    || fail "/v1/completions did not answer"
[[ "$text" == *Paris* ]] || fail "the greedy completion does not name Paris: ${text@Q}"

if command -v haproxy >/dev/null; then
    balanced=$(two_containers_behind_haproxy) || fail "two containers behind HAProxy: $balanced"
else
    balanced="HAProxy is not installed: the two-container step was skipped"
fi

stop_started=$(date +%s.%N)
podman stop -t 10 "$NAME" >/dev/null || fail "podman stop exited non-zero"
stop_s=$(python3 -c "print(f'{$(date +%s.%N) - $stop_started:.1f}')")
exit_code=$(podman inspect -f '{{.State.ExitCode}}' "$NAME")
python3 -c "raise SystemExit($stop_s > $STOP_LIMIT_S)" \
    || fail "podman stop took $stop_s s (limit $STOP_LIMIT_S s)"
[ "$exit_code" = 0 ] || fail "the server exited with $exit_code under podman stop"
echo "container check: PASS ($commit: built in ${build_s} s, /health after ${health_s} s," \
    "greedy completion ${text@Q}, podman stop ${stop_s} s with exit 0; $balanced)"
