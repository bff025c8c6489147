"""Load and save Hugging Face Llama checkpoints: ``config.json`` + safetensors (one file or sharded with
``model.safetensors.index.json``).

Loading is streamed and all-or-nothing:

1. read ``config.json`` -> :class:`ModelArgs`; build :class:`LlamaForCausalLM` on the ``meta`` device (no memory);
2. read every safetensors *header* (no tensor data) and check the key set and every shape against the module:
   a missing, unexpected or wrong-shaped tensor, or a truncated / corrupt file, is reported before any weight
   is read, naming the file and the tensor;
3. read the tensors one file at a time; each is moved to ``device`` / ``dtype`` and put in place of its meta
   parameter. With ``quantize="nf4"`` (or ``"fp4"``) every linear layer except ``lm_head`` becomes a
   ``kernels.NF4Linear`` as soon as its weight arrives, so host memory peaks near one shard and device memory near
   the quantized model. A checkpoint saved 4-bit in bitsandbytes' ``Linear4bit`` form (``weight`` uint8 codes,
   ``weight.absmax``, ``weight.quant_map``, ``weight.quant_state.bitsandbytes__nf4``, ...; what transformers and
   :func:`save_model` write for a 4-bit model) loads into ``kernels.NF4Linear`` without requantizing.

A failure at any step raises; the caller never receives a partly loaded model.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from nf4 import atomic_write_text

from .config import ModelArgs
from .model import LlamaForCausalLM

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# keys some checkpoints carry that hold nothing to load (old transformers saved the RoPE table)
IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
QUANTIZE_TYPES = (None, "nf4", "fp4")
QUANT_STATE_KEY = ".weight.quant_state.bitsandbytes__"  # marks a linear saved in bitsandbytes' Linear4bit form


class CheckpointError(ValueError):
    """A checkpoint on disk does not match the model its config.json describes."""


def resolve_model_dir(name_or_path: str | os.PathLike | None) -> Path:
    """A local directory as is; ``None`` / ``"embedded"`` -> the embedded SmolLM2 (imported once from its GGUF);
    ``"owner/name"`` -> a Hugging Face Hub snapshot (needs a network, or a filled hub cache)."""
    if name_or_path is None or str(name_or_path) in ("embedded", "smollm2-135m-instruct"):
        from .gguf_import import embedded_model_dir

        return embedded_model_dir()
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is not a directory (expected a model directory with config.json)")
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(name_or_path)):
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), allow_patterns=[
            "*.json", "*.safetensors", "tokenizer.model"]))
    raise FileNotFoundError(f"model directory {path} does not exist")


def weight_files(model_dir: Path) -> dict[str, list[str] | None]:
    """``{file: keys the index assigns to it}`` (``None`` for a single unindexed file)."""
    index = model_dir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (expected JSON with 'weight_map'): {e}") from e
        files: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            files.setdefault(fname, []).append(key)
        return files
    if (model_dir / SINGLE_NAME).is_file():
        return {SINGLE_NAME: None}
    found = sorted(p.name for p in model_dir.glob("*.safetensors"))
    hint = f" (found {', '.join(found)} but no {INDEX_NAME})" if found else ""
    if (model_dir / "pytorch_model.bin").exists():
        hint = " (only pytorch_model.bin, a pickle; convert it to safetensors)"
    raise FileNotFoundError(f"no weights in {model_dir}: expected {SINGLE_NAME} or {INDEX_NAME}{hint}")


def read_headers(model_dir: Path, files: dict[str, list[str] | None]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{key: (file, shape)}`` from the safetensors headers only; corrupt or truncated files raise here."""
    where: dict[str, tuple[str, tuple[int, ...]]] = {}
    for fname, indexed_keys in files.items():
        path = model_dir / fname
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {INDEX_NAME} but missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        except Exception as e:  # safetensors raises its own SafetensorError for every kind of damage
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e
        if indexed_keys is not None:
            absent = sorted(set(indexed_keys) - set(keys))
            if absent:
                raise CheckpointError(f"{path}: {len(absent)} tensors the index assigns to it are not in it, "
                                      f"e.g. {absent[0]!r}")
        for k in keys:
            if k in where:
                raise CheckpointError(f"tensor {k!r} appears in both {where[k][0]} and {fname}")
            where[k] = (fname, shapes[k])
    return where


def quantized_prefixes(where: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, int]:
    """Linears stored pre-quantized in bitsandbytes' Linear4bit form: ``{module name: number of keys under
    "<name>.weight"}``, found by their ``<name>.weight.quant_state.bitsandbytes__<nf4|fp4>`` key."""
    names = {k.split(QUANT_STATE_KEY)[0].removesuffix(".weight") for k in where if QUANT_STATE_KEY in k}
    return {n: sum(1 for k in where if k == n + ".weight" or k.startswith(n + ".weight.")) for n in names}


def _quantized_owner(key: str, quantized: dict[str, int]) -> str | None:
    """The pre-quantized linear a key belongs to ("a.q_proj.weight.absmax" -> "a.q_proj"), else None."""
    head, sep, _ = key.partition(".weight")
    return head if sep and head in quantized and (key == head + ".weight" or key.startswith(head + ".weight.")) \
        else None


def check_keys(model: nn.Module, where: dict[str, tuple[str, tuple[int, ...]]], model_dir: Path,
               quantized: dict[str, int] | None = None) -> None:
    """Every parameter present with its shape, nothing unexpected (tied ``lm_head.weight`` may be absent).
    A pre-quantized linear's ``weight`` is its set of Linear4bit keys; their shapes are checked when it is built."""
    quantized = quantized or {}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = model.args.tie_word_embeddings
    found = {k for k in where if not IGNORED_KEYS.fullmatch(k) and _quantized_owner(k, quantized) is None}
    found |= {n + ".weight" for n in quantized}
    missing = sorted(set(expected) - found - ({"lm_head.weight"} if tied else set()))
    unexpected = sorted(found - set(expected))
    if missing or unexpected:
        msg = [f"{model_dir}: checkpoint does not match config.json"]
        if missing:
            msg.append(f"missing {len(missing)} tensors: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            msg.append(f"unexpected {len(unexpected)} tensors: {', '.join(unexpected[:5])}"
                       f"{' ...' if len(unexpected) > 5 else ''}")
        raise CheckpointError("; ".join(msg))
    for k in found:
        if _quantized_owner(k, quantized) is None:
            fname, shape = where[k]
            if shape != expected[k]:
                raise CheckpointError(f"{model_dir / fname}: tensor {k!r} has shape {list(shape)}, "
                                      f"the model expects {list(expected[k])}")


def _set_param(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the (meta) parameter ``name`` by ``value``."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = nn.Parameter(value, requires_grad=value.is_floating_point())


def _is_quantized_linear(name: str) -> bool:
    return name.endswith("_proj.weight")  # q/k/v/o and gate/up/down; never lm_head or the embedding


def load_model(path: str | os.PathLike | None = None, quantize: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, blocksize: int = 64, double_quant: bool = False) -> LlamaForCausalLM:
    """Load a Llama checkpoint directory (or hub id, or ``None`` for the embedded SmolLM2) into
    :class:`LlamaForCausalLM` in eval mode, with parameters on ``device`` in ``dtype``.

    ``quantize="nf4"`` / ``"fp4"``: each linear except ``lm_head`` becomes ``kernels.NF4Linear`` (4-bit blocks of
    ``blocksize``, optional double quantization, compute in ``dtype``) as its weight streams in.
    """
    if quantize not in QUANTIZE_TYPES:
        raise ValueError(f"quantize={quantize!r}; expected one of {QUANTIZE_TYPES}")
    model_dir = resolve_model_dir(path)
    args = ModelArgs.from_json(model_dir)
    files = weight_files(model_dir)
    where = read_headers(model_dir, files)
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    quantized = quantized_prefixes(where)
    check_keys(model, where, model_dir, quantized)

    nf4_linear = None
    if quantize is not None or quantized:
        from kernels import NF4Linear  # imported here: only 4-bit models need the kernels

        nf4_linear = NF4Linear
    device = torch.device(device)
    pending: dict[str, dict[str, torch.Tensor]] = {}  # pre-quantized linears whose keys are still arriving
    for fname in files:
        path_ = model_dir / fname
        try:
            with safe_open(str(path_), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if IGNORED_KEYS.fullmatch(key) or (args.tie_word_embeddings and key == "lm_head.weight"):
                        continue
                    t = f.get_tensor(key)
                    owner = _quantized_owner(key, quantized)
                    if owner is not None:  # keep bitsandbytes' dtypes (uint8 codes, fp32 scales)
                        part = pending.setdefault(owner, {})
                        part["weight" + key[len(owner) + len(".weight"):]] = t
                        if len(part) == quantized[owner]:
                            _load_prequantized(model, owner, pending.pop(owner), nf4_linear, device, dtype, path_)
                        continue
                    t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                    if quantize is not None and _is_quantized_linear(key):
                        _quantize_in_place(model, key, t, nf4_linear, quantize, blocksize, double_quant, dtype)
                    elif nf4_linear is not None and key.endswith("_proj.bias") and \
                            isinstance(model.get_submodule(key.rpartition(".")[0]), nf4_linear):
                        _set_bias(model, key, t)
                    else:
                        _set_param(model, key, t)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path_}: failed while reading tensors ({type(e).__name__}: {e})") from e
    if args.tie_word_embeddings:
        model.tie_weights()
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:  # cannot happen after check_keys; guards the all-or-nothing promise
        raise CheckpointError(f"{model_dir}: parameters never loaded: {left[:5]}")
    return model.eval()


def _quantize_in_place(model, key, weight, nf4_linear, quant_type, blocksize, double_quant, dtype) -> None:
    module_name = key.rpartition(".")[0]  # e.g. model.layers.3.self_attn.q_proj
    parent_name, _, child = module_name.rpartition(".")
    parent, old = model.get_submodule(parent_name), model.get_submodule(module_name)
    bias = old.bias if old.bias is not None and not old.bias.is_meta else None
    new = nf4_linear.from_weight(weight, bias=bias, blocksize=blocksize, quant_type=quant_type,
                                 double_quant=double_quant, compute_dtype=dtype)
    if old.bias is not None and bias is None:
        new.bias = nn.Parameter(torch.empty(old.bias.shape, device="meta"))  # the bias key arrives later
    setattr(parent, child, new)


def _load_prequantized(model, name, sd, nf4_linear, device, dtype, path) -> None:
    """Build ``kernels.NF4Linear`` for linear ``name`` from its bitsandbytes Linear4bit tensors ``sd``."""
    from nf4 import QuantizedWeight4bit

    old = model.get_submodule(name)
    try:
        qw = QuantizedWeight4bit.from_bnb_state_dict(sd, "weight")
    except ValueError as e:
        raise CheckpointError(f"{path}: 4-bit weight {name}.weight: {e}") from e
    if tuple(qw.shape) != tuple(old.weight.shape):
        raise CheckpointError(f"{path}: tensor {name + '.weight'!r} has shape {list(qw.shape)} (4-bit), "
                              f"the model expects {list(old.weight.shape)}")
    bias = old.bias if old.bias is not None and not old.bias.is_meta else None
    new = nf4_linear(qw.to(device), bias=bias, compute_dtype=dtype)
    if old.bias is not None and bias is None:
        new.bias = nn.Parameter(torch.empty(old.bias.shape, device="meta"))  # the bias key arrives later
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _set_bias(model: nn.Module, key: str, value: torch.Tensor) -> None:
    module = model.get_submodule(key.rpartition(".")[0])
    module.bias = nn.Parameter(value)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)\s*", size, re.I)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: expected bytes or e.g. '5GB', '200MB'")
    unit = m.group(2).upper()
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** {"K": 1, "M": 2, "G": 3}[unit[0]])


def _bnb_quantization_config(model: nn.Module, q4: dict, compute_dtype: torch.dtype) -> dict:
    """transformers' BitsAndBytesConfig for a model whose 4-bit linears are saved in Linear4bit form."""
    qws = [m.qweight for m in q4.values()]
    kinds = {(qw.quant_type, qw.blocksize, qw.double_quant) for qw in qws}
    if len(kinds) != 1 or next(iter(kinds))[1] != 64:
        raise ValueError(f"cannot describe 4-bit linears {sorted(kinds)} with one BitsAndBytesConfig "
                         "(it needs one quant type, one double-quant setting, blocksize 64)")
    quant_type, _, double_quant = kinds.pop()
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": dense or None}


def save_model(model: LlamaForCausalLM, path: str | os.PathLike, max_shard_size: int | str = "5GB",
               dtype: torch.dtype | None = None) -> Path:
    """Write ``config.json`` and the weights in Hugging Face layout: one ``model.safetensors`` when everything fits in
    ``max_shard_size``, else ``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json``.
    A tied ``lm_head.weight`` is not written (as transformers does). ``dtype`` casts floating tensors."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    sd = model.state_dict()
    if model.args.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    q4 = {n: m for n, m in model.named_modules() if hasattr(m, "qweight")}  # kernels.NF4Linear modules
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    for k, t in sd.items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point() and _quantized_owner(k, q4) is None:
            t = t.to(dtype)
        t = t.contiguous()
        n = t.numel() * t.element_size()
        if shards[-1] and sizes[-1] + n > limit:
            shards.append({})
            sizes.append(0)
        shards[-1][k] = t
        sizes[-1] += n
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    # every shard is written under a temporary name first: a failure (a full disk) leaves a checkpoint already in
    # `out` as it was; only then are the old weights removed and the new ones renamed into place
    tmps = []
    try:
        for name, shard in zip(names, shards):
            tmps.append(out / f".{name}.tmp")
            save_file(shard, str(tmps[-1]), metadata={"format": "pt"})
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise
    for stale in list(out.glob("model*.safetensors")) + [out / INDEX_NAME]:
        if stale.name not in names:
            stale.unlink(missing_ok=True)
    for name, tmp in zip(names, tmps):
        os.replace(tmp, out / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)},
                 "weight_map": {k: name for name, shard in zip(names, shards) for k in shard}}
        atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
    cfg = model.args.to_dict()
    cfg["torch_dtype"] = str(dtype or model.dtype).removeprefix("torch.")
    cfg.pop("quantization_config", None)  # from the checkpoint this model was loaded from, if any
    if q4:
        cfg["quantization_config"] = _bnb_quantization_config(model, q4, dtype or model.dtype)
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out

