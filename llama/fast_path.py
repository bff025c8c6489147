"""The training fast path: fused kernels, a chunked loss and offloaded activation checkpointing, swapped into a
built `LlamaForCausalLM` (dense, NF4 or NF4 + LoRA) by module replacement. llama/model.py is not changed.

    model = inject_lora(model, LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, target_modules=...))
    enable_fast_path(model, checkpointing=True, offload=True)
    loss = model(input_ids, labels=labels).loss        # logits is None: the full (B, T, V) logits never exist

What changes (each swap keeps the module's parameters and their names, so state dicts and adapter files are
unchanged; `disable_fast_path` swaps every class back):

| module | plain path | fast path |
|---|---|---|
| RMSNorm | torch ops, fp32 statistics | `kernels.rms_norm` (Triton forward + hand-written backward); in a |
| | | training layer each norm and its residual add are one node |
| | | (`ResidualRMSNormFunction`): the attention's residual add runs in the |
| | | post-attention norm's pass, and each norm's backward adds the |
| | | residual branch's gradient in its kernel (`FUSE_RESIDUAL_NORMS`) |
| q, k, v; gate, up | a node each; autograd sums grad x | `SiblingsFunction`: one node per group, the same forward kernels; |
| | | the input's gradient accumulated in place (`dx += dy_i @ W_i` in the |
| | | GEMM's epilogue), three fewer (N, C) passes a layer (`GROUP_SIBLINGS`) |
| Attention | rotate-half RoPE in torch, SDPA | `kernels.apply_rope` in place on the q/k projection views, SDPA (flash) |
| MLP | `down(F.silu(g) * u)` | `SwiGLUDownFunction`: SwiGLU (Triton) + down projection (+ LoRA) in one |
| | | node that saves g and u but not their product; backward in row chunks |
| LoRALinear | base(x) + s * B(A(dropout(x.float()))) | `LoRAFunction`: base + LoRA in one autograd node; the dropout mask is |
| | | generated from a seed inside the Triton kernels of dropout(x) @ A^T, dA |
| | | and dx (x read once per use; no dropped copy exists); a checkpointed |
| | | layer's recompute keeps it as keep codes (N * in / 4 bytes) for dA, dx |
| LlamaForCausalLM | logits (B, T, V) then fp32 cross entropy | `kernels.chunked_cross_entropy` on the hidden states |
| DecoderLayer | optional torch checkpoint | `OffloadedCheckpoint`: keeps only the layer input, optionally in |
| | | pinned host memory (copied on a side stream, prefetched one layer ahead); |
| | | the recompute skips the down projection's matmul (its output is never read); |
| | | or (`offload_saved`) no recompute, what the layer saves held in pinned host |
| | | memory (llama/offload.py) |

Numerics are the plain path's up to rounding order (see tests/llama/test_fast_path.py for the tolerances).
On CPU tensors every kernel call dispatches to its pure-torch reference, so the fast path runs anywhere.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module

from .model import Attention, CausalLMOutput, DecoderLayer, LlamaForCausalLM, MLP, RMSNorm
from .offload import PrefetchOnBackward, SavedActivationOffloader, active_hooks


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
        qkv = run_siblings(x, (self.q_proj, self.k_proj, self.v_proj))       # one node: grad x summed in place
        q, k, v = qkv if qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)       # (B, H, T, D)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)    # (B, H_kv, T, D)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)    # (B, H_kv, T, D)
        if x.is_cuda or (_PHILOX_ON_CPU and _interpreting()):   # (the second: tests, Triton's interpreter)
            # in place only into fresh outputs of our Functions (a view made inside a custom Function can't be)
            RoPE = _kernels()[1].RoPEFunction
            q = RoPE.apply(q, cos, sin, qkv is not None or _fused_lora_output(self.q_proj))
            k = RoPE.apply(k, cos, sin, qkv is not None or _fused_lora_output(self.k_proj))
        else:
            q, k = _kernels()[1].apply_rope(q, k, cos, sin)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_heads != self.n_kv_heads)  # (B, H, T, D)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)               # (B, T, H*D)
        return self.o_proj(o)


class FastMLP(MLP):
    """``down(swiglu(gate(x), up(x)))``: SwiGLU and the down projection (with its fused LoRA) as one node that
    saves gate and up but not their product (`SwiGLUDownFunction`); output_needed=False is for a checkpointed
    layer's recompute, where the MLP's output value is never read (only its backward runs)."""

    def forward(self, x: torch.Tensor, output_needed: bool = True) -> torch.Tensor:
        gu = run_siblings(x, (self.gate_proj, self.up_proj))                 # one node: grad x summed in place
        g, u = gu if gu is not None else (self.gate_proj(x), self.up_proj(x))
        y = _mlp_tail(self, g, u, output_needed)
        return self.down_proj(_kernels()[2].swiglu(g, u)) if y is None else y


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


def _base_backward(base: nn.Module, dy: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """grad_x = dy @ W for the frozen base: dy (N, out) -> (N, in); with `out` (N, in), out += dy @ W in place
    (the GEMM's epilogue where cuBLAS runs it) and out is returned."""
    qweight = getattr(base, "qweight", None)
    if qweight is not None:
        from kernels import nf4_matmul_t
        return nf4_matmul_t(dy, qweight, out=out)
    w = base.weight.to(dy.dtype)
    return dy @ w if out is None else out.addmm_(dy, w)


def _own(t: torch.Tensor) -> torch.Tensor:
    """t as a tensor that is not a view (a custom Function's output must not be one: RoPE writes into it in
    place). The base forward returns y.reshape(...) of its own buffer: that buffer is returned instead."""
    if not t._is_view():
        return t
    b = t._base
    if b.shape == t.shape and b.stride() == t.stride() and b.storage_offset() == t.storage_offset() and \
            b.dtype == t.dtype:
        return b
    return t.clone()


def _fused_lora_output(proj: nn.Module) -> bool:
    """True when `proj` returns a fresh (non-view) tensor from LoRAFunction (RoPE may then write into it)."""
    f = proj.__dict__.get("forward")
    return getattr(f, "__func__", None) is _fast_lora_forward and proj.lora_B.bias is None and not proj.merged \
        and not proj.disable_adapter


# LoRA dropout with a mask regenerated from a seed. Two mask families, fixed per LoRA call (forward, checkpoint
# recompute and backward always use the same one):
#
# "philox" (Triton, CUDA): for an (N, K) input, Q = ceil(K / 4); for row m and j < Q, Philox-4x32-10
#     (tl.randint4x, key = seed, counter = m * Q + j) gives four words (u0, u1, u2, u3), and element
#     (m, q * Q + j) is kept iff (u_q >> 1) >= floor(p * 2**31): P(keep) = 1 - p (to 2**-31), kept values are
#     x * 1/(1-p) (fp32, one rounding to x's dtype). One Philox call serves four elements a quarter of a row
#     apart, so every kernel below generates the mask of any tile it reads with a quarter of the Philox work
#     of one call per element, and no kernel depends on another's block sizes.
#     The mask is applied inside the LoRA A-side matmuls, so x is read once per use and xd never exists:
#         _lora_xa_kernel  xa  = dropout(x) @ A^T               (forward and recompute)
#         _lora_da_kernel  dA  = dxa^T @ dropout(x)             (backward; fp32, per row split, summed)
#         _lora_dx_kernel  dx += dropout(dxa @ A)               (backward; into the base's grad_x, in place)
#     `_dropout4_kernel` is the same mask as a plain elementwise pass ("split" path: dropout, then cuBLAS).
#     Keep codes (KC, see keep_codes / KEEP_CODES): a forward may also store the four flags of each (m, j) as
#     one byte (bit q = quarter q), and the backward's kernels then read them instead of running Philox: the
#     mask's 10 rounds, not the bytes of x, bound these kernels on an H200.
#     On first use per (op, K, r, dtype, size) the fused kernels are checked against the split path on a small
#     problem and the fastest correct candidate is kept (`lora_kernel_paths()` lists the choices).
# "torch" (CPU, or no Triton): keep = bernoulli(1 - p) from a torch.Generator seeded with the seed.
try:
    import triton
    import triton.language as tl

    @triton.jit
    def _keep(u, t31):
        """Philox word -> keep flag: (u >> 1) >= t31 with t31 = floor(p * 2**31)."""
        return (u >> 1).to(tl.int32, bitcast=True) >= t31

    @triton.jit
    def _keeps4(seed, rows, j, Q, t31, kc_ptr, kc_mask, KC: tl.constexpr, ROUNDS: tl.constexpr):
        """Keep flags of the four quarter tiles at rows x j (rows already offset by row0). KC = 0: Philox; 1:
        Philox, and the flags stored as one code byte per (row, j) (bit q = quarter q) in kc_ptr (rows, Q);
        2: the flags read back from those codes (no Philox)."""
        idx = rows[:, None] * Q + j[None, :]
        if KC == 2:
            c = tl.load(kc_ptr + idx, mask=kc_mask, other=0)
            return (c & 1) != 0, (c & 2) != 0, (c & 4) != 0, (c & 8) != 0
        u0, u1, u2, u3 = tl.randint4x(seed, idx, ROUNDS)
        k0, k1, k2, k3 = _keep(u0, t31), _keep(u1, t31), _keep(u2, t31), _keep(u3, t31)
        if KC == 1:
            c = k0.to(tl.uint8) | (k1.to(tl.uint8) << 1) | (k2.to(tl.uint8) << 2) | (k3.to(tl.uint8) << 3)
            tl.store(kc_ptr + idx, c, mask=kc_mask)
        return k0, k1, k2, k3

    @triton.jit
    def _drop4_tile(x_row, o_row, col, m2, keep, scale, ACCUMULATE: tl.constexpr):
        x = tl.load(x_row + col[None, :], mask=m2, other=0.0).to(tl.float32)
        y = tl.where(keep, x * scale, 0.0)
        if ACCUMULATE:
            y += tl.load(o_row + col[None, :], mask=m2, other=0.0).to(tl.float32)
        tl.store(o_row + col[None, :], y.to(o_row.dtype.element_ty), mask=m2)

    @triton.jit(do_not_specialize=["seed", "row0"])
    def _dropout4_kernel(x_ptr, out_ptr, kc_ptr, N, K, Q, stride_xm, stride_om, t31, scale, seed, row0,
                         ACCUMULATE: tl.constexpr, BM: tl.constexpr, BQ: tl.constexpr, SEED_PTR: tl.constexpr,
                         KC: tl.constexpr = 0, ROUNDS: tl.constexpr = 10):
        # out = dropout(x)  (ACCUMULATE: out += dropout(x)); program = BM rows x (BQ columns in each quarter)
        if SEED_PTR:                       # the seed in device memory (CUDA-graph replays draw new ones)
            seed = tl.load(seed)
        rm = tl.program_id(0) * BM + tl.arange(0, BM)                   # (BM,)
        j = tl.program_id(1) * BQ + tl.arange(0, BQ)                    # (BQ,) column within a quarter
        mm = (rm < N)[:, None]
        jm = j < Q
        # int32 counters: (row0 + N) * Q < 2**31
        k0, k1, k2, k3 = _keeps4(seed, rm + row0, j, Q, t31, kc_ptr, mm & jm[None, :], KC, ROUNDS)
        x_row = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        o_row = out_ptr + rm.to(tl.int64)[:, None] * stride_om
        _drop4_tile(x_row, o_row, j, mm & (jm & (j < K))[None, :], k0, scale, ACCUMULATE)
        _drop4_tile(x_row, o_row, Q + j, mm & (jm & (Q + j < K))[None, :], k1, scale, ACCUMULATE)
        _drop4_tile(x_row, o_row, 2 * Q + j, mm & (jm & (2 * Q + j < K))[None, :], k2, scale, ACCUMULATE)
        _drop4_tile(x_row, o_row, 3 * Q + j, mm & (jm & (3 * Q + j < K))[None, :], k3, scale, ACCUMULATE)

    @triton.jit
    def _xa_tile(acc, x_row, a_ptr, col, cm, mm, rr, rmask, stride_am, keep, scale, PREC: tl.constexpr):
        # acc (BM, BR) += dropout(x[:, col]) @ A[:, col]^T
        x = tl.load(x_row + col[None, :], mask=mm[:, None] & cm[None, :], other=0.0)            # (BM, BQ)
        xd = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
        at = tl.load(a_ptr + rr[None, :] * stride_am + col[:, None], mask=cm[:, None] & rmask[None, :],
                     other=0.0)                                                                   # (BQ, BR)
        return tl.dot(xd, at, acc, input_precision=PREC)

    @triton.jit(do_not_specialize=["seed", "row0"])
    def _lora_xa_kernel(x_ptr, a_ptr, xa_ptr, kc_ptr, N, K, Q, R, stride_xm, stride_am, stride_om, j_per_split, t31,
                        scale, seed, row0, BM: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr,
                        PARTIAL: tl.constexpr, SEED_PTR: tl.constexpr, KC: tl.constexpr = 0,
                        ROUNDS: tl.constexpr = 10):
        # xa (N, R) = dropout(x) @ A^T: x (N, K), A (R, K); program = (BM rows, a range of j_per_split columns
        # per quarter); PARTIAL: fp32 partial sums into xa_ptr[split] (S, N, R), summed by the launcher
        if SEED_PTR:                       # the seed in device memory (CUDA-graph replays draw new ones)
            seed = tl.load(seed)
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        split = tl.program_id(1)
        mm = rm < N
        rr = tl.arange(0, BR)
        rmask = rr < R
        x_row = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
        acc = tl.zeros((BM, BR), dtype=tl.float32)
        j_lo = split * j_per_split
        j_hi = tl.minimum(j_lo + j_per_split, Q)
        for j0 in range(j_lo, j_hi, BQ):
            j = j0 + tl.arange(0, BQ)
            jm = j < j_hi
            k0, k1, k2, k3 = _keeps4(seed, rm + row0, j, Q, t31, kc_ptr, mm[:, None] & jm[None, :], KC, ROUNDS)
            acc = _xa_tile(acc, x_row, a_ptr, j, jm & (j < K), mm, rr, rmask, stride_am, k0, scale, PREC)
            acc = _xa_tile(acc, x_row, a_ptr, Q + j, jm & (Q + j < K), mm, rr, rmask, stride_am, k1, scale, PREC)
            acc = _xa_tile(acc, x_row, a_ptr, 2 * Q + j, jm & (2 * Q + j < K), mm, rr, rmask, stride_am, k2, scale,
                           PREC)
            acc = _xa_tile(acc, x_row, a_ptr, 3 * Q + j, jm & (3 * Q + j < K), mm, rr, rmask, stride_am, k3, scale,
                           PREC)
        o = xa_ptr + split.to(tl.int64) * N * stride_om + rm.to(tl.int64)[:, None] * stride_om + rr[None, :]
        if PARTIAL:
            tl.store(o, acc, mask=mm[:, None] & rmask[None, :])
        else:
            tl.store(o, acc.to(xa_ptr.dtype.element_ty), mask=mm[:, None] & rmask[None, :])

    @triton.jit
    def _da_tile(acc, dT, x_row, col, cm, mm, keep, scale, PREC: tl.constexpr):
        # acc (BR, BQ) += dxa^T (BR, BM) @ dropout(x[rows, col]) (BM, BQ)
        x = tl.load(x_row + col[None, :], mask=mm[:, None] & cm[None, :], other=0.0)
        xd = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x.dtype)
        return tl.dot(dT, xd, acc, input_precision=PREC)

    @triton.jit
    def _da_store(part_row, acc, col, cm, rmask):
        tl.store(part_row + col[None, :], acc, mask=rmask[:, None] & cm[None, :])

    @triton.jit(do_not_specialize=["seed", "row0"])
    def _lora_da_kernel(dxa_ptr, x_ptr, part_ptr, kc_ptr, N, K, Q, R, stride_dm, stride_xm, rows_per_split, t31,
                        scale, seed, row0, BM: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr,
                        SEED_PTR: tl.constexpr, KC: tl.constexpr = 0, ROUNDS: tl.constexpr = 10):
        # part[s] (R, K) = dxa[rows of s]^T @ dropout(x[rows of s]); program = (BQ columns per quarter, split s)
        if SEED_PTR:                       # the seed in device memory (CUDA-graph replays draw new ones)
            seed = tl.load(seed)
        j = tl.program_id(0) * BQ + tl.arange(0, BQ)
        split = tl.program_id(1)
        jm = j < Q
        rr = tl.arange(0, BR)
        rmask = rr < R
        acc0 = tl.zeros((BR, BQ), dtype=tl.float32)
        acc1 = tl.zeros((BR, BQ), dtype=tl.float32)
        acc2 = tl.zeros((BR, BQ), dtype=tl.float32)
        acc3 = tl.zeros((BR, BQ), dtype=tl.float32)
        m_lo = split * rows_per_split
        m_hi = tl.minimum(m_lo + rows_per_split, N)
        for m0 in range(m_lo, m_hi, BM):
            rm = m0 + tl.arange(0, BM)
            mm = rm < m_hi
            dT = tl.load(dxa_ptr + rm.to(tl.int64)[None, :] * stride_dm + rr[:, None],
                         mask=rmask[:, None] & mm[None, :], other=0.0)                            # (BR, BM)
            k0, k1, k2, k3 = _keeps4(seed, rm + row0, j, Q, t31, kc_ptr, mm[:, None] & jm[None, :], KC, ROUNDS)
            x_row = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
            acc0 = _da_tile(acc0, dT, x_row, j, jm & (j < K), mm, k0, scale, PREC)
            acc1 = _da_tile(acc1, dT, x_row, Q + j, jm & (Q + j < K), mm, k1, scale, PREC)
            acc2 = _da_tile(acc2, dT, x_row, 2 * Q + j, jm & (2 * Q + j < K), mm, k2, scale, PREC)
            acc3 = _da_tile(acc3, dT, x_row, 3 * Q + j, jm & (3 * Q + j < K), mm, k3, scale, PREC)
        part_row = part_ptr + split.to(tl.int64) * R * K + rr[:, None] * K
        _da_store(part_row, acc0, j, jm & (j < K), rmask)
        _da_store(part_row, acc1, Q + j, jm & (Q + j < K), rmask)
        _da_store(part_row, acc2, 2 * Q + j, jm & (2 * Q + j < K), rmask)
        _da_store(part_row, acc3, 3 * Q + j, jm & (3 * Q + j < K), rmask)

    @triton.jit
    def _dx_tile(d, a_ptr, dx_row, col, cm, mm, rr, rmask, stride_am, keep, scale, PREC: tl.constexpr):
        # dx[rows, col] += dropout(dxa[rows] @ A[:, col])
        at = tl.load(a_ptr + rr[:, None] * stride_am + col[None, :], mask=rmask[:, None] & cm[None, :],
                     other=0.0)                                                                   # (BR, BQ)
        dl = tl.dot(d, at, input_precision=PREC)                                                  # (BM, BQ) fp32
        m2 = mm[:, None] & cm[None, :]
        g = tl.load(dx_row + col[None, :], mask=m2, other=0.0).to(tl.float32)
        g += tl.where(keep, dl * scale, 0.0)
        tl.store(dx_row + col[None, :], g.to(dx_row.dtype.element_ty), mask=m2)

    @triton.jit(do_not_specialize=["seed", "row0"])
    def _lora_dx_kernel(dx_ptr, dxa_ptr, a_ptr, kc_ptr, N, K, Q, R, stride_gm, stride_dm, stride_am, t31, scale,
                        seed, row0, BM: tl.constexpr, BQ: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr,
                        SEED_PTR: tl.constexpr, KC: tl.constexpr = 0, ROUNDS: tl.constexpr = 10):
        # dx (N, K) += dropout(dxa @ A): dxa (N, R), A (R, K); program = BM rows x (BQ columns per quarter)
        if SEED_PTR:                       # the seed in device memory (CUDA-graph replays draw new ones)
            seed = tl.load(seed)
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        j = tl.program_id(1) * BQ + tl.arange(0, BQ)
        mm = rm < N
        jm = j < Q
        rr = tl.arange(0, BR)
        rmask = rr < R
        d = tl.load(dxa_ptr + rm.to(tl.int64)[:, None] * stride_dm + rr[None, :],
                    mask=mm[:, None] & rmask[None, :], other=0.0)                                 # (BM, BR)
        k0, k1, k2, k3 = _keeps4(seed, rm + row0, j, Q, t31, kc_ptr, mm[:, None] & jm[None, :], KC, ROUNDS)
        dx_row = dx_ptr + rm.to(tl.int64)[:, None] * stride_gm
        _dx_tile(d, a_ptr, dx_row, j, jm & (j < K), mm, rr, rmask, stride_am, k0, scale, PREC)
        _dx_tile(d, a_ptr, dx_row, Q + j, jm & (Q + j < K), mm, rr, rmask, stride_am, k1, scale, PREC)
        _dx_tile(d, a_ptr, dx_row, 2 * Q + j, jm & (2 * Q + j < K), mm, rr, rmask, stride_am, k2, scale, PREC)
        _dx_tile(d, a_ptr, dx_row, 3 * Q + j, jm & (3 * Q + j < K), mm, rr, rmask, stride_am, k3, scale, PREC)

except Exception:  # noqa: BLE001  (no triton: the torch mask family below is used)
    triton = None
    _dropout4_kernel = _lora_xa_kernel = _lora_da_kernel = _lora_dx_kernel = None

# block sizes: candidates per fused kernel (timed on first use); the interpreter uses small blocks
# (xa's PER_SM: programs per SM it aims for through its split-K count; on an H200 at 8192 rows 4 and 8 beat 2 by
# 11% at K = 4096 and 16% at K = 11008: benchmarks/results/diag/lora_kernels-per-sm-NVIDIA_H200-6951645.json)
_XA_CONFIGS = (dict(BM=64, BQ=64, num_warps=4, num_stages=2, PER_SM=4), dict(BM=32, BQ=64, num_warps=4, num_stages=3),
               dict(BM=64, BQ=64, num_warps=4, num_stages=2, PER_SM=8))
_DA_CONFIGS = (dict(BM=64, BQ=64, num_warps=8, num_stages=3), dict(BM=64, BQ=32, num_warps=4, num_stages=3))
_DX_CONFIGS = (dict(BM=64, BQ=64, num_warps=4, num_stages=1), dict(BM=128, BQ=64, num_warps=8, num_stages=1))
_INTERP_CONFIG = dict(BM=16, BQ=16, num_warps=4, num_stages=1)

PHILOX_ROUNDS = 10                 # Philox4x32 rounds of every mask (Triton's and cuRAND's default)
# Which backpropagated forwards keep their dropout masks as keep codes (dA and dx then read them instead of running
# Philox): "recompute" (a checkpointed layer's recompute: the codes live only until its backward, 1.9% of a
# 4 x 2048 all-linear step on an H200), "always" (also plain layers: N * in / 4 bytes per LoRA linear held from
# forward to backward, 2.2 GiB at that step without checkpointing), or "never".
KEEP_CODES = "recompute"
_RECOMPUTING = [0]                 # > 0 inside OffloadedCheckpoint's recompute
_TRITON_DROPOUT = {"ok": None}     # the philox family's contract check (first use on CUDA)
_PATHS: dict = {}                  # (op, size, K, r, dtype) -> chosen candidate name
_PHILOX_ON_CPU = False             # tests: run the philox family on CPU tensors (needs TRITON_INTERPRET=1)
_FORCE_PATH: Optional[str] = None  # tests: "fused" or "split" instead of the timed choice
_PATH_ROUNDS = 3                   # interleaved timing rounds of the first-use choice


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _drop_consts(p: float):
    """(t31, scale): keep iff (u >> 1) >= t31 = floor(p * 2**31); kept values times scale = 1 / (1 - p)."""
    return min(int(p * 2**31), 2**31 - 1), 1.0 / (1.0 - p)


def _quarter(K: int) -> int:
    return (K + 3) // 4


def _prec(dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"      # fp32 compute keeps fp32 products (no TF32)


_KC_DUMMY: dict = {}


def _kc_arg(kc_out: Optional[torch.Tensor], kc_in: Optional[torch.Tensor], ref: torch.Tensor):
    """(kc tensor, KC mode) for a philox-family launch: write kc_out, read kc_in, or neither (a 1-byte stand-in
    of the device: the kernel never touches it, and one pointer type keeps one compiled variant)."""
    if kc_out is not None:
        return kc_out, 1
    if kc_in is not None:
        return kc_in, 2
    d = _KC_DUMMY.get(ref.device)
    if d is None:
        d = _KC_DUMMY[ref.device] = torch.zeros(1, dtype=torch.uint8, device=ref.device)
    return d, 0


def keep_codes(rows: int, K: int, device) -> torch.Tensor:
    """An empty (rows, ceil(K/4)) uint8 buffer for the keep codes of a philox-family mask: bit q of [m, j] is the
    keep flag of element (m, q * ceil(K/4) + j). A forward that keeps them lets the backward kernels read the mask
    instead of regenerating it (K/4 bytes a row against two Philox passes)."""
    return torch.empty((rows, _quarter(K)), dtype=torch.uint8, device=device)


def _dropout_triton(x: torch.Tensor, p: float, seed: int, out: Optional[torch.Tensor] = None,
                    row0: int = 0, kc_out: Optional[torch.Tensor] = None,
                    kc_in: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dropout(x) with the philox mask of `seed` (out=None) or out += dropout(x); x, out (..., K) with rows of
    unit column stride, same shape. row0: x's first row is row row0 of the masked tensor (a row chunk).
    kc_out: also store the mask's keep codes (see keep_codes) of these rows; kc_in: read the mask from them."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    accumulate = out is not None
    if out is None:
        out = torch.empty_like(x2)
    o2 = out.view(-1, K)
    N, Q = x2.shape[0], _quarter(K)
    t31, scale = _drop_consts(p)
    BM, BQ = (16, 64) if _interpreting() else (16, 128)
    kc, mode = _kc_arg(kc_out, kc_in, x2)
    if N and K:
        _dropout4_kernel[(triton.cdiv(N, BM), triton.cdiv(Q, BQ))](
            x2, o2, kc, N, K, Q, x2.stride(0), o2.stride(0), t31, scale, seed, row0, ACCUMULATE=accumulate, BM=BM,
            BQ=BQ, SEED_PTR=torch.is_tensor(seed), KC=mode, ROUNDS=PHILOX_ROUNDS, num_warps=4)
    return out.view(x.shape)


def _philox_shape_ok(x2: torch.Tensor, row0: int = 0) -> bool:
    return (x2.dim() == 2 and x2.stride(-1) == 1 and (row0 + x2.shape[0]) * _quarter(x2.shape[1]) < 2**31
            and x2.dtype in (torch.float16, torch.bfloat16, torch.float32))


def _use_triton_dropout(x: torch.Tensor, rows: Optional[int] = None) -> bool:
    """The philox family applies to x (N, K) (of `rows` rows in all, when x is a chunk): Triton present, a CUDA
    tensor (or the interpreter under _PHILOX_ON_CPU), int32 Philox counters, and on CUDA the mask passed its
    contract check once."""
    if _dropout4_kernel is None or not _philox_shape_ok(x, (rows or x.shape[0]) - x.shape[0]):
        return False
    if not x.is_cuda:
        return _PHILOX_ON_CPU and _interpreting()
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


def _keep_mask(shape, p: float, seed: int, device, dtype) -> torch.Tensor:
    """Dropout keep-mask of the torch family (0/1 in dtype, P(1) = 1 - p), reproducible from `seed`."""
    if torch.is_tensor(seed):
        raise RuntimeError(f"LoRA dropout on a {tuple(shape)} input: seeds in device memory (seed_slots, CUDA "
                           "graphs) need the Triton philox mask family, which does not apply here (no Triton, a "
                           "CPU tensor, or more than 2**31 mask counters)")
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1.0 - p, generator=gen)


def _family(x2: torch.Tensor, p: float) -> Optional[str]:
    """Mask family for one LoRA call: None (no dropout), "philox" or "torch"."""
    if p <= 0.0:
        return None
    return "philox" if _use_triton_dropout(x2) else "torch"


def _torch_dropout(x2: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    return torch.mul(x2, _keep_mask(x2.shape, p, seed, x2.device, x2.dtype)).mul_(1.0 / (1.0 - p))


def _dropout(x2: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """xd = (x * keep) * 1/(1-p), keep regenerated from seed (the philox family where it applies)."""
    if _use_triton_dropout(x2):
        return _dropout_triton(x2, p, seed)
    return _torch_dropout(x2, p, seed)


# ---- launchers of the fused kernels (x2 (N, K), A (r, K) and dxa (N, r) in the compute dtype; row0 as above)
def _br(R: int) -> int:
    return max(16, triton.next_power_of_2(R))


def _xa_fused(x2, Ac, p, seed, row0, kc_out, cfg):
    N, K = x2.shape
    R, Q = Ac.shape[0], _quarter(K)
    t31, scale = _drop_consts(p)
    cfg = dict(cfg)
    BM, BQ = cfg.pop("BM"), cfg["BQ"]
    per_sm = cfg.pop("PER_SM", 2)                                           # programs per SM to aim for
    n_m, n_j = triton.cdiv(N, BM), triton.cdiv(Q, BQ)
    split = max(1, min(n_j, triton.cdiv(per_sm * _sm_count(x2.device), n_m)))   # split K when rows are few
    j_per = triton.cdiv(n_j, split) * BQ
    split = triton.cdiv(Q, j_per)
    out = torch.empty((split, N, R) if split > 1 else (N, R), device=x2.device,
                      dtype=torch.float32 if split > 1 else x2.dtype)
    kc, mode = _kc_arg(kc_out, None, x2)
    _lora_xa_kernel[(n_m, split)](x2, Ac, out, kc, N, K, Q, R, x2.stride(0), Ac.stride(0), R, j_per, t31, scale,
                                  seed, row0, BM=BM, BR=_br(R), PREC=_prec(x2.dtype), PARTIAL=split > 1,
                                  SEED_PTR=torch.is_tensor(seed), KC=mode, ROUNDS=PHILOX_ROUNDS, **cfg)
    return out.sum(0).to(x2.dtype) if split > 1 else out


def _sm_count(device) -> int:
    if device.type != "cuda":
        return 4
    from kernels._common import sm_count      # (llama imports kernels only where it needs them)
    return sm_count(device)


def _da_fused(dxa, x2, p, seed, row0, kc_in, cfg):
    N, K = x2.shape
    R, Q = dxa.shape[1], _quarter(K)
    t31, scale = _drop_consts(p)
    cfg = dict(cfg)
    BM, BQ = cfg.pop("BM"), cfg["BQ"]
    n_j = triton.cdiv(Q, BQ)
    split = max(1, min(triton.cdiv(N, BM), triton.cdiv(2 * _sm_count(x2.device), n_j)))
    rows = triton.cdiv(triton.cdiv(N, split), BM) * BM
    split = triton.cdiv(N, rows)
    part = torch.empty((split, R, K), device=x2.device, dtype=torch.float32)
    kc, mode = _kc_arg(None, kc_in, x2)
    _lora_da_kernel[(n_j, split)](dxa, x2, part, kc, N, K, Q, R, dxa.stride(0), x2.stride(0), rows, t31, scale,
                                  seed, row0, BM=BM, BR=_br(R), PREC=_prec(x2.dtype), SEED_PTR=torch.is_tensor(seed),
                                  KC=mode, ROUNDS=PHILOX_ROUNDS, **cfg)
    return part.sum(0) if split > 1 else part[0]


def _dx_fused_(dx, dxa, Ac, p, seed, row0, kc_in, cfg):
    N, K = dx.shape
    R, Q = Ac.shape[0], _quarter(K)
    t31, scale = _drop_consts(p)
    cfg = dict(cfg)
    BM, BQ = cfg.pop("BM"), cfg["BQ"]
    kc, mode = _kc_arg(None, kc_in, dx)
    _lora_dx_kernel[(triton.cdiv(N, BM), triton.cdiv(Q, BQ))](
        dx, dxa, Ac, kc, N, K, Q, R, dx.stride(0), dxa.stride(0), Ac.stride(0), t31, scale, seed, row0, BM=BM,
        BR=_br(R), PREC=_prec(dx.dtype), SEED_PTR=torch.is_tensor(seed), KC=mode, ROUNDS=PHILOX_ROUNDS, **cfg)
    return dx


def _xa_split(x2, Ac, p, seed, row0, kc_out=None):
    return _dropout_triton(x2, p, seed, row0=row0, kc_out=kc_out) @ Ac.t()


def _da_split(dxa, x2, p, seed, row0, kc_in=None):
    return (dxa.t() @ _dropout_triton(x2, p, seed, row0=row0, kc_in=kc_in)).float()


def _dx_split_(dx, dxa, Ac, p, seed, row0, kc_in=None):
    return _dropout_triton(dxa @ Ac, p, seed, out=dx, row0=row0, kc_in=kc_in)


_OPS = {  # op -> (fused launcher, its configs, split launcher)
    "xa": (_xa_fused, _XA_CONFIGS, _xa_split),
    "da": (_da_fused, _DA_CONFIGS, _da_split),
    "dx": (_dx_fused_, _DX_CONFIGS, _dx_split_),
}


def op_args(op, x, A, d, dx, p, seed, row0, kc):
    """The positional arguments of op's candidates (each fused launcher also takes its config after them):
    x (N, K) the LoRA input, A (r, K), d = dxa (N, r), dx (N, K) the gradient that dx accumulates into, kc the
    keep codes that xa writes and dA / dx read (or None)."""
    return {"xa": (x, A, p, seed, row0, kc), "da": (d, x, p, seed, row0, kc),
            "dx": (dx, d, A, p, seed, row0, kc)}[op]


_CANDS: dict = {}


def _candidates(op):
    """{name: fn(*args)} of op's philox-family implementations (fused configs, then the split path); built once
    per op (every LoRA call looks its candidate up here)."""
    c = _CANDS.get(op)
    if c is None:
        fused, cfgs, split = _OPS[op]
        c = {f"fused{i}": (lambda *a, _c=cfg: fused(*a, _c)) for i, cfg in enumerate(cfgs)}
        c["split"] = split
        _CANDS[op] = c
    return c


def _close(got: torch.Tensor, want: torch.Tensor) -> bool:
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        return False
    err = (got - want).abs()
    return err.mean().item() <= 2e-2 * want.abs().mean().item() + 1e-6 and \
        err.max().item() <= 0.1 * want.abs().max().item() + 1e-6


def _error_line(e: Exception) -> str:
    """An exception as one short line (a compiler failure's message is followed by its MLIR dump)."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:160] if msg else ''}"


def _fused_ok_names(op, K, R, dtype, device, names, kc: bool = False, why: Optional[dict] = None):
    """The fused candidates that agree with the split path on a small problem of this op's K, r and dtype (the
    same mask, so only rounding differs; a wrong mask or a miscompiled kernel differs by whole elements). kc: the
    keep-code variant (xa writes the codes, which must equal the split path's; dA and dx read them). why: filled
    with {rejected name: reason} (a compile or launch error, wrong codes, or results off the split path's)."""
    g = torch.Generator(device=device).manual_seed(1)
    N, p, seed, row0 = 256, 0.25, 12345, 77
    x = torch.randn(N, K, device=device, dtype=dtype, generator=g)
    A = (torch.randn(R, K, device=device, dtype=dtype, generator=g) / K ** 0.5).to(dtype)
    d = torch.randn(N, R, device=device, dtype=dtype, generator=g)
    cands = _candidates(op)
    codes = None
    if kc:
        codes = keep_codes(row0 + N, K, device)
        _dropout_triton(x, p, seed, row0=row0, kc_out=codes)

    def call(name):
        """The candidate's output, or None when (xa, kc) the codes it wrote are not the mask's."""
        mine = torch.zeros_like(codes) if kc and op == "xa" else codes
        got = cands[name](*op_args(op, x, A, d, x.clone() if op == "dx" else None, p, seed, row0, mine))
        return got if mine is codes or torch.equal(mine[row0:], codes[row0:]) else None

    want = call("split")
    ok = []
    for name in names:
        try:
            got = call(name)
        except Exception as e:  # noqa: BLE001  (a config that cannot compile or launch here is not used)
            reason = _error_line(e)
        else:
            if got is not None and _close(got, want):
                ok.append(name)
                continue
            reason = "wrong keep codes" if got is None else "results off the split path's"
        if why is not None:
            why[name] = reason
    return ok


def _time_ms(fn, reps: int = 5) -> float:
    try:
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / reps
    except Exception:  # noqa: BLE001
        return float("inf")


def _path(op, N, K, R, ref: torch.Tensor, args):
    """Name of the philox-family candidate for this call: forced, the interpreter's fused one, or on CUDA the
    fastest of the correct candidates, timed once per (op, size class, K, r, dtype, keep codes or not) on this
    call's tensors."""
    if _FORCE_PATH is not None:
        return "split" if _FORCE_PATH == "split" else "fused0"
    if not ref.is_cuda:
        return "fused0"
    kc = args[-1] is not None
    key = (op, "N>=4096" if N >= 4096 else "N<4096", K, R, str(ref.dtype).replace("torch.", "")) + \
        (("keep codes",) if kc else ())
    name = _PATHS.get(key)
    if name is not None:
        return name
    if torch.cuda.is_current_stream_capturing():
        return "split"
    cands = _candidates(op)
    rejected: dict = {}
    names = _fused_ok_names(op, K, R, ref.dtype, ref.device, [n for n in cands if n != "split"], kc,
                            rejected) + ["split"]
    if rejected:                      # visible in lora_kernel_paths(): a fused kernel that stopped compiling
        _PATHS[key + ("rejected",)] = rejected
    scratch = args[0].clone() if op == "dx" else None          # dx accumulates in place: time on a copy
    times = dict.fromkeys(names, float("inf"))
    for _ in range(_PATH_ROUNDS):     # interleaved rounds, each candidate's best: a burst of contention slows one
        for n in names:               # round, not a choice (as kernels.nf4_matmul._pick)
            fn = (lambda n=n: cands[n](scratch, *args[1:])) if scratch is not None else (lambda n=n: cands[n](*args))
            times[n] = min(times[n], _time_ms(fn))
    del scratch
    fused = [n for n in names if n != "split"]
    name = min(fused, key=lambda n: times[n]) if fused else "split"
    if times["split"] < 0.9 * times[name]:     # the split path also holds an (N, K) temporary: fused unless slower
        name = "split"
    _PATHS[key] = name
    _PATHS[key + ("ms",)] = {n: round(t, 4) for n, t in times.items()}
    return name


def _run(op, name, args):
    """Candidate `name` of op; a fused kernel that fails at launch falls back to the split path (same mask), and
    the first such failure per (op, name) is kept in lora_kernel_paths() under "launch fallback <op> <name>"."""
    cands = _candidates(op)
    if name == "split" or name not in cands:
        return cands["split"](*args)
    if _interpreting():
        fused, _, _ = _OPS[op]
        return fused(*args, _INTERP_CONFIG)
    try:
        return cands[name](*args)
    except Exception as e:  # noqa: BLE001
        _PATHS.setdefault(("launch fallback", op, name), _error_line(e))
        return cands["split"](*args)


def lora_kernel_paths() -> dict:
    """{"op size-class K r dtype": chosen path} of the philox-family LoRA kernels so far (for benchmarks), the
    candidates' times in ms under the same key + " ms", and the fused candidates the first-use check rejected,
    with the reason, under key + " rejected"."""
    return {" ".join(str(k) for k in key): v for key, v in _PATHS.items()}


def _lora_xa(x2, Ac, p, seed, fam, row0=0, kc_out=None):
    """xa = dropout(x2) @ Ac^T (N, r); x2 is rows row0.. of the masked tensor; kc_out (philox family): also store
    the mask's keep codes of these rows (keep_codes of the whole tensor)."""
    if fam is None:
        return x2 @ Ac.t()
    if fam == "torch":
        assert row0 == 0, "row chunks need the philox mask family"
        return _torch_dropout(x2, p, seed) @ Ac.t()
    args = (x2, Ac, p, seed, row0, kc_out)
    return _run("xa", _path("xa", x2.shape[0], x2.shape[1], Ac.shape[0], x2, args), args)


def _lora_da(dxa, x2, p, seed, fam, row0=0, kc_in=None):
    """dA = dxa^T @ dropout(x2) (r, K) in fp32; kc_in: the mask from its keep codes instead of Philox."""
    if fam is None:
        return (dxa.t() @ x2).float()
    if fam == "torch":
        assert row0 == 0, "row chunks need the philox mask family"
        return (dxa.t() @ _torch_dropout(x2, p, seed)).float()
    dxa = dxa.contiguous()
    args = (dxa, x2, p, seed, row0, kc_in)
    return _run("da", _path("da", x2.shape[0], x2.shape[1], dxa.shape[1], x2, args), args)


def _lora_dx_(dx, dxa, Ac, p, seed, fam, row0=0, kc_in=None):
    """dx += dropout(dxa @ Ac) in place (dx (N, K) in the compute dtype); returns dx. kc_in as in _lora_da."""
    if fam is None:
        return dx.addmm_(dxa, Ac)
    if fam == "torch":
        assert row0 == 0, "row chunks need the philox mask family"
        dl = dxa @ Ac
        dl.mul_(_keep_mask(dl.shape, p, seed, dl.device, dl.dtype)).mul_(1.0 / (1.0 - p))
        return dx.add_(dl)
    if not _philox_shape_ok(dx, row0) or dx.dtype != dxa.dtype:     # not a plain row-major buffer: split + add
        return dx.add_(_dropout_triton((dxa @ Ac).contiguous(), p, seed, row0=row0, kc_in=kc_in))
    dxa = dxa.contiguous()
    args = (dx, dxa, Ac, p, seed, row0, kc_in)
    return _run("dx", _path("dx", dx.shape[0], dx.shape[1], Ac.shape[0], dx, args), args)


class LoRAFunction(torch.autograd.Function):
    """y = base(x) + s * (dropout(x) @ A^T) @ B^T as one autograd node.

    x (N, in) in the compute dtype c; A (r, in), B (out, r) fp32 master weights, used as c; keep (N, in) 0/1.
        xd = (x * keep) * 1/(1-p)          xa = xd @ A^T (N, r)          y = base(x) + s * xa @ B^T
    Backward, with dy (N, out):
        dB = s * dy^T @ xa                 dxa = s * dy @ B              dA = dxa^T @ xd
        dx = dy @ W + ((dxa @ A) * keep) * 1/(1-p)
    Saved: x (usually shared with the sibling projections), xa (N, r) and the seed; xd is never stored: on CUDA
    the mask is generated inside the kernel that computes xa (see the "philox" family above), which with
    `codes` (a forward that will be backpropagated) also stores it as keep codes, N * in / 4 bytes, that the
    kernels of dA and of the dropout part of dx read instead of running Philox twice more; y accumulates
    s * xa @ B^T in place (no copy of the base output).
    """

    @staticmethod
    def forward(ctx, x2, A, B, base, scaling, p, seed, codes=False):
        y, xa, kc, fam = _lora_forward(x2, A, B, base, scaling, p, seed, codes)
        ctx.save_for_backward(x2, xa, A, B, kc)
        ctx.base, ctx.scaling, ctx.p, ctx.seed, ctx.fam = base, scaling, p, seed, fam
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, xa, A, B, kc = ctx.saved_tensors
        dx, dA, dB = _lora_backward(dy, x2, xa, A, B, kc, ctx.base, ctx.scaling, ctx.p, ctx.seed, ctx.fam,
                                    *ctx.needs_input_grad[:3])
        return dx, dA, dB, None, None, None, None, None


def _lora_forward(x2, A, B, base, scaling, p, seed, codes):
    """LoRAFunction's forward: (y, xa, kc, fam) with y = base(x2) + s * (dropout(x2) @ A^T) @ B^T in x2's dtype,
    xa (N, r), the keep codes kc (or None) and the mask family."""
    c = x2.dtype
    fam = _family(x2, p)
    kc = keep_codes(x2.shape[0], x2.shape[1], x2.device) if codes and fam == "philox" else None
    xa = _lora_xa(x2, A.to(c), p, seed, fam, kc_out=kc)                      # (N, r)
    y = _own(_base_forward(base, x2))                                       # (N, out), not a view
    y.addmm_(xa, B.to(c).t(), alpha=scaling)
    return y, xa, kc, fam


def _lora_backward(dy, x2, xa, A, B, kc, base, s, p, seed, fam, need_x, need_a, need_b, dx=None):
    """LoRAFunction's backward: (dx, dA, dB), each None where not needed; with `dx` given, the input gradient is
    added into it in place (the base's part in the GEMM's epilogue, the dropout part in the dx kernel)."""
    c = x2.dtype
    dy = dy.to(c)
    dB = (dy.t() @ xa).float().mul_(s).to(B.dtype) if need_b else None             # (out, r)
    dxa = (dy @ B.to(c)).mul_(s)                                                     # (N, r)
    dA = _lora_da(dxa, x2, p, seed, fam, kc_in=kc) if need_a else None                # (r, in) fp32
    if need_x:
        dx = _lora_dx_(_base_backward(base, dy, out=dx), dxa, A.to(c), p, seed, fam, kc_in=kc)   # (N, in)
    return dx, (dA.to(A.dtype) if dA is not None else None), dB


class SiblingsFunction(torch.autograd.Function):
    """The projections that read one input, q, k, v or gate, up, as one autograd node: y_i = proj_i(x).

    Each member is a fused LoRA linear (as `LoRAFunction`: y = base(x) + s * (dropout(x) @ A^T) @ B^T) or a frozen
    base linear alone. The forward is the members' own forwards, in order (the same kernels, bit-identical
    outputs, the dropout seeds drawn in the same order). What changes is the backward of x: each member's
    contribution is added into one (N, in) buffer as it is made, the base's through the GEMM's epilogue
    (``dx += dy_i @ W_i``, cuBLAS beta = 1 where the weight is dequantized) and the LoRA's dropout part through
    the dx kernel's in-place add, instead of autograd summing three (two) separately written gradients: per
    layer and step that removes three elementwise passes of 3 x (N, in) bytes each. x is saved once.

    members: tuple of (base, scaling, p, seed, has_lora, codes); ab: A, B of each LoRA member, in order (fp32
    master weights, used in x's dtype). Outputs are fresh tensors (RoPE may write into them in place)."""

    @staticmethod
    def forward(ctx, x2, members, *ab):
        ctx.set_materialize_grads(False)
        ys, saved, ctx.fams, j = [], [x2], [], 0
        for base, scaling, p, seed, has_lora, codes in members:
            if has_lora:
                y, xa, kc, fam = _lora_forward(x2, ab[j], ab[j + 1], base, scaling, p, seed, codes)
                saved += [xa, ab[j], ab[j + 1], kc]
                j += 2
            else:
                y, fam = _own(_base_forward(base, x2)), None
            ys.append(y)
            ctx.fams.append(fam)
        ctx.save_for_backward(*saved)
        ctx.members = members
        return tuple(ys)

    @staticmethod
    def backward(ctx, *dys):
        x2, *rest = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        grads, dx, j = [], None, 0
        for (base, s, p, seed, has_lora, _), fam, dy in zip(ctx.members, ctx.fams, dys):
            if has_lora:
                xa, A, B, kc = rest[4 * j:4 * j + 4]
                ia = 2 + 2 * j                                  # A's position among apply's inputs
                j += 1
                if dy is None:                                  # this output was not used
                    grads += [None, None]
                    continue
                dx, dA, dB = _lora_backward(dy, x2, xa, A, B, kc, base, s, p, seed, fam, need_x,
                                            ctx.needs_input_grad[ia], ctx.needs_input_grad[ia + 1], dx=dx)
                grads += [dA, dB]
            elif dy is not None and need_x:
                dx = _base_backward(base, dy.to(x2.dtype), out=dx)
        return (dx, None, *grads)


# Sibling projections (q, k, v; gate, up) run as one SiblingsFunction node where every member qualifies (False:
# each projection is its own node, autograd sums their input gradients).
GROUP_SIBLINGS = True


def _sibling_member(proj: nn.Module, x: torch.Tensor, lora_cls):
    """(base, scaling, p, has_lora, A, B) for a projection SiblingsFunction can run bit-identically to its own
    forward, in compute dtype x.dtype (the caller has checked autocast); None otherwise (a merged, disabled or
    biased adapter, a trainable base, another compute dtype, an unknown module). Kept cheap: it runs for every
    group on every forward, and an eager step is bound by the host."""
    d = proj.__dict__
    if d["_forward_hooks"] or d["_forward_pre_hooks"]:      # called as a module, so that its hooks run
        return None
    if type(proj) is lora_cls:
        f = d.get("forward")
        if getattr(f, "__func__", None) is not _fast_lora_forward or proj.merged or proj.disable_adapter:
            return None
        mods = d["_modules"]
        if mods["lora_B"].bias is not None:
            return None
        base = mods["base_layer"]
        drop = mods["lora_dropout"]
        p = float(drop.p) if type(drop) is nn.Dropout and proj.training else 0.0
        lora = (proj.scaling, p, True, mods["lora_A"].weight, mods["lora_B"].weight)
    else:
        base, lora = proj, (1.0, 0.0, False, None, None)
    bd = base.__dict__
    if bd["_modules"] or any(t is not None and t.requires_grad for t in bd["_parameters"].values()):
        return None
    if "qweight" in bd:
        if type(base).forward is not _NF4_FORWARD[0] or (bd["compute_dtype"] or x.dtype) != x.dtype:
            return None
    elif type(base) is not nn.Linear or (bd["_parameters"]["weight"].dtype != x.dtype and not
                                         torch.is_autocast_enabled(x.device.type)):
        return None
    return (base,) + lora


_NF4_FORWARD = [None]           # kernels.NF4Linear.forward (set on first use: llama imports kernels lazily)


def _global_module_hooks() -> bool:
    """Whether forward hooks for every module are registered (nn.modules.module.register_module_forward_hook):
    then the fused nodes step aside and each module is called, so that the hooks see it."""
    return bool(_nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks)


def run_siblings(x: torch.Tensor, projs) -> Optional[tuple]:
    """The outputs of `projs` on x (..., in) as one SiblingsFunction node, or None where a member does not qualify
    (the caller then runs each projection itself). A member with forward hooks (or global module hooks) does not:
    the node calls no module, so hooks would not run."""
    if not GROUP_SIBLINGS or not (torch.is_grad_enabled() and x.requires_grad) or _global_module_hooks():
        return None
    dt = x.device.type
    if torch.is_autocast_enabled(dt) and torch.get_autocast_dtype(dt) != x.dtype:   # each would cast x itself
        return None
    if _NF4_FORWARD[0] is None:
        from kernels import NF4Linear
        _NF4_FORWARD[0] = NF4Linear.forward
    lora_cls = _lora_class()
    got = [_sibling_member(p, x, lora_cls) for p in projs]
    if any(m is None for m in got):
        return None
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    codes = _keep_codes_here()
    members, ab = [], []
    for base, scaling, p, has_lora, A, B in got:          # seeds drawn in call order, as the members' own forwards
        members.append((base, scaling, p, _draw_seed(p) if has_lora else 0, has_lora, codes))
        if has_lora:
            ab += [A, B]
    with torch.autocast(x.device.type, enabled=False):
        ys = SiblingsFunction.apply(x2, tuple(members), *ab)
    return tuple(y.view(*shape[:-1], y.shape[-1]) for y in ys)


def _lora_class():
    from lora import LoRALinear
    return LoRALinear


def _compute_dtype(x: torch.Tensor, base: nn.Module) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return getattr(base, "compute_dtype", None) or x.dtype


def _dropout_p(lora_module: nn.Module) -> float:
    d = lora_module.lora_dropout
    return float(d.p) if isinstance(d, nn.Dropout) and lora_module.training else 0.0


def _host_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, (1,)).item())                   # from the CPU generator


class SeedSlots:
    """LoRA dropout seeds in device memory, for a step that is captured in a CUDA graph and replayed.

    Eagerly (no seed slots) each fused LoRA call draws its seed from the CPU generator and passes it to the
    kernels as an integer, which a graph would freeze. Under `seed_slots(slots)` the i-th call of the step gets
    slot i of `buf` instead (the kernels read it, SEED_PTR) and the seed is drawn at the same moment from the same
    generator and written there, so a step run this way draws exactly the masks of the eager step. A checkpointed
    layer's recompute rewinds to the slots of its forward (`rewound`), as the eager recompute restores the CPU
    generator. While a graph is captured nothing is drawn; before each replay `refill()` draws the `used` seeds
    of one step, in order, and copies them to `buf` (one host-to-device copy)."""

    def __init__(self, device, capacity: int = 4096):
        self.buf = torch.zeros(capacity, dtype=torch.int64, device=device)
        self.used = 0           # slots the step takes (set by the eager steps; a capture must take the same)
        self.cursor = 0         # next slot of the current step
        self.high = 0           # slots drawn so far in the current step
        self.capturing = False

    def begin_step(self, capturing: bool = False) -> None:
        self.cursor, self.high, self.capturing = 0, 0, capturing

    def take(self) -> torch.Tensor:
        i = self.cursor
        if i >= self.buf.numel():
            raise RuntimeError(f"SeedSlots: more than {self.buf.numel()} dropout LoRA calls in one step")
        self.cursor += 1
        if i >= self.high:
            self.high = i + 1
            if self.capturing:
                if i >= self.used:
                    raise RuntimeError(f"SeedSlots: the captured step takes dropout seed {i + 1}, the eager steps "
                                       f"took {self.used}: the step's LoRA calls changed between warm-up and capture")
            else:
                self.buf[i].fill_(_host_seed())
                self.used = max(self.used, i + 1)
        return self.buf[i:i + 1]

    @contextlib.contextmanager
    def rewound(self, cursor: int):
        saved, self.cursor = self.cursor, cursor
        try:
            yield
        finally:
            self.cursor = saved

    def refill(self) -> None:
        """Draw the seeds of one replay (as the eager step would, in call order) into buf."""
        if self.used:
            vals = torch.tensor([_host_seed() for _ in range(self.used)], dtype=torch.int64)
            if self.buf.is_cuda:
                vals = vals.pin_memory()          # an asynchronous copy (the host allocator keeps it until done)
            self.buf[:self.used].copy_(vals, non_blocking=self.buf.is_cuda)


_SLOTS: list = [None]          # the active SeedSlots (seed_slots), else None


@contextlib.contextmanager
def seed_slots(slots: Optional[SeedSlots]):
    """Within the block, fused LoRA calls take their dropout seeds from `slots` (see SeedSlots)."""
    prev, _SLOTS[0] = _SLOTS[0], slots
    try:
        yield slots
    finally:
        _SLOTS[0] = prev


def _draw_seed(p: float):
    """The dropout seed of one LoRA call: a host int, or (under seed_slots) a 1-element device tensor."""
    if p <= 0.0:
        return 0
    slots = _SLOTS[0]
    return _host_seed() if slots is None else slots.take()


def _keep_codes_here() -> bool:
    """Whether a fused LoRA forward here keeps its dropout mask as keep codes (see KEEP_CODES): only a forward that
    will be backpropagated (grad mode on: a checkpointed layer's first, no-grad pass is not; its recompute is)."""
    if not torch.is_grad_enabled() or KEEP_CODES == "never":
        return False
    if KEEP_CODES == "always":
        return True
    if KEEP_CODES != "recompute":
        raise ValueError(f"llama.fast_path.KEEP_CODES is {KEEP_CODES!r}: expected 'recompute', 'always' or 'never'")
    return _RECOMPUTING[0] > 0


def _fast_lora_forward(self, x: torch.Tensor) -> torch.Tensor:
    """LoRALinear.forward of the fast path: one fused node when training with an adapter and no lora bias."""
    if self.merged or self.disable_adapter or self.lora_B.bias is not None:
        return _lora_class().forward(self, x)
    shape = x.shape
    c = _compute_dtype(x, self.base_layer)
    x2 = x.reshape(-1, shape[-1]).to(c)                                      # (N, in)
    p = _dropout_p(self)
    seed = _draw_seed(p)
    with torch.autocast(x.device.type, enabled=False):
        y = LoRAFunction.apply(x2, self.lora_A.weight, self.lora_B.weight, self.base_layer, self.scaling, p, seed,
                               _keep_codes_here())
    return y.view(*shape[:-1], y.shape[-1]).to(x.dtype if not torch.is_autocast_enabled(x.device.type) else c)


# ----------------------------------------------------------------------------------------------- MLP tail
def _swiglu_h(g2: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """h = silu(g) * u (Triton on CUDA, the torch reference elsewhere)."""
    if g2.is_cuda:
        return _kernels()[2].swiglu_forward(g2, u2)
    return F.silu(g2) * u2


def _swiglu_grads_(dh, g2, u2, dg, du):
    """dg, du of h = silu(g) * u, written into dg and du (which may be g2 and u2 themselves: elementwise)."""
    if g2.is_cuda and all(t.is_contiguous() for t in (dh, g2, u2, dg, du)) \
            and g2.shape == u2.shape == dh.shape == dg.shape == du.shape:
        return _kernels()[2].swiglu_backward(dh, g2, u2, out=(dg, du))
    gf, uf, dhf = g2.float(), u2.float(), dh.float()
    sg = torch.sigmoid(gf)
    dgv, duv = dhf * uf * sg * (1 + gf * (1 - sg)), dhf * gf * sg
    return dg.copy_(dgv), du.copy_(duv)


_MLP_CHUNK_ROWS = 2048   # rows per chunk of the MLP tail's recompute and backward: bounds its (rows, F) temporaries


def _row_chunks(N: int, fam: Optional[str]):
    """Row ranges for the MLP tail (one range where the torch mask family needs the whole tensor at once)."""
    step = N if fam == "torch" or N <= _MLP_CHUNK_ROWS else _MLP_CHUNK_ROWS
    return [(r, min(N, r + step)) for r in range(0, N, max(step, 1))]


class SwiGLUDownFunction(torch.autograd.Function):
    """out = down(silu(g) * u) as one node, down a frozen linear with an optional fused LoRA (A, B not None).

    Saves g, u (N, F) (and xa (N, r)) but not h = silu(g) * u: backward recomputes h for dA, one row chunk at a
    time. need_out=False (a checkpointed layer's recompute, whose output value is discarded) skips the base
    matmul, computes xa chunk by chunk and returns a zero-stride tensor. Backward runs by row chunks
    (_MLP_CHUNK_ROWS): dh = dy @ W_down + dropout(dxa @ A), then dg, du, so no (N, F) temporary exists;
    inplace_bwd writes dg and du into g and u (their values are not needed afterwards).
    """

    @staticmethod
    def forward(ctx, g2, u2, A, B, base, n_out, scaling, p, seed, need_out, inplace_bwd, codes=False):
        c = g2.dtype
        N = g2.shape[0]
        fam = _family(g2, p) if A is not None else None
        kc = keep_codes(N, g2.shape[1], g2.device) if codes and fam == "philox" else None
        xa = None
        if need_out:
            h = _swiglu_h(g2, u2)                                            # (N, F)
            y = _own(_base_forward(base, h))                                 # (N, out)
            if A is not None:
                xa = _lora_xa(h, A.to(c), p, seed, fam, kc_out=kc)           # (N, r)
                y.addmm_(xa, B.to(c).t(), alpha=scaling)
            del h
        else:
            if A is not None:
                Ac = A.to(c)
                xa = torch.cat([_lora_xa(_swiglu_h(g2[r0:r1], u2[r0:r1]), Ac, p, seed, fam, r0, kc_out=kc)
                                for r0, r1 in _row_chunks(N, fam)])
            y = g2.new_zeros(()).expand(N, n_out)                            # never read (see the class doc)
        ctx.save_for_backward(g2, u2, xa, A, B, kc)
        ctx.base, ctx.scaling, ctx.p, ctx.seed, ctx.fam, ctx.inplace = base, scaling, p, seed, fam, inplace_bwd
        return y

    @staticmethod
    def backward(ctx, dy):
        g2, u2, xa, A, B, kc = ctx.saved_tensors
        s, p, c, fam, seed = ctx.scaling, ctx.p, g2.dtype, ctx.fam, ctx.seed
        dy = dy.to(c)
        need_a = A is not None and ctx.needs_input_grad[2]
        need_gu = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dA = dB = dxa = Ac = None
        if A is not None:
            Ac, Bc = A.to(c), B.to(c)
            if ctx.needs_input_grad[3]:
                dB = (dy.t() @ xa).float().mul_(s).to(B.dtype)               # (out, r)
            dxa = (dy @ Bc).mul_(s)                                          # (N, r)
        dg = du = None
        if need_gu:
            dg, du = (g2, u2) if ctx.inplace else (torch.empty_like(g2), torch.empty_like(u2))
        for r0, r1 in _row_chunks(g2.shape[0], fam):
            g_c, u_c = g2[r0:r1], u2[r0:r1]
            if need_a:
                part = _lora_da(dxa[r0:r1], _swiglu_h(g_c, u_c), p, seed, fam, r0, kc_in=kc)   # (r, F) fp32
                dA = part if dA is None else dA.add_(part)
            if need_gu:
                dh = _base_backward(ctx.base, dy[r0:r1])                   # (rows, F)
                if dxa is not None:
                    dh = _lora_dx_(dh, dxa[r0:r1], Ac, p, seed, fam, r0, kc_in=kc)
                _swiglu_grads_(dh, g_c, u_c, dg[r0:r1], du[r0:r1])
                del dh
        return dg, du, (dA.to(A.dtype) if dA is not None else None), dB, None, None, None, None, None, None, None, \
            None


def _mlp_tail(mlp: nn.Module, g: torch.Tensor, u: torch.Tensor, output_needed: bool) -> Optional[torch.Tensor]:
    """down(swiglu(g, u)) through SwiGLUDownFunction, or None where it does not apply (a trainable base, a
    LoRA bias, a merged or disabled adapter, an unknown down projection, forward hooks on it)."""
    down = mlp.down_proj
    if down._forward_hooks or down._forward_pre_hooks or _global_module_hooks():   # hooks see a module call
        return None
    if type(down) is _lora_class():
        if not _fused_lora_output(down):
            return None
        base, A, B, scaling, p = down.base_layer, down.lora_A.weight, down.lora_B.weight, down.scaling, \
            _dropout_p(down)
    else:
        base, A, B, scaling, p = down, None, None, 1.0, 0.0
    if any(t.requires_grad for t in base.parameters()) or g.shape != u.shape or \
            not (hasattr(base, "qweight") or isinstance(getattr(base, "weight", None), torch.Tensor)):
        return None
    n_out = getattr(base, "out_features", None)
    if not isinstance(n_out, int):
        return None
    autocast = torch.is_autocast_enabled(g.device.type)
    if A is None and hasattr(base, "qweight"):       # as NF4Linear.forward: its compute dtype, output in g's dtype
        c, out_dtype = getattr(base, "compute_dtype", None) or g.dtype, g.dtype
    else:                                            # as the fused LoRA forward (or F.linear under autocast)
        c = _compute_dtype(g, base)
        out_dtype = c if autocast else g.dtype
    g2, u2 = g.reshape(-1, g.shape[-1]).to(c), u.reshape(-1, u.shape[-1]).to(c)
    seed = _draw_seed(p)                                                      # as down_proj's forward would
    with torch.autocast(g.device.type, enabled=False):
        y = SwiGLUDownFunction.apply(g2, u2, A, B, base, n_out, scaling, p, seed, output_needed,
                                     not output_needed, _keep_codes_here())
    return y.view(*g.shape[:-1], n_out).to(out_dtype)


# ----------------------------------------------------------------------------------------------- checkpointing
class ActivationOffloader:
    """Pinned host buffers for the checkpointed layer inputs, copied on a side stream.

    `save(i, x)` starts the device-to-host copy of layer i's input (before the layer's compute, beside which it
    runs) and `release_saved()` (after it) lets x go; `load(i)` returns it on the device, waiting for a prefetch
    started by `prefetch(i)` (the backward of layer i prefetches layer i-1's input).

    Lifetimes by events, not `record_stream`: every device tensor here is allocated on the compute stream and
    freed there only after the compute stream has waited for the side stream's copy (a saved input once its
    layer's compute is enqueued, a prefetched one when loaded). While a CUDA graph is being captured, a block
    marked with `record_stream` cannot be reused before the capture ends (the allocator cannot query events
    then), so the captured 4 x 2048 step kept every layer's input and prefetch in its pool: 13.4 GiB reserved
    (H200, 8075066), 9.5 GiB since (H100, 49700e7). The capture's allocated peak (9.08 GiB against 5.86 eager)
    did not move: that has another cause."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.host: dict[int, torch.Tensor] = {}
        self.fetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.saving: list[tuple[torch.Tensor, torch.cuda.Event]] = []   # sources of device-to-host copies
        # host buffers that a captured CUDA graph copies into: kept alive when a batch of another shape replaces
        # them in `host` (a freed pinned block could be handed to another pinned tensor, which a replay of that
        # graph would then overwrite)
        self.graph_held: list[torch.Tensor] = []

    def __deepcopy__(self, memo):
        """A copied model gets an offloader of its own: a new side stream, no buffers, nothing in flight (CUDA
        events cannot be copied, and sharing the pinned buffers would let the two models overwrite each other)."""
        new = memo[id(self)] = type(self)(self.device)
        return new

    def _copy_done(self) -> torch.cuda.Event:
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    @staticmethod
    def _host_empty(shape, dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def release_saved(self) -> None:
        """The compute stream waits for the pending device-to-host copies; then their sources may be freed."""
        cur = torch.cuda.current_stream(self.device)
        for _, ev in self.saving:
            cur.wait_event(ev)
        self.saving.clear()

    def save(self, i: int, x: torch.Tensor) -> None:
        self._drop_fetched(i)                   # a prefetch left over from an interrupted backward
        self.release_saved()                   # the previous layer's copy ran beside this layer's compute
        buf = self.host.get(i)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = self.host[i] = self._host_empty(x.shape, x.dtype)
        if torch.cuda.is_current_stream_capturing() and not any(b is buf for b in self.graph_held):
            self.graph_held.append(buf)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            buf.copy_(x, non_blocking=True)
        self.saving.append((x, self._copy_done()))   # x stays referenced until the compute stream waited

    def prefetch(self, i: int) -> None:
        self.release_saved()
        if i < 0 or i not in self.host or i in self.fetched:
            return
        src = self.host[i]
        t = torch.empty(src.shape, dtype=src.dtype, device=self.device)     # on the compute stream
        self.stream.wait_stream(torch.cuda.current_stream(self.device))     # t's earlier users are done
        with torch.cuda.stream(self.stream):
            t.copy_(src, non_blocking=True)
        self.fetched[i] = (t, self._copy_done())

    def load(self, i: int) -> torch.Tensor:
        self.prefetch(i)
        t, ev = self.fetched.pop(i)
        torch.cuda.current_stream(self.device).wait_event(ev)
        return t

    def _drop_fetched(self, i: int) -> None:
        got = self.fetched.pop(i, None)
        if got is not None:                     # free it only after its copy (the compute stream waits)
            torch.cuda.current_stream(self.device).wait_event(got[1])

    def free(self) -> None:
        for i in list(self.fetched):
            self._drop_fetched(i)
        self.release_saved()
        self.host.clear()
        self.graph_held.clear()


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
        ctx.slots = _SLOTS[0]                           # seeds in device memory: recompute rewinds to these
        ctx.slot0 = ctx.slots.cursor if ctx.slots is not None else 0
        ctx.cpu_rng = torch.get_rng_state()
        # (with seed slots no CUDA generator is used: the masks come from the slots, and a graph capture cannot
        # read the generator's state)
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda and ctx.slots is None else None
        if offloader is not None:
            offloader.save(layer.self_attn.layer_idx, x)    # the copy runs beside this layer's compute
        with torch.no_grad():
            forward = layer._fused_forward if hasattr(layer, "_fused_forward") else layer._plain_forward
            y = forward(x, cos, sin, mask)
        if offloader is not None:
            offloader.release_saved()       # the compute stream waits for the copy (done by now); x may go
            ctx.save_for_backward(cos, sin, mask)
        else:
            ctx.save_for_backward(x, cos, sin, mask)
        return y

    @staticmethod
    def backward(ctx, dy):
        layer, offloader = ctx.layer, ctx.offloader
        i = layer.self_attn.layer_idx
        if offloader is not None:
            cos, sin, mask = ctx.saved_tensors
            x = offloader.load(i)
        else:
            x, cos, sin, mask = ctx.saved_tensors
        x = x.detach().requires_grad_(True)
        devices = [x.device] if ctx.cuda_rng is not None else []
        rewind = ctx.slots.rewound(ctx.slot0) if ctx.slots is not None else contextlib.nullcontext()
        with torch.random.fork_rng(devices=devices), rewind:
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            _RECOMPUTING[0] += 1
            try:
                with torch.enable_grad(), torch.autocast(ctx.device_type, dtype=ctx.autocast[1],
                                                         enabled=ctx.autocast[0]):
                    if hasattr(layer, "_recompute_forward"):
                        outs = layer._recompute_forward(x, cos, sin, mask, offloader)   # out = sum(outs)
                    else:
                        outs = (layer._plain_forward(x, cos, sin, mask),)
            finally:
                _RECOMPUTING[0] -= 1
        torch.autograd.backward(outs, [dy] * len(outs))
        if offloader is not None:
            offloader.prefetch(i - 1)         # a no-op when the recompute's backward already started it
        return None, None, x.grad, None, None, None, None


class FastDecoderLayer(DecoderLayer):
    """DecoderLayer whose training forward goes through `OffloadedCheckpoint` when checkpointing is on, and keeps
    what it saves for backward in pinned host memory when it is one of the `offload_saved` layers
    (llama/offload.py)."""

    _plain_forward = DecoderLayer.forward

    def _recompute_forward(self, x, cos, sin, mask, offloader=None):
        """DecoderLayer.forward for OffloadedCheckpoint's backward, as (h, m) with out = h + m: the sum is never
        formed (only its gradient matters, dy for both terms) and the MLP skips its output (output_needed=False:
        the down projection's matmul is not run). With an offloader, h's backward prefetches the layer below."""
        h, n = self._attention_half(x, cos, sin, mask)
        if offloader is not None:
            # n's backward runs once the MLP half of the layer's backward is done, past its memory peak
            n = PrefetchOnBackward.apply(n, offloader, self.self_attn.layer_idx - 1)
        m = self.mlp(n, output_needed=False) if isinstance(self.mlp, FastMLP) else self.mlp(n)
        return h, m

    def _attention_half(self, x, cos, sin, mask):
        """(h, n): h = x + attention(input norm of x) and n = the post-attention norm of h, each norm with its
        residual add as one node (the attention's residual add done in the post-attention norm's pass)."""
        xr, n = _residual_norm(self.input_layernorm, x, None)
        return _residual_norm(self.post_attention_layernorm, xr, self.self_attn(n, cos, sin, mask))

    def _fused_forward(self, x, cos, sin, mask):
        """DecoderLayer.forward with the fused residual norms: a checkpointed layer's first pass (no graph), and
        the training forward of a layer that keeps its activations (RECOMPUTE_NORM_OUTPUTS off)."""
        h, n = self._attention_half(x, cos, sin, mask)
        return h + self.mlp(n)

    def forward(self, x, cos, sin, mask, cache=None):
        training = self.training and cache is None and torch.is_grad_enabled()
        saved_off = getattr(self, "_saved_offloader", None) if training else None
        if saved_off is None:
            return self._training_forward(x, cos, sin, mask, cache, training)
        i = self.self_attn.layer_idx
        saved_off.before_layer(i)                  # device copies of earlier offloaded layers whose time has come
        with saved_off.layer(i, self, (cos, sin, mask)):
            out = self._training_forward(x, cos, sin, mask, cache, training)
        if i == saved_off.n_layers - 1:
            saved_off.before_layer(i + 1)          # the end of the forward: every offloaded layer is off the device
        return PrefetchOnBackward.apply(out, saved_off, i)

    def _training_forward(self, x, cos, sin, mask, cache, training):
        if training and getattr(self, "_fast_checkpoint", False):
            anchor = self._grad_anchor
            if anchor.device != x.device:
                anchor = self._grad_anchor = torch.zeros((), device=x.device, requires_grad=True)
            return OffloadedCheckpoint.apply(self, getattr(self, "_offloader", None), x, cos, sin, mask, anchor)
        if training and RECOMPUTE_NORM_OUTPUTS:
            xr, n = _residual_norm(self.input_layernorm, x, None)
            with _saved_as_recomputed(n, self.input_layernorm, x):
                a = self.self_attn(n, cos, sin, mask)
            h, n = _residual_norm(self.post_attention_layernorm, xr, a)
            with _saved_as_recomputed(n, self.post_attention_layernorm, h):
                return h + self.mlp(n)
        if training:
            return self._fused_forward(x, cos, sin, mask)
        return DecoderLayer.forward(self, x, cos, sin, mask, cache)


# The residual adds of a layer meet its norms in one node each (kernels.rms_norm.ResidualRMSNormFunction): the
# attention's residual add is done in the post-attention norm's pass, and the backward of each norm adds the
# gradient that reached its input by the residual branch in its own kernel, instead of autograd summing the two
# (False: the separate add and norm).
FUSE_RESIDUAL_NORMS = True


def _residual_norm(norm: nn.Module, x: torch.Tensor, a: Optional[torch.Tensor]):
    """(h, norm(h)) with h = x + a (a None: h = x): one ResidualRMSNormFunction node for our norm on CUDA (and in
    the interpreter tests), else the separate ops (also where the norm has forward hooks, which a node that does
    not call the module would skip). Values equal the separate ops' (the same kernels)."""
    on = x.is_cuda or (_PHILOX_ON_CPU and _interpreting())
    if FUSE_RESIDUAL_NORMS and on and type(norm) is FastRMSNorm and not (
            norm._forward_hooks or norm._forward_pre_hooks or _global_module_hooks()):
        return _kernels()[0].residual_rms_norm(x, a, norm.weight, norm.eps, triton_on_cpu=not x.is_cuda)
    h = x if a is None else x + a
    return h, norm(h)


# A layer that keeps its activations (not checkpointed) saves its norms' outputs only for the LoRA A-sides that
# read them (dA needs the input): q/k/v read input_layernorm(x), gate/up post_attention_layernorm(h). The norms
# keep x and h for their own backward anyway, so these saved outputs are recomputed from them when the backward
# unpacks them (one norm kernel each, bit-identical: the same deterministic kernel on the same input) instead of
# being held from forward to backward: (B, T, C) per norm and layer (1 of about 12.4 (B, T, C)-sized activations
# per layer with LoRA on q, v).
RECOMPUTE_NORM_OUTPUTS = True


class _NormRecipe:
    """norm(inp), recomputed once when a saved view of it is first unpacked (kept until the recipe dies). Inside
    a layer whose saved activations are offloaded (llama/offload.py), inp is kept as the offloader keeps it."""

    __slots__ = ("norm", "inp", "autocast", "value", "unpack")

    def __init__(self, norm, inp, outer=None):
        self.norm, self.value = norm, None
        self.inp, self.unpack = (outer[0](inp), outer[1]) if outer is not None else (inp, None)
        dt = inp.device.type
        self.autocast = (dt, torch.is_autocast_enabled(dt), torch.get_autocast_dtype(dt))

    def get(self) -> torch.Tensor:
        if self.value is None:
            dt, on, dtype = self.autocast
            inp = self.unpack(self.inp) if self.unpack is not None else self.inp
            with torch.no_grad(), torch.autocast(dt, dtype=dtype, enabled=on):
                self.value = self.norm(inp)
        return self.value


def _saved_as_recomputed(out: torch.Tensor, norm: nn.Module, inp: torch.Tensor):
    """Within the block, autograd saves any view of `out` (= norm(inp)) as a recipe to recompute it; other saved
    tensors go to the enclosing offloading block's hooks, if any (saved_tensors_hooks do not nest)."""
    if out.storage_offset() != 0 or not out.is_contiguous():
        return contextlib.nullcontext()
    outer = active_hooks()
    recipe = _NormRecipe(norm, inp, outer)
    ptr, dev, dtype = out.untyped_storage().data_ptr(), out.device, out.dtype     # (not `out`: freed after)

    def pack(t):
        if t.device == dev and t.untyped_storage().data_ptr() == ptr and t.dtype == dtype:
            return recipe, tuple(t.shape), t.stride(), t.storage_offset()
        return outer[0](t) if outer is not None else t

    def unpack(saved):
        if isinstance(saved, tuple) and isinstance(saved[0], _NormRecipe):
            r, shape, stride, offset = saved
            return r.get().as_strided(shape, stride, offset)
        return outer[1](saved) if outer is not None else saved

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


# ----------------------------------------------------------------------------------------------- loss
class FastLlamaForCausalLM(LlamaForCausalLM):
    """With labels (and no logits_to_keep) the loss is the chunked cross-entropy of the final hidden states and
    `logits` is None; without labels this is the plain forward."""

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, labels=None,
                logits_to_keep: int = 0, loss_reduction: str = "mean") -> CausalLMOutput:
        """loss_reduction "mean" (over labelled tokens, as the plain path) or "sum" (the sum of the tokens'
        losses: train.loop divides by the label tokens of the whole accumulated, all-rank step)."""
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"FastLlamaForCausalLM loss_reduction: expected 'mean' or 'sum', got {loss_reduction!r}")
        if labels is None or logits_to_keep or cache is not None:
            if loss_reduction == "sum" and labels is not None:
                raise ValueError("FastLlamaForCausalLM: loss_reduction='sum' needs the chunked loss (no cache, "
                                 "no logits_to_keep)")
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
            loss = _kernels()[3].chunked_cross_entropy(h.reshape(B * T, C), w, shifted.reshape(-1),
                                                       reduction=loss_reduction, return_count=False)
        return CausalLMOutput(logits=None, loss=loss)


class CPUEmbedding(nn.Embedding):
    """A frozen embedding kept in pinned host memory. CUDA ids: a kernel reads the rows it needs from the pinned
    table over the host link (kernels.gather: no synchronization, no host work, capturable in a CUDA graph); its
    first call is checked against the host gather, and a failure (a Triton build that refuses host pointers, a
    wrong row) falls back to the host path for good. Host path: the rows are gathered on the CPU and copied to
    `device` (the ids are copied to the host first: a synchronization).

    Ids outside [0, V): the host path raises at once; the device gather writes zero rows and flags them in pinned
    memory, and the next call (eager) raises IndexError naming the embedding's size."""

    DEVICE_GATHER = True                   # class switch (benchmarks compare both paths)

    def _gather_state(self):
        st = self.__dict__.get("_gather")
        if st is None:
            st = self.__dict__["_gather"] = {"ok": None, "why": None, "bad": torch.zeros(1, dtype=torch.int32)}
        if torch.cuda.is_available() and not st["bad"].is_pinned():     # new, or a copy (deepcopy does not pin)
            st["bad"] = st["bad"].pin_memory()
        return st

    def _host_rows(self, ids: torch.Tensor) -> torch.Tensor:
        ids_h = ids.reshape(-1).cpu()
        rows = torch.empty((ids_h.numel(), self.weight.shape[1]), dtype=self.weight.dtype,
                           pin_memory=self.weight.is_pinned())
        torch.index_select(self.weight, 0, ids_h, out=rows)                    # (B*T, C) on the host
        return rows.to(self._device, non_blocking=True)

    def device_gather_ok(self, ids: torch.Tensor) -> bool:
        """Whether calls with ids like these gather on the device; the first such call (outside a graph capture)
        checks the kernel against the host gather on these ids, once."""
        from kernels.gather import device_gather_possible, gather_rows

        st = self._gather_state()
        dev = torch.device(self._device)
        same = ids.device.type == dev.type and (dev.index is None or ids.device.index in (None, dev.index))
        if not (self.DEVICE_GATHER and st["ok"] is not False and same and device_gather_possible(self.weight, ids)):
            return False
        if st["ok"] is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return False
            try:
                got = gather_rows(self.weight, ids, check_range=True)
            except IndexError:
                raise
            except Exception as e:  # noqa: BLE001  (the host path stays)
                st["ok"], st["why"] = False, f"{type(e).__name__}: {e}"
                return False
            st["ok"] = bool(torch.equal(got, self._host_rows(ids)))
            st["why"] = None if st["ok"] else "the device gather differed from the host gather"
        return st["ok"]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from kernels.gather import gather_rows

        st = self._gather_state()
        if st["bad"][0].item():
            st["bad"].zero_()
            raise IndexError(f"embedding: an earlier call's input ids were outside [0, {self.weight.shape[0]}) "
                             f"(the vocabulary size); its rows for them were zeros")
        if self.device_gather_ok(ids):
            return gather_rows(self.weight, ids, check_range=False, bad=st["bad"]).view(*ids.shape, -1)
        return self._host_rows(ids).view(*ids.shape, -1)                         # (B, T, C)


# ----------------------------------------------------------------------------------------------- switch
_SWAPS = ((RMSNorm, FastRMSNorm), (Attention, FastAttention), (MLP, FastMLP), (DecoderLayer, FastDecoderLayer),
          (LlamaForCausalLM, FastLlamaForCausalLM))


def enable_fast_path(model: LlamaForCausalLM, checkpointing: bool | int = False, offload: bool = False,
                     fused_lora: bool = True, offload_embeddings: bool = False,
                     offload_saved: int = 0) -> LlamaForCausalLM:
    """Swap the fused modules into `model` in place (and return it).

    checkpointing: recompute each decoder layer in backward, keeping only its input (B, T, C); an int k
    checkpoints the first k layers only (the rest keep their activations: less recompute, more memory).
    offload: keep those inputs in pinned host memory (CUDA only; copies overlap compute on a side stream).
    fused_lora: LoRALinear layers use `LoRAFunction` (dropout fused, mask regenerated, no fp32 input copy).
    offload_embeddings: a frozen input embedding moves to pinned host memory (CUDA only; exact, saves V*C*2 bytes).
    offload_saved: the first k layers that are not checkpointed keep what their backward needs in pinned host
    memory instead (llama/offload.py: no recompute; the host link's bandwidth bounds how many pay). On CPU
    tensors the same bookkeeping runs with copies in host memory (tests).
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
    if not isinstance(offload_saved, int) or isinstance(offload_saved, bool) or offload_saved < 0:
        raise ValueError(f"enable_fast_path offload_saved: expected a number of layers >= 0, got {offload_saved!r}")
    n_saved = min(offload_saved, n_layers - n_ckpt)
    saved_off = SavedActivationOffloader(device, range(n_ckpt, n_ckpt + n_saved), n_layers) if n_saved else None
    for i, layer in enumerate(model.model.layers):
        layer._fast_checkpoint = i < n_ckpt
        layer._offloader = offloader
        layer._saved_offloader = saved_off
        layer._grad_anchor = torch.zeros((), device=device, requires_grad=True)
    emb = model.model.embed_tokens
    if offload_embeddings and device.type == "cuda" and not emb.weight.requires_grad and \
            emb.weight is not model.lm_head.weight:
        emb.weight = nn.Parameter(emb.weight.detach().cpu().pin_memory(), requires_grad=False)
        emb.__class__ = CPUEmbedding
        emb._device = device
    model._fast_path = dict(checkpointed_layers=f"{n_ckpt} of {n_layers}", offload=offloader is not None,
                            offloaded_saved_layers=f"{n_saved} of {n_layers}",
                            fused_lora=fused_lora,
                            offload_embeddings=type(emb) is CPUEmbedding,
                            sibling_nodes=GROUP_SIBLINGS, residual_norm_nodes=FUSE_RESIDUAL_NORMS)
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
        for k in ("_fast_checkpoint", "_offloader", "_saved_offloader", "_grad_anchor"):
            layer.__dict__.pop(k, None)
    model.__dict__.pop("_fast_path", None)
    return model


def fast_path_memory_note(model: nn.Module) -> Optional[dict]:
    """What `enable_fast_path` switched on for `model` (None when it is the plain path)."""
    return getattr(model, "_fast_path", None)
