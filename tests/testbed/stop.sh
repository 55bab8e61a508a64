#!/usr/bin/env bash
# Stops the test bed running in RUNDIR (started by start.sh) using the pid
# files in RUNDIR/pids: the supervisor first (it stops its children in order),
# then anything left over. Leaves RUNDIR in place; --clean removes it too.
#
#   stop.sh [--clean] RUNDIR
set -euo pipefail

clean=0
rundir=""
for a in "$@"; do
  case "$a" in
    --clean) clean=1 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) rundir="$a" ;;
  esac
done
[[ -n "$rundir" && -d "$rundir" ]] || { echo "usage: stop.sh [--clean] RUNDIR" >&2; exit 2; }
rundir="$(cd "$rundir" && pwd)"

# Is pid running (a zombie is not: it is only waiting for its parent to reap it)?
alive() {
  local state
  state="$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null || true)"
  [[ -n "$state" && "$state" != Z ]]
}

# Is pid running and one of ours (binary named like its pid file)?
ours() {
  local pid="$1" name="$2" exe
  alive "$pid" || return 1
  exe="$(readlink "/proc/$pid/exe" 2>/dev/null || true)"
  exe="${exe% (deleted)}"
  [[ "$(basename "$exe")" == "$name" ]]
}

wait_gone() {
  local pid="$1" secs="$2" i
  for (( i = 0; i < secs * 10; i++ )); do
    alive "$pid" || return 0
    sleep 0.1
  done
  return 1
}

stop_pidfile() {
  local file="$1" grace="$2" name pid
  [[ -f "$file" ]] || return 0
  name="$(basename "$file" .pid)"
  pid="$(cat "$file" 2>/dev/null || true)"
  if [[ "$pid" =~ ^[0-9]+$ ]] && ours "$pid" "$name"; then
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$grace"; then
      echo "stop.sh: $name (pid $pid) still running after ${grace}s, killing it" >&2
      kill -KILL "$pid" 2>/dev/null || true
      wait_gone "$pid" 5 || true
    fi
  fi
  rm -f "$file"
}

# The supervisor stops its children itself (up to 15s each).
stop_pidfile "$rundir/pids/testbed.pid" 70
# Left-overs, e.g. when the supervisor was killed with SIGKILL (its children
# get SIGKILL from the kernel then, but be sure), in reverse start order.
for name in kube-scheduler kube-controller-manager kube-apiserver etcd; do
  stop_pidfile "$rundir/pids/$name.pid" 15
done
rm -f "$rundir/env"
if [[ $clean == 1 ]]; then
  rm -rf "$rundir"
fi
echo "stopped: $rundir"
