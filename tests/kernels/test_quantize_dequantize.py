"""Triton quantize / double-quantize / dequantize, in the interpreter, bit for bit against nf4/."""
import pytest
import torch

import nf4
from nf4.blockwise import canonical_nan

from kernels._common import interpreting
from kernels.dequantize import dequantize_4bit_triton
from kernels.quantize import double_quantize_triton, quantize_4bit_triton

from .helpers import assert_bits_equal

pytestmark = pytest.mark.skipif(not interpreting(), reason="CPU interpreter tests; test_cuda.py covers the GPU")


def special_values(n, dtype, seed, blocksize):
    """Gaussian data with an all-zero block, NaN, +-inf, a denormal and values on thresholds."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 2
    b = min(blocksize, n // 4)  # positions scaled so that every case lands inside x

    def put(i, v):
        if i < n:
            x[i] = v
    x[:blocksize] = 0.0 if n >= 2 * blocksize else x[:blocksize]
    put(blocksize + 3, float("nan"))
    put(b + 1, float("nan"))
    put(3 * b + 1, 1e-40 if dtype == torch.float32 else 0.0)
    put(5 * blocksize + 2, float("inf"))
    put(5 * blocksize + 5, -float("inf"))
    # exact NF4 code values times a power of two: ties with the table after scaling
    i0 = min(2 * blocksize, n - 16)
    x[i0:i0 + 16] = torch.tensor(nf4.NF4_TABLE) * 4.0
    return x.to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize,n", [(64, 1001), (32, 777), (256, 2049), (4096, 4099)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_bit_exact(quant_type, blocksize, n, dtype):
    x = special_values(n, dtype, n + blocksize, blocksize)
    packed, absmax = quantize_4bit_triton(x, blocksize, quant_type)
    ref_packed, ref_absmax = nf4.quantize_4bit(x, blocksize, quant_type)
    assert_bits_equal(packed, ref_packed, "packed codes")
    assert_bits_equal(absmax, ref_absmax, "absmax")


@pytest.mark.parametrize("n_blocks", [1, 255, 300, 777])
def test_double_quantize_bit_exact(n_blocks):
    g = torch.Generator().manual_seed(n_blocks)
    absmax = torch.rand(n_blocks, generator=g) * 3 + 0.01
    absmax[0] = absmax.mean()  # a centred value of exactly 0 (codes tie at the middle of the map)
    state, ref = double_quantize_triton(absmax), nf4.double_quantize(absmax)
    assert_bits_equal(state.q, ref.q, "q")
    assert_bits_equal(state.absmax2, ref.absmax2, "absmax2")
    assert_bits_equal(state.offset, ref.offset, "offset")
    assert_bits_equal(state.code, ref.code, "map")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize,n", [(64, 1001), (128, 3000), (32, 65)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_bit_exact(quant_type, blocksize, n, double_quant, dtype):
    x = special_values(n, torch.float32, n, blocksize)
    packed, absmax = nf4.quantize_4bit(x, blocksize, quant_type)
    nested = nf4.double_quantize(absmax) if double_quant else None
    scales = nf4.double_dequantize(nested) if double_quant else absmax
    out = dequantize_4bit_triton(packed, None if double_quant else absmax, (n,), blocksize, quant_type, dtype,
                                 nested=nested)
    ref = nf4.dequantize_4bit(packed, scales, (n,), blocksize, quant_type, dtype)
    assert_bits_equal(canonical_nan(out), ref, "dequantized")  # the interpreter's NaN is numpy's


def test_dequantize_into_scratch_and_shape():
    w = torch.randn(37, 90)
    packed, absmax = nf4.quantize_4bit(w, 64, "nf4")
    scratch = torch.full((37, 90), 7.0)
    out = dequantize_4bit_triton(packed, absmax, w.shape, 64, "nf4", torch.float32, out=scratch)
    assert out.data_ptr() == scratch.data_ptr() and out.shape == w.shape
    assert_bits_equal(out, nf4.dequantize_4bit(packed, absmax, w.shape, 64, "nf4", torch.float32), "scratch")
    with pytest.raises(ValueError, match="out"):
        dequantize_4bit_triton(packed, absmax, w.shape, 64, "nf4", torch.float16, out=scratch)
    with pytest.raises(ValueError, match="on cpu, got torch.float32 .* on meta"):   # never written across devices
        dequantize_4bit_triton(packed, absmax, w.shape, 64, "nf4", torch.float32,
                               out=torch.empty(37, 90, device="meta"))
    with pytest.raises(ValueError, match="not contiguous"):
        dequantize_4bit_triton(packed, absmax, w.shape, 64, "nf4", torch.float32, out=torch.empty(90, 37).t())


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_codes_at_thresholds(quant_type):
    """Values exactly on every threshold and one ulp either side, in blocks with absmax 1 (so xs == x):
    the strict `xs > T` must hold for the search over thresholds."""
    from kernels._common import thresholds_on
    t = thresholds_on(quant_type, torch.device("cpu"))
    vals = torch.cat([t, torch.nextafter(t, torch.tensor(2.0)), torch.nextafter(t, torch.tensor(-2.0))])
    vals = torch.cat([vals, -vals]) if quant_type == "fp4" else vals
    blocks = vals.split(63)
    x = torch.cat([torch.cat([b, torch.ones(64 - b.numel())]) for b in blocks])  # absmax 1 in every block
    packed, absmax = quantize_4bit_triton(x, 64, quant_type)
    ref_packed, ref_absmax = nf4.quantize_4bit(x, 64, quant_type)
    assert_bits_equal(absmax, ref_absmax, "absmax")
    assert_bits_equal(packed, ref_packed, "codes at thresholds")


def test_double_quantized_states_share_the_code_table_and_files_copy_it():
    """Every double-quantized weight refers to the one cached 8-bit code table (no device copy per weight, as
    bitsandbytes' states share theirs); a state dict gets its own copy, so nothing written from it can change the
    table the next weight is quantized with."""
    a1, a2 = torch.rand(300) + 0.1, torch.rand(1000) * 3
    s1, s2 = double_quantize_triton(a1), double_quantize_triton(a2)
    assert s1.code is s2.code
    qw = nf4.QuantizedWeight4bit(torch.zeros(9600, 1, dtype=torch.uint8), None, (300, 64), torch.float32, 64, "nf4",
                                 s1)                                        # 300 blocks: a1's 300 scales
    sd = qw.to_bnb_state_dict("w")
    code = [v for k, v in sd.items() if k.endswith("nested_quant_map")][0]
    assert torch.equal(code, s1.code) and code.data_ptr() != s1.code.data_ptr()
    code.zero_()
    assert torch.equal(double_quantize_triton(a1).code, nf4.dynamic_map(signed=True))
