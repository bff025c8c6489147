"""PEFT-format adapter files: `adapter_model.safetensors` + `adapter_config.json`.

A directory written by `save_adapter` loads with `peft.PeftModel.from_pretrained(hf_model, directory)`;
one written by peft's `save_pretrained` loads with `load_adapter(model, directory)`.

Key form in the file (peft's, adapter name removed), for a LoRA layer at module path P:
    base_model.model.P.lora_A.weight     (r, in)
    base_model.model.P.lora_B.weight     (out, r)
    base_model.model.P.lora_B.bias       (out,)         only with lora_bias
    base_model.model.P.base_layer.bias   (out,)         bias="lora_only" (bias="all": every *.bias)
    base_model.model.M.<param>                          every parameter of a modules_to_save module M
Our in-memory keys are the same without the `base_model.model.` prefix (see lora.layer).
Both files are written atomically: to a temp file in the same directory, then renamed.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file

from nf4 import atomic_save_safetensors

from .config import LoraConfig
from .inject import inject_lora, lora_layers, mark_only_lora_trainable, modules_to_save_names
from .layer import lora_scaling

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def adapter_state_dict(model: nn.Module, config: Optional[LoraConfig] = None) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, keyed as in the model (no `base_model.model.` prefix)."""
    config = config or _model_config(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    keys = []
    for name, layer in lora_layers(model):
        keys += [f"{name}.lora_A.{k}" for k, _ in layer.lora_A.named_parameters()]
        keys += [f"{name}.lora_B.{k}" for k, _ in layer.lora_B.named_parameters()]
        if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            keys.append(f"{name}.base_layer.bias")
    if config.bias == "all":
        keys += [k for k in params if k == "bias" or k.endswith(".bias")]
    for m in modules_to_save_names(model, config):
        keys += [f"{m}.{k}" for k, _ in model.get_submodule(m).named_parameters()]
    return {k: params[k] for k in dict.fromkeys(keys)}


def _model_config(model: nn.Module) -> LoraConfig:
    config = getattr(model, "lora_config", None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no lora_config: call lora.inject_lora first or pass config")
    return config


def save_adapter(model: nn.Module, directory: str, config: Optional[LoraConfig] = None) -> str:
    """Write `directory/adapter_model.safetensors` and `directory/adapter_config.json` (PEFT format).

    `config` defaults to the one `inject_lora` recorded; base_model_name_or_path is filled from the model
    (`name_or_path`) when unset. Returns `directory`.
    """
    config = config or _model_config(model)
    if not any(True for _ in lora_layers(model)):
        raise ValueError(f"{type(model).__name__} has no LoRA layers to save")
    if config.base_model_name_or_path is None:
        name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        if name:
            config.base_model_name_or_path = name
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous().clone()
               for k, v in adapter_state_dict(model, config).items()}
    os.makedirs(directory, exist_ok=True)
    atomic_save_safetensors(tensors, os.path.join(directory, ADAPTER_WEIGHTS), {"format": "pt"})
    config.save(directory)
    return directory


def read_adapter_weights(directory: str) -> dict[str, torch.Tensor]:
    """The tensors of an adapter directory, keys without the `base_model.model.` prefix."""
    path = os.path.join(directory, ADAPTER_WEIGHTS)
    if os.path.isfile(path):
        sd = load_file(path)
    elif os.path.isfile(os.path.join(directory, "adapter_model.bin")):
        path = os.path.join(directory, "adapter_model.bin")
        sd = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} (or adapter_model.bin) in {directory}")
    return {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in sd.items()}


def load_adapter(model: nn.Module, directory: str, is_trainable: bool = False,
                 adapter_dtype: torch.dtype = torch.float32) -> LoraConfig:
    """Load a PEFT-format adapter into `model` (injecting LoRA layers per its config if absent).

    Every tensor must match a parameter of the model in shape; errors name the tensor. Like peft's
    `from_pretrained`, the model is frozen unless `is_trainable`. Returns the adapter's LoraConfig.
    """
    config = LoraConfig.load(directory)
    if not any(True for _ in lora_layers(model)):
        inject_lora(model, config, adapter_dtype=adapter_dtype)
    else:  # existing LoRA layers take the file's scaling and dropout (their shapes are checked below)
        for name, layer in lora_layers(model):
            layer.lora_alpha, layer.use_rslora = config.alpha_for(name), config.use_rslora
            layer.scaling = lora_scaling(layer.r, layer.lora_alpha, layer.use_rslora)
            layer.lora_dropout = (nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity())
    file_sd = read_adapter_weights(directory)
    expected = adapter_state_dict(model, config)
    params = dict(model.named_parameters(remove_duplicate=False))
    where = os.path.join(directory, ADAPTER_WEIGHTS)
    unexpected = [k for k in file_sd if k not in params]
    if unexpected:
        raise ValueError(f"{where}: tensors {[PEFT_PREFIX + k for k in unexpected[:10]]} match no parameter of "
                         f"{type(model).__name__} (LoRA layers at: {[n for n, _ in lora_layers(model)][:10]})")
    missing = [k for k in expected if k not in file_sd and (".lora_A." in k or ".lora_B." in k)]
    if missing:
        raise ValueError(f"{where}: lacks LoRA tensors {[PEFT_PREFIX + k for k in missing[:10]]}")
    for k, t in file_sd.items():
        if tuple(t.shape) != tuple(params[k].shape):
            raise ValueError(f"{where}: tensor {PEFT_PREFIX + k} has shape {tuple(t.shape)} but the model's "
                             f"parameter {k} has shape {tuple(params[k].shape)} (r={config.r})")
    with torch.no_grad():
        for k, t in file_sd.items():
            params[k].copy_(t.to(params[k].device))
    model.lora_config = config
    if is_trainable:
        config.inference_mode = False
        mark_only_lora_trainable(model, config)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    return config
