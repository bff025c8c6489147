"""nf4_linear (autograd) in the interpreter and NF4Linear's bitsandbytes Linear4bit state-dict form."""
import json

import pytest
import torch

import nf4
import nf4.blockwise
from kernels import NF4Linear, nf4_linear
from kernels._common import interpreting

from .helpers import assert_bits_equal, rel_err


@pytest.mark.skipif(not interpreting(), reason="CPU interpreter test; test_cuda.py covers the GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_autograd_matches_dense(dtype, tol, backend):
    qw = nf4.QuantizedWeight4bit.from_tensor(torch.randn(23, 96), 64, "nf4", True)
    w = qw.dequantize(torch.float32).double()
    x = torch.randn(2, 9, 96).to(dtype).requires_grad_()
    b = torch.randn(23).to(dtype).requires_grad_()
    y = nf4_linear(x, qw, b, backend=backend)
    gy = torch.randn_like(y)
    y.backward(gy)
    xr = x.detach().double().requires_grad_()
    br = b.detach().double().requires_grad_()
    yr = xr @ w.T + br
    yr.backward(gy.double())
    assert y.dtype == dtype
    assert rel_err(y, yr) < tol
    assert rel_err(x.grad, xr.grad) < tol
    assert rel_err(b.grad, br.grad) < tol


def test_module_forward_and_no_weight_grad():
    lin = torch.nn.Linear(64, 10)
    m = NF4Linear.from_linear(lin)
    assert (m.in_features, m.out_features) == (64, 10)
    assert [n for n, _ in m.named_parameters()] == ["bias"]   # the 4-bit weight is not a parameter
    x = torch.randn(4, 64)
    ref = x @ m.qweight.dequantize(torch.float32).T + lin.bias
    assert rel_err(m(x), ref) < 1e-6


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_state_dict_equals_bitsandbytes(double_quant, quant_type):
    """Same keys, order, dtypes, shapes and metadata as bitsandbytes' Linear4bit; same values where its CPU
    backend follows the CUDA semantics (NF4 codes and plain absmax). Its CPU FP4 codes tiny values' sign
    the other way round from its CUDA kernel and its CPU double quantization rounds differently; the GPU
    test (test_cuda.py) checks every value against bitsandbytes' CUDA kernels."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bF
    torch.manual_seed(3)
    lin = torch.nn.Linear(200, 37)
    ref = bnb.nn.Linear4bit(200, 37, compute_dtype=torch.float32, compress_statistics=double_quant,
                            quant_type=quant_type)
    ref.load_state_dict(lin.state_dict())
    ref = ref.to("cpu")                                   # bitsandbytes quantizes on the move
    ours = NF4Linear.from_linear(lin, quant_type=quant_type, double_quant=double_quant)
    sd, sr = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(sr)
    for k in sr:
        assert sd[k].dtype == sr[k].dtype and sd[k].shape == sr[k].shape, k
        if ".quant_state." in k:
            a, b = json.loads(bytes(sd[k].tolist())), json.loads(bytes(sr[k].tolist()))
            assert a.pop("nested_offset", 0) == pytest.approx(b.pop("nested_offset", 0), rel=1e-6)
            assert a == b
    assert torch.equal(sd["bias"], sr["bias"])
    assert torch.equal(sd["weight.quant_map"], sr["weight.quant_map"])
    same = (nf4.blockwise.unpack_nibbles(sd["weight"], 7400) == nf4.blockwise.unpack_nibbles(sr["weight"], 7400))
    if quant_type == "nf4":
        assert_bits_equal(sd["weight"], sr["weight"], "weight")
        if not double_quant:
            assert_bits_equal(sd["weight.absmax"], sr["weight.absmax"], "absmax")
    else:
        assert same.float().mean() > 0.99
    # ours loads bitsandbytes' dict and then holds exactly bitsandbytes' weights
    m = NF4Linear.from_weight(torch.zeros(37, 200), torch.zeros(37))
    assert not m.load_state_dict(sr).missing_keys
    ref_w = bF.dequantize_4bit(ref.weight.data, ref.weight.quant_state)
    assert rel_err(m.qweight.dequantize(torch.float32), ref_w) < 1e-6
    x = torch.randn(3, 200)
    assert rel_err(m(x), ref(x)) < 1e-5


def test_state_dict_round_trip_and_errors():
    m = NF4Linear.from_weight(torch.randn(12, 64), torch.randn(12), double_quant=True)
    sd = m.state_dict()
    m2 = NF4Linear.from_weight(torch.randn(12, 64), torch.zeros(12))
    m2.load_state_dict(sd)
    assert m2.qweight.double_quant and torch.equal(m2.qweight.packed, m.qweight.packed)
    assert torch.equal(m2.bias, m.bias)
    for k, v in m2.state_dict().items():
        assert torch.equal(v, sd[k]), k
    wrong = NF4Linear.from_weight(torch.randn(13, 64), torch.zeros(13))
    with pytest.raises(RuntimeError, match="shape"):
        wrong.load_state_dict(sd)
    missing = {k: v for k, v in sd.items() if k != "weight"}
    with pytest.raises(RuntimeError, match="weight"):
        m2.load_state_dict(missing)


def test_dtype_moves_keep_codes_and_scales():
    m = NF4Linear.from_weight(torch.randn(8, 64), torch.randn(8), double_quant=True)
    packed, q, absmax2 = m.qweight.packed, m.qweight.nested.q, m.qweight.nested.absmax2
    h = m.half()
    assert h.compute_dtype == torch.float16 and h.bias.dtype == torch.float16
    assert h.qweight.packed.dtype == torch.uint8 and torch.equal(h.qweight.packed, packed)
    assert torch.equal(h.qweight.nested.q, q) and h.qweight.nested.absmax2.dtype == torch.float32
    assert torch.equal(h.qweight.nested.absmax2, absmax2)
    m.to(torch.float32)
    assert m.compute_dtype == torch.float32
    m.to("cpu")
    assert m.qweight.device.type == "cpu"
    y = m(torch.randn(2, 64, dtype=torch.float64))         # output in the input's dtype
    assert y.dtype == torch.float64
