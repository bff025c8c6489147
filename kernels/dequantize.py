"""Blockwise 4-bit dequantization (NF4 / FP4, optional double-quantized scales) in Triton.

    out[i] = table[code_i] * absmax[i // blocksize]        float32, then rounded to `dtype`
    absmax[b] = map[q[b]] * absmax2[b // 256] + offset     (double quantization; two roundings)

with code_{2j} the high and code_{2j+1} the low nibble of byte j. Bit-exact with `nf4.dequantize_4bit`
(and so with bitsandbytes' CUDA kernel). Memory traffic per element: 0.5 B read + 2 B (bf16) written.

Layers: `_dequantize_kernel` (one program = a tile of whole 4-bit blocks), the launcher
`dequantize_4bit_triton`, and the public dispatcher `dequantize_4bit` (CUDA -> Triton, CPU -> nf4).
"""
import math

import torch
import triton
import triton.language as tl

import nf4
from nf4.blockwise import check_quant_args

from ._common import Launch, WeightPlan, check_triton_device, code_table_on, interpreting, load_scales, scale_args, \
    unpack_values, use_ptx

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _dequantize_kernel(
    # pointers
    packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr, out_ptr,
    # sizes
    n, n_bytes, n_blocks,
    # constexpr
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, USE_PTX: tl.constexpr, ROWS: tl.constexpr,
):
    """One program = ROWS consecutive 4-bit blocks: a (ROWS, BLOCKSIZE/2) tile of bytes, one scale a row."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (ROWS * (BLOCKSIZE // 2))                     # first byte of the tile
    r = tl.arange(0, ROWS)
    boff = r[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]  # (ROWS, BS/2)
    byte = tl.load(packed_ptr + base + boff, mask=boff < n_bytes - base, other=0)
    rows = pid * ROWS + r
    scale = load_scales(rows, rows < n_blocks, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                        DOUBLE_QUANT, USE_PTX)[:, None]                     # (ROWS, 1)
    hi, lo = unpack_values(byte, table_ptr)
    # (ROWS, BS/2, 2) -> (ROWS, BS): out[2j] = hi[j], out[2j+1] = lo[j]
    vals = tl.reshape(tl.join(hi * scale, lo * scale), (ROWS, BLOCKSIZE))
    eoff = r[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + 2 * base + eoff, vals.to(out_ptr.dtype.element_ty), mask=eoff < n - 2 * base)


def _launch_args(packed, absmax, shape, blocksize, quant_type, nested, block_bytes, num_warps):
    """(grid, kernel arguments before `out`, sizes after it, constexprs) of one dequantization, after the checks."""
    check_quant_args(blocksize, quant_type)
    check_triton_device(packed, "dequantize_4bit_triton packed")
    n = math.prod(shape)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed codes: expected {(n + 1) // 2} bytes for shape {shape}, got {packed.numel()}")
    a, q, a2, code8, offset, dq = scale_args(absmax, nested, packed.device)
    n_blocks = -(-n // blocksize)
    rows = max(1, block_bytes // (blocksize // 2))
    grid = (triton.cdiv(n_blocks, rows),)
    args = (packed, a, q, a2, code8, offset, code_table_on(quant_type, packed.device))
    kw = dict(BLOCKSIZE=blocksize, DOUBLE_QUANT=dq, USE_PTX=use_ptx(packed), ROWS=rows, num_warps=num_warps)
    return grid, args, (n, packed.numel(), n_blocks), kw


def _output(out, shape, n, dtype, device):
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if out.numel() != n or out.dtype != dtype or not out.is_contiguous() or out.device != device:
        raise ValueError(f"out: expected a contiguous {dtype} tensor of {n} elements on {device}, got {out.dtype} "
                         f"{tuple(out.shape)} on {out.device}{'' if out.is_contiguous() else ' (not contiguous)'}")
    return out


def dequantize_4bit_triton(packed, absmax, shape, blocksize=64, quant_type="nf4", dtype=torch.bfloat16,
                           nested=None, out=None, block_bytes=4096, num_warps=4):
    """Triton dequantization. Give `absmax` (float32 per block) or `nested` (a DoubleQuantState) for the
    scales. `out` (optional) is a preallocated tensor of `shape` and `dtype` (a reusable scratch)."""
    shape = tuple(shape)
    grid, args, sizes, kw = _launch_args(packed, absmax, shape, blocksize, quant_type, nested, block_bytes, num_warps)
    out = _output(out, shape, sizes[0], dtype, packed.device)
    _dequantize_kernel[grid](*args, out, *sizes, **kw)
    return out.view(shape)


class _DequantPlan(WeightPlan):
    """A weight's dequantization, checked and bound once (dequantize_weight on CUDA): the arguments, grid and
    constexprs, launched through `Launch` (the training step dequantizes every weight twice a step)."""
    __slots__ = ("launcher", "args", "sizes", "shape", "dtype")

    def __init__(self, qw, dtype):
        self.bind(qw)
        self.shape, self.dtype = tuple(qw.shape), dtype
        grid, self.args, self.sizes, kw = _launch_args(qw.packed, qw.absmax, self.shape, qw.blocksize,
                                                       qw.quant_type, qw.nested, 4096, 4)
        self.launcher = Launch(_dequantize_kernel, grid, kw, varying=(len(self.args),))

    def run(self, out):
        out = _output(out, self.shape, self.sizes[0], self.dtype, self.args[0].device)
        self.launcher(*self.args, out, *self.sizes)
        return out.view(self.shape)


_PLANS = {}


def dequantize_4bit(packed, absmax, shape, blocksize=64, quant_type="nf4", dtype=torch.bfloat16, nested=None,
                    out=None):
    """Dequantize 4-bit codes: (packed uint8 ((n+1)//2, 1), absmax fp32 (n_blocks,) or nested) -> tensor(shape).
    CUDA tensors run the Triton kernel; CPU tensors run the nf4 reference."""
    if packed.is_cuda:
        return dequantize_4bit_triton(packed, absmax, shape, blocksize, quant_type, dtype, nested, out)
    scales = absmax if nested is None else nf4.double_dequantize(nested)
    res = nf4.dequantize_4bit(packed, scales, shape, blocksize, quant_type, dtype)
    if out is not None:
        out.view(res.shape).copy_(res)
        return out.view(res.shape)
    return res


def dequantize_weight(qweight, dtype=None, out=None):
    """Dequantize a nf4.QuantizedWeight4bit (dtype defaults to its original dtype)."""
    dtype = qweight.dtype if dtype is None else dtype
    if qweight.packed.is_cuda and not interpreting():
        key = (id(qweight), dtype)
        plan = _PLANS.get(key)
        if plan is None or not plan.valid_for(qweight):
            if len(_PLANS) > 4096:  # weights come and go (tests, reloads): start over rather than grow
                _PLANS.clear()
            plan = _DequantPlan(qweight, dtype).store(_PLANS, key)
        return plan.run(out)
    return dequantize_4bit(qweight.packed, qweight.absmax, qweight.shape, qweight.blocksize, qweight.quant_type,
                           dtype, qweight.nested, out)
