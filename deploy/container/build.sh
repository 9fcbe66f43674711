#!/usr/bin/env bash
# Builds hybroker's container image from a static binary with buildah (no base image, no network):
#
#   deploy/container/build.sh BINARY TAG [more buildah bud arguments]
#   deploy/container/build.sh target/x86_64-unknown-linux-gnu/release/hybroker hybroker:0.1.0
#
# BINARY must be statically linked (RUSTFLAGS="-C target-feature=+crt-static" cargo build --release
# --target x86_64-unknown-linux-gnu). The CA bundle is the build host's Debian ca-certificates
# (/etc/ssl/certs/ca-certificates.crt; CA_BUNDLE=PATH for another). buildah honours
# CONTAINERS_STORAGE_CONF (the tests build into a temporary vfs store); BUILDAH=podman uses
# `podman build` instead. The Containerfile builds the same context with docker too.
set -euo pipefail
binary=${1:?usage: build.sh BINARY TAG [buildah bud arguments]}
tag=${2:?usage: build.sh BINARY TAG [buildah bud arguments]}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
ca_bundle=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
builder=${BUILDAH:-buildah}

[[ -f $ca_bundle ]] || { echo "no CA bundle at $ca_bundle: apt-get install ca-certificates, or set CA_BUNDLE" >&2; exit 1; }
if LC_ALL=C readelf -l "$binary" | grep -q 'program interpreter'; then
  echo "$binary is dynamically linked: build it with RUSTFLAGS=\"-C target-feature=+crt-static\" --target x86_64-unknown-linux-gnu" >&2
  exit 1
fi
version=$("$binary" --version | awk '{ print $2; exit }')

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
mkdir -p "$context/rootfs/etc/ssl/certs" "$context/rootfs/tmp" "$context/rootfs/var/lib" "$context/state"
chmod 1777 "$context/rootfs/tmp"
chmod 0700 "$context/state"
install -m 0644 "$ca_bundle" "$context/rootfs/etc/ssl/certs/ca-certificates.crt"
install -m 0755 "$binary" "$context/hybroker"
printf 'root:x:0:0:root:/root:/sbin/nologin\nhybroker:x:65532:65532:hybroker:/var/lib/hybroker:/sbin/nologin\n' \
  >"$context/rootfs/etc/passwd"
printf 'root:x:0:\nhybroker:x:65532:\n' >"$context/rootfs/etc/group"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' >"$context/rootfs/etc/nsswitch.conf"
chmod 0644 "$context/rootfs/etc/passwd" "$context/rootfs/etc/group" "$context/rootfs/etc/nsswitch.conf"

revision=$(git -C "$here" rev-parse HEAD 2>/dev/null || echo unknown)
created=$(date -u -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}" +%Y-%m-%dT%H:%M:%SZ)
build=(bud)
[[ $builder == buildah ]] || build=(build)
"$builder" "${build[@]}" --quiet -f "$here/Containerfile" \
  --build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "CREATED=$created" \
  -t "$tag" "$@" "$context"
