"""The AdamW update as bitsandbytes computes it, 32-bit and 8-bit blockwise, in pure torch.

32-bit, per parameter element, step t >= 1 (all float32):

    m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g*g
    c1 = 1 - b1**t ;  c2 = sqrt(1 - b2**t) ;  step_size = -lr * c2 / c1
    p = p + step_size * m / (sqrt(v) + eps*c2)
    p = p * (1 - lr*wd)                       # decay_after=True: bitsandbytes' CUDA kernel
  or the decay first                          # decay_after=False: bitsandbytes' CPU path and torch.optim.AdamW

Where the decay goes (read from bitsandbytes 0.50.2):
  * CUDA kernels (csrc/kernels.cu, kOptimizer32bit2State / kOptimizerStatic8bit2StateBlockwise): AFTER the update.
  * CPU (bitsandbytes/backends/cpu/ops.py, _optimizer_update_32bit_cpu / _8bit_blockwise_cpu): BEFORE, like torch.
The optimizers in train.optim pick `decay_after = (device is CUDA)` unless told otherwise, so each device
reproduces what bitsandbytes does on that device. The difference per step is lr*wd*|update| (~1e-10 at the
tutorial's lr 2e-4, wd 1e-3).
With decay_after=False this function performs exactly the float32 operations of bitsandbytes' CPU 32-bit
path, so it is bit-identical to bnb.optim.AdamW32bit on the CPU.

8-bit blockwise: m and v live as uint8 codes into 256-entry dynamic maps (signed for m, unsigned for v) with
one float32 absmax per block of 256 elements of the flattened tensor. Each step: dequantize
(code[q] * absmax[block]), run the 32-bit math above, take the new per-block absmax, requantize to the nearest
code of x / absmax; the CUDA kernel's sign fix (an m code whose sign differs from m moves one code towards m)
is applied. bitsandbytes' 8-bit CPU path writes the denominator as sqrt(v)/c2 + eps and scales by -lr/c1
(algebraically equal); its CPU quantizer is an approximate search that differs from exact nearest on ~0.15%
of elements by one code -- both are within bitsandbytes' own 8-bit test bounds (tests/train/test_optim.py).

Shapes: p, g (any shape, contiguous); m, v like p (float32); q1, q2 uint8 like p; absmax1, absmax2 float32
(ceil(numel/256),); code1, code2 float32 (256,).
"""
from __future__ import annotations

import math

import torch

from nf4.double_quant import dynamic_map

BLOCKSIZE_8BIT = 256


# ---------------------------------------------------------------------------------------------------------
# dynamic 8-bit maps (same construction as bitsandbytes.functional.create_dynamic_map)
def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """256 sorted float32 values: a dynamic exponent (10^-6 .. 10^0) times a linear fraction; 0 and 1 included.

    Signed: min -0.99296875, code[127] = 0, max 1.0. Unsigned: code[0] = 0, max 1.0. The same maps as double
    quantization uses (nf4.double_quant.dynamic_map, which builds them).
    """
    return dynamic_map(signed, max_exponent_bits, total_bits)


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Flatten and zero-pad to (n_blocks, blocksize)."""
    flat = x.reshape(-1)
    n = flat.numel()
    nb = -(-n // blocksize)
    if nb * blocksize != n:
        flat = torch.nn.functional.pad(flat, (0, nb * blocksize - n))
    return flat.view(nb, blocksize)  # (n_blocks, blocksize)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = BLOCKSIZE_8BIT,
                            out: torch.Tensor | None = None, absmax_out: torch.Tensor | None = None,
                            sign_fix: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """codes uint8 (x.shape), absmax float32 (n_blocks,): nearest code of x / absmax[block].

    An all-zero block has absmax 0 and codes the map's zero.
    """
    xb = _blocks(x.float(), blocksize)                       # (nb, bs)
    absmax = xb.abs().amax(dim=1)                             # (nb,)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    xs = (xb / safe[:, None]).reshape(-1)[: x.numel()]        # (n,) in [-1, 1]
    mids = (code[1:] + code[:-1]) * 0.5                       # (255,)
    idx = torch.bucketize(xs, mids)                           # nearest code; ties go down
    if sign_fix:  # kernels.cu: keep the sign of m after quantization
        wrong = torch.signbit(code[idx]) != torch.signbit(xs)
        idx = torch.where(wrong, idx + torch.where(xs > 0, 1, -1), idx)
    q = idx.to(torch.uint8).view(x.shape)
    if out is not None:
        out.copy_(q)
        q = out
    if absmax_out is not None:
        absmax_out.copy_(absmax)
        absmax = absmax_out
    return q, absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int = BLOCKSIZE_8BIT) -> torch.Tensor:
    """float32 (q.shape): code[q] * absmax[block]."""
    vals = _blocks(code[q.reshape(-1).long()], blocksize)   # (nb, bs)
    return (vals * absmax[:, None]).reshape(-1)[: q.numel()].view(q.shape)


# ---------------------------------------------------------------------------------------------------------
@torch.no_grad()
def adamw_update_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float,
                  b1: float, b2: float, eps: float, wd: float, decay_after: bool = True) -> None:
    """One AdamW step in place on p (any float dtype), m and v (float32). See the module docstring."""
    g32 = g.float()
    p32 = p if p.dtype == torch.float32 else p.float()
    m.mul_(b1).add_(g32, alpha=1.0 - b1)
    v.mul_(b2).addcmul_(g32, g32, value=1.0 - b2)
    c1 = 1.0 - b1 ** step
    c2 = math.sqrt(1.0 - b2 ** step)
    step_size = -lr * c2 / c1
    if wd > 0.0 and not decay_after:
        p32.mul_(1.0 - lr * wd)
    p32.add_(m / (v.sqrt() + eps * c2), alpha=step_size)
    if wd > 0.0 and decay_after:
        p32.mul_(1.0 - lr * wd)
    if p32 is not p:
        p.copy_(p32)


@torch.no_grad()
def adamw8bit_update_(p: torch.Tensor, g: torch.Tensor, q1: torch.Tensor, q2: torch.Tensor,
                      absmax1: torch.Tensor, absmax2: torch.Tensor, code1: torch.Tensor, code2: torch.Tensor,
                      step: int, lr: float, b1: float, b2: float, eps: float, wd: float,
                      decay_after: bool = True, update_fn=adamw_update_) -> None:
    """8-bit blockwise AdamW step: dequantize m, v -> update_fn -> requantize (codes and absmax in place)."""
    m = dequantize_blockwise_8bit(q1, absmax1, code1)
    v = dequantize_blockwise_8bit(q2, absmax2, code2)
    update_fn(p, g, m, v, step, lr, b1, b2, eps, wd, decay_after=decay_after)
    quantize_blockwise_8bit(m, code1, out=q1, absmax_out=absmax1, sign_fix=True)
    quantize_blockwise_8bit(v, code2, out=q2, absmax_out=absmax2)
