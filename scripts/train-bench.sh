#!/usr/bin/env bash
# Training throughput on SmolLM2-135M-Instruct: dense vs 50% vs 70% (magnitude-pruned: the kernels'
# speed depends on the sparsity, not on which weights were kept), sequence length 512, one
# sequence per step. Prints, per model, each step's tokens/s, the median over steps 3.. (the
# first steps also fault in the optimizer state) and the trainer's summary line (layers on the
# sparse kernels, AdamW state).
#
#   scripts/train-bench.sh [STEPS]        LACUNA=path/to/lacuna picks the binary, EXTRA=--masked-dense adds flags
set -euo pipefail
steps=${1:-8}
lacuna=${LACUNA:-lacuna}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/recipe.yaml" <<YAML
data:
  sources: [{name: wiki, weight: 3}, {name: python, weight: 1}]
  sequenceLength: 512
schedule: {steps: $steps, batchSize: 1, gradientAccumulation: 1, checkpointEvery: 0, evalEvery: 0, evalSequences: 1, seed: 0}
optimizer: {learningRate: 0.0002, warmupSteps: 1}
YAML
for s in 50 70; do
  "$lacuna" prune --method magnitude --sparsity 0.$s --out "$work/mag$s" > /dev/null
done
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) threads"
for m in smollm2-135m "$work/mag50" "$work/mag70"; do
  line=$("$lacuna" train pretrain --model "$m" --recipe "$work/recipe.yaml" --out "$work/out" --overwrite ${EXTRA:-} 2>/dev/null | tail -1)
  tps=$(grep -o '"tokens_per_s":[0-9.]*' "$work/out.metrics.jsonl" | cut -d: -f2)
  med=$(echo "$tps" | tail -n +3 | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
  echo "$(basename "$m"): steps $(echo "$tps" | xargs printf '%.1f ')| median from step 3: $med tokens/s"
  echo "  $line"
  rm -rf "$work/out" "$work/out-bitmask" "$work/out.metrics.jsonl" "$work/out.checkpoint"
done
