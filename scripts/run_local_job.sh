#!/usr/bin/env bash
# The main job on its embedded default, as a user runs it on a cluster, but on this machine:
# start a local Ray cluster of its own, submit jobs/sweep.py with `ray job submit`, and stop that
# cluster at the end whatever the outcome. Extra arguments go to jobs/sweep.py (e.g. --set descendants.seeds=[0]).
#
# Only the cluster started here is stopped, never another Ray instance on this machine (`ray stop`
# would stop them all, other users' too). Its head runs under `ray start --block` in the background:
# a SIGTERM to that one process makes Ray stop exactly the processes of its node (and they die
# with it if it is killed outright). Its own --temp-dir keeps its session files and address file
# apart from any other Ray here.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source "${MMLG_VENV:-$ROOT/.venv}/bin/activate"
export RAY_USAGE_STATS_ENABLED=0
PORT=${MMLG_RAY_PORT:-6390}
DASH=${MMLG_DASHBOARD_PORT:-8266}
# the dashboard agent's HTTP port (Ray's default 52365 is taken by any other Ray instance here, a test
# session's included, and then `ray job submit` fails with "No available agent to submit job")
AGENT=${MMLG_AGENT_PORT:-$((DASH + 1))}
OUT=${MMLG_OUTPUT:-$ROOT/runs/local}
RAY_TMP=$(mktemp -d /tmp/mmlg_ray.XXXXXX)   # short: Ray's socket paths live under it
head_pid=

stop_head() {
  [ -n "$head_pid" ] || return 0
  echo "stopping the local Ray cluster (pid $head_pid)"
  kill -TERM "$head_pid" 2>/dev/null || true
  wait "$head_pid" 2>/dev/null || true
  head_pid=
}
cleanup() {
  local rc=$?
  stop_head
  if [ "$rc" = 0 ]; then rm -rf "$RAY_TMP"; else echo "Ray's logs are kept in $RAY_TMP" >&2; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_head() {  # returns once the head is up (as `ray start` without --block would), 1 if it died
  RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0 PYTHONUNBUFFERED=1 ray start --head --block --temp-dir="$RAY_TMP" \
    --port="$PORT" --dashboard-host=127.0.0.1 --dashboard-port="$DASH" \
    --dashboard-agent-listen-port="$AGENT" --disable-usage-stats \
    >"$RAY_TMP/head.log" 2>&1 &
  head_pid=$!
  for _ in $(seq 240); do
    if grep -q "Ray runtime started" "$RAY_TMP/head.log" 2>/dev/null; then return 0; fi
    if ! kill -0 "$head_pid" 2>/dev/null; then
      wait "$head_pid" 2>/dev/null || true
      head_pid=
      tail -n 5 "$RAY_TMP/head.log" >&2
      return 1
    fi
    sleep 0.5
  done
  echo "the local Ray head did not start within 120 s" >&2
  stop_head
  return 1
}

wait_dashboard() {  # `ray job submit` talks to the dashboard, which answers seconds after "Ray runtime started"
  for _ in $(seq 240); do
    if python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$DASH/api/version', timeout=2)" \
        2>/dev/null; then return 0; fi
    sleep 0.5
  done
  echo "the local Ray dashboard did not answer on 127.0.0.1:$DASH within 120 s" >&2
  return 1
}

echo "starting a local Ray cluster (head on port $PORT, dashboard on 127.0.0.1:$DASH, files in $RAY_TMP)"
if ! start_head; then   # a cluster stopped a moment ago can hold its ports briefly: retry once
  sleep 10; start_head
fi
wait_dashboard
t0=$(date +%s)
ray job submit --address "http://127.0.0.1:$DASH" --working-dir . \
  --runtime-env-json '{"excludes": ["runs/", ".venv/", ".git/", "**/__pycache__/"], "env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}}' \
  -- python jobs/sweep.py --config configs/local.yaml --output "$OUT" "$@"
echo "job finished in $(( $(date +%s) - t0 )) s; results in $OUT"
