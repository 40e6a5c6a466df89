#!/usr/bin/env bash
# Reproduces docs/quantization.md's table: SmolLM2-135M-Instruct and its 70% SparseGPT model
# quantized to W8A8 with `lacuna quantize` (SmoothQuant + GPTQ, calibration 128 × 512 tokens of
# wiki+python, seed 0), with the ablations (round-to-nearest vs GPTQ, α = 0 / 0.5 / 0.8, 0 vs 5
# kurtosis-skipped layers), then held-out perplexity on prose (wiki) and Python code (python).
# Results go to $OUT (default: target/quantize) as JSON; the table is printed at the end. Every
# step is skipped when its output exists.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/quantize}
THREADS=${THREADS:-2}
EVAL="--seq-len 2048 --max-segments ${SEGMENTS:-8}"
CAL=${CAL:-wiki+python:128x512}
mkdir -p "$OUT"
[ -n "${LACUNA:-}" ] || cargo build --release -p lacuna-cli
L=${LACUNA:-${CARGO_TARGET_DIR:-target}/release/lacuna}
export LACUNA_THREADS=$THREADS

BASE=$($L model fetch smollm2-135m --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')

evaluate() { # name, model path
  for data in wiki python; do
    # Written under a temporary name: an interrupted run leaves no file that looks finished.
    [ -f "$OUT/$1.$data.json" ] || { $L eval perplexity --model "$2" --data $data $EVAL --json >"$OUT/$1.$data.json.tmp" &&
      mv "$OUT/$1.$data.json.tmp" "$OUT/$1.$data.json"; }
  done
}
quantize() { # name, input model, then lacuna quantize flags
  local name=$1 model=$2; shift 2
  [ -f "$OUT/$name/lacuna_quantize.json" ] ||
    $L quantize --model "$model" --out "$OUT/$name" --calibration $CAL --seed 0 --overwrite "$@"
  evaluate "$name" "$OUT/$name"
}

evaluate dense "$BASE"
# The headline runs first (they are the timed ones: run the script on an idle machine).
quantize dense-w8a8 "$BASE" --smoothquant-alpha 0.8 --skip-by-kurtosis 0
[ -f "$OUT/sparse70/lacuna_prune.json" ] ||
  $L prune --model "$BASE" --method sparsegpt --sparsity 0.7 --calibration wiki:128x512 --seed 0 \
    --out "$OUT/sparse70" --overwrite
evaluate sparse70 "$OUT/sparse70"
quantize sparse70-w8a8 "$OUT/sparse70" --smoothquant-alpha 0.8 --skip-by-kurtosis 0
quantize sparse70-w8a8-skip5 "$OUT/sparse70" --smoothquant-alpha 0.8 --skip-by-kurtosis 5
# Ablations on the dense model.
quantize dense-w8a8-rtn "$BASE" --smoothquant-alpha 0.8 --skip-by-kurtosis 0 --rounding nearest
quantize dense-w8a8-a0 "$BASE" --smoothquant-alpha 0 --skip-by-kurtosis 0
quantize dense-w8a8-a05 "$BASE" --smoothquant-alpha 0.5 --skip-by-kurtosis 0
quantize dense-w8a8-skip5 "$BASE" --smoothquant-alpha 0.8 --skip-by-kurtosis 5

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def ppl(name, data):
    return json.load(open(f"{out}/{name}.{data}.json"))["report"]["perplexity"]
print("| model | rounding | α | skipped | wiki ppl | python ppl | vs float wiki | vs float python | time | peak RSS |")
print("|---|---|---|---|---|---|---|---|---|---|")
for ref in ["dense", "sparse70"]:
    fw, fp = ppl(ref, "wiki"), ppl(ref, "python")
    print(f"| {ref} (float) | — | — | — | {fw:.2f} | {fp:.2f} | — | — | — | — |")
    for name in sorted(n for n in os.listdir(out) if n.startswith(ref + "-") and os.path.isdir(f"{out}/{n}")):
        if not os.path.exists(f"{out}/{name}.python.json"):
            continue
        rep = json.load(open(f"{out}/{name}/lacuna_quantize.json"))
        r, s = rep["recipe"], rep["summary"]
        w, p = ppl(name, "wiki"), ppl(name, "python")
        rss = rep.get("peak_rss_bytes") or 0
        print(f"| {name} | {r.get('rounding', 'gptq')} | {r['smoothquantAlpha']} | {r['skipByKurtosis']} | "
              f"{w:.2f} | {p:.2f} | {100*(w/fw-1):+.1f}% | {100*(p/fp-1):+.1f}% | {s['seconds']:.0f} s | {rss/2**20:.0f} MiB |")
PY
