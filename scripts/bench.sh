#!/usr/bin/env bash
# Benchmarks: stoker against Spark's built-in Kubernetes backend on the same test bed and machine,
# plus stoker's control-plane throughput and memory. Prints markdown tables; saves them and the
# raw samples under bench-results/<UTC time>/ (ignored by git). Asserts nothing about timings.
#   scripts/bench.sh [--quick]      (make bench / make bench-quick)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${STOKER_CACHE:-$HOME/.cache/stoker}"
VENV="$CACHE/venv-pyspark-4.2.0"
QUICK=()
[[ "${1:-}" == "--quick" ]] && QUICK=(--quick)
OUT="$ROOT/bench-results/$(date -u +%Y%m%dT%H%M%SZ)${QUICK:+-quick}"
mkdir -p "$OUT"

"$ROOT/scripts/setup.sh"
echo "[bench] building release binaries (stoker, stoker-bench, process-kubelet)" >&2
(cd "$ROOT" && cargo build --locked --release -p stoker -p stoker-bench -p stoker-testbed-kubelet --bins --quiet)

echo "[bench] control plane and memory (stoker-bench)" >&2
"$ROOT/target/release/stoker-bench" --out "$OUT" "${QUICK[@]}"

echo "[bench] Kubernetes: stoker vs Spark's built-in backend" >&2
# The release kubelet: the debug one takes ~10x the CPU the test bed shares with both systems.
STOKER_KUBELET_BIN="$ROOT/target/release/process-kubelet" \
  STOKER_PLUGIN_JAR="$ROOT/spark-plugin/target/stoker-spark-plugin.jar" \
  "$VENV/bin/python" "$ROOT/tests/bench/bench_k8s.py" --out "$OUT" "${QUICK[@]}"

cat "$OUT"/k8s.md "$OUT"/rpc.md > "$OUT/results.md"
echo "[bench] results: $OUT/results.md" >&2
