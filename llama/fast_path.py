"""The training fast path: fused kernels, a chunked loss and offloaded activation checkpointing, swapped into a
built `LlamaForCausalLM` (dense, NF4 or NF4 + LoRA) by module replacement. llama/model.py is not changed.

    model = inject_lora(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=...))
    enable_fast_path(model, checkpointing=True, offload=True)
    loss = model(input_ids, labels=labels).loss        # logits is None: the full (B, T, V) logits never exist

What changes (each swap keeps the module's parameters and their names, so state dicts and adapter files are
unchanged; `disable_fast_path` swaps every class back):

| module | plain path | fast path |
|---|---|---|
| RMSNorm | torch ops, fp32 statistics | `kernels.rms_norm` (Triton forward + hand-written backward) |
| Attention | rotate-half RoPE in torch, SDPA | `kernels.apply_rope` in place on the q/k projection views, SDPA (flash) |
| MLP | `F.silu(g) * u` | `kernels.swiglu` (one pass forward, one backward) |
| LoRALinear | base(x) + s * B(A(dropout(x.float()))) | `LoRAFunction`: base + LoRA in one autograd node; the dropout mask is |
| | | regenerated from a seed in backward (never stored), no fp32 copy of x |
| LlamaForCausalLM | logits (B, T, V) then fp32 cross entropy | `kernels.chunked_cross_entropy` on the hidden states |
| DecoderLayer | optional torch checkpoint | `OffloadedCheckpoint`: keeps only the layer input, optionally in |
| | | pinned host memory (copied on a side stream, prefetched one layer ahead) |

Numerics are the plain path's up to rounding order (see tests/llama/test_fast_path.py for the tolerances).
On CPU tensors every kernel call dispatches to its pure-torch reference, so the fast path runs anywhere.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .model import Attention, CausalLMOutput, DecoderLayer, LlamaForCausalLM, LlamaModel, MLP, RMSNorm


# ----------------------------------------------------------------------------------------------- fused ops
def _kernels():
    """The fused-op modules of `kernels` (imported lazily: llama imports kernels only where it needs them).
    By module path: the package re-exports functions with the same names as these modules."""
    import importlib
    return tuple(importlib.import_module(f"kernels.{m}") for m in ("rms_norm", "rope", "swiglu", "cross_entropy"))


class FastRMSNorm(RMSNorm):
    """RMSNorm through `kernels.rms_norm`: ``y = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)``; x (..., C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _kernels()[0].rms_norm(x, self.weight, self.eps)


class FastAttention(Attention):
    """Attention with the Triton RoPE applied in place to the projection views, then SDPA (flash when no mask)."""

    def forward(self, x, cos, sin, mask, cache=None):
        if cache is not None:                       # decoding keeps the plain path (KV cache bookkeeping)
            return super().forward(x, cos, sin, mask, cache)
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)      # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)   # (B, H_kv, T, D)
        if x.is_cuda:   # in place only into our fused LoRA outputs (a view made inside a custom Function can't be)
            RoPE = _kernels()[1].RoPEFunction
            q = RoPE.apply(q, cos, sin, _fused_lora_output(self.q_proj))
            k = RoPE.apply(k, cos, sin, _fused_lora_output(self.k_proj))
        else:
            q, k = _kernels()[1].apply_rope(q, k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_heads != self.n_kv_heads)  # (B, H, T, D)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)               # (B, T, H*D)
        return self.o_proj(o)


class FastMLP(MLP):
    """``down(swiglu(gate(x), up(x)))`` with the Triton SwiGLU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(_kernels()[2].swiglu(self.gate_proj(x), self.up_proj(x)))


# ----------------------------------------------------------------------------------------------- LoRA
def _base_forward(base: nn.Module, x2: torch.Tensor) -> torch.Tensor:
    """Frozen base linear on x2 (N, in) -> (N, out) in x2's dtype, without an autograd node."""
    qweight = getattr(base, "qweight", None)
    bias = getattr(base, "bias", None)
    if bias is not None:
        bias = bias.to(x2.dtype)
    if qweight is not None:
        from kernels import nf4_matmul
        return nf4_matmul(x2, qweight, bias)
    return F.linear(x2, base.weight.to(x2.dtype), bias)


def _base_backward(base: nn.Module, dy: torch.Tensor) -> torch.Tensor:
    """grad_x = dy @ W for the frozen base: dy (N, out) -> (N, in)."""
    qweight = getattr(base, "qweight", None)
    if qweight is not None:
        from kernels import nf4_matmul_t
        return nf4_matmul_t(dy, qweight)
    return dy @ base.weight.to(dy.dtype)


def _fused_lora_output(proj: nn.Module) -> bool:
    """True when `proj` returns a fresh (non-view) tensor from LoRAFunction (RoPE may then write into it)."""
    f = proj.__dict__.get("forward")
    return getattr(f, "__func__", None) is _fast_lora_forward and proj.lora_B.bias is None and not proj.merged \
        and not proj.disable_adapter


# Dropout with a regenerated mask, in Triton on CUDA: keep_i = (philox_uniform(seed, i) >= p); one pass per use.
# (A candidate for kernels/; it lives here while the fast path is its only user.)
try:
    import triton
    import triton.language as tl

    @triton.jit
    def _dropout_kernel(x_ptr, out_ptr, n, p, scale, seed, ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
        # out = dropout(x) = x * keep * scale  (ACCUMULATE: out += x * keep * scale)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)           # int32: n < 2**31
        m = offs < n
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        keep = tl.rand(seed, offs) >= p                                  # P(keep) = 1 - p
        y = tl.where(keep, x * scale, 0.0)
        if ACCUMULATE:
            y += tl.load(out_ptr + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=m)
except Exception:  # noqa: BLE001  (no triton: the torch mask path below is used)
    _dropout_kernel = None

_TRITON_DROPOUT = {"ok": None}


def _dropout_triton(x: torch.Tensor, p: float, seed: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dropout(x) with the mask of `seed` (out=None) or out += dropout(x); x, out contiguous, same shape."""
    n = x.numel()
    accumulate = out is not None
    if out is None:
        out = torch.empty_like(x)
    BLOCK = 4096
    _dropout_kernel[(triton.cdiv(n, BLOCK),)](x, out, n, p, 1.0 / (1.0 - p), seed, ACCUMULATE=accumulate,
                                              BLOCK=BLOCK, num_warps=8)
    return out


def _use_triton_dropout(x: torch.Tensor) -> bool:
    if _dropout_kernel is None or not x.is_cuda or not x.is_contiguous() or x.numel() >= 2**31:
        return False
    if _TRITON_DROPOUT["ok"] is None:                                    # first use: check it against its contract
        try:
            t = torch.randn(4096, 33, device=x.device, dtype=x.dtype)
            y = _dropout_triton(t, 0.25, 7)
            y2 = _dropout_triton(t, 0.25, 7)
            kept = y != 0
            frac = kept.float().mean().item()
            ok = torch.equal(y, y2) and 0.72 < frac < 0.78 and \
                torch.equal(y[kept], (t.float()[kept] * (1 / 0.75)).to(x.dtype))
        except Exception:  # noqa: BLE001
            ok = False
        _TRITON_DROPOUT["ok"] = bool(ok)
    return _TRITON_DROPOUT["ok"]


def _dropout(x2: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """xd = (x * keep) * 1/(1-p), keep regenerated from seed (Triton on CUDA, a torch mask elsewhere)."""
    if _use_triton_dropout(x2):
        return _dropout_triton(x2, p, seed)
    return torch.mul(x2, _keep_mask(x2.shape, p, seed, x2.device, x2.dtype)).mul_(1.0 / (1.0 - p))


def _keep_mask(shape, p: float, seed: int, device, dtype) -> torch.Tensor:
    """Dropout keep-mask (0/1 in dtype, P(1) = 1 - p), reproducible from `seed` (regenerated in backward)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=gen)


class LoRAFunction(torch.autograd.Function):
    """y = base(x) + s * (dropout(x) @ A^T) @ B^T as one autograd node.

    x (N, in) in the compute dtype c; A (r, in), B (out, r) fp32 master weights, used as c; keep (N, in) 0/1.
        xd = (x * keep) * 1/(1-p)          xa = xd @ A^T (N, r)          y = base(x) + s * xa @ B^T
    Backward, with dy (N, out):
        dB = s * dy^T @ xa                 dxa = s * dy @ B              dA = dxa^T @ xd
        dx = dy @ W + ((dxa @ A) * keep) * 1/(1-p)
    Saved: x (usually shared with the sibling projections), xa (N, r) and the seed; keep and xd are recomputed.
    """

    @staticmethod
    def forward(ctx, x2, A, B, base, scaling, p, seed):
        c = x2.dtype
        Ac, Bc = A.to(c), B.to(c)
        xd = _dropout(x2, p, seed) if p > 0.0 else x2                       # (N, in)
        xa = xd @ Ac.t()                                                    # (N, r)
        y = torch.addmm(_base_forward(base, x2), xa, Bc.t(), alpha=scaling)  # (N, out)
        ctx.save_for_backward(x2, xa, A, B)
        ctx.base, ctx.scaling, ctx.p, ctx.seed = base, scaling, p, seed
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, xa, A, B = ctx.saved_tensors
        s, p, c = ctx.scaling, ctx.p, x2.dtype
        dy = dy.to(c)
        Ac, Bc = A.to(c), B.to(c)
        triton_drop = p > 0.0 and _use_triton_dropout(x2)
        keep = _keep_mask(x2.shape, p, ctx.seed, x2.device, c) if p > 0.0 and not triton_drop else None
        dB = (dy.t() @ xa).float().mul_(s) if ctx.needs_input_grad[2] else None   # (out, r)
        dxa = (dy @ Bc).mul_(s)                                                    # (N, r)
        dA = None
        if ctx.needs_input_grad[1]:
            xd = _dropout(x2, p, ctx.seed) if p > 0.0 else x2
            dA = (dxa.t() @ xd).float()                                          # (r, in)
            del xd
        dx = None
        if ctx.needs_input_grad[0]:
            dl = dxa @ Ac                                                        # (N, in)
            dx = _base_backward(ctx.base, dy)
            if triton_drop and dx.is_contiguous() and dx.dtype == dl.dtype:
                _dropout_triton(dl, p, ctx.seed, out=dx)                         # dx += dropout(dl), same mask
            else:
                if p > 0.0:
                    keep = keep if keep is not None else _keep_mask(x2.shape, p, ctx.seed, x2.device, c)
                    dl.mul_(keep).mul_(1.0 / (1.0 - p))
                dx.add_(dl)
        return dx, (dA.to(A.dtype) if dA is not None else None), (dB.to(B.dtype) if dB is not None else None), \
            None, None, None, None


def _lora_class():
    from lora import LoRALinear
    return LoRALinear


def _fast_lora_forward(self, x: torch.Tensor) -> torch.Tensor:
    """LoRALinear.forward of the fast path: one fused node when training with an adapter and no lora bias."""
    if self.merged or self.disable_adapter or self.lora_B.bias is not None:
        return _lora_class().forward(self, x)
    shape = x.shape
    c = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        c = torch.get_autocast_dtype(x.device.type)
    elif getattr(self.base_layer, "compute_dtype", None) is not None:
        c = self.base_layer.compute_dtype
    x2 = x.reshape(-1, shape[-1]).to(c)                                      # (N, in)
    p = float(self.lora_dropout.p) if isinstance(self.lora_dropout, nn.Dropout) and self.training else 0.0
    seed = int(torch.randint(0, 2**31 - 1, (1,)).item()) if p > 0.0 else 0    # from the CPU generator
    with torch.autocast(x.device.type, enabled=False):
        y = LoRAFunction.apply(x2, self.lora_A.weight, self.lora_B.weight, self.base_layer, self.scaling, p, seed)
    return y.view(*shape[:-1], y.shape[-1]).to(x.dtype if not torch.is_autocast_enabled(x.device.type) else c)


# ----------------------------------------------------------------------------------------------- checkpointing
class ActivationOffloader:
    """Pinned host buffers for the checkpointed layer inputs, copied on a side stream.

    `save(i, x)` starts the device-to-host copy of layer i's input; `load(i)` returns it on the device,
    waiting for a prefetch started by `prefetch(i)` (the backward of layer i prefetches layer i-1's input)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.host: dict[int, torch.Tensor] = {}
        self.fetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}

    def save(self, i: int, x: torch.Tensor) -> None:
        self.fetched.pop(i, None)               # a prefetch left over from an interrupted backward
        buf = self.host.get(i)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = self.host[i] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            buf.copy_(x, non_blocking=True)
        x.record_stream(self.stream)            # the allocator keeps x until the copy is done

    def prefetch(self, i: int) -> None:
        if i < 0 or i not in self.host or i in self.fetched:
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            t = self.host[i].to(self.device, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.fetched[i] = (t, ev)

    def load(self, i: int) -> torch.Tensor:
        self.prefetch(i)
        t, ev = self.fetched.pop(i)
        torch.cuda.current_stream(self.device).wait_event(ev)
        t.record_stream(torch.cuda.current_stream(self.device))
        return t

    def free(self) -> None:
        self.host.clear()
        self.fetched.clear()


class OffloadedCheckpoint(torch.autograd.Function):
    """Recompute a decoder layer in backward from its saved input (reentrant style, like Unsloth's offload).

    Forward runs the layer without building a graph and keeps only x (B, T, C) - on the device, or in pinned host
    memory with `offloader`. Backward restores the RNG and autocast state, reruns the layer with grad, and
    backpropagates dy through it; LoRA parameter gradients accumulate in their `.grad` as usual."""

    @staticmethod
    def forward(ctx, layer, offloader, x, cos, sin, mask, _grad_anchor):
        ctx.layer, ctx.offloader = layer, offloader
        ctx.device_type = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(ctx.device_type), torch.get_autocast_dtype(ctx.device_type))
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        with torch.no_grad():
            y = layer._plain_forward(x, cos, sin, mask)
        if offloader is not None:
            offloader.save(layer.self_attn.layer_idx, x)
            ctx.save_for_backward(cos, sin, mask)
        else:
            ctx.save_for_backward(x, cos, sin, mask)
        return y

    @staticmethod
    def backward(ctx, dy):
        layer, offloader = ctx.layer, ctx.offloader
        if offloader is not None:
            cos, sin, mask = ctx.saved_tensors
            i = layer.self_attn.layer_idx
            x = offloader.load(i)
            offloader.prefetch(i - 1)
        else:
            x, cos, sin, mask = ctx.saved_tensors
        x = x.detach().requires_grad_(True)
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
                y = layer._plain_forward(x, cos, sin, mask)
        torch.autograd.backward(y, dy)
        return None, None, x.grad, None, None, None, None


class FastDecoderLayer(DecoderLayer):
    """DecoderLayer whose training forward goes through `OffloadedCheckpoint` when checkpointing is on."""

    _plain_forward = DecoderLayer.forward

    def forward(self, x, cos, sin, mask, cache=None):
        ckpt = getattr(self, "_fast_checkpoint", False)
        if ckpt and self.training and cache is None and torch.is_grad_enabled():
            anchor = self._grad_anchor
            if anchor.device != x.device:
                anchor = self._grad_anchor = torch.zeros((), device=x.device, requires_grad=True)
            return OffloadedCheckpoint.apply(self, getattr(self, "_offloader", None), x, cos, sin, mask, anchor)
        return DecoderLayer.forward(self, x, cos, sin, mask, cache)


# ----------------------------------------------------------------------------------------------- loss
class FastLlamaForCausalLM(LlamaForCausalLM):
    """With labels (and no logits_to_keep) the loss is the chunked cross-entropy of the final hidden states and
    `logits` is None; without labels this is the plain forward."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, labels=None,
                logits_to_keep: int = 0) -> CausalLMOutput:
        if labels is None or logits_to_keep or cache is not None:
            return LlamaForCausalLM.forward(self, input_ids, attention_mask, position_ids, cache, labels,
                                            logits_to_keep)
        h = self.model(input_ids, attention_mask, position_ids, cache)         # (B, T, C)
        B, T, C = h.shape
        shifted = torch.full_like(labels, -100, device=h.device)                # position t predicts labels[t+1]
        shifted[:, :-1] = labels[:, 1:]
        w = self.lm_head.weight
        if torch.is_autocast_enabled(h.device.type):
            c = torch.get_autocast_dtype(h.device.type)
            h, w = h.to(c), w.to(c)
        with torch.autocast(h.device.type, enabled=False):
            loss = _kernels()[3].chunked_cross_entropy(h.reshape(B * T, C), w, shifted.reshape(-1))
        return CausalLMOutput(logits=None, loss=loss)


class CPUEmbedding(nn.Embedding):
    """A frozen embedding kept in (pinned) host memory: rows are gathered on the CPU and copied to `device`."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids_h = ids.reshape(-1).cpu()
        rows = torch.empty((ids_h.numel(), self.weight.shape[1]), dtype=self.weight.dtype,
                           pin_memory=self.weight.is_pinned())
        torch.index_select(self.weight, 0, ids_h, out=rows)                    # (B*T, C) on the host
        return rows.to(self._device, non_blocking=True).view(*ids.shape, -1)   # (B, T, C)


# ----------------------------------------------------------------------------------------------- switch
_SWAPS = ((RMSNorm, FastRMSNorm), (Attention, FastAttention), (MLP, FastMLP), (DecoderLayer, FastDecoderLayer),
          (LlamaForCausalLM, FastLlamaForCausalLM))


def enable_fast_path(model: LlamaForCausalLM, checkpointing: bool | int = False, offload: bool = False,
                     fused_lora: bool = True, offload_embeddings: bool = False) -> LlamaForCausalLM:
    """Swap the fused modules into `model` in place (and return it).

    checkpointing: recompute each decoder layer in backward, keeping only its input (B, T, C); an int k
    checkpoints the first k layers only (the rest keep their activations: less recompute, more memory).
    offload: keep those inputs in pinned host memory (CUDA only; copies overlap compute on a side stream).
    fused_lora: LoRALinear layers use `LoRAFunction` (dropout fused, mask regenerated, no fp32 input copy).
    offload_embeddings: a frozen input embedding moves to pinned host memory (CUDA only; exact, saves V*C*2 bytes).
    """
    device = model.device
    for m in model.modules():
        for plain, fast in _SWAPS:
            if type(m) is plain:
                m.__class__ = fast
        if fused_lora and type(m).__name__ == "LoRALinear" and type(m) is _lora_class():
            m.forward = _fast_lora_forward.__get__(m)
    model.model.gradient_checkpointing = False
    n_layers = len(model.model.layers)
    n_ckpt = n_layers if checkpointing is True else 0 if checkpointing is False else max(0, min(int(checkpointing),
                                                                                              n_layers))
    offloader = ActivationOffloader(device) if (n_ckpt and offload and device.type == "cuda") else None
    for i, layer in enumerate(model.model.layers):
        layer._fast_checkpoint = i < n_ckpt
        layer._offloader = offloader
        layer._grad_anchor = torch.zeros((), device=device, requires_grad=True)
    emb = model.model.embed_tokens
    if offload_embeddings and device.type == "cuda" and not emb.weight.requires_grad and \
            emb.weight is not model.lm_head.weight:
        emb.weight = nn.Parameter(emb.weight.detach().cpu().pin_memory(), requires_grad=False)
        emb.__class__ = CPUEmbedding
        emb._device = device
    model._fast_path = dict(checkpointed_layers=f"{n_ckpt} of {n_layers}", offload=offloader is not None,
                            fused_lora=fused_lora,
                            offload_embeddings=type(emb) is CPUEmbedding)
    return model


def disable_fast_path(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """Undo `enable_fast_path` (the embedding comes back to the model's device)."""
    emb = model.model.embed_tokens
    if type(emb) is CPUEmbedding:
        emb.weight = nn.Parameter(emb.weight.detach().to(emb._device), requires_grad=False)
        emb.__class__ = nn.Embedding
    for m in model.modules():
        for plain, fast in _SWAPS:
            if type(m) is fast:
                m.__class__ = plain
        if "forward" in m.__dict__ and getattr(m.__dict__["forward"], "__func__", None) is _fast_lora_forward:
            del m.forward
    for layer in model.model.layers:
        for k in ("_fast_checkpoint", "_offloader", "_grad_anchor"):
            layer.__dict__.pop(k, None)
    model.__dict__.pop("_fast_path", None)
    return model


def fast_path_memory_note(model: nn.Module) -> Optional[dict]:
    """What `enable_fast_path` switched on for `model` (None when it is the plain path)."""
    return getattr(model, "_fast_path", None)
