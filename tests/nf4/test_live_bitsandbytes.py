"""Live comparison with bitsandbytes 0.50.2 on the CPU, on fresh random tensors.

bitsandbytes' CPU path is itself exact (equal to its CUDA path) for NF4 codes and absmax (its midpoint
bucketize and correctly rounded reciprocal agree with CUDA's literal thresholds and approximate
reciprocal except within an ulp of a threshold), and for 4-bit dequantization. It is NOT exact for FP4
codes (its sorted-midpoint thresholds are not CUDA's literals; its FP4 code 8 dequantizes to +0.0 where
CUDA gives -0.0) nor for the 8-bit second level (a different
search): those are covered by the CUDA golden vectors in test_golden.py.
"""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is a test oracle: pip install -e .[test]")
import bitsandbytes.functional as F  # noqa: E402

from nf4 import QuantizedWeight4bit, dequantize_4bit, from_bnb_state_dict, quantize_4bit, reciprocal_f32  # noqa: E402
from nf4.tables import nf4_thresholds  # noqa: E402

from .conftest import assert_bits_equal  # noqa: E402


def near_threshold(x, absmax, blocksize):
    """Elements whose scaled value lies within 2 ulps of an NF4 threshold: there bitsandbytes' CPU path
    (correct reciprocal, midpoints) may legitimately differ from CUDA's, which we reproduce."""
    xs = x.reshape(-1).float() * reciprocal_f32(absmax).repeat_interleave(blocksize)[: x.numel()]
    t = nf4_thresholds()
    gap = (xs.unsqueeze(1) - t.unsqueeze(0)).abs().min(dim=1).values
    return gap <= 2 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("blocksize", [64, 128, 4096])
def test_nf4_quantize_equals_bitsandbytes_cpu(dtype, blocksize):
    gen = torch.Generator().manual_seed(torch.seed() % (2**31))  # fresh every run
    x = (torch.randn(333, 257, generator=gen) * 0.05).to(dtype)
    packed, absmax = quantize_4bit(x, blocksize, "nf4")
    ref_packed, ref_state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4")
    assert_bits_equal(absmax, ref_state.absmax, "absmax")
    ours = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1)[: x.numel()]
    theirs = torch.stack([ref_packed.reshape(-1) >> 4, ref_packed.reshape(-1) & 15], 1).reshape(-1)[: x.numel()]
    differ = ours != theirs
    excused = near_threshold(x, absmax, blocksize)
    assert not (differ & ~excused).any(), f"{int((differ & ~excused).sum())} codes differ away from any threshold"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_equals_bitsandbytes_cpu(quant_type, double_quant, out_dtype):
    x = torch.randn(129, 67) * 0.02
    packed, state = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    absmax = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset) if double_quant else state.absmax
    state.dtype = out_dtype
    expected = F.dequantize_4bit(packed, state)
    ours = dequantize_4bit(packed, absmax, x.shape, 64, quant_type, out_dtype)
    if quant_type == "fp4":
        # FP4 code 8 is "-0": CUDA returns -0.0 (golden vectors), bitsandbytes' CPU table has +0.0
        ours = torch.where(ours == 0, torch.zeros_like(ours), ours)
    assert_bits_equal(ours, expected, f"{quant_type} dequantize")


def _bnb_linear_from_state_dict(sd, in_f, out_f, dq, quant_type):
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=False, compress_statistics=dq, quant_type=quant_type,
                            compute_dtype=torch.float32)
    stats = {k: v for k, v in sd.items() if k != "weight"}
    lin.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=lin)
    return lin


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip_through_linear4bit(quant_type, double_quant):
    w = torch.randn(96, 176) * 0.02
    ours = QuantizedWeight4bit.from_tensor(w, 64, quant_type, double_quant)
    sd = ours.to_bnb_state_dict("weight")
    # ours -> bitsandbytes: it loads, computes with exactly our weight, and saves the same keys and bytes
    lin = _bnb_linear_from_state_dict(sd, 176, 96, double_quant, quant_type)
    x = torch.randn(5, 176)
    assert torch.equal(lin(x), x @ ours.dequantize(torch.float32).T)
    saved = lin.state_dict()
    assert list(saved) == list(sd)
    for k in sd:
        assert_bits_equal(saved[k], sd[k], k)
    # bitsandbytes -> ours: a weight it quantized loads here and dequantizes to its values
    lin2 = bnb.nn.Linear4bit(176, 96, bias=False, compress_statistics=double_quant, quant_type=quant_type)
    packed, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
    lin2.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True,
                                    quant_type=quant_type, module=lin2)
    lin2.quant_state = state
    theirs = from_bnb_state_dict(lin2.state_dict(), "weight")
    assert theirs.shape == w.shape and theirs.double_quant == double_quant
    # + 0.0: FP4 code 8 is -0.0 on CUDA (and ours), +0.0 in bitsandbytes' generic CPU table
    assert_bits_equal(theirs.dequantize(torch.float32) + 0.0, F.dequantize_4bit(packed, state) + 0.0,
                      "bnb-saved weight")
