#!/usr/bin/env bash
# Starts `stoker serve` on the local backend, runs a real PySpark job with a shuffle through it
# (master spark+stoker://127.0.0.1:PORT), prints the job's result and the executors it used,
# and stops everything.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${STOKER_CACHE:-$HOME/.cache/stoker}"
PY="$CACHE/venv-pyspark-4.2.0/bin/python"
JAR="$ROOT/spark-plugin/target/stoker-spark-plugin.jar"
WORK="$(mktemp -d /tmp/stoker-demo.XXXXXX)"
PORT="${STOKER_DEMO_PORT:-7077}"
METRICS_PORT="${STOKER_DEMO_METRICS_PORT:-9077}"

"$ROOT/target/debug/stoker" serve --listen "127.0.0.1:$PORT" --metrics-listen "127.0.0.1:$METRICS_PORT" \
  --work-dir "$WORK" >"$WORK/stoker.log" 2>&1 &
STOKER_PID=$!
trap 'kill -TERM $STOKER_PID 2>/dev/null; wait $STOKER_PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break
  kill -0 $STOKER_PID 2>/dev/null || { cat "$WORK/stoker.log"; exit 1; }
  sleep 0.1
done
echo "stoker is serving on 127.0.0.1:$PORT (log: $WORK/stoker.log)"

STOKER_PLUGIN_JAR="$JAR" PYSPARK_PYTHON="$PY" "$PY" "$ROOT/tests/e2e/jobs/shuffle.py" "127.0.0.1:$PORT" \
  --executors 2 >"$WORK/driver.out" 2>"$WORK/driver.log" || { tail -50 "$WORK/driver.log"; exit 1; }

"$PY" - "$WORK/driver.out" <<'PYEOF'
import json, sys
events = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
res = next(e for e in events if e["event"] == "result")
r = res["results"][0]
ok = r["count"] == res["expected_count"] and r["sum"] == res["expected_sum"] and r["groups"] == 1000
print(f"job: group-by of {res['expected_count']:,} rows into 1000 keys over 50 partitions")
print(f"result: groups={r['groups']} count={r['count']:,} sum={r['sum']:,} -> {'CORRECT' if ok else 'WRONG'}")
sys.exit(0 if ok else 1)
PYEOF
echo "executors stoker started for the job:"
grep -h "executor process started" "$WORK/stoker.log" | sed -E "s/\x1b\[[0-9;]*m//g" | sed -E 's/.*(app=[^ ]+) (executor=[^ ]+) (pid=[^ ]+).*/  \1 \2 \3/'
