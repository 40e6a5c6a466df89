#!/usr/bin/env python3
"""Compares llm-compressor's pruned layers (the `--dump` of sparsegpt.py: weights and Hessians)
with Lacuna's (a safetensors file of the same layers: a `lacuna prune` output directory's
model.safetensors, or a checkpoint's block-NNN.safetensors from `--stop-after-blocks`), against
the dense weights.

For each layer: both sparsities, how far the per-row sparsities spread, the share of positions
pruned by both / by one only, the relative difference of the kept weights, and each side's layer
reconstruction error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) (ΔW = pruned − dense) under llm-compressor's
Hessian H = 2/n Σ x xᵀ (which, on the same windows, is Lacuna's up to the scale, which cancels).

  .../venvs/llmcompressor/bin/python scripts/llmcompressor/compare_layers.py \
      --dense smollm2-f32/model.safetensors --llmc llmc-50-layer0.safetensors \
      --lacuna lacuna-50.checkpoint/block-000.safetensors
"""

import argparse
import json

import torch
from safetensors import safe_open


def tensor(path, name):
    with safe_open(path, "pt") as f:
        for key in (name, name + ".weight", name.removesuffix(".weight")):
            if key in f.keys():
                return f.get_tensor(key).to(torch.float64)
    raise SystemExit(f"{path}: no tensor {name}")


def recon(dw, w, h):
    return float(torch.einsum("ij,jk,ik->", dw, h, dw) / torch.einsum("ij,jk,ik->", w, h, w))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dense", required=True)
    p.add_argument("--llmc", required=True)
    p.add_argument("--lacuna", required=True)
    a = p.parse_args()
    with safe_open(a.llmc, "pt") as f:
        layers = sorted(k.removesuffix(".H") for k in f.keys() if k.endswith(".H"))
    out = []
    for name in layers:
        w = tensor(a.dense, name + ".weight")
        h = tensor(a.llmc, name + ".H")
        lc = tensor(a.llmc, name + ".weight")
        la = tensor(a.lacuna, name + ".weight")
        mc, ma = lc == 0, la == 0
        rows_c, rows_a = mc.double().mean(1), ma.double().mean(1)
        both_kept = ~mc & ~ma
        r = {
            "layer": name,
            "sparsity": {"llmcompressor": float(mc.double().mean()), "lacuna": float(ma.double().mean())},
            "row_sparsity_min_max": {
                "llmcompressor": [float(rows_c.min()), float(rows_c.max())],
                "lacuna": [float(rows_a.min()), float(rows_a.max())],
            },
            "pruned_by_both": float((mc & ma).double().mean()),
            "pruned_by_llmcompressor_only": float((mc & ~ma).double().mean()),
            "pruned_by_lacuna_only": float((~mc & ma).double().mean()),
            "kept_by_both_rel_diff": float((lc - la)[both_kept].norm() / lc[both_kept].norm()),
            "recon_error": {"llmcompressor": recon(lc - w, w, h), "lacuna": recon(la - w, w, h)},
        }
        out.append(r)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
