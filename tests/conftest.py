"""Test-wide setup, before any test module is imported.

- Without a GPU, Triton kernels run in the CPU interpreter: TRITON_INTERPRET is read when a kernel is decorated,
  and importing bitsandbytes below imports this project's kernels/ (bitsandbytes looks for a package named
  `kernels` on AVX512-BF16 CPUs), so it is set first (tests/kernels/conftest.py repeats it for runs of that
  directory alone).
- bitsandbytes, an oracle only, computes on every CPU as on CUDA (see below).
- transformers, an oracle only, does not take kernels/ for Hugging Face's hub-kernels package
  (benchmarks/peers.py).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from benchmarks.peers import shield_transformers  # noqa: E402

shield_transformers()      # transformers >= 5.25 would import this repository's kernels/ as Hugging Face's

try:
    import bitsandbytes.nn.modules as _bnb_modules
except Exception:  # noqa: BLE001 -- not installed (or broken): the tests that need it skip on their own
    _bnb_modules = None

if _bnb_modules is not None and hasattr(_bnb_modules, "has_avx512bf16"):
    # On AVX512-BF16 CPUs (Sapphire Rapids CI hosts) bitsandbytes' Linear4bit switches, in eval mode, to a
    # fused CPU kernel that rounds x and absmax to bfloat16 (1.5e-2 off its own dequantize + matmul) and that
    # it loads through the `kernels` package, which this project's kernels/ shadows. As an oracle it must do
    # what it does on CUDA and on other CPUs: dequantize, then matmul in the compute dtype.
    _bnb_modules.has_avx512bf16 = lambda: False

    # Its CPU dequantize_4bit calls a C++ kernel that takes 4-bit blocks per row of the weight (on AVX512 hosts;
    # CUDA, the golden vectors and ours take them over the flat weight, and its own CPU quantize does too): where
    # a block straddles two rows (in_features % blocksize != 0) the two disagree. Its generic torch path is the
    # flat one: registered over the C++ kernel, bitsandbytes dequantizes what it quantized.
    try:
        import warnings

        from bitsandbytes._ops import register_kernel
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code

        def _flat_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
            A = A if A.dtype == torch.uint8 else A.view(torch.uint8)
            return _dequantize_4bit_compute(A.reshape(-1), absmax.float(), _get_4bit_code(quant_type, A.device),
                                            blocksize, shape, dtype)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": that is the point
            register_kernel("bitsandbytes::dequantize_4bit", "cpu")(_flat_dequantize_4bit)
    except (ImportError, RuntimeError):  # another bitsandbytes layout, or a torch that refuses to override a
        pass                             # kernel (2.11): its own kernel stays (the interop tests say if it differs)
