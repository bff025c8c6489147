"""Double quantization: the float32 absmax of every 4-bit block, itself quantized to 8 bits.

QLoRA's second level (paper section 3, "Double Quantization"): the first-level scales c2 (one fp32
per 64 weights = 0.5 bit/param) are centred on their mean and quantized blockwise (blocks of 256)
with the signed dynamic 8-bit map:

    offset  = mean(absmax)                                   float32 scalar
    absmax2 = max |absmax - offset| per 256 scales           float32, (ceil(n_blocks / 256),)
    q       = quantize8(( absmax - offset) * (1 / absmax2))  uint8, (n_blocks,)
    absmax ~= map[q] * absmax2[b // 256] + offset            float32 (a multiply, then an add)

Cost: 8/64 + 32/(64*256) = 0.127 bit/param instead of 32/64 = 0.5.

The 8-bit quantizer reproduces bitsandbytes' CUDA kernel: a 7-step binary search over the sorted
map from pivot 127 (steps 64, 32, ..., 1), then one compare against the midpoint between the value
found and its bracketing neighbour. The result is the nearest code, except that an exact tie goes
to the pivot the search stopped at.
"""
from dataclasses import dataclass

import torch

from .blockwise import blockwise_absmax, canonical_nan, flush_denormals, reciprocal_f32

NESTED_BLOCKSIZE = 256


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic 8-bit map (Dettmers 2015, arXiv 1511.04561): 256 sorted float32 values.

    For exponent e = 0..max_exponent_bits-1 the fraction bits shrink: the levels are the midpoints of
    linspace(0.1, 1, 2**(e + non_sign_bits - max_exponent_bits) + 1) (one more fraction bit when
    unsigned) times 10**(e - max_exponent_bits + 1), mirrored for signed maps, plus 0 and 1.0.
    With the defaults (signed): min -0.99296875, map[127] == 0, max 1.0.
    """
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    values = []
    scale_exp = 0
    for e in range(max_exponent_bits):
        n_fraction = 2 ** (e + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
        bounds = torch.linspace(0.1, 1, n_fraction, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale_exp = -(max_exponent_bits - 1) + e
        values += (10 ** scale_exp * means).tolist()
        if signed:
            values += (-(10 ** scale_exp) * means).tolist()
    if additional_items > 0:
        bounds = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        values += (10 ** scale_exp * means).tolist()
        if signed:
            values += (-(10 ** scale_exp) * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def search_codes(xs: torch.Tensor, code: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """8-bit codes of values scaled into [-1, 1], by CUDA's binary search (see module docstring)."""
    code = code.to(xs.device, torch.float32)
    pivot = torch.full_like(xs, 127, dtype=torch.int64)
    lower_pivot = torch.zeros_like(pivot)
    upper_pivot = torch.full_like(pivot, 255)
    lower = torch.full_like(xs, -1.0 if signed else 0.0)
    upper = torch.ones_like(xs)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = xs > val
        lower_pivot = torch.where(up, pivot, lower_pivot)
        lower = torch.where(up, val, lower)
        upper_pivot = torch.where(up, upper_pivot, pivot)
        upper = torch.where(up, upper, val)
        pivot = torch.where(up, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    up = xs > val
    go_up = up & (xs > (upper + val) * 0.5)
    go_down = ~up & (xs < (lower + val) * 0.5)
    out = torch.where(go_up, upper_pivot, torch.where(go_down, lower_pivot, pivot))
    return out.to(torch.uint8)


def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """Blockwise 8-bit quantization of a flat float32 tensor: -> (q uint8 (n,), absmax float32 (blocks,))."""
    xf = flush_denormals(x.reshape(-1).float())
    absmax = blockwise_absmax(xf, blocksize)
    block_of = torch.arange(xf.numel(), device=xf.device) // blocksize
    xs = xf * reciprocal_f32(absmax)[block_of]
    return search_codes(xs, code, signed=bool(code.min() < 0)), absmax


def dequantize_blockwise_8bit(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                              blocksize: int = NESTED_BLOCKSIZE) -> torch.Tensor:
    """map[q] * absmax[block], float32, (n,)."""
    block_of = torch.arange(q.numel(), device=q.device) // blocksize
    return canonical_nan(code.to(q.device, torch.float32)[q.reshape(-1).long()] * absmax.float()[block_of])


@dataclass
class DoubleQuantState:
    """The 8-bit form of a 4-bit tensor's absmax: q (uint8, one per 4-bit block), absmax2 (float32, one
    per 256 scales), code (the 256-entry signed dynamic map), offset (float32 scalar tensor)."""
    q: torch.Tensor
    absmax2: torch.Tensor
    code: torch.Tensor
    offset: torch.Tensor
    blocksize: int = NESTED_BLOCKSIZE

    def to(self, device) -> "DoubleQuantState":
        return DoubleQuantState(self.q.to(device), self.absmax2.to(device), self.code.to(device),
                                self.offset.to(device), self.blocksize)


def absmax_mean(absmax: torch.Tensor) -> torch.Tensor:
    """mean(absmax) as a float32 scalar tensor, accumulated in float64 and rounded once: the exact
    mean, and within one ulp of the float32 tree reduction torch runs on CUDA."""
    return absmax.double().mean().float()


def double_quantize(absmax: torch.Tensor, code: torch.Tensor = None, offset: torch.Tensor = None) -> DoubleQuantState:
    """absmax (float32, (n_blocks,)) -> DoubleQuantState (see module docstring).

    `offset` defaults to mean(absmax) rounded once from float64. bitsandbytes takes torch's mean on the
    tensor's device; on CUDA that is a float32 tree reduction whose last bit can differ (1 ulp, in 10 of
    the 48 golden cases); pass offset=absmax.mean() to reproduce it exactly from a CUDA run.
    """
    code = dynamic_map(signed=True).to(absmax.device) if code is None else code
    offset = absmax_mean(absmax) if offset is None else offset.reshape(()).float()
    q, absmax2 = quantize_blockwise_8bit(absmax.float() - offset, code, NESTED_BLOCKSIZE)
    return DoubleQuantState(q, absmax2, code, offset)


def double_dequantize(state: DoubleQuantState) -> torch.Tensor:
    """The first-level absmax restored: map[q] * absmax2[b // 256] + offset, float32."""
    return canonical_nan(dequantize_blockwise_8bit(state.q, state.absmax2, state.code, state.blocksize)
                         + state.offset.float())
