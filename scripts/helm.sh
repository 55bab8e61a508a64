#!/usr/bin/env bash
# Builds `helm` from its Go module (helm.sh/helm/v3) into a cache folder outside the checkout and
# prints the binary's path as the last line of output:
#
#   ${STOKER_CACHE:-$HOME/.cache/stoker}/helm/<version>/helm
#
# When the binary is already there no go command runs. Used by scripts/setup.sh (once, for
# `make test`) and by tests/e2e/test_helm.py.
#
# Environment:
#   STOKER_CACHE     cache root (default $HOME/.cache/stoker)
#   HELM_VERSION     the helm v3 release to build (default below)
#   HELM_GO_PARALLEL go build -p (default 1: the machine is shared)
set -euo pipefail

version="${HELM_VERSION:-v3.22.0}"
dir="${STOKER_CACHE:-$HOME/.cache/stoker}/helm/$version"
bin="$dir/helm"

if [[ -x "$bin" ]]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$dir"
# One build at a time per version; a second caller waits and then finds the binary.
exec 9>"$dir/.build.lock"
flock 9
if [[ -x "$bin" ]]; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "helm.sh: go is not installed" >&2; exit 1; }

# helm's own Makefile stamps its version the same way (`helm version` prints it).
ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$version"
tmp="$dir/bin.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT
echo "helm.sh: building helm $version from its Go module into $dir" >&2
start=$SECONDS
GOBIN="$tmp" CGO_ENABLED=0 nice -n "${HELM_NICE:-10}" \
  go install -p "${HELM_GO_PARALLEL:-1}" -trimpath -ldflags "$ldflags" "helm.sh/helm/v3/cmd/helm@$version" >&2
mv "$tmp/helm" "$bin"
echo "helm.sh: built in $((SECONDS - start)) s" >&2
"$bin" version --short >&2
echo "$bin"
