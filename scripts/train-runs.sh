#!/usr/bin/env bash
# The measured runs of docs/training.md: SparseGPT 50% and 70% (iterative 50 → 70) on SmolLM2,
# then sparse pretraining of each with the wiki+python mixture, then fine-tuning the 50% model on
# HumanEval with and without SquareHead distillation. Everything at nice 19.
#
#   LACUNA=target/release/lacuna OUT=runs scripts/train-runs.sh
set -euo pipefail
LACUNA=${LACUNA:-target/debug/lacuna}
OUT=${OUT:-runs}
RECIPES=${RECIPES:-examples/recipes}
mkdir -p "$OUT"
run() { echo "+ $*" >&2; nice -n 19 "$LACUNA" "$@"; }

[ -d "$OUT/smollm2-50" ] || run prune --method sparsegpt --sparsity 0.5 --calibration wiki+python:128x512 --seed 0 --out "$OUT/smollm2-50"
[ -d "$OUT/smollm2-70" ] || run prune --model "$OUT/smollm2-50" --method sparsegpt --sparsity 0.7 --calibration wiki+python:128x512 --seed 0 --out "$OUT/smollm2-70"
for s in 50 70; do
  [ -d "$OUT/smollm2-$s-sp" ] || run train pretrain --model "$OUT/smollm2-$s" --recipe "$RECIPES/sparse-pretrain.yaml" --out "$OUT/smollm2-$s-sp"
done
[ -d "$OUT/ft-distill" ] || run train finetune --model "$OUT/smollm2-50" --recipe "$RECIPES/finetune-from-oneshot.yaml" --out "$OUT/ft-distill"
[ -d "$OUT/ft-plain" ] || run train finetune --model "$OUT/smollm2-50" --recipe "$RECIPES/finetune-from-oneshot-no-distill.yaml" --out "$OUT/ft-plain"
