"""bitsandbytes `Linear4bit` state-dict form of a QuantizedWeight4bit, and safetensors files of them.

Under a weight prefix (e.g. "model.layers.0.self_attn.q_proj.weight") bitsandbytes 0.50 writes:

    {prefix}                                    uint8 ((n + 1) // 2, 1)  packed codes
    {prefix}.absmax                             float32 (n_blocks,), or uint8 (n_blocks,) when double-quantized
    {prefix}.quant_map                          float32 (16,)            the code table
    {prefix}.nested_absmax                      float32 (ceil(n_blocks / 256),)     double quant only
    {prefix}.nested_quant_map                   float32 (256,)                      double quant only
    {prefix}.quant_state.bitsandbytes__nf4      uint8 bytes of a JSON object (``__fp4`` for FP4):
        {"quant_type", "blocksize", "dtype", "shape"[, "nested_blocksize", "nested_dtype", "nested_offset"]}
"""
import json
import os
import shutil
import tempfile
from collections import OrderedDict

import torch

from .double_quant import DoubleQuantState
from .quantized_weight import QuantizedWeight4bit
from .tables import QUANT_TYPES, code_table

QUANT_STATE_KEY = ".quant_state.bitsandbytes__"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def bnb_quant_map(quant_type: str, device=None) -> torch.Tensor:
    """The quant_map tensor bitsandbytes writes: our code table, except FP4's code 8 is stored as +0.0
    (its CUDA kernel still decodes code 8 as -0.0, which is what code_table holds)."""
    table = code_table(quant_type, device)
    return torch.where(table == 0, torch.zeros_like(table), table)


def to_bnb_state_dict(qw: QuantizedWeight4bit, prefix: str = "weight") -> "OrderedDict[str, torch.Tensor]":
    """The tensors bitsandbytes' Linear4bit.state_dict() holds for this weight, in its key order."""
    sd = OrderedDict()
    sd[prefix] = qw.packed
    meta = {"quant_type": qw.quant_type, "blocksize": qw.blocksize, "dtype": _dtype_name(qw.dtype),
            "shape": list(qw.shape)}
    if qw.nested is None:
        sd[f"{prefix}.absmax"] = qw.absmax
        sd[f"{prefix}.quant_map"] = bnb_quant_map(qw.quant_type, qw.device)
    else:
        sd[f"{prefix}.absmax"] = qw.nested.q
        sd[f"{prefix}.quant_map"] = bnb_quant_map(qw.quant_type, qw.device)
        sd[f"{prefix}.nested_absmax"] = qw.nested.absmax2
        sd[f"{prefix}.nested_quant_map"] = qw.nested.code.clone()
        meta.update(nested_blocksize=qw.nested.blocksize, nested_dtype="float32",
                    nested_offset=float(qw.nested.offset.item()))
    blob = json.dumps(meta).encode("utf-8")
    sd[f"{prefix}{QUANT_STATE_KEY}{qw.quant_type}"] = torch.tensor(list(blob), dtype=torch.uint8)
    return sd


def _require(state_dict: dict, key: str, dtype: torch.dtype, where: str) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"{where}: missing key {key!r} (bitsandbytes Linear4bit form)")
    t = state_dict[key]
    if not isinstance(t, torch.Tensor) or t.dtype != dtype:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{where}: {key!r} must be a {dtype} tensor, got {got}")
    return t


def from_bnb_state_dict(state_dict: dict, prefix: str = "weight", where: str = "state dict") -> QuantizedWeight4bit:
    """Rebuild a QuantizedWeight4bit from bitsandbytes' Linear4bit keys under `prefix`."""
    qs_keys = [k for k in state_dict if k.startswith(prefix + QUANT_STATE_KEY)]
    if len(qs_keys) != 1:
        raise ValueError(f"{where}: expected exactly one key {prefix + QUANT_STATE_KEY}<nf4|fp4>, found {qs_keys}")
    qs_key = qs_keys[0]
    suffix = qs_key[len(prefix + QUANT_STATE_KEY):]
    blob = state_dict[qs_key]
    try:
        meta = json.loads(bytes(blob.cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, AttributeError, TypeError) as err:
        raise ValueError(f"{where}: {qs_key!r} does not hold a JSON quant state ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: {qs_key!r} must hold a JSON object, got {type(meta).__name__}")
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"{where}: {qs_key!r} lacks field {field!r}; expected quant_type, blocksize, dtype, shape")
    quant_type = meta["quant_type"]
    if quant_type not in QUANT_TYPES or quant_type != suffix:
        raise ValueError(f"{where}: {qs_key!r} says quant_type {quant_type!r}; expected {suffix!r} (one of {QUANT_TYPES})")
    if meta["dtype"] not in _DTYPES:
        raise ValueError(f"{where}: {qs_key!r} has dtype {meta['dtype']!r}; expected one of {list(_DTYPES)}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"{where}: {qs_key!r} has shape {shape!r}; expected a list of positive integers")
    packed = _require(state_dict, prefix, torch.uint8, where)
    quant_map = _require(state_dict, f"{prefix}.quant_map", torch.float32, where)
    if not torch.equal(quant_map.cpu(), code_table(quant_type)):  # (-0.0 == 0.0 here)
        raise ValueError(f"{where}: {prefix}.quant_map is not the standard {quant_type} table; custom maps are unsupported")
    packed = packed.reshape(-1, 1)
    nested = None
    if "nested_offset" in meta:
        for field in ("nested_blocksize", "nested_dtype"):
            if field not in meta:
                raise ValueError(f"{where}: {qs_key!r} has nested_offset but lacks {field!r}")
        q = _require(state_dict, f"{prefix}.absmax", torch.uint8, where)
        absmax2 = _require(state_dict, f"{prefix}.nested_absmax", torch.float32, where)
        code = _require(state_dict, f"{prefix}.nested_quant_map", torch.float32, where)
        if code.numel() != 256:
            raise ValueError(f"{where}: {prefix}.nested_quant_map must have 256 entries, got {code.numel()}")
        n_nested = -(-q.numel() // int(meta["nested_blocksize"]))
        if absmax2.numel() != n_nested:
            raise ValueError(f"{where}: {prefix}.nested_absmax has {absmax2.numel()} entries; expected {n_nested}")
        offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32, device=q.device)
        nested = DoubleQuantState(q.reshape(-1), absmax2.reshape(-1), code, offset, int(meta["nested_blocksize"]))
        absmax = None
    else:
        absmax = _require(state_dict, f"{prefix}.absmax", torch.float32, where).reshape(-1)
    try:
        return QuantizedWeight4bit(packed, absmax, torch.Size(shape), _DTYPES[meta["dtype"]],
                                   int(meta["blocksize"]), quant_type, nested)
    except ValueError as err:
        raise ValueError(f"{where}: {prefix}: {err}") from None


def split_bnb_state_dict(state_dict: dict, where: str = "state dict"):
    """Split a model state dict into {weight prefix: QuantizedWeight4bit} and the remaining plain tensors."""
    prefixes = sorted({k.split(QUANT_STATE_KEY)[0] for k in state_dict if QUANT_STATE_KEY in k})
    quantized = {p: from_bnb_state_dict(state_dict, p, where) for p in prefixes}
    suffixes = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")
    used = {p + s for p in prefixes for s in suffixes} | {k for k in state_dict if QUANT_STATE_KEY in k}
    rest = OrderedDict((k, v) for k, v in state_dict.items() if k not in used)
    return quantized, rest


def atomic_save_safetensors(tensors: dict, path: str, metadata: dict = None) -> None:
    """Write a safetensors file to a temporary name in the same directory, then rename it over `path`,
    so a failure never leaves a half-written file where a good one was."""
    from safetensors.torch import save_file
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    """Write a text file to a temporary name in the same directory, then rename it over `path`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def copy_side_files(src_dir: str, out_dir: str, skip: tuple = ()) -> list:
    """Copy a model directory's files other than weights (config, tokenizer, generation config, chat template) into
    `out_dir`, each to a temporary name and renamed; `skip`: names the caller writes itself. Returns the names."""
    copied = []
    for fname in sorted(os.listdir(src_dir)):
        src = os.path.join(src_dir, fname)
        if (not os.path.isfile(src) or fname.endswith(WEIGHT_SUFFIXES) or fname in WEIGHT_INDEXES
                or fname.startswith(".") or fname in skip):
            continue
        tmp = os.path.join(out_dir, f".{fname}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, os.path.join(out_dir, fname))
        copied.append(fname)
    return copied


def save_quantized(weights: dict, path: str, extra: dict = None) -> None:
    """Save {prefix: QuantizedWeight4bit} (+ plain tensors in `extra`) as one safetensors file, bnb form."""
    tensors = OrderedDict()
    for prefix, qw in weights.items():
        tensors.update(to_bnb_state_dict(qw, prefix))
    tensors.update(extra or {})
    atomic_save_safetensors(tensors, path, metadata={"format": "pt"})


def load_quantized(path: str, device="cpu"):
    """Load every quantized weight of a safetensors file (bnb form): -> {prefix: QuantizedWeight4bit}."""
    from safetensors.torch import load_file
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        sd = load_file(path, device=str(device))
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers
        raise ValueError(f"{path}: not a readable safetensors file ({err})") from None
    quantized, _ = split_bnb_state_dict(sd, where=path)
    if not quantized:
        raise ValueError(f"{path}: holds no bitsandbytes 4-bit quant state (no '*{QUANT_STATE_KEY}*' key)")
    return quantized
