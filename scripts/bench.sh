#!/usr/bin/env bash
# Run the benchmark suite (bench/run.py): fh-tasks side by side with its peers, in one run on this machine.
# Usage: PY=.venv/bin/python bash scripts/bench.sh [--quick] [bench/run.py options]
# Redis: 127.0.0.1:6379 when it answers, else bench/run.py starts a private redis-server on a free port.
set -euo pipefail
PY=${PY:-.venv/bin/python}
cd "$(dirname "$0")/.."
for tool in wrk; do
  if ! command -v "$tool" >/dev/null; then
    echo "bench: '$tool' is missing (Debian: apt-get install wrk)" >&2
    exit 2
  fi
done
exec "$PY" -m bench.run "$@"
