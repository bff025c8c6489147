"""Kernel-only times: the small-M NF4 matmuls, dequantize and quantize replayed from CUDA graphs, ours and
bitsandbytes alike, beside the plain do_bench times (which include each call's host dispatch).

    python benchmarks/diag/graph_decode.py --out graph_decode.json      # one GPU, about a minute

benchmarks/kernels.py times each call as launched from Python, so where a kernel runs for less time than its
host dispatch (small weights, M <= 16) it measures the host. Decoding engines replay CUDA graphs, which removes
the host from the loop for both stacks; this script measures that case (triton.testing.do_bench_cudagraph,
median) so that the kernels themselves can be compared. Every variant is checked first (matmuls within 1e-2
relative Frobenius error of a float32 product; dequantize bit-equal to bitsandbytes).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
sys.path.insert(0, ROOT)

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="graph_decode.json")
    ap.add_argument("--ms", default="1,4,16")
    ap.add_argument("--commit", default=os.environ.get("BENCH_COMMIT", "unknown"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("graph_decode.py needs a CUDA GPU")
        return 0
    import bitsandbytes as bnb
    import bitsandbytes.functional as bF
    from triton.testing import do_bench, do_bench_cudagraph

    import kernels
    import importlib

    mm = importlib.import_module("kernels.nf4_matmul")

    def t_plain(fn):
        return do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3

    def t_graph(fn):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        try:
            return do_bench_cudagraph(fn, rep=25, return_mode="median") * 1e3
        except Exception as e:  # noqa: BLE001
            return f"{type(e).__name__}: {str(e)[:200]}"

    def rel(y, ref):
        return float((y.float() - ref).norm() / ref.norm())

    rows, fails = [], []
    ms = [int(m) for m in a.ms.split(",")]
    for dq in (False, True):
        for n, k in SHAPES:
            tag = f"{n}x{k}{' DQ' if dq else ''}"
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            qw = kernels.quantize_weight(w, 64, "nf4", dq)
            bp, bqs = bF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
            wd = kernels.dequantize_weight(qw, torch.bfloat16)
            if not torch.equal(wd.view(torch.int16), bF.dequantize_4bit(bp, bqs, blocksize=64,
                                                                        quant_type="nf4").view(torch.int16)):
                fails.append(f"dequantize {tag}")
            out = torch.empty_like(wd)
            r = dict(op="dequantize", shape=tag)
            for name, fn in (("ours", lambda: kernels.dequantize_weight(qw, torch.bfloat16, out=out)),
                             ("bnb", lambda: bF.dequantize_4bit(bp, bqs, blocksize=64, quant_type="nf4"))):
                r[f"{name} plain"], r[f"{name} graph"] = t_plain(fn), t_graph(fn)
            rows.append(r)
            print(r, flush=True)
            for m in ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ wd.float().T            # the NF4 weight's product
                dense_ref = x.float() @ w.float().T       # the bf16 weight's (cuBLAS on w is the peer)
                r = dict(op="matmul", shape=tag, M=m, weight_bytes=qw.nbytes())
                for name, fn in (("ours", lambda: mm.nf4_matmul(x, qw)),
                                 ("bnb", lambda: bnb.matmul_4bit(x, bp.t(), quant_state=bqs)),
                                 ("bf16", lambda: x @ w.T)):
                    e = rel(fn(), dense_ref if name == "bf16" else ref)
                    if e > 1e-2:
                        fails.append(f"{name} {tag} M={m}: {e:.2e}")
                    r[f"{name} plain"], r[f"{name} graph"] = t_plain(fn), t_graph(fn)
                rows.append(r)
                print({k2: (round(v, 2) if isinstance(v, float) else v) for k2, v in r.items()}, flush=True)
            del w, qw, bp, bqs, wd, out
            torch.cuda.empty_cache()
    res = dict(gpu=torch.cuda.get_device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               commit=a.commit, torch=torch.__version__, bitsandbytes=bnb.__version__, failures=fails, rows=rows,
               chosen_paths={str(k): v for k, v in mm.chosen_paths().items()})
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)

    def f(v):
        return f"{v:7.1f}" if isinstance(v, float) else "   err"
    print(f"\n{'weight':>14} {'M':>3} | {'ours':>7} {'bnb':>7} {'bf16':>7} (graph us) | ours/bnb speedup graph (plain)"
          " | ours weight TB/s (graph)")
    for r in rows:
        if r["op"] != "matmul":
            continue
        og, bg = r["ours graph"], r["bnb graph"]
        sp = bg / og if isinstance(og, float) and isinstance(bg, float) else float("nan")
        print(f"{r['shape']:>14} {r['M']:>3} | {f(og)} {f(bg)} {f(r['bf16 graph'])} | {sp:5.2f}x "
              f"({r['bnb plain'] / r['ours plain']:5.2f}x) | "
              f"{r['weight_bytes'] / (og * 1e-6) / 1e12 if isinstance(og, float) else float('nan'):5.2f}")
    for r in rows:
        if r["op"] == "dequantize":
            print(f"dequantize {r['shape']:>14}: ours {f(r['ours graph'])} bnb {f(r['bnb graph'])} us (graph); "
                  f"plain {r['ours plain']:.1f} / {r['bnb plain']:.1f}")
    print(f"failures: {fails}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
