#!/usr/bin/env bash
# Builds the container image (scripts/build-image.sh, no network) and runs the suites
# that need it (tests/tests/image.rs): the image's contents, a container with the pod's
# settings (read-only root, uid 65532, no capabilities, state on a volume) serving
# mutual TLS to the host, admin commands through `docker exec`, SIGTERM, and three
# replicas on a private Docker network sharing one PostgreSQL with one killed under
# load. Needs the Docker engine and root (the test PostgreSQL runs as `postgres`).
set -euo pipefail
cd "$(dirname "$0")/.."
export CA_IMAGE=${CA_IMAGE:-istio-ca-rs:0.1.0}
scripts/build-image.sh "$CA_IMAGE"
cargo test -p e2e --test image -- --ignored --test-threads=1
