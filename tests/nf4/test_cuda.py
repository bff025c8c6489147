"""The nf4 reference run on CUDA tensors against bitsandbytes' CUDA kernels, live, on fresh random data.
Needs a GPU and bitsandbytes; on a CPU-only machine it is skipped (the golden tests cover the same)."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes' CUDA path)")

from nf4 import QuantizedWeight4bit, dequantize_4bit, double_quantize, quantize_4bit  # noqa: E402

from .conftest import assert_bits_equal  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_reference_on_cuda_equals_bitsandbytes_cuda(dtype, quant_type, blocksize):
    F = pytest.importorskip("bitsandbytes.functional")
    x = (torch.randn(1023, 1001, device="cuda") * 0.02).to(dtype)
    packed, absmax = quantize_4bit(x, blocksize, quant_type)
    ref_packed, state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
    assert_bits_equal(packed, ref_packed, "packed codes")
    assert_bits_equal(absmax, state.absmax, "absmax")
    for out in (torch.float32, torch.float16, torch.bfloat16):
        state.dtype = out
        assert_bits_equal(dequantize_4bit(packed, absmax, x.shape, blocksize, quant_type, out),
                          F.dequantize_4bit(ref_packed, state), f"dequantized to {out}")
    _, dq_state = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
    ours = double_quantize(absmax, offset=absmax.mean())  # torch's CUDA mean, as bitsandbytes takes it
    assert_bits_equal(ours.offset.reshape(1), dq_state.offset.reshape(1), "offset")
    assert_bits_equal(ours.q, dq_state.absmax, "8-bit scales")
    assert_bits_equal(ours.absmax2, dq_state.state2.absmax, "nested absmax")


def test_quantized_weight_moves_to_cuda_and_back():
    qw = QuantizedWeight4bit.from_tensor(torch.randn(300, 70), 64, "nf4", True)
    on_gpu = qw.cuda()
    assert on_gpu.packed.is_cuda and on_gpu.nested.q.is_cuda
    assert_bits_equal(on_gpu.dequantize().cpu(), qw.dequantize(), "dequantized on GPU")
