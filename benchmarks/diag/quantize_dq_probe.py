"""Where double quantization's time goes (diagnostic): quantize_weight with and without double quantization
against bitsandbytes' quantize_4bit, each part alone (4-bit kernel, absmax.mean(), the 8-bit kernel), and the
whole call replayed from a CUDA graph (the GPU's time without the host's launches), in one run.

    python benchmarks/diag/quantize_dq_probe.py [--out quantize_dq_probe.json]
"""
import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path = [p for p in sys.path if not os.path.abspath(p or ".").startswith(os.path.join(ROOT, "benchmarks"))]
sys.path.insert(0, ROOT)
import kernels  # noqa: E402
from kernels import quantize as kq  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192)]


def bench(fn):
    return do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3


def graphed(fn):
    """Microseconds per replay of fn captured in a CUDA graph (the GPU's time alone)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return bench(g.replay)


def host_us(fn, calls=200):
    """Microseconds of host time per call, launches only (the GPU is synchronized once at the end)."""
    import time
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def profile(w):
    import cProfile
    import pstats
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        kernels.quantize_weight(w, 64, "nf4", True)
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(18)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "quantize_dq_probe.json"))
    ap.add_argument("--host", action="store_true", help="host time per part and a cProfile of the DQ call")
    args = ap.parse_args()
    if args.host:
        w = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        packed, absmax = kq.quantize_4bit_triton(w)
        offset = absmax.mean().reshape(1)
        q = torch.empty(absmax.numel(), dtype=torch.uint8, device="cuda")
        a2 = torch.empty(absmax.numel() // 256, dtype=torch.float32, device="cuda")
        code = kq._dynamic_map_on("cuda:0")
        parts = {"quantize_weight": lambda: kernels.quantize_weight(w, 64, "nf4", False),
                 "quantize_weight DQ": lambda: kernels.quantize_weight(w, 64, "nf4", True),
                 "quantize_4bit_triton": lambda: kq.quantize_4bit_triton(w),
                 "double_quantize_triton": lambda: kq.double_quantize_triton(absmax),
                 "absmax.mean()": lambda: absmax.mean(),
                 "torch.empty": lambda: torch.empty(4096, dtype=torch.uint8, device="cuda"),
                 "8-bit launch": lambda: kq._quantize_8bit_kernel[(a2.numel(),)](
                     absmax, offset, a2, code, q, a2, absmax.numel(), USE_PTX=True, BS=256, num_warps=4)}
        print({k: round(host_us(f), 1) for k, f in parts.items()}, flush=True)
        profile(w)
        return
    import bitsandbytes.functional as bF
    res = dict(gpu=torch.cuda.get_device_name(), rows=[])
    for _ in range(2):  # two rounds: the fastest of each, against bursts of host contention
        for N, K in SHAPES:
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            packed, absmax = kq.quantize_4bit_triton(w)
            t = {"ours": bench(lambda: kernels.quantize_weight(w, 64, "nf4", False)),
                 "ours DQ": bench(lambda: kernels.quantize_weight(w, 64, "nf4", True)),
                 "bnb": bench(lambda: bF.quantize_4bit(w, blocksize=64, quant_type="nf4")),
                 "bnb DQ": bench(lambda: bF.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                                          quant_type="nf4")),
                 "4-bit kernel": bench(lambda: kq.quantize_4bit_triton(w)),
                 "double_quantize_triton": bench(lambda: kq.double_quantize_triton(absmax)),
                 "absmax.mean()": bench(lambda: absmax.mean()),
                 "graph ours": graphed(lambda: kernels.quantize_weight(w, 64, "nf4", False)),
                 "graph ours DQ": graphed(lambda: kernels.quantize_weight(w, 64, "nf4", True))}
            res["rows"].append(dict(shape=f"{N}x{K}", times_us=t))
            print(f"{N}x{K}: " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()), flush=True)
    json.dump(res, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
