#!/usr/bin/env bash
# Installs what the test suites need besides the Rust toolchain: the OpenSSL command
# line (an independent verifier of issued certificates and an independent CSR maker)
# and PostgreSQL's server binaries (the suites start throwaway clusters of their own;
# nothing is started here, and the package's own cluster is not used).
set -euo pipefail
missing=()
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
# The disk-failure suite formats and checks an ext4 image on a loop device.
command -v mkfs.ext4 >/dev/null 2>&1 || missing+=(e2fsprogs)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
