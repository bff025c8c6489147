"""Blockwise 4-bit quantization (NF4 / FP4) with bitsandbytes' CUDA semantics, in pure torch.

For a tensor of n elements, flattened, in blocks of `blocksize` (the last block may be partial):

    absmax[b] = max_{i in b} |x_i|                          float32, shape (ceil(n / blocksize),)
    xs_i      = float32(x_i) * (1 / absmax[b])              the reciprocal, not a division
    code_i    = #{ thresholds T_k : xs_i > T_k }            NF4: 15 thresholds, 16 codes
    byte_j    = code_{2j} << 4 | code_{2j+1}                first element in the HIGH nibble

and back:  x_i ~= table[code_i] * absmax[b]  (float32, then rounded to the output dtype).

Edge cases follow the CUDA kernel (measured, see tests/nf4/golden/):
- float32 denormals are flushed to zero (the kernel is built with fast math);
- NaN is ignored by the block maximum; an all-NaN block has absmax = -FLT_MAX (the max's initial value);
- an all-zero block has absmax 0, so xs = 0 * inf = NaN, which passes no threshold: every code is 0;
- NaN inputs code 0; +-inf give absmax inf, then xs = inf * 0 = NaN (code 0) and finite values code 0.0;
- odd n: the packed tensor gets one pad element, quantized like a 0.0 of the last block.
"""
import functools
import importlib.resources
import math
import zlib

import torch

from .tables import BLOCKSIZES, FP4_MAGNITUDE_CODES, QUANT_TYPES, code_table, fp4_thresholds, nf4_thresholds

FLT_MIN = 1.1754943508222875e-38  # smallest normal float32
FLT_MAX = 3.4028234663852886e38
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_quant_args(blocksize: int, quant_type: str) -> None:
    """Raise ValueError unless blocksize and quant_type are ones bitsandbytes accepts."""
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")


def _check_input(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a float32, float16 or bfloat16 tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name}: cannot quantize an empty tensor (shape {tuple(x.shape)})")


def flush_denormals(x: torch.Tensor) -> torch.Tensor:
    """float32 values with |x| < FLT_MIN become 0 (what CUDA's flush-to-zero mode does)."""
    return torch.where(x.abs() < FLT_MIN, torch.zeros_like(x), x)


def blockwise_absmax(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """absmax per block of a flat float32 tensor, NaN-ignoring; (n,) -> (ceil(n / blocksize),).

    The padding of the last partial block counts as 0.0 (the CUDA kernel loads zeros there), so only a
    FULL all-NaN block keeps the reduction's initial value -FLT_MAX.
    """
    n = x.numel()
    n_blocks = -(-n // blocksize)
    padded = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n))
    a = padded.abs().view(n_blocks, blocksize)  # (n_blocks, blocksize)
    a = torch.where(torch.isnan(a), torch.full_like(a, -FLT_MAX), a)
    return a.amax(dim=1)


@functools.lru_cache(maxsize=None)
def _rcp_approx_delta(device: torch.device) -> torch.Tensor:
    """int8[2**23]: ulps by which CUDA's rcp.approx.ftz.f32 differs from the correctly rounded 1/x,
    indexed by the 23-bit mantissa of x (recorded on an H100-class GPU by tools/make_rcp_table.py)."""
    raw = zlib.decompress(importlib.resources.files("nf4").joinpath("data/rcp_approx_delta.bin").read_bytes())
    return torch.frombuffer(bytearray(raw), dtype=torch.int8).to(device)


def reciprocal_f32(absmax: torch.Tensor) -> torch.Tensor:
    """1 / absmax in float32 exactly as bitsandbytes' CUDA quantizer computes it.

    bitsandbytes is built with --use_fast_math, so `1.0f / absmax` is the GPU's approximate reciprocal
    (rcp.approx.ftz.f32): within one ulp of the correctly rounded value, off by one for ~13% of
    mantissas, and flush-to-zero on input and output. We take the correctly rounded reciprocal and
    add the recorded per-mantissa difference.
    """
    a = flush_denormals(absmax.float())
    exact = (1.0 / a.double()).float()
    bits = exact.view(torch.int32)
    delta = _rcp_approx_delta(a.device)[(a.view(torch.int32) & 0x7FFFFF).long()].to(torch.int32)
    normal = (a.abs() >= FLT_MIN) & torch.isfinite(a) & (exact.abs() >= FLT_MIN)
    approx = torch.where(normal, bits + delta, bits).view(torch.float32)
    return flush_denormals(approx)


def codes_from_scaled(xs: torch.Tensor, quant_type: str) -> torch.Tensor:
    """4-bit codes (uint8, 0..15) of values already scaled into [-1, 1]. NaN -> 0."""
    nan = torch.isnan(xs)
    if quant_type == "nf4":
        # bucketize(right=False) returns #{T_k < x}, i.e. the strict `x > T_k` count
        codes = torch.bucketize(xs, nf4_thresholds(xs.device), right=False)
    else:
        magnitude = torch.bucketize(xs.abs(), fp4_thresholds(xs.device), right=False)
        codes = torch.tensor(FP4_MAGNITUDE_CODES, device=xs.device)[magnitude]
        codes = codes + 8 * (xs < 0)
    return torch.where(nan, torch.zeros_like(codes), codes).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(m,) uint8 codes, m even -> (m // 2, 1) uint8 bytes, first code in the high nibble."""
    return ((codes[0::2] << 4) | codes[1::2]).unsqueeze(1)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of pack_nibbles: packed bytes -> the first n codes (int64)."""
    flat = packed.reshape(-1).to(torch.int64)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)  # (2 * bytes,)
    return codes[:n]


def quantize_4bit(x: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"):
    """Quantize x (any shape, fp32/fp16/bf16) to 4-bit codes with one float32 absmax per block.

    Returns (packed, absmax): packed uint8 of shape ((n + 1) // 2, 1), absmax float32 (ceil(n / blocksize),).
    """
    _check_input(x, "quantize_4bit input")
    check_quant_args(blocksize, quant_type)
    n = x.numel()
    xf = flush_denormals(x.detach().reshape(-1).float())  # (n,)
    absmax = blockwise_absmax(xf, blocksize)  # (n_blocks,)
    padded_n = n + (n % 2)  # one pad element for odd n
    xf = torch.nn.functional.pad(xf, (0, padded_n - n))  # the pad is a 0.0 of the last block
    inv = reciprocal_f32(absmax)
    block_of = torch.arange(padded_n, device=xf.device) // blocksize  # (padded_n,)
    xs = xf * inv[block_of]
    return pack_nibbles(codes_from_scaled(xs, quant_type)), absmax


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                    quant_type: str = "nf4", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """table[code] * absmax[block] in float32, rounded to `dtype` and shaped `shape`."""
    check_quant_args(blocksize, quant_type)
    shape = tuple(shape)
    n = math.prod(shape)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes: expected dtype uint8, got {packed.dtype}")
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed codes: expected {(n + 1) // 2} bytes for shape {shape}, got {packed.numel()}")
    n_blocks = -(-n // blocksize)
    if absmax.numel() != n_blocks:
        raise ValueError(f"absmax: expected {n_blocks} blocks for shape {shape} and blocksize {blocksize}, "
                         f"got {absmax.numel()}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dequantize_4bit: output dtype must be float32, float16 or bfloat16, got {dtype}")
    codes = unpack_nibbles(packed, n)  # (n,)
    values = code_table(quant_type, packed.device)[codes]
    block_of = torch.arange(n, device=packed.device) // blocksize
    out = (values * absmax.float().reshape(-1)[block_of]).to(dtype)
    return canonical_nan(out).reshape(shape)


def canonical_nan(x: torch.Tensor) -> torch.Tensor:
    """Replace every NaN by the NaN a CUDA kernel writes (all mantissa bits set, sign clear:
    0x7fffffff in float32, 0x7fff in float16/bfloat16), so outputs compare bit for bit."""
    nan = torch.isnan(x)
    if not bool(nan.any()):
        return x
    int_dtype = {4: torch.int32, 2: torch.int16}[x.element_size()]
    canonical = torch.tensor(0x7FFFFFFF if x.element_size() == 4 else 0x7FFF, dtype=int_dtype).view(x.dtype)
    return torch.where(nan, canonical.to(x.device), x)
