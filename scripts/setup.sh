#!/usr/bin/env bash
# Installs and builds everything stoker's demo and tests need, on a machine that has Rust, Java 17
# with Maven, Python 3.11, Go and kubectl (and nothing of this project). Expensive results are
# cached outside the checkout, keyed by version, so a second run costs seconds:
#   $STOKER_CACHE (default ~/.cache/stoker)/venv-pyspark-<version>   Python venv with pyspark, pytest
#   ~/.m2                                                             Maven's dependency cache
#   $STOKER_CACHE/testbed/<versions>-<hash>/bin                       Kubernetes test bed binaries
#   (and Go's module and build caches, `go env GOMODCACHE GOCACHE`)
# Outputs: target/debug/stoker, target/debug/process-kubelet and
# spark-plugin/target/stoker-spark-plugin.jar.
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
# The tests' raw gRPC client (tests/e2e/grpc_client.py: a caller that is not the plugin, such as
# another team's driver or an attacker), in the same venv; its own marker so that an existing
# venv gains it.
GRPC_VERSION=1.76.0
if [[ ! -f "$VENV/.grpc-$GRPC_VERSION" ]]; then
  log "installing grpcio $GRPC_VERSION into $VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "grpcio==$GRPC_VERSION" "grpcio-tools==$GRPC_VERSION"
  touch "$VENV/.grpc-$GRPC_VERSION"
fi
# The Spark Connect Python client (tests/e2e/test_start_modes.py): pyspark 4.2.0's `connect`
# extra (pandas >= 2.2 and < 3, pyarrow >= 18, grpcio-status matching grpcio,
# googleapis-common-protos >= 1.71, zstandard >= 0.25), pinned; its own marker, as above.
CONNECT_PINS=("pandas==2.3.3" "numpy==2.3.5" "pyarrow==22.0.0" "grpcio-status==$GRPC_VERSION"
  "googleapis-common-protos==1.72.0" "zstandard==0.25.0")
CONNECT_MARK="$VENV/.connect-$(printf '%s\n' "${CONNECT_PINS[@]}" | sha256sum | cut -c1-12)"
if [[ ! -f "$CONNECT_MARK" ]]; then
  log "installing the Spark Connect client packages into $VENV: ${CONNECT_PINS[*]}"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${CONNECT_PINS[@]}"
  "$VENV/bin/python" -c "import pyspark.sql.connect.utils as u, pyspark.sql.pandas.utils as p
for check in (p.require_minimum_pandas_version, p.require_minimum_pyarrow_version, u.require_minimum_grpc_version,
              u.require_minimum_grpcio_status_version, u.require_minimum_googleapis_common_protos_version,
              u.require_minimum_zstandard_version):
    check()"
  touch "$CONNECT_MARK"
fi

# 2. Every binary of the workspace (one shared target/ for the demo and the tests): the stoker
#    server and the test bed's process kubelet (target/debug/process-kubelet).
log "building the workspace binaries (cargo build)"
(cd "$ROOT" && cargo build --locked --workspace --bins --quiet)

# 3. The Spark plugin: one shaded jar.
JAR="$ROOT/spark-plugin/target/stoker-spark-plugin.jar"
log "building the Spark plugin (maven)"
(cd "$ROOT/spark-plugin" && mvn -B -q -DskipTests package)
[[ -f "$JAR" ]] || { log "plugin jar missing: $JAR"; exit 1; }

# 4. The Kubernetes test bed: etcd, kube-apiserver, kube-controller-manager, kube-scheduler built
#    from their Go modules (needs Go). Cached under $CACHE/testbed/<versions>-<hash>/bin: a cold
#    build takes about 13 minutes on 2 cores, later runs only print the folder.
if [[ "${STOKER_SETUP_TESTBED:-1}" == "0" ]]; then
  # `make demo` runs on the local backend only and skips this one-time build.
  log "skipping the Kubernetes test bed (STOKER_SETUP_TESTBED=0)"
  TESTBED_BIN="(not built)"
else
  log "building the Kubernetes test bed (tests/testbed/build.sh; cached)"
  # The set-up runs its builds one after another, so the Go build may use every core
  # (build.sh's own default is one, for machines shared with other builds).
  TESTBED_BIN="$(TESTBED_GO_PARALLEL="${TESTBED_GO_PARALLEL:-$(nproc)}" STOKER_CACHE="$CACHE" \
    "$ROOT/tests/testbed/build.sh" | tail -n 1)"
  [[ -x "$TESTBED_BIN/kube-apiserver" ]] || { log "test bed binaries missing in $TESTBED_BIN"; exit 1; }
fi

# 4b. helm, for the Helm chart's tests (tests/e2e/test_helm.py): built from its Go module by
#     scripts/helm.sh into $CACHE/helm/<version>/helm (a cold build takes a few minutes on 2
#     cores; later runs only print the path).
if [[ "${STOKER_SETUP_TESTBED:-1}" != "0" ]]; then
  log "building helm (scripts/helm.sh; cached)"
  HELM_BIN="$(HELM_GO_PARALLEL="${HELM_GO_PARALLEL:-$(nproc)}" STOKER_CACHE="$CACHE" "$ROOT/scripts/helm.sh" | tail -n 1)"
  [[ -x "$HELM_BIN" ]] || { log "helm missing: $HELM_BIN"; exit 1; }
fi

# 5. Container tools for the image test (tests/e2e/test_image.py, `make image`): Debian
#    packages. runc, not crun: crun 1.8 refuses this machine's hybrid cgroup v1/v2 layout. Not for
#    `make demo` (STOKER_SETUP_TESTBED=0), which runs no image.
if [[ "${STOKER_SETUP_TESTBED:-1}" != "0" ]] && { ! command -v buildah >/dev/null || ! command -v podman >/dev/null \
   || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; }; then
  log "installing buildah podman runc debootstrap (apt)"
  SUDO=""
  [[ "$(id -u)" == "0" ]] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    buildah podman runc debootstrap >/dev/null
fi

log "ready: $ROOT/target/debug/stoker, $ROOT/target/debug/process-kubelet, $JAR, $VENV, $TESTBED_BIN"
