"""Data-parallel (DDP) and sharded (FSDP2) training on torch.distributed, for `torchrun -m train.run`.

    torchrun --nproc-per-node 4 -m train.run --distributed fsdp --model_name ... --max_steps 100

One process per GPU (per CPU process with the gloo backend). torchrun sets RANK, LOCAL_RANK, WORLD_SIZE;
`init_distributed` opens the process group (nccl on CUDA, gloo on the CPU) and pins the process to
cuda:LOCAL_RANK. Everything else is the single-process run with four hooks:

1. data: the global micro-batch is per_device_train_batch_size * world_size examples, cut from the same
   sampler order a single process with that batch size would use; rank r takes the r-th contiguous slice
   (`rank_slice`). The loss normaliser n_items (label tokens of the whole optimizer step) is computed by
   every rank from the global batch, so no communication is needed for it:
       loss_r = sum_{t in slice r} CE_t / n_items(step) * world_size
   DDP and FSDP2 average gradients over ranks (divide by world_size), which gives exactly the gradient of
   the single-process loss sum_t CE_t / n_items. Logged losses are all-reduced sums / n_items.
2. model: `wrap_model` - DDP(model) for ddp; for fsdp, FSDP2 `fully_shard` bottom-up in two units per decoder
   layer plus the root. (a) The layer's seven NF4 linears as ONE unit (`shard_nf4_group`: `fully_shard` of
   the list of modules; with `make_shardable`, their packed codes and absmax scales become frozen parameters,
   each sharded on its dim 0 and all-gathered uint8/fp32 as they are: the unit's mixed-precision policy casts
   nothing). (b) The layer itself (LoRA A/B, norms: on a GPU with bf16/fp16 the policy all-gathers them in
   that dtype and reduces gradients in fp32). (c) The root (embeddings, final norm, lm_head). Two policies
   need two units per layer. With activation checkpointing each unit is all-gathered twice per micro-batch
   (in forward, and in backward for the recompute, whose unsharded weights the backward then uses; the root
   once), so an 80-layer model issues 2 * (80 + 80) + 1 = 321 all-gathers per micro-batch, against
   2 * (560 + 80) + 1 = 1,281 with one unit per NF4 linear (counted for a 2-layer model on the CPU with gloo,
   under torch 2.13 and under torch 2.11's FSDP2 code). Explicit prefetch (`set_layer_prefetch`) issues the
   next layer's gathers one layer ahead in forward and backward. Measured on 4 x H100 (README, "Distributed
   benchmark"): the 70B-shaped model scales to 0.98 / 0.91 of linear at 2 / 4 GPUs this way, against
   0.64 / 0.60 with one unit per NF4 linear and implicit prefetch ($QLORA_FSDP_NF4_UNITS=linear and
   $QLORA_FSDP_PREFETCH=0 restore that layout for A/B runs). Losses are the same either way
   (same shards, same gathered values).
3. state: checkpoints and the adapter are written once, by rank 0, from full (gathered) tensors
   (`full_tensor` of every DTensor); resume loads the full files on every rank and keeps each rank's shard
   (`load_param_`, `optimizer_state_for_load`).
4. control: decisions that end the loop (time budget, non-finite loss) are all-reduced so every rank
   leaves at the same step.

Reading the base checkpoint: with --distributed fsdp, `load_model_sharded` builds the model on the meta
device, shards it, and each rank reads only its rows of every tensor (safetensors `get_slice`) and quantizes
only its rows of each linear: its codes and scales are exactly its FSDP2 shard when out % world == 0 and
in % 128 == 0 (Llama 7B/70B shapes); other linears are read whole and cut. Device memory peaks near the
rank's shard plus one weight. Pre-quantized (bitsandbytes-form) checkpoints, double quantization and
--distributed auto (which needs the model to decide) load whole on every rank and are sharded afterwards
(the OS page cache serves the ranks of one host from one copy of the file).
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from kernels import NF4Linear
from nf4 import QuantizedWeight4bit
from nf4.double_quant import DoubleQuantState

MODES = ("auto", "ddp", "fsdp", "none")


@dataclass
class DistContext:
    """Where this process stands: mode "none" (one process), "ddp" or "fsdp"; rank / world size."""

    mode: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def active(self) -> bool:
        return self.mode != "none" and self.world_size > 1  # "auto" until choose_mode resolves it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Sum (or max) of each value over ranks (float64 on the CPU for gloo, on the GPU for nccl)."""
        if not self.active:
            return list(values)
        dev = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")
        t = torch.tensor(values, dtype=torch.float64, device=dev)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else
                                     torch.distributed.ReduceOp.SUM)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank."""
        return bool(self.all_reduce([float(flag)], op="max")[0]) if self.active else flag


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(requested: str, device_type: str) -> DistContext:
    """Open the process group when torchrun started this process (WORLD_SIZE > 1) and requested != "none".

    The mode stays "auto" until `choose_mode` sees the model; device_type "cuda" -> nccl, else gloo."""
    world = env_world_size()
    if requested == "none" or world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend)
    return DistContext(mode=requested, rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def model_bytes(model: nn.Module) -> int:
    """Bytes the model's weights take on the device: parameters, buffers and NF4 codes + scales."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    for m in model.modules():
        qw = m.__dict__.get("qweight")
        if qw is not None and hasattr(qw, "nbytes"):
            total += qw.nbytes()
    return total


def choose_mode(ctx: DistContext, model: nn.Module, device: torch.device, log=print) -> DistContext:
    """Resolve "auto": fsdp when the weights take more than half of one GPU's memory, else ddp (always ddp
    on the CPU). Logs the choice."""
    if not ctx.active and ctx.mode != "auto":
        return ctx
    nbytes = model_bytes(model)
    if ctx.mode == "auto":
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            ctx.mode = "fsdp" if nbytes > 0.5 * total else "ddp"
            why = f"weights {nbytes / 2**30:.1f} GiB vs {total / 2**30:.0f} GiB per GPU"
        else:
            ctx.mode, why = "ddp", "CPU"
        log(f"distributed: auto -> {ctx.mode} ({why})")
    log(f"distributed: {ctx.mode}, {ctx.world_size} processes ({ctx.backend}); weights {nbytes / 2**20:.1f} MiB "
        f"per process" + (f" before sharding, ~{nbytes / ctx.world_size / 2**20:.1f} MiB after" if ctx.mode == "fsdp"
                          else ""))
    return ctx


# ------------------------------------------------------------------------------------------------------------
# data
def rank_slice(indices: list[int], rank: int, world_size: int) -> list[int]:
    """Rank r's contiguous part of a global micro-batch: sizes differ by at most one (np.array_split)."""
    n = len(indices)
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return indices[start: start + base + (1 if rank < extra else 0)]


def empty_example(pad_id: int) -> dict:
    """Stand-in for a rank whose slice of a short last batch is empty: no label, so no loss and no gradient
    (every rank must still run forward/backward for the collectives to meet)."""
    return {"input_ids": [pad_id, pad_id], "labels": [-100, -100]}


# ------------------------------------------------------------------------------------------------------------
# model
def make_shardable(module: nn.Module) -> nn.Module:
    """Turn a kernels.NF4Linear into a ShardableNF4Linear in place (its codes and scales become parameters)."""
    if isinstance(module, ShardableNF4Linear) or not isinstance(module, NF4Linear):
        return module
    qw = module.__dict__.pop("qweight")
    module.__class__ = ShardableNF4Linear
    module.qweight = qw
    return module


class ShardableNF4Linear(NF4Linear):
    """NF4Linear whose packed codes and block scales are registered, frozen nn.Parameters
    (`weight_packed` uint8 ((n+1)//2, 1); `weight_scales` fp32 absmax (n_blocks,), or the uint8 8-bit
    scales when double-quantized) so FSDP2 can shard and all-gather them. `qweight` is rebuilt from them
    on each access (inside forward FSDP2 has put the all-gathered tensors there); the state dict stays
    bitsandbytes Linear4bit's (the two parameters are not in it)."""

    @property
    def qweight(self) -> QuantizedWeight4bit:
        meta = self.__dict__["_qmeta"]
        packed, scales = self._parameters["weight_packed"], self._parameters["weight_scales"]
        nested = None if meta["nested"] is None else DoubleQuantState(scales, *meta["nested"])
        return QuantizedWeight4bit(packed, scales if nested is None else None, meta["shape"], meta["dtype"],
                                   meta["blocksize"], meta["quant_type"], nested)

    @qweight.setter
    def qweight(self, qw: QuantizedWeight4bit) -> None:
        n = qw.nested
        self.__dict__["_qmeta"] = dict(shape=qw.shape, dtype=qw.dtype, blocksize=qw.blocksize,
                                       quant_type=qw.quant_type,
                                       nested=None if n is None else (n.absmax2, n.code, n.offset, n.blocksize))
        self._parameters["weight_packed"] = nn.Parameter(qw.packed, requires_grad=False)
        self._parameters["weight_scales"] = nn.Parameter(qw.absmax if n is None else n.q, requires_grad=False)

    def _apply(self, fn, recurse=True):
        meta = self.__dict__["_qmeta"]
        dtype = self.compute_dtype or meta["dtype"]
        scales = self._parameters["weight_scales"]
        probe = fn(torch.empty(0, dtype=dtype, device=scales.device))
        casts = probe.dtype != dtype and probe.dtype.is_floating_point
        if casts:  # .to(dtype): the fp32 scales must not be cast (uint8 codes never are); they only move
            self._parameters.pop("weight_scales")
        try:
            nn.Module._apply(self, fn, recurse)
        finally:
            if casts:
                self._parameters["weight_scales"] = nn.Parameter(scales.detach().to(probe.device),
                                                                 requires_grad=False)
        if meta["nested"] is not None and probe.device != meta["nested"][0].device:
            meta["nested"] = tuple(t.to(probe.device) if torch.is_tensor(t) else t for t in meta["nested"])
        if casts:
            self.compute_dtype = probe.dtype
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        # FSDP2 hooks its pre-backward all-gather on this output; an in-place op on a view would drop it
        return y.clone() if y._is_view() else y

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.pop(prefix + "weight_packed", None)
        destination.pop(prefix + "weight_scales", None)


@contextlib.contextmanager
def integer_parameters_without_grad():
    """While active, ``nn.Parameter(t)`` of an integer or bool tensor gets requires_grad=False instead of raising.

    torch 2.11's FSDP2 (`FSDPParam._init_sharded_param`) wraps each new shard as ``nn.Parameter(dtensor)``, whose
    default requires_grad=True raises "only Tensors of floating point dtype can require gradients" for the uint8
    NF4 codes, and sets the real requires_grad only afterwards; later torch passes it to the constructor. False
    is the only value such a tensor can take, so nothing else changes."""
    original = nn.Parameter.__dict__["__new__"]

    def __new__(cls, data=None, requires_grad=True):
        if requires_grad and data is not None and not (data.is_floating_point() or data.is_complex()):
            requires_grad = False
        return original.__func__(cls, data, requires_grad)

    nn.Parameter.__new__ = staticmethod(__new__)
    try:
        yield
    finally:
        nn.Parameter.__new__ = original


def shard_nf4_linear(module: nn.Module, mesh, mp_policy) -> nn.Module:
    """FSDP2 `fully_shard` of one NF4 linear: its codes (uint8) and scales become frozen parameters
    (`make_shardable`), sharded on dim 0 and all-gathered as they are (`mp_policy` should cast nothing)."""
    return shard_nf4_group([module], mesh, mp_policy)[0]


def shard_nf4_group(modules: list[nn.Module], mesh, mp_policy) -> list[nn.Module]:
    """One FSDP2 unit (one FSDPParamGroup: one all-gather per unshard) for several NF4 linears:
    ``fully_shard([m1, m2, ...])`` (list form, in torch since 2.6) after `make_shardable` on each. Every
    code / scale tensor is still sharded on its own dim 0, exactly as per linear; only the collective is
    shared (mixed uint8 / fp32 inputs go through FSDP2's byte-view all-gather, as they already did per
    linear). `mp_policy` should cast nothing. A single module is sharded on its own (not as a group).

    FSDP2 runs a group's pre-forward (unshard) at the first of its modules to run forward, its post-forward
    (reshard, pre-backward hook) after the last one, and its post-backward (reshard) when the gradient of the
    first module's input is complete. For a decoder layer's linears this is safe: the pre-backward hook sits
    on down_proj's output, whose gradient precedes every other linear's backward; the post-backward node is
    made at q_proj's pre-forward (q_proj runs first), so its autograd sequence number is below that of every
    node the other six linears make, and the engine, which runs ready nodes highest sequence number first,
    reaches it only after their backward (all of them feed the layer's output). A reshard before some
    linear's backward would free the codes that backward reads, and the 2-process CPU tests would fail."""
    from torch.distributed.fsdp import fully_shard

    for m in modules:
        make_shardable(m)
    with integer_parameters_without_grad():
        if len(modules) == 1:
            fully_shard(modules[0], mesh=mesh, mp_policy=mp_policy)
        else:
            fully_shard(list(modules), mesh=mesh, mp_policy=mp_policy)
    return list(modules)


NF4_UNITS_ENV = "QLORA_FSDP_NF4_UNITS"   # "layer" (default): one FSDP2 unit per decoder layer's NF4 linears;
                                         # "linear": one per NF4 linear (the layout before; for A/B runs)
PREFETCH_ENV = "QLORA_FSDP_PREFETCH"     # "1" (default): explicit layer prefetch (with "layer" units); "0": off


def set_layer_prefetch(layers: list[nn.Module], nf4_units: list[Optional[nn.Module]]) -> bool:
    """Explicit FSDP2 prefetch between decoder layers, each sharded as two units: L_i (the layer: LoRA A/B
    and norms under the compute-dtype policy) and G_i (its NF4 linears' codes and scales, `nf4_units[i]`
    any module of that group, or None).

    forward  - L_i's pre-forward issues the all-gathers of G_i, L_{i+1}, G_{i+1}: layer i's codes are
               gathered before input_layernorm runs and layer i+1's during layer i's compute.
    backward - L_i's pre-backward (the first hook of layer i in backward, before its recompute) issues
               G_i (usually already in flight), L_{i-1}, G_{i-1}: layer i-1's codes are gathered during layer
               i's recompute and backward. Without this, FSDP2's default backward prefetch (the previous unit
               in forward order) asks for G_i only at L_i's pre-backward, right before the recompute needs it.
    Only the layer units prefetch. G_i's pre-forward also runs during the activation-checkpoint recompute
    (in backward), where a forward prefetch of layer i+1 would gather units already done with; L_i's
    pre-forward returns early there (its state is PRE_BACKWARD). One more layer's codes are unsharded at a
    time than without prefetching (about 0.5 GB of codes and scales for a Llama-2-70B layer, plus FSDP2's
    all-gather buffer for them). Returns False (nothing set)
    when this torch's FSDPModule lacks set_modules_to_forward_prefetch / set_modules_to_backward_prefetch."""
    if not layers or not all(hasattr(layer, "set_modules_to_forward_prefetch") and
                             hasattr(layer, "set_modules_to_backward_prefetch") for layer in layers):
        return False
    n = len(layers)
    for i, layer in enumerate(layers):
        fwd = [nf4_units[i]] + ([layers[i + 1], nf4_units[i + 1]] if i + 1 < n else [])
        bwd = [nf4_units[i]] + ([layers[i - 1], nf4_units[i - 1]] if i > 0 else [])
        layer.set_modules_to_forward_prefetch([m for m in fwd if m is not None])
        layer.set_modules_to_backward_prefetch([m for m in bwd if m is not None])
    return True


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device,
               compute_dtype: torch.dtype = torch.float32, nf4_units: Optional[str] = None,
               prefetch: Optional[bool] = None) -> nn.Module:
    """DDP(model) or the FSDP2-sharded model (the same object, its parameters now DTensor shards).

    FSDP2 units, bottom-up: per decoder layer one unit for its NF4 linears (`shard_nf4_group`, no-cast
    policy; nf4_units="linear" gives one unit per linear instead), then the layer (LoRA A/B, norms: `mp`),
    then the root (embeddings, final norm, lm_head). NF4 linears outside model.model.layers get a unit each.
    With layer units, `prefetch` (default on) sets explicit layer prefetch (`set_layer_prefetch`).
    Defaults come from $QLORA_FSDP_NF4_UNITS / $QLORA_FSDP_PREFETCH (for A/B runs without code changes)."""
    if not ctx.active:
        return model
    if ctx.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    nf4_units = nf4_units or os.environ.get(NF4_UNITS_ENV) or "layer"
    if nf4_units not in ("layer", "linear"):
        raise ValueError(f"nf4_units (${NF4_UNITS_ENV}) must be 'layer' or 'linear', not {nf4_units!r}")
    if prefetch is None:
        prefetch = os.environ.get(PREFETCH_ENV, "1").strip().lower() not in ("0", "false", "no", "off")
    mesh = init_device_mesh(device.type, (ctx.world_size,))
    keep = MixedPrecisionPolicy()  # no casts: NF4 codes stay uint8, scales fp32
    mp = keep
    if device.type == "cuda" and compute_dtype in (torch.bfloat16, torch.float16):
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    layers = list(getattr(getattr(model, "model", None), "layers", None) or [])
    grouped: list[Optional[nn.Module]] = []
    seen: set[int] = set()
    for layer in layers:
        lins = [m for m in layer.modules() if isinstance(m, NF4Linear)]
        seen.update(id(m) for m in lins)
        if nf4_units == "layer" and lins:
            grouped.append(shard_nf4_group(lins, mesh, keep)[0])
        else:
            grouped.append(None)
            for m in lins:
                shard_nf4_linear(m, mesh, keep)
    for m in list(model.modules()):
        if isinstance(m, NF4Linear) and id(m) not in seen:
            shard_nf4_linear(m, mesh, keep)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    if prefetch and nf4_units == "layer":
        set_layer_prefetch(layers, grouped)
    return model


def load_model_sharded(path, ctx: DistContext, device: torch.device, dtype: torch.dtype, quantize: Optional[str],
                       lora_config, seed: int, blocksize: int = 64, double_quant: bool = False) -> Optional[nn.Module]:
    """FSDP2 loading where each rank reads only its rows of each tensor from the safetensors files.

    The model (NF4 linears as ShardableNF4Linear, LoRA injected) is built on the meta device, sharded with
    `wrap_model`, materialized with `to_empty`, and each rank fills its dim-0 shard: a dense tensor's rows
    [r*c, (r+1)*c) (c = ceil(rows / world), torch.chunk's split, what FSDP2's Shard(0) keeps) through
    safetensors `get_slice`; an NF4 linear's rows [r*out/world, (r+1)*out/world) are read and quantized on
    the rank, and their codes and absmax scales are exactly its shard of `weight_packed` / `weight_scales`
    when out % world == 0 and in % (2*blocksize) == 0 (whole bytes and whole blocks per row; otherwise the
    whole weight is read and quantized, and the rank keeps its chunk). LoRA A/B are drawn from `seed` with the
    same generator calls as inject_lora on `device` (so the run equals a single-process one), then cut.
    Returns None where this path does not apply (pre-quantized or biased linears, double quantization): the
    caller loads normally.
    """
    from safetensors import safe_open

    from kernels import quantize_weight
    from llama.checkpoint import IGNORED_KEYS, check_keys, quantized_prefixes, read_headers, resolve_model_dir, \
        weight_files
    from llama.config import ModelArgs
    from llama.model import LlamaForCausalLM
    from lora import inject_lora, lora_layers

    model_dir = resolve_model_dir(path)
    args = ModelArgs.from_json(model_dir)
    files = weight_files(model_dir)
    where = read_headers(model_dir, files)
    if quantized_prefixes(where) or double_quant:
        return None
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    check_keys(model, where, model_dir)
    quantized = set()
    if quantize is not None:
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.Linear) and name.endswith("_proj"):  # llama.checkpoint's rule: not lm_head
                if m.bias is not None:
                    return None
                n = m.in_features * m.out_features
                qw = QuantizedWeight4bit(torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device="meta"),
                                         torch.empty(-(-n // blocksize), device="meta"),
                                         (m.out_features, m.in_features), dtype, blocksize, quantize)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, make_shardable(NF4Linear(qw, None, compute_dtype=dtype)))
                quantized.add(name + ".weight")
    inject_lora(model, lora_config)
    wrap_model(model, ctx, device, dtype)
    model.to_empty(device=device)
    W, r = ctx.world_size, ctx.rank
    params = dict(model.named_parameters())

    def rows(n: int) -> tuple[int, int]:
        c = -(-n // W)
        start = min(r * c, n)
        return start, min(start + c, n)

    def put(param: torch.Tensor, value: torch.Tensor, what: str) -> None:
        local = param.to_local() if hasattr(param, "to_local") else param
        if tuple(local.shape) != tuple(value.shape):
            raise RuntimeError(f"sharded load of {what}: rank {r} got {tuple(value.shape)} for a shard of "
                               f"{tuple(local.shape)}")
        with torch.no_grad():
            local.copy_(value.to(local.device, local.dtype))

    with torch.no_grad():
        for fname in files:
            with safe_open(str(model_dir / fname), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if IGNORED_KEYS.fullmatch(key) or (args.tie_word_embeddings and key == "lm_head.weight"):
                        continue
                    if key in quantized:
                        prefix = key[: -len(".weight")]
                        mod = model.get_submodule(prefix)
                        lin = mod.base_layer if hasattr(mod, "base_layer") else mod
                        pname = prefix + (".base_layer" if lin is not mod else "")
                        out_f, in_f = lin.out_features, lin.in_features
                        if out_f % W == 0 and in_f % (2 * blocksize) == 0:  # this rank's rows only
                            k = out_f // W
                            w = f.get_slice(key)[r * k:(r + 1) * k].to(device, dtype)
                            qw = quantize_weight(w, blocksize, quantize, False)
                            packed, scales = qw.packed, qw.absmax
                        else:  # whole weight, keep this rank's chunk of codes and scales
                            qw = quantize_weight(f.get_tensor(key).to(device, dtype), blocksize, quantize, False)
                            a, b = rows(qw.packed.shape[0])
                            c, d = rows(qw.absmax.shape[0])
                            packed, scales = qw.packed[a:b], qw.absmax[c:d]
                        put(params[pname + ".weight_packed"], packed, key)
                        put(params[pname + ".weight_scales"], scales, key)
                    else:
                        name = key if key in params else key.replace(".weight", ".base_layer.weight")
                        p = params[name]
                        a, b = rows(p.shape[0])
                        put(p, f.get_slice(key)[a:b], key)
        # LoRA: inject_lora's generator calls, on `device`, from `seed` (what train.run does after seeding)
        torch.manual_seed(seed)
        for name, layer in lora_layers(model):
            A = nn.Linear(layer.in_features, layer.r, bias=False, device=device, dtype=torch.float32)
            B = nn.Linear(layer.r, layer.out_features, bias=layer.lora_B.bias is not None, device=device,
                          dtype=torch.float32)
            nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
            nn.init.zeros_(B.weight)
            for mod, full_mod in ((layer.lora_A, A), (layer.lora_B, B)):
                for pn, p in mod.named_parameters():
                    v = getattr(full_mod, pn)
                    if pn == "bias":
                        v = torch.zeros_like(v)
                    a, b = rows(v.shape[0])
                    put(p, v[a:b], f"{name}.{pn}")
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameter names are the checkpoint's (DDP's `.module`; FSDP2 keeps the names)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def no_sync(model: nn.Module, last_micro_batch: bool):
    """DDP: skip the gradient all-reduce on accumulation micro-batches but the last; FSDP2: no
    reduce-scatter until the last (set_requires_gradient_sync)."""
    if last_micro_batch:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and type(model).__name__ == "DistributedDataParallel":
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


# ------------------------------------------------------------------------------------------------------------
# gradients
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ for plain or DTensor (FSDP2) gradients: the norm is of the full gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    full = total.full_tensor() if hasattr(total, "full_tensor") else total
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, full)
    return full


# ------------------------------------------------------------------------------------------------------------
# state: gathered for saving, re-sharded for loading
def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU (a collective for a DTensor: every rank must call it)."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous().clone()


def gather_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: full tensor} of every trainable parameter (names without DDP's `module.`)."""
    return {n: full(p) for n, p in unwrap(model).named_parameters() if p.requires_grad}


def gather_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every per-parameter state of a sharded (DTensor) parameter gathered to a
    full CPU tensor: DTensor states (torch AdamW) and plain local-shard states (PagedAdamW keeps its states
    shaped like the shard). A collective: every rank calls it."""
    from torch.distributed.tensor import DTensor

    sd = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    for idx, p in zip(ids, params):
        if idx not in sd["state"]:
            continue
        st = sd["state"][idx] = dict(sd["state"][idx])  # state_dict() shares the live per-parameter dicts
        for k, v in list(st.items()):
            if not torch.is_tensor(v):
                continue
            if hasattr(v, "full_tensor"):
                st[k] = full(v)
            elif hasattr(p, "_local_tensor") and v.dim() > 0:
                if v.shape != p._local_tensor.shape:
                    raise RuntimeError(f"optimizer state {k!r} of a sharded parameter {tuple(p.shape)} has shape "
                                       f"{tuple(v.shape)}, not its shard's {tuple(p._local_tensor.shape)}: blockwise "
                                       "8-bit states cannot be gathered; use --optim paged_adamw_32bit or adamw_torch "
                                       "with --distributed fsdp")
                st[k] = full(DTensor.from_local(v, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                                run_check=False))
    return sd


def load_param_(param: torch.Tensor, value: torch.Tensor) -> None:
    """param.copy_(value) where param may be a DTensor shard: keep this rank's part of the full value."""
    with torch.no_grad():
        if hasattr(param, "device_mesh"):
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value.to(param.device_mesh.device_type), param.device_mesh,
                                      param.placements, src_data_rank=None)
        param.copy_(value.to(param.device) if not hasattr(value, "device_mesh") else value)


def optimizer_state_for_load(optimizer: torch.optim.Optimizer, sd: dict) -> dict:
    """A full optimizer state dict with each per-parameter tensor shaped like its (DTensor) parameter cut to
    this rank's shard: a DTensor for torch optimizers, the plain local shard for PagedAdamW."""
    from torch.distributed.tensor import distribute_tensor

    local_states = not isinstance(optimizer, (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    ids = [i for g in sd["param_groups"] for i in g["params"]]
    for idx, p in zip(ids, params):
        st = sd["state"].get(idx)
        if st is None or not hasattr(p, "device_mesh"):
            continue
        for k, v in list(st.items()):
            if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) == tuple(p.shape):
                d = distribute_tensor(v.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                      src_data_rank=None)
                st[k] = d.to_local() if local_states else d
    return sd


def gather_adapter(model: nn.Module, config=None) -> tuple[dict[str, torch.Tensor], object]:
    """(adapter tensors in PEFT file form, LoraConfig), gathered: a collective, every rank calls it."""
    from lora.adapter_io import PEFT_PREFIX, _model_config, adapter_state_dict

    raw = unwrap(model)
    config = config or _model_config(raw)
    return {PEFT_PREFIX + k: full(v) for k, v in adapter_state_dict(raw, config).items()}, config


def save_adapter_tensors(tensors: dict[str, torch.Tensor], config, directory: str) -> str:
    """What lora.save_adapter writes, from tensors already gathered (rank 0 calls it)."""
    from lora.adapter_io import ADAPTER_WEIGHTS
    from nf4 import atomic_save_safetensors

    os.makedirs(directory, exist_ok=True)
    atomic_save_safetensors(tensors, os.path.join(directory, ADAPTER_WEIGHTS), {"format": "pt"})
    config.save(directory)
    return directory


def write_adapter(model: nn.Module, directory: str, ctx: DistContext, config=None) -> str:
    """save_adapter for a DDP / FSDP2 model: gathered on every rank, written by rank 0; all ranks return
    when the files exist."""
    tensors, config = gather_adapter(model, config)
    if ctx.is_main:
        save_adapter_tensors(tensors, config, directory)
    ctx.barrier()
    return directory


def shutdown(ctx: DistContext) -> None:
    if ctx.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
