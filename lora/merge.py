"""Fold LoRA updates into the base weights, unwrap the LoRA layers, and write a dense HF checkpoint.

Dense base (the tutorial's "reload the base in fp16 and merge_and_unload"):
    W' = cast_to_W_dtype( float32(W) + s * float32(B) @ float32(A) )      W: (out, in)
    b' = b + s * b_B                                                       (lora_bias only)
NF4 base (QLoRA merged back into a 4-bit model):
    W' = quantize_nf4( dequantize_nf4(Q) + s * B @ A )
and the error the second quantization adds is reported per layer (relative Frobenius norms):
    rel_err       = ||deq(W') - (deq(Q) + dW)||_F / ||deq(Q) + dW||_F
    rel_err_delta = ||deq(W') - (deq(Q) + dW)||_F / ||dW||_F      (> 1 means the update is drowned)

    model = llama.checkpoint.load_model("base_dir", dtype=torch.float16)    # the dense base again, fp16
    load_adapter(model, "adapter_dir")                                     # lora.adapter_io
    save_merged_checkpoint(merge_and_unload(model), "out_dir", base_dir="base_dir")  # from_pretrained(out_dir)

The same three steps from the command line: `python -m train.merge` (train/merge.py: it needs llama's loader).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import save_file

from nf4 import atomic_write_text, copy_side_files

from .inject import lora_layers
from .layer import LoRALinear


def _is_quantized(base: nn.Module) -> bool:
    return getattr(base, "qweight", None) is not None and not isinstance(base, nn.Linear)


@torch.no_grad()
def merge_layer(layer: LoRALinear) -> Optional[dict]:
    """Fold s * B @ A into layer.base_layer in place and mark the layer merged.

    Dense base: returns None. NF4 base (kernels.NF4Linear): the base is re-quantized with its own
    blocksize / quant_type / double_quant and the quantization error is returned as
    {"rel_err": ..., "rel_err_delta": ...}.
    """
    if layer.merged:
        raise ValueError("LoRALinear is already merged")
    base = layer.base_layer
    if layer.lora_B.bias is not None and getattr(base, "bias", None) is None:
        raise ValueError(f"cannot merge lora_bias into a {type(base).__name__} that has no bias (peft neither)")
    delta = layer.delta_weight(torch.float32)                          # (out, in) fp32
    report = None
    if _is_quantized(base):
        qw = base.qweight
        target = qw.dequantize(torch.float32) + delta                  # (out, in)
        new = type(base).from_weight(
            target.to(qw.dtype), bias=base.bias, blocksize=qw.blocksize, quant_type=qw.quant_type,
            double_quant=qw.nested is not None, compute_dtype=getattr(base, "compute_dtype", None))
        err = torch.linalg.norm(new.qweight.dequantize(torch.float32) - target)
        report = {"rel_err": (err / torch.linalg.norm(target).clamp_min(1e-30)).item(),
                  "rel_err_delta": (err / torch.linalg.norm(delta).clamp_min(1e-30)).item()}
        layer.base_layer = new
        base = new
    else:
        w = base.weight
        w.copy_((w.float() + delta).to(w.dtype))
    if layer.lora_B.bias is not None:
        base.bias.copy_((base.bias.float() + layer.scaling * layer.lora_B.bias.float()).to(base.bias.dtype))
    layer.merged = True
    return report


@torch.no_grad()
def unmerge_layer(layer: LoRALinear) -> None:
    """Undo merge_layer for a dense base: W -= s * B @ A (exact up to the rounding of W's dtype)."""
    if not layer.merged:
        raise ValueError("LoRALinear is not merged")
    base = layer.base_layer
    if _is_quantized(base):
        raise ValueError("cannot unmerge from a re-quantized NF4 base (the quantization is not invertible)")
    base.weight.copy_((base.weight.float() - layer.delta_weight(torch.float32)).to(base.weight.dtype))
    if layer.lora_B.bias is not None:
        base.bias.copy_((base.bias.float() - layer.scaling * layer.lora_B.bias.float()).to(base.bias.dtype))
    layer.merged = False


def merge_adapter(model: nn.Module) -> dict[str, dict]:
    """merge_layer on every LoRA layer; returns {path: quantization report} for the NF4 ones."""
    reports = {}
    for name, layer in list(lora_layers(model)):
        rep = merge_layer(layer)
        if rep is not None:
            reports[name] = rep
    return reports


def unload(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by its base_layer (merged or not); the LoRA weights are dropped."""
    for name, layer in list(lora_layers(model)):
        parent_path, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, child, layer.base_layer)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def merge_and_unload(model: nn.Module, return_report: bool = False):
    """peft's merge_and_unload: merge every LoRA layer into its base, then unwrap. Returns the model
    (and with return_report, {path: {"rel_err", "rel_err_delta"}} for layers with an NF4 base)."""
    reports = merge_adapter(model)
    unload(model)
    return (model, reports) if return_report else model


@torch.no_grad()
def dequantize_linears(model: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Replace every 4-bit linear (a module with `qweight`, e.g. kernels.NF4Linear), LoRA bases included, by an
    nn.Linear holding deq(Q) in `dtype`. Then merge_and_unload gives a dense model: W = deq(Q) + s B A.
    (The tutorial instead reloads the original fp16 weights, which avoids the 4-bit error in W.)"""
    for name, module in list(model.named_modules()):
        if not _is_quantized(module):
            continue
        w = module.qweight.dequantize(torch.float32)
        bias = getattr(module, "bias", None)
        dense = nn.Linear(module.in_features, module.out_features, bias=bias is not None, dtype=dtype,
                          device=w.device)
        dense.weight.copy_(w.to(dtype))
        dense.weight.requires_grad_(False)
        if bias is not None:
            dense.bias.copy_(bias.to(dtype))
            dense.bias.requires_grad_(bias.requires_grad)
        parent_path, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, dense)
    return model


# --------------------------------------------------------------------------- checkpoint writing
def _dense_state_dict(model: nn.Module, dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    """Parameters by HF key, tied ones once (first name: model.embed_tokens.weight before lm_head.weight)."""
    quantized = [n for n, m in model.named_modules() if _is_quantized(m)]
    if quantized or any(True for _ in lora_layers(model)):
        raise ValueError("save_merged_checkpoint needs a dense model without LoRA layers; "
                         f"found quantized modules {quantized[:5]} / LoRA layers: merge_and_unload a dense model")
    out = {}
    for name, p in model.named_parameters():           # remove_duplicate=True drops tied aliases
        t = p.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        out[name] = t.to("cpu").contiguous()
    return out


def save_merged_checkpoint(model: nn.Module, out_dir: str, base_dir: Optional[str] = None,
                           dtype: Optional[torch.dtype] = None, max_shard_bytes: int = 5 * 2**30) -> str:
    """Write a Hugging Face-layout checkpoint of a dense (merged) model that `from_pretrained` loads.

    Files: model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json when larger
    than max_shard_bytes), and from `base_dir` every non-weight file (config.json, generation_config.json,
    tokenizer files, chat template). config.json gets the saved dtype. Without base_dir, the model's own
    config is written (transformers' `model.config` or our Llama module's `model.args`). Every file is written to a temp name, then renamed. Returns out_dir.
    """
    sd = _dense_state_dict(model, dtype)
    os.makedirs(out_dir, exist_ok=True)
    shards, cur, size = [], {}, 0
    for k, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += nbytes
    shards.append(cur)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        tmp = os.path.join(out_dir, f".{name}.tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(out_dir, name))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in sd.values())},
                 "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
        atomic_write_text(os.path.join(out_dir, "model.safetensors.index.json"),
                          json.dumps(index, indent=2) + "\n")

    saved_dtype = str(next(iter(sd.values())).dtype).replace("torch.", "") if sd else None
    if base_dir is not None:
        copy_side_files(str(base_dir), out_dir)
    else:  # transformers' model.config, or our Llama module's model.args (both have to_dict)
        own = getattr(model, "config", None) or getattr(model, "args", None)
        if hasattr(own, "to_dict"):
            atomic_write_text(os.path.join(out_dir, "config.json"),
                              json.dumps(own.to_dict(), indent=2, default=str) + "\n")
    cfg_path = os.path.join(out_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"no config.json for {out_dir}: pass base_dir (the base model's directory)")
    with open(cfg_path) as fh:
        cfg = json.load(fh)
    if saved_dtype is not None:
        cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = saved_dtype
    atomic_write_text(cfg_path, json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out_dir
