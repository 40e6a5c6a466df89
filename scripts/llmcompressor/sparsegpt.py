#!/usr/bin/env python3
"""llm-compressor's SparseGPT on Lacuna's own calibration windows, for comparison with `lacuna prune`.

Calibrates on exactly the token windows `lacuna prune` draws (written by the lacuna-prune example
`calibration_windows`), with the settings of Lacuna's SparseGPT recipe: unstructured, 128-column
blocks, dampening 0.01 of the mean Hessian diagonal, every decoder-layer linear, lm_head dense,
sequential block by block with the pruned block's outputs feeding the next. Writes a dense Hugging
Face directory (float32, zeros in place) that `lacuna eval perplexity` and `lacuna inspect` read.

  python3 -m venv "${LACUNA_CACHE:-$HOME/.cache/lacuna}/venvs/llmcompressor"
  "${LACUNA_CACHE:-$HOME/.cache/lacuna}/venvs/llmcompressor/bin/pip" install -r scripts/llmcompressor/requirements.txt
  lacuna model convert smollm2-135m --dtype f32 --out smollm2-f32
  calibration_windows --model smollm2-135m --calibration wiki:128x512 --seed 0 --out windows.json
  .../venvs/llmcompressor/bin/python scripts/llmcompressor/sparsegpt.py \
      --model smollm2-f32 --windows windows.json --sparsity 0.5 --out smollm2-llmc-50

`--dump FILE` also writes, as safetensors, the pruned weights of the layers named by `--dump-layer`
(default: layer 0's self_attn.q_proj and mlp.down_proj) and the Hessians llm-compressor accumulated
for them (`<name>.H`, 2/n Σ x xᵀ over the n samples, before dampening), for a layer-by-layer
comparison with Lacuna's.
"""

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

DEFAULT_DUMP_LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]
# Every decoder-layer linear (q/k/v/o, gate/up/down), as Lacuna's default `targets`.
TARGETS = [r"re:.*layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj$"]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="Hugging Face directory (float32)")
    p.add_argument("--windows", required=True, type=Path, help="JSON from the calibration_windows example")
    p.add_argument("--sparsity", required=True, type=float)
    p.add_argument("--out", type=Path, help="output Hugging Face directory (must not exist)")
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--dampening", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--batch-size",
        type=int,
        default=1,
        help="windows per forward pass (all windows have the same length, so no padding: the same "
        "Hessians up to f32 summation order, faster)",
    )
    p.add_argument("--dump", type=Path, help="safetensors file for the pruned weights and Hessians of --dump-layer")
    p.add_argument("--dump-layer", action="append", help=f"layer name (repeatable; default {DEFAULT_DUMP_LAYERS})")
    p.add_argument(
        "--only-layers",
        type=int,
        help="keep only the first N decoder layers and write no model, just --dump (a layer-level comparison in minutes)",
    )
    return p.parse_args()


def load_windows(path: Path):
    doc = json.loads(path.read_text())
    windows = doc.get("windows")
    if not isinstance(windows, list) or not windows:
        sys.exit(f"{path}: no 'windows' list")
    lengths = {len(w) for w in windows}
    if len(lengths) != 1:
        sys.exit(f"{path}: windows of different lengths {sorted(lengths)}")
    return doc, windows, lengths.pop()


def main():
    a = parse_args()
    if not 0.0 < a.sparsity < 1.0:
        sys.exit(f"--sparsity {a.sparsity}: must be in (0, 1)")
    if a.only_layers is None and a.out is None:
        sys.exit("--out DIR is required (or --only-layers N with --dump FILE)")
    if a.only_layers is not None and (a.out is not None or a.dump is None):
        sys.exit("--only-layers writes no model: give --dump FILE and no --out")
    if a.out is not None and a.out.exists():
        sys.exit(f"{a.out} already exists")
    doc, windows, seq_len = load_windows(a.windows)

    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from llmcompressor.modifiers.pruning.sparsegpt import base as sgpt_base
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dump_layers = a.dump_layer or DEFAULT_DUMP_LAYERS
    dumped = {}
    if a.dump:
        # Keep the accumulated Hessian of each dumped layer: sparsify_weight dampens and
        # factorizes it in place.
        sparsify = sgpt_base.sparsify_weight

        def sparsify_and_keep_h(module, hessians_dict, **kw):
            name = next((n for n, m in model.named_modules() if m is module), None)
            if name in dump_layers:
                dumped[f"{name}.H"] = hessians_dict[module].detach().clone().contiguous()
            return sparsify(module=module, hessians_dict=hessians_dict, **kw)

        sgpt_base.sparsify_weight = sparsify_and_keep_h

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    if a.only_layers is not None:
        model.model.layers = model.model.layers[: a.only_layers]
        model.config.num_hidden_layers = a.only_layers
    ds = Dataset.from_dict({"input_ids": windows, "attention_mask": [[1] * seq_len for _ in windows]})

    modifier = SparseGPTModifier(
        sparsity=a.sparsity,
        mask_structure="0:0",
        block_size=a.block_size,
        dampening_frac=a.dampening,
        targets=TARGETS,
        ignore=["lm_head"],
    )
    t0 = time.time()
    oneshot(
        model=model,
        tokenizer=tokenizer,
        dataset=ds,
        recipe=modifier,
        num_calibration_samples=len(windows),
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
        pipeline="sequential",
        batch_size=a.batch_size,
    )
    seconds = time.time() - t0

    # Sparsity of what was pruned, counted here as lacuna inspect counts it.
    zeros = total = 0
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n != "lm_head":
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    print(f"pruned in {seconds:.0f} s; decoder linears {100 * zeros / total:.2f}% zeros", flush=True)

    if a.out is not None:
        save(a, model, tokenizer, doc, windows, seq_len, seconds, zeros / total)
    if a.dump:
        modules = dict(model.named_modules())
        for name in dump_layers:
            if name not in modules:
                sys.exit(f"--dump-layer {name}: no such module")
            dumped[f"{name}.weight"] = modules[name].weight.detach().to(torch.float32).contiguous()
        part = a.dump.with_name(a.dump.name + ".partial")
        save_file(dumped, str(part))
        os.replace(part, a.dump)
    print("wrote " + " and ".join(str(p) for p in (a.out, a.dump) if p is not None))


def save(a, model, tokenizer, doc, windows, seq_len, seconds, sparsity):
    """The pruned model as a dense Hugging Face directory, written under a temporary name."""
    import llmcompressor
    import torch

    tmp = a.out.with_name(a.out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, save_compressed=False)
    tokenizer.save_pretrained(tmp)
    # Pruning changes no architecture field; transformers 5 rewrites `rope_theta` into
    # `rope_parameters`, which Lacuna's config reader does not read (it would fall back to
    # rope_theta = 10000), so the input's config.json is kept as it was.
    shutil.copyfile(a.model / "config.json", tmp / "config.json")
    (tmp / "llmcompressor_run.json").write_text(
        json.dumps(
            {
                "llmcompressor": llmcompressor.__version__,
                "torch": torch.__version__,
                "model": str(a.model),
                "windows": str(a.windows),
                "calibration": doc.get("calibration"),
                "seed": doc.get("seed"),
                "samples": len(windows),
                "seq_len": seq_len,
                "sparsity": a.sparsity,
                "block_size": a.block_size,
                "dampening_frac": a.dampening,
                "threads": a.threads,
                "batch_size": a.batch_size,
                "seconds": seconds,
                "decoder_linear_sparsity": sparsity,
            },
            indent=2,
        )
    )
    os.replace(tmp, a.out)


if __name__ == "__main__":
    main()
