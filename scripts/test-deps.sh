#!/usr/bin/env bash
# Installs the independent reference implementations the tests compare against (idempotent, fast
# when already present):
# - tests/fixtures/requirements.txt into python3's site-packages (gguf, numpy, transformers, and the
#   openai client and prometheus-client parser that tests/it/serve.rs drives the server with, ...);
# - tests/fixtures/requirements-compressed-tensors.txt into its own virtualenv (compressed-tensors
#   with torch and transformers < 5), at the path tests/it/compressed_tensors.rs looks in.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -r tests/fixtures/requirements.txt
CT_VENV="${LACUNA_CACHE:-$HOME/.cache/lacuna}/venvs/compressed-tensors"
if ! "$CT_VENV/bin/python" -c "import compressed_tensors, torch" >/dev/null 2>&1; then
  echo "creating $CT_VENV (tests/fixtures/requirements-compressed-tensors.txt, about 5 GB)" >&2
  python3 -m venv "$CT_VENV"
  "$CT_VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r tests/fixtures/requirements-compressed-tensors.txt
fi
