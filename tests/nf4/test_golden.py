"""The pure-torch reference against golden vectors recorded from bitsandbytes 0.50.2 on CUDA (an H200).

tests/nf4/golden/make_golden.py made the fixture; every comparison is bit for bit.
"""
import json
import os

import pytest
import torch

from nf4 import dequantize_4bit, double_dequantize, double_quantize, dynamic_map, quantize_4bit
from nf4.double_quant import dequantize_blockwise_8bit, quantize_blockwise_8bit

from .conftest import GOLDEN, Golden, assert_bits_equal

CASES = json.loads(Golden(GOLDEN).file.metadata()["cases"])
FOUR_BIT = sorted(k for k, v in CASES.items() if v["kind"] == "4bit")
DOUBLE = sorted(k for k in FOUR_BIT if CASES[k]["double_quant"])


def test_fixture_is_small_and_covers_what_it_should(golden):
    assert os.path.getsize(GOLDEN) < 2 * 1024 * 1024
    assert golden.meta["bitsandbytes"] == "0.50.2"
    cases = golden.cases.values()
    assert {c["blocksize"] for c in cases if c["kind"] == "4bit"} == {32, 64, 128, 256, 512, 1024, 2048, 4096}
    assert {c["dtype"] for c in cases if c["kind"] == "4bit"} == {"float32", "float16", "bfloat16"}
    assert {c["quant_type"] for c in cases if c["kind"] == "4bit"} == {"nf4", "fp4"}
    assert any(c["double_quant"] for c in cases if c["kind"] == "4bit")
    assert len(FOUR_BIT) >= 100


@pytest.mark.parametrize("name", FOUR_BIT)
def test_quantize_matches_cuda(golden, name):
    case = golden.cases[name]
    x = golden.get(f"input/{case['input']}")
    packed, absmax = quantize_4bit(x, case["blocksize"], case["quant_type"])
    assert_bits_equal(packed, golden.get(f"{name}/packed"), f"{name} packed codes")
    assert_bits_equal(absmax, golden.get(f"{name}/absmax"), f"{name} absmax")


@pytest.mark.parametrize("name", FOUR_BIT)
def test_dequantize_matches_cuda(golden, name):
    case = golden.cases[name]
    packed = golden.get(f"{name}/packed")
    absmax = golden.get(f"{name}/absmax_restored" if case["double_quant"] else f"{name}/absmax")
    for dt in case["out_dtypes"]:
        out = dequantize_4bit(packed, absmax, case["shape"], case["blocksize"], case["quant_type"], getattr(torch, dt))
        assert out.shape == torch.Size(case["shape"])
        assert_bits_equal(out, golden.get(f"{name}/dequant_{dt}"), f"{name} dequantized to {dt}")


@pytest.mark.parametrize("name", DOUBLE)
def test_double_quant_matches_cuda(golden, name):
    absmax = golden.get(f"{name}/absmax")
    cuda_offset = golden.get(f"{name}/offset")
    # our own mean: the exact mean rounded once, within one ulp of CUDA's float32 tree reduction
    ours = double_quantize(absmax)
    ulps = (ours.offset.reshape(1).view(torch.int32).long() - cuda_offset.view(torch.int32).long()).abs().item()
    assert ulps <= 1 or not torch.isfinite(cuda_offset).all(), f"{name}: offset {ulps} ulps from CUDA's"
    # given CUDA's offset, everything after it is bit-exact
    state = double_quantize(absmax, offset=cuda_offset)
    assert_bits_equal(state.offset.reshape(1), cuda_offset, f"{name} offset")
    assert_bits_equal(state.q, golden.get(f"{name}/absmax_q"), f"{name} 8-bit absmax codes")
    assert_bits_equal(state.absmax2, golden.get(f"{name}/nested_absmax"), f"{name} nested absmax")
    assert_bits_equal(state.code, golden.get(f"{name}/nested_code"), f"{name} nested map")
    assert_bits_equal(double_dequantize(state), golden.get(f"{name}/absmax_restored"), f"{name} restored absmax")


def test_offset_mean_is_usually_bit_exact(golden):
    """Count how often our float64-rounded mean equals CUDA's float32 reduction exactly (reported)."""
    exact = sum(torch.equal(double_quantize(golden.get(f"{n}/absmax")).offset.reshape(1), golden.get(f"{n}/offset"))
                for n in DOUBLE)
    assert exact >= len(DOUBLE) * 0.6, f"only {exact} of {len(DOUBLE)} offsets bit-exact"


def test_8bit_binary_search_tie_rule(golden):
    """Values exactly on the midpoints of the dynamic map: ties go where CUDA's binary search stops."""
    x = golden.get("dqtie/input")
    code = golden.get("dqtie/code")
    assert_bits_equal(dynamic_map(signed=True), code, "signed dynamic map")
    q, absmax = quantize_blockwise_8bit(x, code, 256)
    assert_bits_equal(q, golden.get("dqtie/q"), "8-bit codes on ties")
    assert_bits_equal(absmax, golden.get("dqtie/absmax"), "8-bit absmax")
    assert_bits_equal(dequantize_blockwise_8bit(q, absmax, code, 256), golden.get("dqtie/dequant"), "8-bit dequant")
    # a naive nearest-value search disagrees on some of these ties: the test would catch a naive port
    xs = x / absmax.repeat_interleave(256)[: x.numel()]
    naive = (xs.unsqueeze(1) - code.unsqueeze(0)).abs().argmin(dim=1).to(torch.uint8)
    assert (naive != q).any()
