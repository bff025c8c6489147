"""Blockwise 4-bit quantization (NF4 / FP4) and double quantization of the scales, in Triton.

Per block b of `blocksize` elements of the flattened tensor (CUDA semantics, see nf4/blockwise.py):

    absmax[b] = max |x_i|   (NaN ignored, denormals flushed, the partial last block padded with 0.0)
    xs_i      = float32(x_i) * rcp_approx(absmax[b])
    code_i    = #{k : xs_i > T_k}                 NF4, 15 float32 thresholds (binary search)
              = 8 * (xs_i < 0) + magnitude code   FP4, 7 thresholds on |xs_i|
    byte_j    = code_{2j} << 4 | code_{2j+1}

Double quantization (nf4/double_quant.py): offset = mean(absmax); the centred scales are quantized in
blocks of 256 with the signed dynamic 8-bit map by CUDA's binary search from pivot 127.

Layers: `_quantize_kernel`, `_quantize_8bit_kernel`, the launchers `quantize_4bit_triton` /
`double_quantize_triton`, and the dispatchers `quantize_4bit`, `double_quantize`, `quantize_weight`
(CUDA -> Triton, CPU -> the nf4 reference). Bit-exact with the reference.

On a GPU the reciprocal is the PTX instruction itself; under TRITON_INTERPRET=1 the launcher computes
absmax and `nf4.reciprocal_f32(absmax)` in torch first and the kernel reads that reciprocal instead.
"""
import functools

import torch
import triton
import triton.language as tl

import nf4
from nf4.blockwise import _check_input, blockwise_absmax, check_quant_args, flush_denormals, reciprocal_f32
from nf4.double_quant import NESTED_BLOCKSIZE, DoubleQuantState, absmax_mean, dynamic_map

from ._common import Launch, check_triton_device, rcp_approx, thresholds_on, use_ptx


@triton.jit
def _nan_to_neg_max_abs(x):
    a = tl.abs(x)
    return tl.where(a != a, -3.4028234663852886e38, a)


@triton.jit
def _codes(xs, thr_ptr, IS_NF4: tl.constexpr):
    """4-bit codes (int32) of scaled values: #{k : xs > T_k}, found by a binary search over the sorted
    thresholds (4 compares for NF4, 3 on |xs| for FP4) instead of one compare per threshold. NaN compares
    false everywhere and gets code 0."""
    if IS_NF4:
        b3 = xs > tl.load(thr_ptr + 7)
        b2 = xs > tl.where(b3, tl.load(thr_ptr + 11), tl.load(thr_ptr + 3))
        t1 = tl.where(b3, tl.where(b2, tl.load(thr_ptr + 13), tl.load(thr_ptr + 9)),
                      tl.where(b2, tl.load(thr_ptr + 5), tl.load(thr_ptr + 1)))
        b1 = xs > t1
        t0 = tl.where(b3, tl.where(b2, tl.where(b1, tl.load(thr_ptr + 14), tl.load(thr_ptr + 12)),
                                   tl.where(b1, tl.load(thr_ptr + 10), tl.load(thr_ptr + 8))),
                      tl.where(b2, tl.where(b1, tl.load(thr_ptr + 6), tl.load(thr_ptr + 4)),
                               tl.where(b1, tl.load(thr_ptr + 2), tl.load(thr_ptr + 0))))
        b0 = xs > t0
        code = 8 * b3.to(tl.int32) + 4 * b2.to(tl.int32) + 2 * b1.to(tl.int32) + b0.to(tl.int32)
    else:
        a = tl.abs(xs)
        b2 = a > tl.load(thr_ptr + 3)
        b1 = a > tl.where(b2, tl.load(thr_ptr + 5), tl.load(thr_ptr + 1))
        t0 = tl.where(b2, tl.where(b1, tl.load(thr_ptr + 6), tl.load(thr_ptr + 4)),
                      tl.where(b1, tl.load(thr_ptr + 2), tl.load(thr_ptr + 0)))
        m = 4 * b2.to(tl.int32) + 2 * b1.to(tl.int32) + (a > t0).to(tl.int32)
        # FP4_MAGNITUDE_CODES = (0, 1, 6, 7, 4, 5, 2, 3): flip bit 2 where bit 1 is set
        code = (m ^ ((m & 2) << 1)) + 8 * (xs < 0).to(tl.int32)
    return code


@triton.jit
def _quantize_kernel(
    # pointers
    x_ptr, inv_ptr, thr_ptr, packed_ptr, absmax_ptr,
    # sizes
    n, n_blocks,
    # constexpr
    BLOCKSIZE: tl.constexpr, ROWS: tl.constexpr, IS_NF4: tl.constexpr, USE_PTX: tl.constexpr,
):
    """One program = ROWS consecutive 4-bit blocks, loaded as a contiguous (ROWS, BLOCKSIZE) tile."""
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * (ROWS * BLOCKSIZE)                            # first element of the tile
    r = tl.arange(0, ROWS)
    off = r[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]         # (ROWS, BLOCKSIZE), int32
    remaining = n - base
    x = tl.load(x_ptr + base + off, mask=off < remaining, other=0.0).to(tl.float32)
    x = tl.where(tl.abs(x) < 1.1754943508222875e-38, 0.0, x)                # flush denormals
    amax = tl.max(_nan_to_neg_max_abs(x), axis=1)                           # (ROWS,)
    rows = pid * ROWS + r
    tl.store(absmax_ptr + rows, amax, mask=rows < n_blocks)
    if USE_PTX:
        inv = rcp_approx(amax, USE_PTX)
    else:
        inv = tl.load(inv_ptr + rows, mask=rows < n_blocks, other=0.0)
    codes = _codes(x * inv[:, None], thr_ptr, IS_NF4)                       # (ROWS, BLOCKSIZE)
    hi, lo = tl.split(tl.reshape(codes, (ROWS, BLOCKSIZE // 2, 2)))         # elements 2j, 2j+1
    byte = (hi << 4) | lo
    boff = r[:, None] * (BLOCKSIZE // 2) + tl.arange(0, BLOCKSIZE // 2)[None, :]
    tl.store(packed_ptr + base // 2 + boff, byte.to(tl.uint8), mask=2 * boff < remaining)


@triton.jit
def _quantize_8bit_kernel(
    # pointers
    a_ptr, offset_ptr, inv_ptr, code_ptr, q_ptr, absmax2_ptr,
    # sizes
    n,
    # constexpr
    USE_PTX: tl.constexpr, BS: tl.constexpr,
):
    pid = tl.program_id(0)
    i = pid * BS + tl.arange(0, BS)
    mask = i < n
    v = tl.where(mask, tl.load(a_ptr + i, mask=mask, other=0.0) - tl.load(offset_ptr), 0.0)
    v = tl.where(tl.abs(v) < 1.1754943508222875e-38, 0.0, v)
    amax = tl.max(_nan_to_neg_max_abs(v), axis=0)
    tl.store(absmax2_ptr + pid, amax)
    if USE_PTX:
        inv = rcp_approx(amax, USE_PTX)
    else:
        inv = tl.load(inv_ptr + pid)
    xs = v * inv
    # CUDA's binary search over the sorted signed map (nf4/double_quant.py: search_codes)
    pivot = tl.full((BS,), 127, tl.int32)
    lower_pivot = tl.zeros((BS,), tl.int32)
    upper_pivot = tl.full((BS,), 255, tl.int32)
    lower = tl.full((BS,), -1.0, tl.float32)
    upper = tl.full((BS,), 1.0, tl.float32)
    val = tl.load(code_ptr + pivot)
    for s in tl.static_range(7):
        step = 64 >> s
        up = xs > val
        lower_pivot = tl.where(up, pivot, lower_pivot)
        lower = tl.where(up, val, lower)
        upper_pivot = tl.where(up, upper_pivot, pivot)
        upper = tl.where(up, upper, val)
        pivot = tl.where(up, pivot + step, pivot - step)
        val = tl.load(code_ptr + pivot)
    upper = tl.where(upper_pivot == 255, tl.load(code_ptr + 255), upper)
    lower = tl.where(lower_pivot == 0, tl.load(code_ptr), lower)
    up = xs > val
    go_up = up & (xs > (upper + val) * 0.5)
    go_down = (~up) & (xs < (lower + val) * 0.5)
    out = tl.where(go_up, upper_pivot, tl.where(go_down, lower_pivot, pivot))
    tl.store(q_ptr + i, out.to(tl.uint8), mask=mask)


def _rows_for(blocksize: int) -> int:
    """Blocks per program: 1024 elements a program measured fastest on an H100 (16 rows of 64 at 4 warps,
    benchmarks/results/diag/decode_sweep-*.json: 426 vs 502 us for 28672x8192 with 2048 elements)."""
    return max(1, 1024 // blocksize)


@functools.lru_cache(maxsize=None)
def _dynamic_map_on(device: str) -> torch.Tensor:
    return dynamic_map(signed=True).to(torch.device(device))


def quantize_4bit_triton(x, blocksize=64, quant_type="nf4", rows=None, num_warps=4):
    """Triton quantization: x (any shape) -> (packed uint8 ((n+1)//2, 1), absmax float32 (n_blocks,))."""
    _check_input(x, "quantize_4bit input")
    check_quant_args(blocksize, quant_type)
    check_triton_device(x, "quantize_4bit_triton input")
    xf = x.detach().reshape(-1)                        # a view when x is contiguous, else one copy
    n = xf.numel()
    n_blocks = -(-n // blocksize)
    packed = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_blocks, dtype=torch.float32, device=x.device)
    ptx = use_ptx(x)
    if ptx:
        inv = absmax  # unused
    else:  # interpreter: the reciprocal the GPU instruction would give, from the torch reference
        inv = reciprocal_f32(blockwise_absmax(flush_denormals(xf.float()), blocksize))
    rows = rows or _rows_for(blocksize)
    _launch(_quantize_kernel, (triton.cdiv(n_blocks, rows),), (0, 1, 3, 4), ptx,
            dict(BLOCKSIZE=blocksize, ROWS=rows, IS_NF4=quant_type == "nf4", USE_PTX=ptx, num_warps=num_warps),
            xf, inv, thresholds_on(quant_type, x.device), packed, absmax, n, n_blocks)
    return packed, absmax


_LAUNCHES = {}


def _launch(kernel, grid, varying, ptx, kw, *args):
    """kernel[grid](*args, **kw); on a GPU through a cached `Launch` (a model's load quantizes a few shapes many
    times, and each Triton launch costs 25-30 us of host time on a busy host)."""
    if not ptx:
        kernel[grid](*args, **kw)
        return
    key = (kernel, grid, *kw.values(), *(a for a in args if isinstance(a, int)), args[varying[0]].device)
    launch = _LAUNCHES.get(key)
    if launch is None:
        if len(_LAUNCHES) > 1024:
            _LAUNCHES.clear()
        launch = _LAUNCHES[key] = Launch(kernel, grid, kw, varying)
    launch(*args)


def double_quantize_triton(absmax, code=None) -> DoubleQuantState:
    """Triton double quantization of float32 scales (see module docstring)."""
    check_triton_device(absmax, "double_quantize_triton absmax")
    code = _dynamic_map_on(str(absmax.device)) if code is None else code.to(absmax.device, torch.float32)
    a = absmax if absmax.dtype == torch.float32 and absmax.dim() == 1 and absmax.is_contiguous() else \
        absmax.float().reshape(-1).contiguous()        # (the loader's absmax already is: no extra host calls)
    n = a.numel()
    ptx = use_ptx(a)
    # bitsandbytes calls absmax.mean() on the GPU; the reference's float64 mean equals it (nf4/double_quant.py)
    offset = a.mean() if ptx else absmax_mean(a)       # a 0-d tensor: the kernel reads it through its pointer
    n2 = -(-n // NESTED_BLOCKSIZE)
    q = torch.empty(n, dtype=torch.uint8, device=a.device)
    absmax2 = torch.empty(n2, dtype=torch.float32, device=a.device)
    if ptx:
        inv = absmax2
    else:
        inv = reciprocal_f32(blockwise_absmax(flush_denormals(a - offset), NESTED_BLOCKSIZE))
    _launch(_quantize_8bit_kernel, (n2,), (0, 1, 2, 3, 4, 5), ptx, dict(USE_PTX=ptx, BS=NESTED_BLOCKSIZE, num_warps=4),
            a, offset, inv, code.contiguous(), q, absmax2, n)
    # the code table is shared, not copied (as bitsandbytes' QuantState shares its cached map): one device copy
    # and allocation fewer per weight on the host-bound small shapes; nothing writes into it (a state dict clones)
    return DoubleQuantState(q, absmax2, code, offset)


def quantize_4bit(x, blocksize=64, quant_type="nf4"):
    """Blockwise 4-bit quantization, (packed, absmax). CUDA -> Triton, CPU -> nf4 reference."""
    if x.is_cuda:
        return quantize_4bit_triton(x, blocksize, quant_type)
    return nf4.quantize_4bit(x, blocksize, quant_type)


def double_quantize(absmax, code=None) -> DoubleQuantState:
    """Double quantization of the scales. CUDA -> Triton, CPU -> nf4 reference."""
    if absmax.is_cuda:
        return double_quantize_triton(absmax, code)
    return nf4.double_quantize(absmax, code)


def quantize_weight(w, blocksize=64, quant_type="nf4", double_quant=False):
    """w (fp32/fp16/bf16) -> nf4.QuantizedWeight4bit, with the Triton kernels on CUDA."""
    if not w.is_cuda:
        return nf4.QuantizedWeight4bit.from_tensor(w, blocksize, quant_type, double_quant)
    packed, absmax = quantize_4bit_triton(w, blocksize, quant_type)
    nested = double_quantize_triton(absmax) if double_quant else None
    return nf4.QuantizedWeight4bit(packed, None if double_quant else absmax, w.shape, w.dtype, blocksize,
                                   quant_type, nested)
