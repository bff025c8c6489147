"""Host time of one `kernels.nf4_matmul` call on the small-M paths, with the Triton kernels replaced by a
no-op (diagnostic, runs on a CPU in the interpreter mode): what our Python dispatch adds on top of Triton's
own launch. Decode on small weights is bound by this, not by the GPU.

    python benchmarks/diag/dispatch_overhead.py
"""
import os, sys, time; os.environ["TRITON_INTERPRET"]="1"; sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import torch, importlib, nf4
mm = importlib.import_module("kernels.nf4_matmul")
class Stub:
    def __getitem__(self, grid):
        return lambda *a, **k: None
mm._nf4_gemv_v2_kernel = Stub(); mm._nf4_decode_swap_kernel = Stub()
for dq in (False, True):
    qw = nf4.QuantizedWeight4bit.from_tensor(torch.randn(256, 512), 64, "nf4", dq)
    for M in (1, 8):
        x = torch.randn(M, 512)
        for _ in range(200): mm.nf4_matmul(x, qw, backend="triton")
        best = 1e9
        for r in range(7):
            n=500; t=time.perf_counter()
            for _ in range(n): mm.nf4_matmul(x, qw, backend="triton")
            best = min(best, (time.perf_counter()-t)/n*1e6)
        print(f"dq={dq} M={M}: {best:.1f} us", end="  ")
print()
