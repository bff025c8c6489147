"""Configuration sweep for the memory-bound NF4 kernels (diagnostic, one GPU run): the v2 GEMV (M = 1),
the swapped small-M tensor-core kernel (M = 4, 16), dequantize and quantize launch parameters, next to
bitsandbytes 0.50 and bf16 cuBLAS timed in the same run. Every variant is checked (relative Frobenius
error vs a float32 matmul of the dequantized weight <= 1e-2; bit equality for dequantize/quantize).

    python benchmarks/diag/decode_sweep.py [--out sweep.json] [--quick]
"""
import argparse
import itertools
import json
import os
import sys
import time

import torch
from triton.testing import do_bench

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path = [p for p in sys.path if not os.path.abspath(p or ".").startswith(os.path.join(ROOT, "benchmarks"))]
sys.path.insert(0, ROOT)
import importlib  # noqa: E402

import kernels  # noqa: E402
from kernels.dequantize import dequantize_4bit_triton  # noqa: E402
from kernels.quantize import quantize_4bit_triton  # noqa: E402

mm = importlib.import_module("kernels.nf4_matmul")
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672), (1024, 8192)]
GEMV = [dict(BN=bn, NB=nb, num_warps=w) for bn, nb, w in
        [(1, 8, 2), (2, 4, 4), (2, 8, 4), (4, 4, 4), (4, 8, 8), (8, 4, 8), (8, 2, 4), (4, 2, 2), (1, 16, 4)]]
SWAP = [dict(BM=16, BN=bn, NB=nb, num_warps=w) for bn, nb, w in
        [(16, 4, 4), (32, 2, 4), (64, 2, 4), (64, 4, 8), (128, 2, 8), (32, 4, 4)]]


def bench(fn):
    return do_bench(fn, warmup=3, rep=15, return_mode="median") * 1e3


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def with_split(cfg, path, M, N, K):
    c = dict(cfg)
    progs = -(-N // c["BN"]) * (1 if path == "gemv2" else -(-M // c["BM"]))
    sk, kb = 1, K // 64
    while progs * sk < 2 * torch.cuda.get_device_properties(0).multi_processor_count and kb // (sk * 2) >= 4 * c["NB"]:
        sk *= 2
    c["SPLIT_K"] = sk
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "decode_sweep.json"))
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bF
    t0 = time.time()
    a = torch.randn(256 * 2**20, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    copy_tb = 2 * a.numel() * 2 / (bench(lambda: b.copy_(a)) * 1e-6) / 1e12
    del a, b
    gpu = torch.cuda.get_device_name()
    print(f"# {gpu} copy {copy_tb:.2f} TB/s", flush=True)
    res = dict(gpu=gpu, copy_tb_s=copy_tb, rows=[])
    shapes = SHAPES[:2] if args.quick else SHAPES
    for (N, K), dq in itertools.product(shapes, (False, True)):
        tag = f"{N}x{K}{' DQ' if dq else ''}"
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        qw = kernels.quantize_weight(w, 64, "nf4", dq)
        bp, bqs = bF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
        wd = kernels.dequantize_weight(qw, torch.bfloat16)
        wbytes = qw.nbytes()
        row = dict(shape=tag, N=N, K=K, dq=dq, weight_bytes=wbytes)
        # ---- dequantize / quantize launch parameters
        out = torch.empty_like(wd)
        deq = {}
        for bb, nw in itertools.product((2048, 4096, 8192, 16384), (4, 8)):
            f = lambda: dequantize_4bit_triton(qw.packed, qw.absmax, qw.shape, 64, "nf4", torch.bfloat16, qw.nested,
                                               out=out, block_bytes=bb, num_warps=nw)  # noqa: E731
            f()
            assert torch.equal(out.view(torch.int16), wd.view(torch.int16)), ("dequant", bb, nw)
            deq[f"{bb}/{nw}"] = bench(f)
        deq["bnb"] = bench(lambda: bF.dequantize_4bit(bp, bqs, blocksize=64, quant_type="nf4"))
        row["dequant_us"] = deq
        if not dq:
            qz = {}
            for rows_, nw in itertools.product((8, 16, 32, 64), (2, 4, 8)):
                f = lambda: quantize_4bit_triton(w, 64, "nf4", rows=rows_, num_warps=nw)  # noqa: E731
                p_, a_ = f()
                assert torch.equal(p_, qw.packed) and torch.equal(a_, qw.absmax), ("quant", rows_, nw)
                qz[f"{rows_}/{nw}"] = bench(f)
            qz["bnb"] = bench(lambda: bF.quantize_4bit(w, blocksize=64, quant_type="nf4"))
            row["quant_us"] = qz
        # ---- M = 1
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        ref = x.float() @ wd.float().T
        g = {"bf16": bench(lambda: x @ w.T),
             "bnb": bench(lambda: bnb.matmul_4bit(x, bp.t(), quant_state=bqs)),
             "ours_dispatch": bench(lambda: mm.nf4_matmul(x, qw))}
        assert rel(bnb.matmul_4bit(x, bp.t(), quant_state=bqs), ref) < 1e-2
        for cfg, lut in itertools.product(GEMV, (0, 1, 2)):
            c = with_split(dict(cfg, LUT=lut), "gemv2", 1, N, K)
            f = lambda: mm.nf4_matmul_fused(x, qw, path="gemv2", config=c)  # noqa: E731
            e = rel(f(), ref)
            assert e < 1e-2, (tag, c, e)
            g[json.dumps(c, sort_keys=True)] = bench(f)
        row["m1_us"] = g
        best = min((k for k in g if k.startswith("{")), key=g.get)
        print(f"{tag:>14} M=1 bf16 {g['bf16']:6.1f} bnb {g['bnb']:6.1f} old {g['ours_dispatch']:6.1f} best {g[best]:6.1f} "
              f"({wbytes / g[best] / 1e6 / copy_tb:.0%} copy) {best}", flush=True)
        # ---- M = 4, 16
        for M in (16,):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ wd.float().T
            s = {"bf16": bench(lambda: x @ w.T),
                 "bnb": bench(lambda: bnb.matmul_4bit(x, bp.t(), quant_state=bqs)),
                 "ours_dispatch": bench(lambda: mm.nf4_matmul(x, qw))}
            for cfg, lut in itertools.product(SWAP, (1, 2)):
                c = with_split(dict(cfg, LUT=lut), "swap", M, N, K)
                f = lambda: mm.nf4_matmul_fused(x, qw, path="swap", config=c)  # noqa: E731
                e = rel(f(), ref)
                assert e < 1e-2, (tag, M, c, e)
                s[json.dumps(c, sort_keys=True)] = bench(f)
            row[f"m{M}_us"] = s
            best = min((k for k in s if k.startswith("{")), key=s.get)
            print(f"{tag:>14} M={M} bf16 {s['bf16']:6.1f} bnb {s['bnb']:6.1f} old {s['ours_dispatch']:6.1f} "
                  f"best {s[best]:6.1f} {best}", flush=True)
        bd = min(v for k, v in deq.items() if k != "bnb")
        print(f"{tag:>14} dequant best {bd:6.1f} us ({wd.numel() * 2.5 / bd / 1e6 / copy_tb:.0%} copy) "
              f"{min((k for k in deq if k != 'bnb'), key=deq.get)} bnb {deq['bnb']:6.1f}", flush=True)
        if not dq:
            bq = min(v for k, v in row["quant_us"].items() if k != "bnb")
            print(f"{tag:>14} quant best {bq:6.1f} us {min((k for k in row['quant_us'] if k != 'bnb'), key=row['quant_us'].get)}"
                  f" bnb {row['quant_us']['bnb']:6.1f} ({row['quant_us']['bnb'] / bq:.2f}x)", flush=True)
        res["rows"].append(row)
        json.dump(res, open(args.out, "w"), indent=1)
        del w, qw, wd, out
        torch.cuda.empty_cache()
    res["seconds"] = time.time() - t0
    json.dump(res, open(args.out, "w"), indent=1)
    print(f"done in {res['seconds']:.0f} s")


if __name__ == "__main__":
    main()
