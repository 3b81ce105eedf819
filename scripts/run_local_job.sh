#!/usr/bin/env bash
# The main job on its embedded default, as a user runs it on a cluster, but on this machine:
# start a local Ray cluster, submit jobs/sweep.py with `ray job submit`, stop Ray at the end
# whatever the outcome. Extra arguments go to jobs/sweep.py (e.g. --set descendants.seeds=[0]).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source .venv/bin/activate
export RAY_USAGE_STATS_ENABLED=0
PORT=${MMLG_RAY_PORT:-6390}
DASH=${MMLG_DASHBOARD_PORT:-8266}
OUT=${MMLG_OUTPUT:-$ROOT/runs/local}
started=0
cleanup() { if [ "$started" = 1 ]; then echo "stopping the local Ray cluster"; ray stop --force >/dev/null 2>&1 || true; fi; }
trap cleanup EXIT INT TERM
echo "starting a local Ray cluster (head on port $PORT, dashboard on 127.0.0.1:$DASH)"
start_head() { ray start --head --port="$PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASH" --disable-usage-stats >/dev/null; }
started=1
if ! start_head; then   # a cluster stopped a moment ago can hold its ports briefly: retry once
  sleep 10; ray stop --force >/dev/null 2>&1 || true; start_head
fi
t0=$(date +%s)
ray job submit --address "http://127.0.0.1:$DASH" --working-dir . \
  --runtime-env-json '{"excludes": ["runs/", ".venv/", ".git/", "**/__pycache__/"], "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}}' \
  -- python jobs/sweep.py --config configs/local.yaml --output "$OUT" "$@"
echo "job finished in $(( $(date +%s) - t0 )) s; results in $OUT"
