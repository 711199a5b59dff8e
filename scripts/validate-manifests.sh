#!/usr/bin/env bash
# Renders every overlay under deploy/kubernetes (the default = single/, ha/, gce/,
# namespace/) and the combinations docs/GCE.md and docs/ISTIO.md describe (ha/ with the
# GCE component, a pinned internal load-balancer address, an image from a registry,
# single/ and ha/ with istiod's serving Secret), validates each
# against the Kubernetes 1.33 schemas offline with a pinned kubernetes-validate from
# PyPI installed into target/ (not the system), then checks what the overlays promise:
# the default and ha/ never create, own or relabel a Namespace; gce/ wires its config.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/validate-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate==1.33.1
fi
out=target/rendered
rm -rf "$out" && mkdir -p "$out"
fail() { echo "$*" >&2; exit 1; }

# Every overlay (a Component is not buildable on its own).
for k in $(find deploy/kubernetes -name kustomization.yaml | sort); do
  dir=$(dirname "$k")
  grep -q '^kind: Component$' "$k" && continue
  name=$(echo "${dir#deploy/kubernetes}" | tr / _)
  kubectl kustomize "$dir" > "$out/default$name.yaml"
done

# The combinations the docs tell users to write, as overlays of their own.
combo=target/kustomize-combos
rm -rf "$combo" && mkdir -p "$combo/ha-gce" "$combo/gce-static-ip" "$combo/registry" \
  "$combo/single-istiod" "$combo/ha-istiod"
cat > "$combo/ha-gce/kustomization.yaml" <<'YAML'
resources: [../../../deploy/kubernetes/ha]
components: [../../../deploy/kubernetes/components/gce]
YAML
cat > "$combo/gce-static-ip/kustomization.yaml" <<'YAML'
resources: [../../../deploy/kubernetes/gce]
patches:
  - path: ilb-address.yaml
YAML
# The patch docs/GCE.md gives for a reserved internal address.
sed -n '/^# ilb-address.yaml$/,/^```$/p' docs/GCE.md | sed '1d;$d' > "$combo/gce-static-ip/ilb-address.yaml"
[ -s "$combo/gce-static-ip/ilb-address.yaml" ] || fail "docs/GCE.md has no ilb-address.yaml block"
cat > "$combo/registry/kustomization.yaml" <<'YAML'
resources: [../../../deploy/kubernetes]
images:
  - name: istio-ca-rs
    newName: europe-docker.pkg.dev/shop-prod/mesh/istio-ca-rs
    newTag: 0.1.0
YAML
# docs/ISTIO.md: istiod's serving Secret, on one replica or three.
for base in single ha; do
  cat > "$combo/$base-istiod/kustomization.yaml" <<YAML
resources: [../../../deploy/kubernetes/$base]
components: [../../../deploy/kubernetes/components/istiod]
YAML
done
for c in ha-gce gce-static-ip registry single-istiod ha-istiod; do
  kubectl kustomize "$combo/$c" > "$out/combo_$c.yaml"
done

"$venv/bin/kubernetes-validate" --strict --kubernetes-version 1.33.0 "$out"/*.yaml

# The default and ha/ leave namespaces alone: `kubectl delete -k` must not take
# Istio's control plane with it.
for f in "$out/default.yaml" "$out/default_single.yaml" "$out/default_ha.yaml" "$out/default_gce.yaml"; do
  if grep -q '^kind: Namespace$' "$f"; then fail "$f contains a Namespace object"; fi
  if grep -q 'ca.istio.io/override' "$f"; then fail "$f labels a namespace out of the CA"; fi
done
cmp -s "$out/default.yaml" "$out/default_single.yaml" || fail "the default is not single/"
# gce/: the config mounted and passed, Workload Identity, the load balancer's options.
for want in '--gce-config=/etc/istio-ca/gce/gce-auth.toml' 'name: istio-ca-gce-' \
  'iam.gke.io/gcp-service-account:' 'externalTrafficPolicy: Local' \
  'networking.gke.io/internal-load-balancer-allow-global-access: "true"'; do
  grep -qF -- "$want" "$out/default_gce.yaml" || fail "gce/ lacks: $want"
  grep -qF -- "$want" "$out/combo_ha-gce.yaml" || fail "ha/ with the GCE component lacks: $want"
done
grep -q 'replicas: 3' "$out/combo_ha-gce.yaml" || fail "ha/ with the GCE component is not 3 replicas"
grep -q 'loadBalancerIP: ' "$out/combo_gce-static-ip.yaml" || fail "the static address patch did not apply"
grep -q 'image: europe-docker.pkg.dev/shop-prod/mesh/istio-ca-rs:0.1.0' "$out/combo_registry.yaml" \
  || fail "the image override did not apply"
for c in single-istiod ha-istiod; do
  grep -qF -- '--serving-cert-secret=istio-system/istiod-tls=istiod.istio-system.svc,' \
    "$out/combo_$c.yaml" || fail "$c lacks istiod's serving Secret"
  grep -qF -- '--secret-controller' "$out/combo_$c.yaml" || fail "$c runs no Secret controller"
done
echo "manifests valid: $(ls "$out" | tr '\n' ' ')"
