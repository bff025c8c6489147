"""Test-wide setup: bitsandbytes, an oracle only, computes as its reference path does on every CPU."""
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
