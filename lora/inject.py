"""Put `LoRALinear` layers into a model by module name, freeze the rest, and count parameters.

    inject_lora(model, LoraConfig(r=64, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    print(trainable_parameters_report(model))
    # trainable params: 8,388,608 || all params: 3,508,801,536 || trainable%: 0.2391

Matching of a module path `key` (e.g. "model.layers.3.self_attn.q_proj"), as peft does it:
    target_modules = list  -> key == t or key.endswith("." + t) for some t
    target_modules = str   -> re.fullmatch(target_modules, key)
    target_modules = "all-linear" -> every linear except the output head (lm_head)
    target_modules = None  -> the model type's default (Llama: ["q_proj", "v_proj"])
`exclude_modules` (same forms) and `modules_to_save` remove modules from the targets.

After injection only these parameters have requires_grad=True:
    every lora_A / lora_B weight (and lora_B bias with lora_bias),
    bias="all": every parameter named "bias" / "*.bias";  bias="lora_only": the base_layer bias of LoRA layers,
    every parameter of a module in modules_to_save (trained in place; peft trains a copy).
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn as nn

from .config import ALL_LINEAR, DEFAULT_TARGET_MODULES, LoraConfig
from .layer import LoRALinear

OUTPUT_HEAD_NAMES = ("lm_head",)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a quantized linear (kernels.NF4Linear, bnb Linear4bit): integer in/out features."""
    if isinstance(module, LoRALinear):
        return False
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(getattr(module, "in_features", None), int)
            and isinstance(getattr(module, "out_features", None), int)
            and (hasattr(module, "qweight") or hasattr(module, "weight")))


def _matches(pattern, key: str) -> bool:
    if isinstance(pattern, str):
        return re.fullmatch(pattern, key) is not None
    return any(key == t or key.endswith("." + t) for t in pattern)


def _output_head_names(model: nn.Module) -> set[str]:
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name.split(".")[-1] in OUTPUT_HEAD_NAMES:
            names.add(name)
    return names


def default_target_modules(model: nn.Module) -> list[str]:
    """peft's default targets for the model type (`model.config.model_type`; our Llama module: llama)."""
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None) or "llama"
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"no default target_modules for model_type {model_type!r}; pass target_modules "
                         f"(known defaults: {DEFAULT_TARGET_MODULES})")
    return list(DEFAULT_TARGET_MODULES[model_type])


def find_target_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """Module paths that get a LoRA layer. Raises ValueError listing the module names when none match,
    and when a matched module is not a linear."""
    targets = config.target_modules
    if targets is None:
        targets = default_target_modules(model)
    all_names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = _output_head_names(model)
        found = [n for n, m in model.named_modules() if n and is_linear(m) and n not in heads]
    else:
        found = [n for n in all_names if _matches(targets, n)]
    if config.exclude_modules:
        found = [n for n in found if not _matches(config.exclude_modules, n)]
    if config.modules_to_save:
        found = [n for n in found if not any(re.match(rf"(^|.*\.){m}($|\..*)", n) for m in config.modules_to_save)]
    if not found:
        leaf_names = sorted({n.split(".")[-1] for n in all_names if not n.split(".")[-1].isdigit()})
        raise ValueError(f"target_modules={targets!r} matched no module of {type(model).__name__}. "
                         f"Module names that exist: {leaf_names} (full paths e.g. {all_names[:8]})")
    modules = dict(model.named_modules())
    bad = [f"{n} ({type(modules[n]).__name__})" for n in found if not is_linear(modules[n])]
    if bad:
        raise ValueError(f"target_modules={targets!r} matched modules that are not linear layers: {bad}; "
                         "only nn.Linear and NF4Linear are supported")
    return found


def _set_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(path, layer) for every LoRALinear in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def inject_lora(model: nn.Module, config: Optional[LoraConfig] = None,
                adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace each targeted linear of `model` (in place) by LoRALinear(linear) and freeze the rest.

    Returns `model`; its config is kept as `model.lora_config` (target_modules=None is resolved to the
    model type's default list, as peft records it).
    """
    config = config or LoraConfig()
    if any(True for _ in lora_layers(model)):
        raise ValueError(f"{type(model).__name__} already has LoRA layers; call lora.unload(model) first")
    found = find_target_modules(model, config)
    for name in found:
        base = model.get_submodule(name)
        layer = LoRALinear(base, r=config.rank_for(name), lora_alpha=config.alpha_for(name),
                           lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                           lora_bias=config.lora_bias, init_lora_weights=config.init_lora_weights,
                           adapter_dtype=adapter_dtype)
        _set_submodule(model, name, layer)
    if config.target_modules is None:
        config.target_modules = default_target_modules(model)
    mark_only_lora_trainable(model, config)
    model.lora_config = config
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with requires_grad (what the optimizer gets), each once."""
    return [p for p in model.parameters() if p.requires_grad]


@contextmanager
def disable_adapters(model: nn.Module):
    """Inside the block every LoRA layer computes its base only (peft's `with model.disable_adapter():`)."""
    layers = [layer for _, layer in lora_layers(model)]
    saved = [layer.disable_adapter for layer in layers]
    for layer in layers:
        layer.disable_adapter = True
    try:
        yield model
    finally:
        for layer, s in zip(layers, saved):
            layer.disable_adapter = s


def modules_to_save_names(model: nn.Module, config: LoraConfig) -> list[str]:
    """Paths of the modules trained in full (peft rule: the path ends with one of config.modules_to_save)."""
    if not config.modules_to_save:
        return []
    names = [n for n, _ in model.named_modules() if n and any(n.endswith(m) for m in config.modules_to_save)]
    # keep outermost matches only
    return [n for n in names if not any(n != o and n.startswith(o + ".") for o in names)]


def mark_only_lora_trainable(model: nn.Module, config: LoraConfig) -> None:
    """requires_grad = True exactly for the LoRA weights, the biases chosen by config.bias and modules_to_save."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name, layer in lora_layers(model):
        for p in list(layer.lora_A.parameters()) + list(layer.lora_B.parameters()):
            p.requires_grad_(True)
        if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            layer.base_layer.bias.requires_grad_(True)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name == "bias" or name.endswith(".bias"):
                p.requires_grad_(True)
    for name in modules_to_save_names(model, config):
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, all) as peft's get_nb_trainable_parameters counts them.

    Each parameter counts its numel (shared / tied parameters once). A 4-bit quantized linear counts as
    many parameters as its original weight (peft: Params4bit numel * 2, two 4-bit codes per byte); the
    quantization constants (absmax, ...) are not counted.
    """
    packed = {id(p) for m in model.modules() if getattr(m, "qweight", None) is not None
              for p in m.parameters(recurse=False) if not p.is_floating_point()}  # counted via qweight.shape
    trainable = total = 0
    for _, p in model.named_parameters():
        if id(p) in packed:
            continue
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2 * (p.element_size() if hasattr(p, "element_size") else 1)
        total += n
        trainable += n if p.requires_grad else 0
    for _, module in model.named_modules():
        qweight = getattr(module, "qweight", None)
        if qweight is not None and hasattr(qweight, "shape") and not isinstance(qweight, nn.Parameter):
            n = 1
            for d in qweight.shape:
                n *= int(d)
            total += n
    return trainable, total


def trainable_parameters_report(model: nn.Module) -> str:
    """'trainable params: X || all params: Y || trainable%: Z', peft's print_trainable_parameters line."""
    trainable, total = count_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    """Print trainable_parameters_report(model), under peft's method name."""
    print(trainable_parameters_report(model))
