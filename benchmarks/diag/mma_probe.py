"""Probe the tensor-core decode kernel (path "mma", kernels/nf4_mma.py; diagnostic): every config against
float64 math, timed next to the word GEMV (gemv3, M <= 4), the swap kernel (M >= 2), bitsandbytes'
matmul_4bit and bf16 cuBLAS in the same run, with the compiler's output per config and the device copy
bandwidth as the yardstick.

    python benchmarks/diag/mma_probe.py [--ms 1,4,8,16] [--out mma_probe.json] [--quick] [--lut] [--persist 2,4]
"""
import argparse
import json
import os
import sys

import torch
from triton.testing import do_bench_cudagraph

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path = [p for p in sys.path if not os.path.abspath(p or ".").startswith(os.path.join(ROOT, "benchmarks"))]
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "diag"))
import importlib  # noqa: E402

import kernels  # noqa: E402
from gemv3_probe import bench, rel  # noqa: E402
from gemv_probe import ir_stats  # noqa: E402

mm = importlib.import_module("kernels.nf4_matmul")
mma = importlib.import_module("kernels.nf4_mma")
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]
CONFIGS = [dict(RT=rt, NW=nw, PREFETCH=pf) for pf in (False, True) for rt, nw in [(1, 4), (1, 8), (2, 4)]]
# --occupancy: more warps a program or more programs (split K) than the heuristic gives, prefetching
CONFIGS_OCC = [dict(RT=2, NW=4, PREFETCH=True), dict(RT=2, NW=8, PREFETCH=True), dict(RT=1, NW=8, PREFETCH=True),
               dict(RT=2, NW=4, PREFETCH=True, SKX=2), dict(RT=1, NW=4, PREFETCH=True, SKX=2),
               dict(RT=2, NW=4, PREFETCH=False, SKX=2), dict(RT=1, NW=16, PREFETCH=True),
               dict(RT=1, NW=16, PREFETCH=False)]


def bench_graph(fn):
    """Microseconds per call replayed from a CUDA graph: the GPU's time without the host's (no L2 flush: the
    4096-wide weights, 8-23 MB, stay in L2 between replays; the 70B ones, 117 MB, do not)."""
    try:
        return do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
    except Exception as ex:  # a peer that cannot be captured
        print(f"graph capture failed: {type(ex).__name__}: {str(ex)[:200]}", flush=True)
        return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "mma_probe.json"))
    ap.add_argument("--quick", action="store_true", help="two shapes, no double quantization")
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--occupancy", action="store_true", help="the CONFIGS_OCC set (more warps / split K)")
    ap.add_argument("--shapes", default=None, help="e.g. 28672x8192,8192x28672 (default: all six)")
    ap.add_argument("--no-dq", action="store_true")
    ap.add_argument("--lut", action="store_true", help="every config also with the shared-memory table (LUT 1)")
    ap.add_argument("--persist", default="", help="every config also persistent, at these programs per SM (e.g. 2,4)")
    args = ap.parse_args()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bF
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_tbs = 2 * src.numel() / (bench(lambda: dst.copy_(src)) * 1e-6) / 1e12
    res = dict(gpu=torch.cuda.get_device_name(), copy_tbs=copy_tbs, rows=[], ir={})
    print(f"{res['gpu']}: copy {copy_tbs:.2f} TB/s", flush=True)
    # fp16, odd N, bias, split-K, blocksize 128, FP4: correctness only
    for M, N, K, bs, qt, dtype, cfg in [(3, 1001, 1344, 64, "nf4", torch.float16, dict(RT=2, NW=4, SPLIT_K=3)),
                                        (16, 515, 2048, 128, "fp4", torch.bfloat16, dict(RT=1, NW=2)),
                                        (9, 67, 640, 64, "nf4", torch.bfloat16, dict(RT=2, NW=8, SPLIT_K=2))]:
        for dq in (False, True):
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            qw = kernels.quantize_weight(w, bs, qt, dq)
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            b = torch.randn(N, device="cuda", dtype=dtype)
            ref = x.double() @ qw.dequantize(torch.float32).double().T + b.double()
            y = mm.nf4_matmul_fused(x, qw, b, path="mma", config=cfg)
            e = rel(y, ref)
            print(f"check M={M} N={N} K={K} bs={bs} {qt} {dtype} dq={dq} {cfg}: rel {e:.2e}", flush=True)
            res.setdefault("checks", []).append(dict(M=M, N=N, K=K, bs=bs, qt=qt, dtype=str(dtype), dq=dq, err=e))
    shapes = SHAPES[:1] + SHAPES[4:5] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    for (N, K) in shapes:
        for dq in ((False,) if args.quick or args.no_dq else (False, True)):
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
            qw = kernels.quantize_weight(w, 64, "nf4", dq)
            bp, bqs = bF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
            wd = kernels.dequantize_weight(qw, torch.bfloat16).double()
            for M in map(int, args.ms.split(",")):
                tag = f"{N}x{K}{' DQ' if dq else ''} M={M}"
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                ref = x.double() @ wd.T
                peers = {"bf16": lambda: x @ w.T, "bnb": lambda: bnb.matmul_4bit(x, bp.t(), quant_state=bqs)}
                if M <= 4:
                    peers["gemv3"] = lambda: mm.nf4_matmul_fused(x, qw, path="gemv3")
                if M > 1:
                    peers["swap"] = lambda: mm.nf4_matmul_fused(x, qw, path="swap")
                for k in list(peers):  # the fused paths through their cached launch plans (as the dispatcher runs them)
                    if k in ("gemv3", "swap"):
                        plan = mm._v2_plan(x, qw, None, k, None)
                        peers[k] = (lambda plan: lambda: mm._launch_plan(plan, x, None))(plan)
                t = {k: bench(f) for k, f in peers.items()}
                g = {k: bench_graph(f) for k, f in peers.items()}
                errs = {k: rel(f(), ref) for k, f in peers.items() if k not in ("bf16", "bnb")}
                d = mma.mma_default(M, N, K, n_sm)
                cfgs = CONFIGS_OCC if args.occupancy else CONFIGS
                if args.lut:
                    cfgs = [dict(c, LUT=lut) for c in cfgs for lut in (0, 1)]
                if args.persist:
                    cfgs = cfgs + [dict(c, PERSIST=int(k)) for c in cfgs for k in args.persist.split(",")]
                for cfg in cfgs:
                    c = dict(cfg, SPLIT_K=1)
                    skx = c.pop("SKX", 1)
                    progs = -(-N // (16 * c["RT"]))
                    while progs * c["SPLIT_K"] < 2 * n_sm and (K // 64) // (c["SPLIT_K"] * 2) >= 4 * c["NW"]:
                        c["SPLIT_K"] *= 2
                    c["SPLIT_K"] *= skx
                    key = "RT{RT} NW{NW} SK{SPLIT_K}".format(**c) + (" pf" if c["PREFETCH"] else "") + \
                        (" smem" if c.get("LUT") else "") + (f" p{c['PERSIST']}" if c.get("PERSIST") else "")
                    try:
                        plan = mma.MmaPlan(x, qw, None, c)
                        f = (lambda plan: lambda: plan.launch(x, None))(plan)
                        errs[key] = e = rel(f(), ref)
                    except Exception as ex:  # report, go on
                        print(f"{tag} {key}: {type(ex).__name__}: {str(ex)[:300]}", flush=True)
                        continue
                    t[key] = bench(f) if e < 1e-2 else float("nan")
                    g[key] = bench_graph(f) if e < 1e-2 else float("nan")
                    ik = f"{key} MX={8 if M <= 8 else 16} dq={dq}"
                    if ik not in res["ir"]:
                        res["ir"][ik] = ir_stats(mma._LAST["compiled"])
                mm._path_cache.clear()
                mm._FAST.clear()
                disp = lambda: kernels.nf4_matmul(x, qw)  # noqa: E731
                disp()  # the dispatcher's choice, timed from CUDA graphs (M <= 16)
                t["dispatch"], g["dispatch"] = bench(disp), bench_graph(disp)
                res.setdefault("chosen", {})[tag] = [v for k, v in mm.chosen_paths().items() if k[0] == "fwd"]
                ours = {k: v for k, v in g.items() if k.startswith("RT") and v == v}
                best = min(ours, key=ours.get) if ours else None
                res["rows"].append(dict(shape=tag, M=M, weight_bytes=qw.nbytes(), times_us=t, graph_us=g,
                                        rel_err=errs, default=d))
                if best is None:
                    print(f"{tag:>22} no mma config ran: {errs}", flush=True)
                    continue
                prev = min(g.get("gemv3", 1e9), g.get("swap", 1e9))
                print(f"{tag:>22} graph: bf16 {g['bf16']:6.1f} bnb {g['bnb']:6.1f} ours-before {prev:6.1f} | mma best "
                      f"{g[best]:6.1f} {best} ({qw.nbytes() / g[best] / 1e6 / copy_tbs:.2f} of copy, "
                      f"{g['bf16'] / g[best]:.2f}x bf16, {g['bnb'] / g[best]:.2f}x bnb, {prev / g[best]:.2f}x before)"
                      f" | dispatch {g['dispatch']:6.1f} {res['chosen'][tag]}"
                      f" | eager (do_bench): bf16 {t['bf16']:6.1f} bnb {t['bnb']:6.1f} mma {t[best]:6.1f} "
                      f"| err {max(errs.values()):.1e}", flush=True)
                json.dump(res, open(args.out, "w"), indent=1)
    for k, v in res["ir"].items():
        print(k, v)


if __name__ == "__main__":
    main()
