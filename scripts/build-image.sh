#!/usr/bin/env bash
# Builds the ca-server container image with no network and no base image: a
# statically linked ca-server (glibc, crt-static; ring needs nothing else) built on
# this host, copied with the system's CA roots into deploy/image/Dockerfile's
# FROM scratch image.
#
#   scripts/build-image.sh [IMAGE]     (default istio-ca-rs:0.1.0, as deploy/kubernetes)
#
# Prints the image's size. To run it in a cluster, push it to your registry and point
# the manifests at it (docs/GCE.md):
#   docker tag istio-ca-rs:0.1.0 REGISTRY/istio-ca-rs:0.1.0 && docker push REGISTRY/istio-ca-rs:0.1.0
#   (cd deploy/kubernetes/single && kustomize edit set image istio-ca-rs=REGISTRY/istio-ca-rs:0.1.0)
set -euo pipefail
cd "$(dirname "$0")/.."
image=${1:-istio-ca-rs:0.1.0}
target=x86_64-unknown-linux-gnu
roots=/etc/ssl/certs/ca-certificates.crt

if [ ! -s "$roots" ]; then
  echo "no CA roots at $roots: install Debian's ca-certificates package" >&2
  exit 1
fi
# --target keeps crt-static off build scripts and proc macros (they must stay dynamic).
RUSTFLAGS='-C target-feature=+crt-static' \
  cargo build --locked --release --target "$target" -p ca-server
bin=target/$target/release/ca-server
if readelf -l "$bin" | grep -q INTERP; then
  echo "$bin is dynamically linked (has an ELF interpreter)" >&2
  exit 1
fi

ctx=target/image-context
rm -rf "$ctx"
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/etc/ssl/certs" "$ctx/state"
strip -o "$ctx/rootfs/usr/local/bin/ca-server" "$bin"
cp "$roots" "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
cp deploy/image/passwd deploy/image/group deploy/image/nsswitch.conf "$ctx/rootfs/etc/"
chmod 0755 "$ctx/rootfs/usr/local/bin/ca-server"
chmod 0644 "$ctx/rootfs/etc/"{passwd,group,nsswitch.conf} "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"
chmod 0700 "$ctx/state"

DOCKER_BUILDKIT=0 docker build --quiet -f deploy/image/Dockerfile -t "$image" "$ctx" >/dev/null
size=$(docker image inspect --format '{{.Size}}' "$image")
echo "built $image: $(( (size + 524288) / 1048576 )) MiB ($size bytes)"
