"""Pieces shared by the NF4 kernels: when to use inline PTX, the small tables every kernel reads, and
the @triton.jit helpers that turn packed bytes and (double-quantized) scales into values.

Exactness notes (see ../shared/NUMERICS.md and nf4/blockwise.py):
- bitsandbytes computes 1/absmax with the approximate `rcp.approx.ftz.f32` (it is built with fast math).
  On a GPU we emit that instruction; the interpreter (TRITON_INTERPRET=1) cannot run inline PTX, so its
  launchers pass the reciprocal precomputed by `nf4.blockwise.reciprocal_f32` (same bits).
- The double-quant restore `map[q] * absmax2 + offset` must round twice. `mul.rn.f32` in PTX is never
  contracted into an FMA; in the interpreter numpy rounds every operation anyway.
"""
import functools
import os

import torch
import triton
import triton.language as tl

from nf4.tables import code_table, fp4_thresholds, nf4_thresholds

FLT_MIN = 1.1754943508222875e-38
FLT_MAX = 3.4028234663852886e38


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_ptx(t: torch.Tensor) -> bool:
    """Inline PTX is available: a CUDA tensor and a real compiler (not the interpreter)."""
    return t.is_cuda and not interpreting()


def check_triton_device(t: torch.Tensor, what: str) -> None:
    if not (t.is_cuda or interpreting()):
        raise ValueError(f"{what}: Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1), got device {t.device}")


@functools.lru_cache(maxsize=None)
def _tables(quant_type: str, device: str):
    dev = torch.device(device)
    table = code_table(quant_type, dev).contiguous()  # (16,) float32
    thresholds = (nf4_thresholds(dev) if quant_type == "nf4" else fp4_thresholds(dev)).contiguous()
    return table, thresholds


def code_table_on(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-entry float32 code table on `device` (cached)."""
    return _tables(quant_type, str(device))[0]


def thresholds_on(quant_type: str, device: torch.device) -> torch.Tensor:
    """The NF4 (15) or FP4 magnitude (7) float32 thresholds on `device` (cached)."""
    return _tables(quant_type, str(device))[1]


def scale_args(qw_absmax, nested, device):
    """Kernel arguments for the scales: (absmax, q, absmax2, code8, offset, DOUBLE_QUANT).
    Unused pointers get a dummy tensor so every launch has the same signature."""
    if nested is None:
        dummy = qw_absmax
        return qw_absmax, dummy, dummy, dummy, dummy, False
    offset = nested.offset.reshape(1).to(device=device, dtype=torch.float32)
    return (nested.absmax2, nested.q, nested.absmax2, nested.code.to(device, torch.float32).contiguous(),
            offset, True)


# ---------------------------------------------------------------------------------------------------
# @triton.jit helpers
# ---------------------------------------------------------------------------------------------------
@triton.jit
def rcp_approx(x, USE_PTX: tl.constexpr):
    """1/x as CUDA's rcp.approx.ftz.f32 (only valid with USE_PTX; the interpreter path never calls it)."""
    if USE_PTX:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def mul_rn(a, b, USE_PTX: tl.constexpr):
    """a * b rounded on its own (never fused into a following add)."""
    if USE_PTX:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def load_scales(block_idx, mask, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                DOUBLE_QUANT: tl.constexpr, USE_PTX: tl.constexpr):
    """float32 absmax of 4-bit block `block_idx` (any shape):
    absmax[b], or with double quantization map[q[b]] * absmax2[b // 256] + offset (two roundings)."""
    if DOUBLE_QUANT:
        q = tl.load(q_ptr + block_idx, mask=mask, other=0).to(tl.int32)
        c = tl.load(code8_ptr + q)
        a2 = tl.load(absmax2_ptr + block_idx // 256, mask=mask, other=0.0)
        return mul_rn(c, a2, USE_PTX) + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block_idx, mask=mask, other=0.0)


@triton.jit
def unpack_values(byte, table_ptr):
    """uint8 bytes -> (value of the high nibble, value of the low nibble), float32 table entries."""
    b = byte.to(tl.int32)
    hi = tl.load(table_ptr + (b >> 4))
    lo = tl.load(table_ptr + (b & 15))
    return hi, lo
