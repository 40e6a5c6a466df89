#!/usr/bin/env bash
# Reproduces docs/pruning.md's recovery table: one-shot pruning of SmolLM2-135M-Instruct with
# SparseGPT, Wanda and magnitude (uniform and OWL profiles) at 50% and 70%, then held-out
# perplexity on prose (wiki) and Python code (python). Calibration: 128 × 512 tokens of the wiki
# calibration split, seed 0. Results go to $OUT (default: target/recovery) as JSON; the table is
# printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/recovery}
THREADS=${THREADS:-2}
EVAL="--seq-len 2048 --max-segments ${SEGMENTS:-8}"
CAL=${CAL:-wiki:128x512}
mkdir -p "$OUT"
cargo build --release -p lacuna-cli
L=${CARGO_TARGET_DIR:-target}/release/lacuna
export LACUNA_THREADS=$THREADS

$L model fetch smollm2-135m >/dev/null
BASE=$(LACUNA_THREADS=$THREADS $L model fetch smollm2-135m --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')

prune() { # name, then lacuna prune flags
  local name=$1; shift
  [ -f "$OUT/$name/lacuna_prune.json" ] || $L prune --out "$OUT/$name" --overwrite "$@"
}
evaluate() { # name, model path
  for data in wiki python; do
    # Written under a temporary name: an interrupted run leaves no file that looks finished.
    [ -f "$OUT/$1.$data.json" ] || { $L eval perplexity --model "$2" --data $data $EVAL --json >"$OUT/$1.$data.json.tmp" &&
      mv "$OUT/$1.$data.json.tmp" "$OUT/$1.$data.json"; }
  done
}

# Ordered so that each comparison is complete as early as possible; every step is skipped when
# its output exists, and an interrupted prune resumes from its checkpoint.
evaluate dense "$BASE"
prune magnitude-50 --model "$BASE" --method magnitude --sparsity 0.5 && evaluate magnitude-50 "$OUT/magnitude-50"
prune wanda-50 --model "$BASE" --method wanda --sparsity 0.5 --calibration $CAL --seed 0 && evaluate wanda-50 "$OUT/wanda-50"
prune sparsegpt-50 --model "$BASE" --method sparsegpt --sparsity 0.5 --calibration $CAL --seed 0 &&
  evaluate sparsegpt-50 "$OUT/sparsegpt-50"
prune magnitude-70 --model "$BASE" --method magnitude --sparsity 0.7 && evaluate magnitude-70 "$OUT/magnitude-70"
prune wanda-70 --model "$BASE" --method wanda --sparsity 0.7 --calibration $CAL --seed 0 && evaluate wanda-70 "$OUT/wanda-70"
# The paper's iterative step: 70% on top of the 50% model (its zeros are kept).
prune sparsegpt-70 --model "$OUT/sparsegpt-50" --method sparsegpt --sparsity 0.7 --calibration $CAL --seed 0 &&
  evaluate sparsegpt-70 "$OUT/sparsegpt-70"
prune sparsegpt-owl-50 --model "$BASE" --method sparsegpt --sparsity 0.5 --profile owl --calibration $CAL --seed 0 &&
  evaluate sparsegpt-owl-50 "$OUT/sparsegpt-owl-50"
prune sparsegpt-owl-70 --model "$OUT/sparsegpt-owl-50" --method sparsegpt --sparsity 0.7 --profile owl \
  --calibration $CAL --seed 0 && evaluate sparsegpt-owl-70 "$OUT/sparsegpt-owl-70"

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def ppl(name, data):
    return json.load(open(f"{out}/{name}.{data}.json"))["report"]["perplexity"]
dw, dp = ppl("dense", "wiki"), ppl("dense", "python")
print("| model | method | profile | sparsity | wiki ppl | python ppl | recovery wiki | recovery python | prune time | peak RSS |")
print("|---|---|---|---|---|---|---|---|---|---|")
print(f"| dense | — | — | 0% | {dw:.2f} | {dp:.2f} | 100% | 100% | — | — |")
for name in ["magnitude-50", "wanda-50", "sparsegpt-50", "sparsegpt-owl-50", "magnitude-70", "wanda-70", "sparsegpt-70", "sparsegpt-owl-70"]:
    if not os.path.exists(f"{out}/{name}.python.json"):
        continue
    rep = json.load(open(f"{out}/{name}/lacuna_prune.json"))
    s, r = rep["summary"], rep["recipe"]
    w, p = ppl(name, "wiki"), ppl(name, "python")
    rss = rep.get("peak_rss_bytes") or 0
    print(f"| {name} | {r['method']} | {r['profile']} | {100*s['sparsity']:.1f}% | {w:.2f} | {p:.2f} | "
          f"{100*dw/w:.1f}% | {100*dp/p:.1f}% | {s['seconds']:.0f} s | {rss/2**20:.0f} MiB |")
PY
