#!/usr/bin/env bash
# Everything the CUDA backend must still show on a real GPU (docs/gpu.md, "What a GPU run must
# show"), in one go. Run on a machine with an NVIDIA GPU and driver:
#
#   scripts/gpu-check.sh            # all steps; a summary at the end, non-zero if any step failed or was skipped
#
# NVRTC comes from $LACUNA_NVRTC_LIB, the test virtualenv (scripts/test-deps.sh), a CUDA toolkit on
# LD_LIBRARY_PATH, or is installed here with pip (nvidia-cuda-nvrtc-cu12) when the network allows.
# The logits step needs SmolLM2 in $LACUNA_CACHE (lacuna model fetch smollm2-135m) or
# LACUNA_GPU_LOGITS_MODELS=dense_dir,sparse_dir set beforehand.
set -uo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/lacuna-target}" CARGO_INCREMENTAL=0
export LACUNA_GPU_REQUIRED=1 LACUNA_GPU_COMPILE_REQUIRED=1
CACHE="${LACUNA_CACHE:-$HOME/.cache/lacuna}"
declare -a SUMMARY=()
status=0
step() { # name, command...
  local name=$1; shift
  echo "== $name"
  if "$@"; then SUMMARY+=("PASS  $name"); else SUMMARY+=("FAIL  $name"); status=1; fi
}
skip() { SUMMARY+=("SKIP  $1: $2"); status=1; echo "== $1: SKIPPED, $2"; }

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv || echo "nvidia-smi not found"
lscpu | grep -E '^Model name' || true

if [ -z "${LACUNA_NVRTC_LIB:-}" ]; then
  found=$(ls "$CACHE"/venvs/compressed-tensors/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib/libnvrtc.so.12 2>/dev/null | head -1)
  if [ -z "$found" ] && ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc.so'; then
    python3 -m pip install --quiet --target "$CACHE/nvrtc-wheel" nvidia-cuda-nvrtc-cu12==12.1.105 2>/dev/null \
      && found="$CACHE/nvrtc-wheel/nvidia/cuda_nvrtc/lib/libnvrtc.so.12"
  fi
  [ -n "$found" ] && export LACUNA_NVRTC_LIB="$found"
fi
echo "LACUNA_NVRTC_LIB=${LACUNA_NVRTC_LIB:-<loader search path>}"

step "build (release)" cargo build --release -p lacuna-gpu --tests --examples
step "unit tests: packing, launch geometry, kernel algorithm emulated against the CPU kernels" \
  cargo test --release -p lacuna-gpu --lib
step "every kernel compiles through NVRTC for sm_80/86/90, no warnings" \
  cargo test --release -p lacuna-gpu --test nvrtc_compile
step "every kernel equals the CPU reference over the shape sweep (tolerances: gpu/tests/device.rs)" \
  cargo test --release -p lacuna-gpu --test device -- --skip logits_match

if [ -z "${LACUNA_GPU_LOGITS_MODELS:-}" ]; then
  if cargo build --release -p lacuna-cli >/dev/null 2>&1; then
    LACUNA="$CARGO_TARGET_DIR/release/lacuna"
    dense=$("$LACUNA" model fetch smollm2-135m --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])' 2>/dev/null)
    sparse="$CACHE/gpu-check/smollm2-magnitude70"
    if [ -n "$dense" ] && { [ -d "$sparse-bitmask" ] || "$LACUNA" prune --model smollm2-135m --method magnitude --sparsity 0.7 --out "$sparse"; }; then
      export LACUNA_GPU_LOGITS_MODELS="$dense,$sparse-bitmask"
    fi
  fi
fi
if [ -n "${LACUNA_GPU_LOGITS_MODELS:-}" ]; then
  step "dense and 70% SmolLM2: same greedy tokens and logits as the CPU engine" \
    cargo test --release -p lacuna-gpu --test device -- logits_match
else
  skip "logits vs the CPU engine" "no SmolLM2 here (lacuna model fetch smollm2-135m needs the network; or set LACUNA_GPU_LOGITS_MODELS)"
fi

step "decode speed: synthetic Llama-2-7B, dense f16 vs 70% bitmask f16 (targets: speedup >= 1.7, >= 0.8 of the byte bound)" \
  "$CARGO_TARGET_DIR/release/examples/decode_bench" --layers 32 --sparsity 0.7 --steps 64 --batch 1
step "decode speed at batch 8" "$CARGO_TARGET_DIR/release/examples/decode_bench" --layers 32 --sparsity 0.7 --steps 32 --batch 8

echo
echo "== summary"
printf '%s\n' "${SUMMARY[@]}"
exit $status
