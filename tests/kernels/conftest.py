"""tests/kernels: without a GPU, run the Triton kernels in Triton's CPU interpreter.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any test module imports
kernels/. With a GPU it is left alone: test_cuda.py compiles the kernels for real.
"""
import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    # kernels/ imported earlier in this process (by another package's tests) was decorated for the
    # compiler: re-execute its kernel modules so their @triton.jit functions run in the interpreter
    for name in ("kernels._common", "kernels.dequantize", "kernels.quantize", "kernels.nf4_matmul"):
        if name in sys.modules:
            importlib.reload(sys.modules[name])
