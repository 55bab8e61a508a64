#!/usr/bin/env bash
# Installs and builds everything stoker's demo and tests need, on a machine that has Rust, Java 17
# with Maven and Python 3.11 (and nothing of this project). Expensive results are cached outside
# the checkout, keyed by version, so a second run costs seconds:
#   $STOKER_CACHE (default ~/.cache/stoker)/venv-pyspark-<version>   Python venv with pyspark, pytest
#   ~/.m2                                                             Maven's dependency cache
# Outputs: target/debug/stoker and spark-plugin/target/stoker-spark-plugin.jar.
set -euo pipefail

SPARK_VERSION=4.2.0
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${STOKER_CACHE:-$HOME/.cache/stoker}"
VENV="$CACHE/venv-pyspark-$SPARK_VERSION"
mkdir -p "$CACHE"

log() { printf '[setup] %s\n' "$*" >&2; }

# 1. Python venv with the full Spark (the pyspark wheel ships Spark's jars) and pytest.
if [[ ! -f "$VENV/.complete" ]]; then
  log "creating $VENV (pyspark $SPARK_VERSION, about 450 MB)"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "pyspark==$SPARK_VERSION" "pytest>=8,<9"
  "$VENV/bin/python" -c "import pyspark; assert pyspark.__version__ == '$SPARK_VERSION', pyspark.__version__"
  touch "$VENV/.complete"
else
  log "venv ok: $VENV"
fi

# 2. The stoker server (one shared target/ for the demo and the tests).
log "building stoker (cargo build)"
(cd "$ROOT" && cargo build --locked --bins --quiet)

# 3. The Spark plugin: one shaded jar.
JAR="$ROOT/spark-plugin/target/stoker-spark-plugin.jar"
log "building the Spark plugin (maven)"
(cd "$ROOT/spark-plugin" && mvn -B -q -DskipTests package)
[[ -f "$JAR" ]] || { log "plugin jar missing: $JAR"; exit 1; }

log "ready: $ROOT/target/debug/stoker, $JAR, $VENV"
