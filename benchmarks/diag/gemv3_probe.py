"""Probe the word GEMV (path gemv3: `_nf4_gemv_w_kernel` at M = 1, `_nf4_gemv_wm_kernel` at 2 <= M <= 4;
diagnostic): every config against float64 math, timed next to the v2 GEMV (M = 1) or the tensor-core swap kernel,
dequantize + cuBLAS, bitsandbytes' matmul_4bit and bf16 cuBLAS in the same run, with the compiler's output per
config and the device copy bandwidth as the yardstick.

Results: benchmarks/results/diag/gemv3_probe-* (M = 1, with the prefetching variant) and gemv3m_probe-*
(--ms 1,2,4,8 at 23fe45d: M = 8 was slower than the swap kernel everywhere, so the kernel stops at 4 rows; the
`-planar-x` run tried x pre-transposed by the launcher into (4, K / 8) words so that each load is one coalesced
line: no faster with its extra copy kernel, removed).

    python benchmarks/diag/gemv3_probe.py [--ms 1,2,3,4] [--out gemv3_probe.json] [--quick]
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
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "diag"))
import importlib  # noqa: E402

import kernels  # noqa: E402
from gemv_probe import ir_stats  # noqa: E402

mm = importlib.import_module("kernels.nf4_matmul")
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]
CONFIGS = [dict(R=r, WT=wt, num_warps=w) for r, wt, w in [(2, 64, 2), (2, 128, 4), (2, 256, 4), (1, 128, 4)]]
CONFIGS_M1 = [dict(R=r, WT=wt, num_warps=w, PREFETCH=pf) for pf in (False, True)
              for r, wt, w in [(4, 256, 4), (4, 128, 4), (2, 256, 4), (4, 64, 2)]]


def bench(fn):
    return do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gemv3_probe.json"))
    ap.add_argument("--quick", action="store_true", help="two shapes, no double quantization")
    ap.add_argument("--ms", default="1,2,3,4")
    args = ap.parse_args()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bF
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_tbs = 2 * src.numel() / (bench(lambda: dst.copy_(src)) * 1e-6) / 1e12
    res = dict(gpu=torch.cuda.get_device_name(), copy_tbs=copy_tbs, rows=[], ir={})
    print(f"{res['gpu']}: copy {copy_tbs:.2f} TB/s", flush=True)
    shapes = SHAPES[:1] + SHAPES[4:5] if args.quick else SHAPES
    for (N, K) in shapes:
        for dq in ((False,) if args.quick else (False, True)):
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
            qw = kernels.quantize_weight(w, 64, "nf4", dq)
            bp, bqs = bF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
            wd = kernels.dequantize_weight(qw, torch.bfloat16).double()
            for M in map(int, args.ms.split(",")):
                tag = f"{N}x{K}{' DQ' if dq else ''} M={M}"
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                ref = x.double() @ wd.T
                t = {"bf16": bench(lambda: x @ w.T),
                     "bnb": bench(lambda: bnb.matmul_4bit(x, bp.t(), quant_state=bqs)),
                     "swap": bench(lambda: mm.nf4_matmul_fused(x, qw, path="swap" if M > 1 else "gemv2")),
                     "dequant": bench(lambda: mm.nf4_matmul_dequant(x, qw))}
                errs = {"swap": rel(mm.nf4_matmul_fused(x, qw, path="swap" if M > 1 else "gemv2"), ref)}
                for cfg in (CONFIGS_M1 if M == 1 else CONFIGS):
                    c = dict(cfg, SPLIT_K=1)
                    key = "R{R} WT{WT} w{num_warps}".format(**c) + (" prefetch" if c.get("PREFETCH") else "")
                    f = lambda: mm.nf4_matmul_fused(x, qw, path="gemv3", config=c)  # noqa: E731
                    errs[key] = e = rel(f(), ref)
                    t[key] = bench(f) if e < 1e-2 else float("nan")
                    ik = f"{key} M={M} dq={dq}"
                    if ik not in res["ir"]:
                        res["ir"][ik] = ir_stats(mm._LAST["compiled"])
                t["gemv3 default"] = bench(lambda: mm.nf4_matmul_fused(x, qw, path="gemv3"))
                errs["gemv3 default"] = rel(mm.nf4_matmul_fused(x, qw, path="gemv3"), ref)
                mm._path_cache.clear()
                mm._FAST.clear()
                t["dispatch"] = bench(lambda: kernels.nf4_matmul(x, qw))
                chosen = [v for k, v in mm.chosen_paths().items() if k[0] == "fwd"]
                g3 = {k: v for k, v in t.items() if k.startswith("R") and v == v}
                best = min(g3, key=g3.get)
                res["rows"].append(dict(shape=tag, M=M, weight_bytes=qw.nbytes(), times_us=t, rel_err=errs,
                                        default=mm._v2_default("gemv3", M, N, K, 64), chosen=chosen))
                peer = "swap" if M > 1 else "gemv2"
                print(f"{tag:>20} bf16 {t['bf16']:6.1f} bnb {t['bnb']:6.1f} {peer} {t['swap']:6.1f} dq+mm "
                      f"{t['dequant']:6.1f} | gemv3 best {t[best]:6.1f} {best} "
                      f"({qw.nbytes() / t[best] / 1e6 / copy_tbs:.2f} of copy, {t['bf16'] / t[best]:.2f}x bf16) "
                      f"default {t['gemv3 default']:6.1f} | dispatch {t['dispatch']:6.1f} {chosen} "
                      f"| err {max(errs.values()):.1e}", flush=True)
                json.dump(res, open(args.out, "w"), indent=1)
    for k, v in res["ir"].items():
        print(k, v)


if __name__ == "__main__":
    main()
