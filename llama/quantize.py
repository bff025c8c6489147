"""`python -m llama.quantize`: write a 4-bit copy of a Hugging Face Llama checkpoint, in bitsandbytes' format.

    python -m llama.quantize --model DIR_OR_ID --out DIR [--quant-type nf4|fp4] [--double-quant] [--blocksize 64]
                             [--dtype bfloat16] [--device cuda] [--max-shard-size 5GB]

Every linear but lm_head is quantized as `load_model(..., quantize=...)` quantizes it while loading (the same codes
and scales, bit for bit with bitsandbytes); the rest stays in `--dtype`. The copy loads here (`load_model(out)`:
no quantization at load, a quarter of the bytes to read) and in transformers + bitsandbytes (`from_pretrained(out)`,
from the `quantization_config` in its config.json). The tokenizer, generation config and chat template are copied.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional

import torch

from nf4 import copy_side_files

from .checkpoint import QUANTIZE_TYPES, load_model, resolve_model_dir, save_model


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llama.quantize",
                                description="Write a 4-bit copy of a Hugging Face Llama checkpoint in bitsandbytes' "
                                            "format (loads here and in transformers + bitsandbytes).")
    p.add_argument("--model", default=None, help="model directory or hub id (default: the embedded SmolLM2)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--quant-type", choices=[q for q in QUANTIZE_TYPES if q], default="nf4")
    p.add_argument("--double-quant", action="store_true", help="quantize the scales too (bitsandbytes' nested)")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="dtype of everything not quantized (embeddings, norms, lm_head) and of compute")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to quantize (a GPU runs the Triton kernels; the result is the same)")
    p.add_argument("--max-shard-size", default="5GB")
    a = p.parse_args(argv)
    model_dir = resolve_model_dir(a.model)
    out = os.path.abspath(a.out)
    if os.path.isdir(out) and os.path.samefile(out, model_dir):
        p.error(f"--out {a.out} is the model directory: writing the copy would replace its weights")
    t = time.time()
    try:
        model = load_model(model_dir, quantize=a.quant_type, device=a.device, dtype=getattr(torch, a.dtype),
                           blocksize=a.blocksize, double_quant=a.double_quant)
    except ValueError as err:  # e.g. a blocksize bitsandbytes does not have: the loader names it
        p.error(str(err))
    n4 = sum(1 for m in model.modules() if hasattr(m, "qweight"))
    if n4 == 0:
        p.error(f"{model_dir}: no linear was quantized (an already 4-bit checkpoint? it loads as it is)")
    save_model(model, out, max_shard_size=a.max_shard_size)
    copied = copy_side_files(str(model_dir), out, skip=("config.json",))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
    print(f"{model_dir} -> {out}: {n4} linears in {a.quant_type}{' (double quant)' if a.double_quant else ''}, "
          f"blocksize {a.blocksize}, the rest {a.dtype}; {size / 2**20:.1f} MiB of weights, "
          f"{len(copied)} side files copied; {time.time() - t:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
