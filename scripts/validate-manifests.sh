#!/usr/bin/env bash
# Renders every kustomization under deploy/kubernetes (the default, ha/, namespace/)
# and validates the result against the Kubernetes 1.33 schemas, offline, with a
# pinned kubernetes-validate from PyPI installed into target/ (not the system). Then
# checks what the default must never do: create, own or relabel a Namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/validate-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.33.1
fi
out=target/rendered
rm -rf "$out" && mkdir -p "$out"
for k in $(find deploy/kubernetes -name kustomization.yaml | sort); do
  dir=$(dirname "$k")
  name=$(echo "${dir#deploy/kubernetes}" | tr / _)
  kubectl kustomize "$dir" > "$out/default$name.yaml"
done
"$venv/bin/kubernetes-validate" --strict --kubernetes-version 1.33.0 "$out"/*.yaml
# The default and ha/ leave namespaces alone: `kubectl delete -k` must not take
# Istio's control plane with it.
for f in "$out/default.yaml" "$out/default_ha.yaml"; do
  if grep -q '^kind: Namespace$' "$f"; then
    echo "$f contains a Namespace object" >&2; exit 1
  fi
done
echo "manifests valid: $(ls "$out" | tr '\n' ' ')"
