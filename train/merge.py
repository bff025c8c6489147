"""`python -m train.merge`: merge a saved PEFT-format LoRA adapter into its dense base model and write a Hugging
Face checkpoint (the tutorial's last step: reload the base in fp16, apply the adapter, merge_and_unload, save).

    python -m train.merge --adapter results/qlora-adapter --out merged [--base DIR_OR_ID] [--dtype float16]

The base defaults to the adapter's base_model_name_or_path; train.run's embedded default records the
SmolLM2-135M-Instruct hub id, which here means the embedded copy it trained on. The merge is lora's
(`merge_and_unload`, W' = dtype(float32(W) + s B A)); the checkpoint is `save_merged_checkpoint`'s (weights plus the
base's config and tokenizer files, each written to a temp name and renamed). It lives in train/ because it needs
both llama (the loader) and lora.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch

from llama import load_model, resolve_model_dir
from lora import LoraConfig, load_adapter, lora_layers, merge_and_unload, save_merged_checkpoint


EMBEDDED_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what train.run records for its embedded default base


def merge_into_base(base_dir, adapter_dir: str, out_dir: str, dtype: torch.dtype = torch.float16,
                    device: str | torch.device = "cpu") -> int:
    """Reload the dense base in `dtype`, apply the adapter, merge, write the checkpoint; returns the merged layers."""
    model = load_model(base_dir, dtype=dtype, device=device)
    load_adapter(model, adapter_dir)
    n = sum(1 for _ in lora_layers(model))
    save_merged_checkpoint(merge_and_unload(model), out_dir, base_dir=str(base_dir))
    return n


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.merge",
                                description="Merge a PEFT-format LoRA adapter into its dense base model and write a "
                                            "Hugging Face checkpoint (safetensors + the base's config and tokenizer).")
    p.add_argument("--adapter", required=True, help="adapter directory (adapter_config.json, adapter_model.safetensors)")
    p.add_argument("--out", required=True, help="output directory for the merged checkpoint")
    p.add_argument("--base", default=None, help="base model directory or hub id (default: the adapter's "
                   f"base_model_name_or_path; {EMBEDDED_BASE_ID} = the embedded copy)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="dtype the base is reloaded in and the merged weights are saved in (the tutorial: float16)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    if not os.path.isfile(os.path.join(a.adapter, "adapter_config.json")):
        p.error(f"--adapter {a.adapter}: no adapter_config.json there (expected a PEFT-format adapter directory)")
    base = a.base or LoraConfig.load(a.adapter).base_model_name_or_path
    base_dir = resolve_model_dir(None if base in (None, EMBEDDED_BASE_ID) and a.base is None else base)
    out = os.path.abspath(a.out)
    for what, d in (("base model", str(base_dir)), ("adapter", a.adapter)):
        if os.path.isdir(out) and os.path.samefile(out, d):
            p.error(f"--out {a.out} is the {what} directory: the merged checkpoint would overwrite its files")
    n = merge_into_base(base_dir, a.adapter, out, getattr(torch, a.dtype), a.device)
    print(f"merged {n} LoRA layers of {a.adapter} into {base_dir} ({a.dtype}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
