"""Probe the v2 decode kernels on one GPU (diagnostic): correctness of every LUT mode, timings next to
bitsandbytes and bf16 cuBLAS, and what the compiler made of each (registers, spills, layout conversions,
shared-memory use) so a slow variant can be explained.

    python benchmarks/diag/gemv_probe.py [--out probe.json]
"""
import argparse
import itertools
import json
import os
import re
import sys

import torch
from triton.testing import do_bench

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path = [p for p in sys.path if not os.path.abspath(p or ".").startswith(os.path.join(ROOT, "benchmarks"))]
sys.path.insert(0, ROOT)
import importlib  # noqa: E402

import kernels  # noqa: E402

mm = importlib.import_module("kernels.nf4_matmul")


def bench(fn):
    return do_bench(fn, warmup=3, rep=15, return_mode="median") * 1e3


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def ir_stats(ck):
    ttgir, ptx = ck.asm.get("ttgir", ""), ck.asm.get("ptx", "")
    return dict(regs=getattr(ck, "n_regs", None), spills=getattr(ck, "n_spills", None),
                smem=getattr(ck, "metadata", None) and getattr(ck.metadata, "shared", None),
                convert_layout=ttgir.count("convert_layout"), local_alloc=ttgir.count("local_alloc"),
                ld_global=len(re.findall(r"ld\.global", ptx)), ld_shared=len(re.findall(r"ld\.shared", ptx)),
                st_shared=len(re.findall(r"st\.shared", ptx)), shfl=len(re.findall(r"shfl", ptx)),
                prmt=len(re.findall(r"prmt", ptx)), mma=len(re.findall(r"mma|wgmma", ptx)),
                ld_local=len(re.findall(r"ld\.local", ptx)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gemv_probe.json"))
    args = ap.parse_args()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bF
    res = dict(gpu=torch.cuda.get_device_name(), rows=[], ir={})
    gemv_cfgs = [dict(BN=bn, NB=nb, num_warps=w) for bn, nb, w in [(4, 4, 4), (2, 8, 4), (8, 4, 8), (1, 16, 4),
                                                                  (4, 8, 4), (16, 2, 4), (8, 8, 8)]]
    swap_cfgs = [dict(BM=16, BN=bn, NB=nb, num_warps=w) for bn, nb, w in [(32, 4, 4), (64, 2, 4), (16, 4, 4)]]
    for (N, K), dq in itertools.product([(4096, 4096), (28672, 8192), (8192, 28672)], (False, True)):
        tag = f"{N}x{K}{' DQ' if dq else ''}"
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        qw = kernels.quantize_weight(w, 64, "nf4", dq)
        bp, bqs = bF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        wd = kernels.dequantize_weight(qw, torch.bfloat16)
        row = dict(shape=tag, weight_bytes=qw.nbytes())
        for M in (1, 16):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ wd.float().T
            t = {"bf16": bench(lambda: x @ w.T), "bnb": bench(lambda: bnb.matmul_4bit(x, bp.t(), quant_state=bqs)),
                 "old": bench(lambda: mm.nf4_matmul(x, qw))}
            path, cfgs = ("gemv2", gemv_cfgs) if M == 1 else ("swap", swap_cfgs)
            for cfg, lut in itertools.product(cfgs, (0, 3)):
                c = dict(cfg, LUT=lut)
                f = lambda: mm.nf4_matmul_fused(x, qw, path=path, config=c)  # noqa: E731
                e = rel(f(), ref)
                key = json.dumps(c, sort_keys=True)
                if e > 1e-2:
                    t[key] = f"WRONG rel {e:.3g}"
                    print(tag, M, key, "WRONG", e, flush=True)
                    continue
                t[key] = bench(f)
                ik = f"{path} {key} dq={dq}"
                if ik not in res["ir"]:
                    res["ir"][ik] = ir_stats(mm._LAST["compiled"])
            row[f"m{M}"] = t
            num = {k: v for k, v in t.items() if k.startswith("{") and isinstance(v, float)}
            best = min(num, key=num.get) if num else None
            b3 = {k: v for k, v in num.items() if '"LUT": 3' in k}
            b3k = min(b3, key=b3.get) if b3 else None
            print(f"{tag:>14} M={M:<2} bf16 {t['bf16']:6.1f} bnb {t['bnb']:6.1f} old {t['old']:6.1f} | best {num.get(best, 0):6.1f}"
                  f" {best} | best prmt {b3.get(b3k, 0):6.1f} ({qw.nbytes() / max(b3.get(b3k, 1e9), 1e-9) / 1e6:.2f} TB/s) {b3k}",
                  flush=True)
        res["rows"].append(row)
        json.dump(res, open(args.out, "w"), indent=1)
    for k, v in res["ir"].items():
        print(k, v)


if __name__ == "__main__":
    main()
