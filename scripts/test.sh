#!/usr/bin/env bash
# Start what the tests need that is not running, then run pytest. Under CI=true, missing servers fail tests.
set -euo pipefail
PY=${PY:-.venv/bin/python}
cleanup=()
trap 'for c in "${cleanup[@]}"; do eval "$c"; done' EXIT

# Redis: use 127.0.0.1:6379 if it answers, else start a private redis-server on a free port.
if [ -z "${FH_TASKS_REDIS_URL:-}" ]; then
  if "$PY" - <<'PY' 2>/dev/null; then export FH_TASKS_REDIS_URL=redis://127.0.0.1:6379/0
import socket; s = socket.create_connection(("127.0.0.1", 6379), 1); s.sendall(b"PING\r\n"); assert s.recv(16).startswith(b"+PONG")
PY
  elif command -v redis-server >/dev/null; then
    port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    dir=$(mktemp -d)
    redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" >/dev/null
    cleanup+=("kill \$(cat $dir/redis.pid) 2>/dev/null; rm -rf $dir")
    export FH_TASKS_REDIS_URL=redis://127.0.0.1:$port/0
    for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
fi

# RabbitMQ for the broker engines' tests: start the machine's server if nothing answers on 5672.
if [ -z "${FH_TASKS_AMQP_URL:-}" ] && ! "$PY" -c 'import socket; socket.create_connection(("127.0.0.1", 5672), 1)' 2>/dev/null \
   && command -v rabbitmq-server >/dev/null; then
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 120); do "$PY" -c 'import socket; socket.create_connection(("127.0.0.1", 5672), 1)' 2>/dev/null && break; sleep 0.5; done
fi

# Chromium for the browser tests (Debian's package; Playwright drives it, never downloads its own).
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 || true
fi

# The dev extra: pytest, and what the docs build (mkdocs, mkdocstrings) and the wheel test (build) need.
"$PY" -c 'import mkdocs, mkdocstrings_handlers.python, build, pytest, xdist' 2>/dev/null || "$PY" -m pip install -q -e '.[dev]'

# Two test processes (pytest-xdist): most tests wait on real servers and processes, so two share two cores well.
# TEST_PROCS=0 runs everything in this process; ARGS (make test ARGS=...) come after and may override it.
"$PY" -m pytest -n "${TEST_PROCS:-2}" "$@"
