"""Host time per call of the public NF4 operations and of their pieces, on a GPU (diagnostic): how much of an
eager call on a small weight is Python, how much is Triton's launch, and how much a launch through the
compiled kernel's own runner (no argument binding / cache lookup) would save. Each variant is called
back to back on a 64-element tensor (the GPU work is negligible), so time per call is host time.

    python benchmarks/diag/host_launch.py [--out host_launch.json]
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path = [p for p in sys.path if not os.path.abspath(p or ".").startswith(os.path.join(ROOT, "benchmarks"))]
sys.path.insert(0, ROOT)
import importlib  # noqa: E402

import triton  # noqa: E402

import kernels  # noqa: E402

dq_mod = importlib.import_module("kernels.dequantize")
q_mod = importlib.import_module("kernels.quantize")
mm = importlib.import_module("kernels.nf4_matmul")
common = importlib.import_module("kernels._common")


def host_us(fn, n=2000, reps=5):
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "host_launch.json"))
    args = ap.parse_args()
    res = {}
    w = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16)
    x1 = torch.randn(1, 64, device="cuda", dtype=torch.bfloat16)
    for fast in ("0", "1"):  # the public ops without and with the launch fast path (kernels/_common.py Launch)
        os.environ["QLORA_FAST_LAUNCH"] = fast
        for cache in (mm._FAST, mm._V2_PLANS, dq_mod._PLANS, q_mod._LAUNCHES):
            cache.clear()
        for dq in (False, True):
            qw = kernels.quantize_weight(w, 64, "nf4", dq)
            out = torch.empty(64, 64, device="cuda", dtype=torch.bfloat16)
            tag = (" DQ" if dq else "") + (" fast" if fast == "1" else " triton")
            res["dequantize_weight" + tag] = host_us(lambda: kernels.dequantize_weight(qw, torch.bfloat16, out=out))
            res["quantize_weight" + tag] = host_us(lambda: kernels.quantize_weight(w, 64, "nf4", dq), n=500)
            kernels.nf4_matmul(x1, qw)
            res["nf4_matmul M=1" + tag] = host_us(lambda: kernels.nf4_matmul(x1, qw))
            res["nf4_matmul M=1 chosen" + tag] = str(mm.chosen_paths())
    os.environ["QLORA_FAST_LAUNCH"] = "1"
    for dq in (False, True):
        qw = kernels.quantize_weight(w, 64, "nf4", dq)
        out = torch.empty(64, 64, device="cuda", dtype=torch.bfloat16)
        tag = " DQ" if dq else ""
        a, q, a2, code8, offset, dqf = common.scale_args(qw.absmax, qw.nested, w.device)
        table = common.code_table_on("nf4", w.device)
        kargs = (qw.packed, a, q, a2, code8, offset, table, out, 4096, 2048, 64)
        kw = dict(BLOCKSIZE=64, DOUBLE_QUANT=dqf, USE_PTX=True, ROWS=128, num_warps=4)
        ck = dq_mod._dequantize_kernel[(1,)](*kargs, **kw)
        res["bare triton launch" + tag] = host_us(lambda: dq_mod._dequantize_kernel[(1,)](*kargs, **kw))
        try:
            runner = ck[(1, 1, 1)]
            full = kargs + (64, dqf, True, 128)
            runner(*full)
            torch.cuda.synchronize()
            res["CompiledKernel runner (all args)" + tag] = host_us(lambda: runner(*full))
        except Exception as ex:
            print("runner with constexprs failed:", type(ex).__name__, str(ex)[:200])
            try:
                runner(*kargs)
                torch.cuda.synchronize()
                res["CompiledKernel runner (runtime args)" + tag] = host_us(lambda: runner(*kargs))
            except Exception as ex2:
                print("runner without constexprs failed:", type(ex2).__name__, str(ex2)[:200])
        res["scale_args" + tag] = host_us(lambda: common.scale_args(qw.absmax, qw.nested, w.device))
        try:
            import bitsandbytes.functional as bF
            bp, bqs = bF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
            res["bnb dequantize_4bit" + tag] = host_us(lambda: bF.dequantize_4bit(bp, bqs, blocksize=64,
                                                                                   quant_type="nf4"))
            res["bnb quantize_4bit" + tag] = host_us(lambda: bF.quantize_4bit(w, blocksize=64, compress_statistics=dq,
                                                                               quant_type="nf4"), n=500)
            import bitsandbytes as bnb
            res["bnb matmul_4bit M=1" + tag] = host_us(lambda: bnb.matmul_4bit(x1, bp.t(), quant_state=bqs))
        except ImportError:
            print("bitsandbytes not installed: peers skipped")
    dst = torch.empty_like(w)
    res["torch copy_"] = host_us(lambda: dst.copy_(w))
    res["torch.empty 64x64"] = host_us(lambda: torch.empty(64, 64, device="cuda"))
    res["x @ W.T bf16 64"] = host_us(lambda: w @ w.T)
    info = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                host_us=res)
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)
    for k, v in res.items():
        print(f"{k:44s} {v:7.2f} us" if isinstance(v, float) else f"{k:44s} {v}")


if __name__ == "__main__":
    main()
