#!/usr/bin/env bash
# Builds the image of deploy/Dockerfile on this machine, which reaches no container registry, and
# lets podman start it.
#
#   scripts/image.sh build [--binary PATH | --from-source] [--tag TAG]
#   scripts/image.sh env        prints the exports that point buildah/podman at the private store
#
# The Dockerfile is built as it is, with buildah. Its two FROM images cannot be pulled here, so
# stand-ins are made from Debian 12 packages (apt's mirror) and tagged, in a private store, with
# the very names the Dockerfile uses:
#   gcr.io/distroless/cc-debian12:nonroot  the Debian 12 packages distroless builds that image
#       from (base-files netbase tzdata ca-certificates libc6 libssl3 libgomp1 libstdc++6
#       libgcc-s1 gcc-12-base), unpacked onto a merged /usr, with distroless' passwd, group,
#       nsswitch.conf, /tmp 1777, /home/nonroot, USER 65532, PATH and SSL_CERT_FILE. No shell.
#   rust:<v>-slim-bookworm                 (--from-source only) debootstrap bookworm minbase with
#       ca-certificates gcc libc6-dev, and this machine's Rust <v> (rustup's minimal profile:
#       rustc, cargo, rust-std) under /usr/local/rustup and /usr/local/cargo, as the official
#       image has it.
# --binary PATH (default: target/debug/stoker) replaces the Dockerfile's build stage with an image
# holding that binary as /stoker (`--build-context build=container-image://...`: a named context
# overrides the stage of the same name, in buildah as in BuildKit), so only the runtime stage
# runs: seconds. --from-source runs the build stage as well: `cargo build --release` of stoker
# inside the container (see the README for its time on 2 cores).
#
# Cache ($STOKER_CACHE, default ~/.cache/stoker, /image): the store (storage/) with each stand-in
# tagged by a key (localhost/stoker-stand-in/<name>:<key>). The key hashes the exact .deb files
# apt resolves for it, the Rust toolchain's version and this script's recipe, so a Debian point
# release or another toolchain makes a new stand-in; stand-ins of other keys are removed.
# Needs root and the Debian packages buildah podman runc (and debootstrap for --from-source).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${STOKER_CACHE:-$HOME/.cache/stoker}/image"
DOCKERFILE="$ROOT/deploy/Dockerfile"
MIRROR="${STOKER_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# Bump when a stand-in's recipe below changes: it is part of every key.
RECIPE=2

log() { printf '[image] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

store_env() {
  mkdir -p "$CACHE/storage" "$CACHE/run"
  cat > "$CACHE/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$CACHE/storage"
runroot = "$CACHE/run"
EOF
  # Root here lacks CAP_SYS_RESOURCE, so podman's default rlimits (nofile 1048576, nproc 4194304)
  # cannot be set: ask for what this shell has. crun 1.8 refuses this machine's hybrid cgroup
  # v1/v2 layout ("cgroups in hybrid mode not supported"); runc runs. Host network: the servers
  # bind to 127.0.0.1, as the tests do.
  cat > "$CACHE/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$(ulimit -Hn):$(ulimit -Hn)", "nproc=4096:4096"]
netns = "host"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
  export CONTAINERS_STORAGE_CONF="$CACHE/storage.conf" CONTAINERS_CONF="$CACHE/containers.conf"
}

need() {
  local missing=()
  for c in "$@"; do command -v "$c" >/dev/null || missing+=("$c"); done
  ((${#missing[@]} == 0)) || die "missing: ${missing[*]} (apt-get install ${missing[*]})"
}

# apt's lists are needed to resolve the .debs: fetched once when missing.
apt_lists() {
  apt-get download --print-uris libc6 >/dev/null 2>&1 || apt-get update -qq >&2
}

# key NAME WORDS...: 12 hex digits over the recipe, the words and the .debs apt resolves for the
# packages among them (name, size and SHA256 of each file).
key() {
  local name=$1; shift
  { echo "$RECIPE $name"; printf '%s\n' "$@"
    apt-get download --print-uris "${DEBS[@]}" | awk '{print $2, $3, $4}'; } | sha256sum | cut -c1-12
}

# use_stand_in NAME KEY FROM_NAME: tag the keyed stand-in with the Dockerfile's name for it, and
# drop stand-ins of NAME with other keys.
use_stand_in() {
  local name=$1 k=$2 as=$3 old
  for old in $(buildah images --format '{{.Name}}:{{.Tag}}' --filter "reference=localhost/stoker-stand-in/$name"); do
    [[ "$old" == "localhost/stoker-stand-in/$name:"* && "$old" != *":$k" ]] && buildah rmi "$old" >/dev/null
  done
  buildah tag "localhost/stoker-stand-in/$name:$k" "$as"
}

commit_rootfs() { # commit_rootfs DIR TAG STAND_IN_FOR CONFIG_ARGS...
  local dir=$1 tag=$2 for=$3; shift 3
  local c; c=$(buildah from scratch)
  # Through a mount, not `buildah copy`, which (as COPY does) makes every file root's: the
  # stand-ins keep their owners (/home/nonroot is 65532's, as in distroless).
  tar -C "$dir" -cf - . | tar -C "$(buildah mount "$c")" -xpf - --numeric-owner
  buildah umount "$c" >/dev/null
  buildah config --os linux --arch amd64 --label "org.stoker.stand-in-for=$for" "$@" "$c"
  buildah commit --quiet --rm "$c" "$tag" >/dev/null
}

stand_in_distroless() {
  local from; from=$(sed -n 's/^FROM \(gcr.io\/distroless\/[^ ]*\).*/\1/p' "$DOCKERFILE")
  [[ "$from" == gcr.io/distroless/cc-debian12:nonroot ]] || die "the runtime base is $from: this script makes cc-debian12:nonroot only"
  DEBS=(base-files netbase tzdata ca-certificates libc6 libssl3 libgomp1 libstdc++6 libgcc-s1 gcc-12-base)
  local k; k=$(key distroless-cc)
  local tag="localhost/stoker-stand-in/distroless-cc:$k"
  if ! buildah inspect --type image "$tag" >/dev/null 2>&1; then
    log "making the stand-in for $from ($tag)"
    local tmp; tmp=$(mktemp -d); local r="$tmp/rootfs"
    (cd "$tmp" && apt-get download "${DEBS[@]}" >/dev/null)
    mkdir -p "$r"/usr/{bin,sbin,lib,lib64}
    for d in bin sbin lib lib64; do ln -s "usr/$d" "$r/$d"; done
    for f in "$tmp"/*.deb; do dpkg-deb --fsys-tarfile "$f" | tar -x -C "$r" --keep-directory-symlink; done
    mkdir -p "$r/etc/ssl/certs"
    find "$r/usr/share/ca-certificates" -name '*.crt' | sort | xargs cat > "$r/etc/ssl/certs/ca-certificates.crt"
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
      'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
      'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' > "$r/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'tty:x:5:' 'staff:x:50:' 'nonroot:x:65532:' > "$r/etc/group"
    echo 'hosts: files dns' > "$r/etc/nsswitch.conf"
    mkdir -p "$r/tmp" "$r/root" "$r/home/nonroot"
    chmod 1777 "$r/tmp"; chmod 700 "$r/root" "$r/home/nonroot"; chown 65532:65532 "$r/home/nonroot"
    rm -rf "$r"/usr/share/{doc,man,info,lintian}
    commit_rootfs "$r" "$tag" "$from" --user 65532 --workingdir /home/nonroot \
      --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
    rm -rf "$tmp"
  fi
  use_stand_in distroless-cc "$k" "$from"
}

stand_in_rust() {
  need debootstrap rustup
  local v; v=$(sed -n 's/^FROM rust:\([0-9.]*\)-slim-bookworm.*/\1/p' "$DOCKERFILE")
  [[ -n "$v" ]] || die "the build stage is not FROM rust:<version>-slim-bookworm"
  # The newest installed toolchain <v> or <v>.<patch> (rust:<v>-… carries the newest patch).
  local t; t=$(rustup toolchain list | awk '{print $1}' | grep -E "^$v(\.[0-9]+)?-x86_64-unknown-linux-gnu$" | sort -V | tail -n 1)
  [[ -n "$t" ]] || die "Rust $v is not installed here (rustup toolchain list), and no registry here brings it"
  local sysroot; sysroot=$(rustup run "$t" rustc --print sysroot)
  local full; full=$(rustup run "$t" rustc --version | awk '{print $2}')
  local tc="$full-x86_64-unknown-linux-gnu"
  DEBS=(ca-certificates gcc libc6-dev libc6)
  local k; k=$(key rust "$(rustup run "$t" rustc -vV)" "$(rustup run "$t" cargo -V)")
  local tag="localhost/stoker-stand-in/rust:$k"
  if ! buildah inspect --type image "$tag" >/dev/null 2>&1; then
    log "making the stand-in for rust:$v-slim-bookworm ($tag): debootstrap and Rust $full"
    local tmp; tmp=$(mktemp -d); local r="$tmp/rootfs"
    debootstrap --variant=minbase --include=ca-certificates,gcc,libc6-dev bookworm "$r" "$MIRROR" >"$tmp/debootstrap.log" 2>&1 \
      || { tail -20 "$tmp/debootstrap.log" >&2; die "debootstrap failed"; }
    rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/*
    local d="$r/usr/local/rustup/toolchains/$tc"
    mkdir -p "$d" "$r/usr/local/cargo/bin"
    # rustup's minimal profile: exactly the files of the rustc, cargo and rust-std components.
    local c
    for c in rustc cargo rust-std; do
      local m="lib/rustlib/manifest-$c-x86_64-unknown-linux-gnu"
      sed -n 's/^file://p; s/^dir://p' "$sysroot/$m"; echo "$m"
    done | (cd "$sysroot" && tar -cf - -T - lib/rustlib/rust-installer-version lib/rustlib/multirust-channel-manifest.toml) \
      | tar -xf - -C "$d"
    printf '%s\n' rustc cargo rust-std | sed 's/$/-x86_64-unknown-linux-gnu/' > "$d/lib/rustlib/components"
    { echo 'config_version = "1"'
      for c in cargo rust-std rustc; do printf '\n[[components]]\npkg = "%s"\ntarget = "x86_64-unknown-linux-gnu"\nis_extension = false\n' "$c"; done
    } > "$d/lib/rustlib/multirust-config.toml"
    printf 'version = "12"\ndefault_toolchain = "%s"\nprofile = "minimal"\nauto_self_update = "disable"\n\n[overrides]\n' "$tc" \
      > "$r/usr/local/rustup/settings.toml"
    install -m 0755 "$(readlink -f "$(command -v rustup)")" "$r/usr/local/cargo/bin/rustup"
    for c in cargo rustc rustdoc; do ln -s rustup "$r/usr/local/cargo/bin/$c"; done
    commit_rootfs "$r" "$tag" "docker.io/library/rust:$v-slim-bookworm" \
      --env RUSTUP_HOME=/usr/local/rustup --env CARGO_HOME=/usr/local/cargo \
      --env PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --env RUST_VERSION="$full" --cmd bash
    rm -rf "$tmp"
  fi
  use_stand_in rust "$k" "docker.io/library/rust:$v-slim-bookworm"
}

build() {
  local binary="$ROOT/target/debug/stoker" from_source=0 tag=localhost/stoker:dev
  while (($#)); do
    case $1 in
      --binary) binary=$2; shift 2 ;;
      --from-source) from_source=1; shift ;;
      --tag) tag=$2; shift 2 ;;
      *) die "unknown argument $1" ;;
    esac
  done
  need buildah podman runc apt-get dpkg-deb
  store_env
  apt_lists
  stand_in_distroless
  local args=(--pull=never --isolation chroot --network host -f "$DOCKERFILE" -t "$tag")
  if ((from_source)); then
    stand_in_rust
    # The build stage downloads crates: give it this host's trust store (a host whose way out
    # goes through a TLS-inspecting proxy trusts that proxy's CA there).
    [[ -f /etc/ssl/certs/ca-certificates.crt ]] \
      && args+=(-v /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
    log "building $tag from source: the Dockerfile's build stage runs cargo build --release"
  else
    [[ -x "$binary" ]] || die "$binary missing: cargo build --bin stoker, or pass --binary"
    local sum; sum=$(sha256sum "$binary" | cut -c1-12)
    local b="localhost/stoker-stand-in/binary:$sum"
    if ! buildah inspect --type image "$b" >/dev/null 2>&1; then
      local c; c=$(buildah from scratch)
      buildah copy --quiet --chmod 0755 "$c" "$binary" /stoker >/dev/null
      buildah commit --quiet --rm "$c" "$b" >/dev/null
    fi
    use_stand_in binary "$sum" "$b"
    args+=(--build-context "build=container-image://$b")
    log "building $tag: the Dockerfile's runtime stage, its build stage replaced by $binary"
  fi
  buildah build "${args[@]}" "$ROOT" >&2
  buildah rmi --prune >/dev/null 2>&1 || true
  echo "$tag"
}

case "${1:-}" in
  build) shift; build "$@" ;;
  env) store_env; printf 'export CONTAINERS_STORAGE_CONF=%q CONTAINERS_CONF=%q\n' "$CONTAINERS_STORAGE_CONF" "$CONTAINERS_CONF" ;;
  *) die "usage: scripts/image.sh build [--binary PATH | --from-source] [--tag TAG] | env" ;;
esac
