#!/usr/bin/env bash
# Builds the test bed's binaries (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, testbed) from Go modules into a cache folder outside the
# checkout:
#
#   ${STOKER_CACHE:-$HOME/.cache/stoker}/testbed/<k8s>-<etcd>-<hash>/bin
#
# <hash> covers go.mod, go.sum, this script and every file under cmd/, so any
# change to what goes into the binaries gives a new folder. When all binaries
# are already there the script only prints the folder (no go command runs).
# The last line of output is always the bin folder.
#
# Environment:
#   STOKER_CACHE        cache root (default $HOME/.cache/stoker)
#   TESTBED_GO_PARALLEL go build -p (default 1: the machine is shared)
#   TESTBED_NICE        nice level for the go commands (default 19)
#   TESTBED_KEEP_BUILDS how many builds to keep in the cache root (default 3)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"

binaries=(etcd kube-apiserver kube-controller-manager kube-scheduler testbed)

k8s_version="$(awk '$1 == "k8s.io/kubernetes" && $2 ~ /^v/ { print $2; exit }' go.mod)"
etcd_version="$(awk '$1 == "go.etcd.io/etcd/server/v3" && $2 ~ /^v/ { print $2; exit }' go.mod)"
if [[ -z "$k8s_version" || -z "$etcd_version" ]]; then
  echo "build.sh: cannot read k8s.io/kubernetes / go.etcd.io/etcd/server/v3 versions from go.mod" >&2
  exit 1
fi

hash="$(
  {
    sha256sum go.mod go.sum build.sh
    find cmd -type f | LC_ALL=C sort | xargs sha256sum
  } | sha256sum | cut -c1-12
)"

root="${STOKER_CACHE:-$HOME/.cache/stoker}/testbed"
dir="$root/${k8s_version}-${etcd_version}-${hash}"
bin="$dir/bin"

have_all() {
  local b
  for b in "${binaries[@]}"; do
    [[ -x "$bin/$b" ]] || return 1
  done
}

if have_all; then
  echo "$bin"
  exit 0
fi

mkdir -p "$root"
# One build at a time per cache root; a second caller waits and then finds the
# binaries there.
exec 9>"$root/.build.lock"
flock 9
if have_all; then
  echo "$bin"
  exit 0
fi

command -v go >/dev/null || { echo "build.sh: go is not installed" >&2; exit 1; }

# k8s.io/kubernetes' hack/lib/version.sh sets these in both packages.
k8s_minor="${k8s_version#v1.}"
k8s_minor="${k8s_minor%%.*}"
build_date="$(go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}}' k8s.io/kubernetes 2>/dev/null || echo 1970-01-01T00:00:00Z)"
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags+=" -X ${pkg}.gitVersion=${k8s_version}"
  ldflags+=" -X ${pkg}.gitMajor=1"
  ldflags+=" -X ${pkg}.gitMinor=${k8s_minor}"
  ldflags+=" -X ${pkg}.gitTreeState=clean"
  ldflags+=" -X ${pkg}.buildDate=${build_date}"
done

tmp="$dir/bin.tmp.$$"
rm -rf "$tmp"
mkdir -p "$tmp"
trap 'rm -rf "$tmp"' EXIT

echo "build.sh: building k8s ${k8s_version} + etcd ${etcd_version} into $bin (cold: tens of minutes)" >&2
start=$(date +%s)
export CGO_ENABLED=0
export GOFLAGS="-p=${TESTBED_GO_PARALLEL:-1} -mod=readonly -buildvcs=false"
nice -n "${TESTBED_NICE:-19}" go build -trimpath -ldflags "$ldflags" -o "$tmp/" ./cmd/...
for b in "${binaries[@]}"; do
  [[ -x "$tmp/$b" ]] || { echo "build.sh: $b was not built" >&2; exit 1; }
done
{
  echo "k8s=${k8s_version}"
  echo "etcd=${etcd_version}"
  echo "hash=${hash}"
  echo "go=$(go env GOVERSION)"
  echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "seconds=$(( $(date +%s) - start ))"
} >"$tmp/BUILD-INFO"
rm -rf "$bin"
mv "$tmp" "$bin"
trap - EXIT
# Keep the ${TESTBED_KEEP_BUILDS:-3} newest builds (about 330 MB each).
ls -1dt "$root"/v*-v*-*/ 2>/dev/null | tail -n +"$(( ${TESTBED_KEEP_BUILDS:-3} + 1 ))" | while read -r old; do
  [[ "${old%/}" == "$dir" ]] || rm -rf "${old%/}"
done
echo "build.sh: built in $(( $(date +%s) - start ))s" >&2
echo "$bin"
