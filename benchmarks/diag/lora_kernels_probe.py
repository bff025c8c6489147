"""The LoRA A-side kernels with fused dropout (llama.fast_path: xa, dA, dx) at a 4 x 2048-token step's shapes, on
a GPU (diagnostic): each fused config and the split path (dropout pass, then cuBLAS), at 10 Philox rounds (the
default; --rounds 10,7,0 adds 7 and 0, no mixing: what the mask costs), with and without keep codes (xa stores the
mask as codes, dA and dx read them instead of running Philox), against cuBLAS without dropout and a copy of x.

    python benchmarks/diag/lora_kernels_probe.py [--out lora_kernels.json]
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
import triton  # noqa: E402

import llama.fast_path as fp  # noqa: E402


def us(fn):
    return round(triton.testing.do_bench(fn, warmup=10, rep=40) * 1e3, 1)


def problem(N, K, R, dev, dt):
    """x (N, K), A (R, K), dxa (N, R) and a gradient dx (N, K), random, on the device."""
    return (torch.randn(N, K, device=dev, dtype=dt), torch.randn(R, K, device=dev, dtype=dt) / K ** 0.5,
            torch.randn(N, R, device=dev, dtype=dt), torch.randn(N, K, device=dev, dtype=dt))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--rounds", type=lambda v: [int(r) for r in v.split(",")], default=[10],
                    help="Philox rounds to time, comma-separated (10 is the library's; 0 shows the mask's cost)")
    ap.add_argument("--sweep", action="store_true", help="time a grid of block configs per op (10 rounds) instead")
    ap.add_argument("--per-sm", type=lambda v: [int(m) for m in v.split(",")], default=None,
                    help="with --sweep: xa only, its kept configs at these programs-per-SM targets (e.g. 2,4,8,16)")
    a = ap.parse_args()
    if a.sweep:
        return sweep(a)
    dev, dt, R, p, seed = torch.device("cuda"), torch.bfloat16, 64, 0.1, 1234
    N = a.rows
    res = dict(gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               rows=N, r=R, p=p, results=[])
    for K in (4096, 11008):
        x, A, d, dx = problem(N, K, R, dev, dt)
        ref = dict(copy_x=us(lambda: x.clone()), xAt_cublas=us(lambda: x @ A.t()),
                   dAt_cublas=us(lambda: d.t() @ x), dxA_cublas_add=us(lambda: dx.addmm_(d, A)),
                   torch_dropout=us(lambda: torch.nn.functional.dropout(x, p)))
        row = dict(K=K, x_mib=round(x.numel() * 2 / 2**20, 1), ref_us=ref, ops={})
        kc = fp.keep_codes(N, K, dev)
        fp._dropout_triton(x, p, seed, kc_out=kc)
        for rounds in a.rounds:
            fp.PHILOX_ROUNDS = rounds
            for op in ("xa", "da", "dx"):
                fused, cfgs, split = fp._OPS[op]
                t = {}
                for codes in (None, kc):
                    tag = "" if codes is None else "+kc"       # xa writes the keep codes, dA / dx read them
                    args = fp.op_args(op, x, A, d, dx, p, seed, 0, codes)
                    for i, cfg in enumerate(cfgs):
                        t[f"fused{i}{tag}"] = us(lambda c=cfg: fused(*args, c))
                    t["split" + tag] = us(lambda: split(*args))
                t["dropout_pass"] = us(lambda: fp._dropout_triton(x, p, seed))
                t["dropout_pass+kc_in"] = us(lambda: fp._dropout_triton(x, p, seed, kc_in=kc))
                row["ops"][f"{op} rounds={rounds}"] = t
                print(K, op, rounds, t, flush=True)
        fp.PHILOX_ROUNDS = 10
        res["results"].append(row)
        print(K, "ref", ref, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    print("\n     K op/rounds       fused  split  fused+kc  split+kc  (us, best config; references per K below)")
    for row in res["results"]:
        print(row["K"], "ref", row["ref_us"])
        for k, t in row["ops"].items():
            f = min(v for n, v in t.items() if n.startswith("fused") and not n.endswith("+kc"))
            fk = min(v for n, v in t.items() if n.startswith("fused") and n.endswith("+kc"))
            print(f"{row['K']:6d} {k:14s} {f:7.1f} {t['split']:6.1f} {fk:8.1f} {t['split+kc']:8.1f}")


def sweep(a):
    """Every (BM, BQ, num_warps, num_stages) of a small grid per op and K, at 10 rounds; the fastest first."""
    import itertools
    dev, dt, R, p, seed, N = torch.device("cuda"), torch.bfloat16, 64, 0.1, 1234, a.rows
    res = dict(gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               rows=N, r=R, p=p, sweep={})
    grid = list(itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (1, 2, 3)))
    if a.per_sm:                 # xa only: programs per SM (its split-K count), on the kept configs
        grid = [(c["BM"], c["BQ"], c["num_warps"], c["num_stages"], m) for c in fp._XA_CONFIGS for m in a.per_sm]
    for K in (4096, 11008):
        x, A, d, dx = problem(N, K, R, dev, dt)
        for op in ("xa", "da", "dx"):
            fused = fp._OPS[op][0]
            t = {}
            if a.per_sm and op != "xa":
                continue
            for BM, BQ, w, st, *m in grid:
                if BM * BQ > 8192 or (op == "xa" and BM == 32 and BQ == 32):
                    continue
                cfg = dict(BM=BM, BQ=BQ, num_warps=w, num_stages=st, **({"PER_SM": m[0]} if m else {}))
                args = fp.op_args(op, x, A, d, dx, p, seed, 0, None)
                fn = lambda: fused(*args, cfg)  # noqa: E731
                try:
                    t[",".join(map(str, (BM, BQ, w, st, *m)))] = us(fn)
                except Exception as e:  # noqa: BLE001
                    t[",".join(map(str, (BM, BQ, w, st, *m)))] = repr(e)[:80]
            best = sorted((v, k) for k, v in t.items() if isinstance(v, float))[:6]
            res["sweep"][f"{op} K={K}"] = dict(best=best, all=t)
            print(op, K, "best (us, BM,BQ,warps,stages[,per SM]):", best, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
