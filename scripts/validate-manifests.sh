#!/usr/bin/env bash
# Validates deploy/kubernetes against the Kubernetes 1.33 schemas, offline, with a
# pinned kubernetes-validate from PyPI installed into target/ (not the system).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/validate-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.33.1
fi
manifests=$(ls deploy/kubernetes/*.yaml | grep -v kustomization.yaml)
"$venv/bin/kubernetes-validate" --strict --kubernetes-version 1.33.0 $manifests
# Every file of the directory is in the kustomization, and only those.
for f in $manifests; do
  grep -q "^  - $(basename "$f")$" deploy/kubernetes/kustomization.yaml || { echo "$f is not in kustomization.yaml" >&2; exit 1; }
done
