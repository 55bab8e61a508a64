#!/usr/bin/env bash
# Starts the test bed (etcd + kube-apiserver + kube-controller-manager +
# kube-scheduler on 127.0.0.1, free ports) with all state in RUNDIR (default: a
# new temporary folder), builds the binaries first if needed (build.sh).
#
#   start.sh [--foreground] [RUNDIR] [-- testbed up flags...]
#
# Default: the supervisor (bin/testbed) runs detached in the background; this
# script waits until the control plane is ready, prints RUNDIR/env, and prints
# RUNDIR on its last line. Stop it with stop.sh RUNDIR.
# --foreground: runs the supervisor in this shell instead (Ctrl-C stops all).
#
# Environment: TESTBED_START_TIMEOUT (seconds, default 180), plus build.sh's.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
foreground=0
rundir=""
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --foreground) foreground=1; shift ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    -*) echo "start.sh: unknown option $1" >&2; exit 2 ;;
    *) [[ -z "$rundir" ]] || { echo "start.sh: one RUNDIR only" >&2; exit 2; }; rundir="$1"; shift ;;
  esac
done

bin="$("$here/build.sh" | tail -n 1)"
[[ -x "$bin/testbed" ]] || { echo "start.sh: build.sh did not give a bin folder" >&2; exit 1; }

if [[ -z "$rundir" ]]; then
  rundir="$(mktemp -d "${TMPDIR:-/tmp}/stoker-testbed.XXXXXX")"
fi
mkdir -p "$rundir/logs" "$rundir/pids"
rundir="$(cd "$rundir" && pwd)"
timeout="${TESTBED_START_TIMEOUT:-180}"

if [[ $foreground == 1 ]]; then
  exec "$bin/testbed" up --bin-dir "$bin" --timeout "${timeout}s" "${extra[@]}" "$rundir"
fi

# Running (not a zombie) and a testbed binary?
running_testbed() {
  local pid state exe
  pid="$(cat "$1" 2>/dev/null || true)"
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  state="$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null || true)"
  [[ -n "$state" && "$state" != Z ]] || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
  [[ "$(basename "${exe% (deleted)}")" == testbed ]]
}
if running_testbed "$rundir/pids/testbed.pid"; then
  echo "start.sh: a test bed is already running in $rundir (pid $(cat "$rundir/pids/testbed.pid")); stop.sh $rundir first" >&2
  exit 1
fi
rm -f "$rundir/env" "$rundir/pids/testbed.pid"

# Detached: own session, no terminal, output to a log, so it outlives this
# script and never holds a caller's stdout/stderr pipes open.
setsid "$bin/testbed" up --bin-dir "$bin" --timeout "${timeout}s" "${extra[@]}" "$rundir" \
  </dev/null >>"$rundir/logs/testbed.log" 2>&1 &
pid=$!

deadline=$(( $(date +%s) + timeout + 15 ))
while [[ ! -f "$rundir/env" ]]; do
  if ! running_testbed "$rundir/pids/testbed.pid" && ! kill -0 "$pid" 2>/dev/null; then
    echo "start.sh: the test bed failed to start; last lines of $rundir/logs/testbed.log:" >&2
    tail -n 40 "$rundir/logs/testbed.log" >&2 || true
    exit 1
  fi
  if (( $(date +%s) > deadline )); then
    echo "start.sh: the test bed was not ready after ${timeout}s; stopping it" >&2
    kill -TERM "$pid" 2>/dev/null || true
    tail -n 40 "$rundir/logs/testbed.log" >&2 || true
    exit 1
  fi
  sleep 0.2
done
cat "$rundir/env"
echo "$rundir"
