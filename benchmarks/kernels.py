"""NF4 kernel benchmark: ours vs bitsandbytes 0.50 vs bf16 cuBLAS, in one run on one GPU.

    python benchmarks/kernels.py [--quick] [--out-dir benchmarks/results] [--commit ID]
    python benchmarks/kernels.py --report benchmarks/results/kernels-<gpu>.json   # table + plot again

Weight shapes [out, in] of Llama-2-7B/70B, M in {1, 4, 16, 64, 256, 4096, 8192}, blocksize 64, NF4,
double quantization off and on, bf16. Every timed variant is checked first (bit equality for
quantize/dequantize against bitsandbytes, relative Frobenius error against a float32 matmul for the
matmuls). Times: each variant of a row (ours, bitsandbytes, bf16 cuBLAS) gets a triton.testing.do_bench
median in each of 2 rounds over the row, and keeps its fastest (bench_all). The device-to-device copy bandwidth
is measured in the same run and is the ceiling for the memory-bound targets.

Writes <out-dir>/kernels-<gpu>.json ({gpu, date, commit, copy_tb_s, rows, targets}) and
<out-dir>/kernels-<gpu>.md (the README table).
"""
import argparse
import datetime
import json
import os
import subprocess
import sys

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402
import importlib  # noqa: E402

mm = importlib.import_module("kernels.nf4_matmul")

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192), (28672, 8192), (8192, 28672)]
MS = [1, 4, 16, 64, 256, 4096, 8192]
BLOCKSIZE = 64


def bench(fn):
    return do_bench(fn, warmup=5, rep=20, return_mode="median") * 1e3  # microseconds


ROUNDS = 2  # every variant of a row is timed once per round, rounds in sequence; the result is its fastest median


def bench_graph(fn):
    """Microseconds per call replayed from a CUDA graph (median; no L2 flush between replays: weights of
    8-23 MB stay in the H100/H200's 50-60 MB L2, the 70B ones do not); nan where fn cannot be captured."""
    try:
        return do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3
    except Exception:
        return float("nan")


def bench_all(fns: dict) -> dict:
    """{name: microseconds}: the fastest of ROUNDS medians, the variants interleaved round by round, so that a
    burst of contention on a shared GPU host (seen on an H100: one variant of a row 2-4x its own other rounds)
    does not decide a ratio; a variant that raises is NaN."""
    out = {name: float("inf") for name in fns}
    for _ in range(ROUNDS):
        for name, fn in fns.items():
            try:
                out[name] = min(out[name], bench(fn))
            except Exception:  # noqa: BLE001 -- the caller's correctness check reports it
                out[name] = float("nan")
    return out


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def copy_bandwidth():
    a = torch.randn(256 * 2**20, device="cuda", dtype=torch.bfloat16)  # 512 MiB
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a))
    return 2 * a.numel() * 2 / (t * 1e-6) / 1e12  # TB/s, read + write


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="two shapes, M in {1, 16, 4096}")
    ap.add_argument("--fused-max-m", type=int, default=256,
                    help="time the fused GEMM / grad_x kernels up to this M (they lose to dequantize + cuBLAS)")
    ap.add_argument("--shapes", default="", help="comma-separated NxK subset, e.g. 4096x4096,28672x8192")
    ap.add_argument("--commit", default="", help="commit id to record where the tree has no .git (device runs)")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    import bitsandbytes as bnb
    import bitsandbytes.functional as bF

    shapes = SHAPES[:2] if args.quick else SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
    ms = [1, 16, 4096] if args.quick else MS
    torch.manual_seed(0)
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    copy_tb = copy_bandwidth()
    print(f"# {gpu}  copy {copy_tb:.2f} TB/s  torch {torch.__version__} triton {triton.__version__} "
          f"bnb {bnb.__version__}", flush=True)
    rows, failures = [], []

    def check(ok, what):
        if not ok:
            failures.append(what)
            print("CHECK FAILED:", what, flush=True)

    for (N, K) in shapes:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        n = N * K
        for dq in (False, True):
            tag = f"{N}x{K}{' DQ' if dq else ''}"
            # ---- quantize ---------------------------------------------------------------------
            qw = kernels.quantize_weight(w, BLOCKSIZE, "nf4", dq)
            bp, bqs = bF.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=dq, quant_type="nf4")
            ok = bits_equal(qw.packed, bp)
            if dq:
                ok &= (bits_equal(qw.nested.q, bqs.absmax) and bits_equal(qw.nested.absmax2, bqs.state2.absmax)
                       and float(qw.nested.offset) == float(bqs.offset))
            else:
                ok &= bits_equal(qw.absmax, bqs.absmax)
            check(ok, f"quantize {tag} bit-exact vs bnb")
            t = bench_all({"ours": lambda: kernels.quantize_weight(w, BLOCKSIZE, "nf4", dq),
                           "bnb": lambda: bF.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=dq,
                                                           quant_type="nf4")})
            t_q, t_bq = t["ours"], t["bnb"]
            rows.append(dict(op="quantize", shape=tag, dq=dq, ours_us=t_q, bnb_us=t_bq, speedup=t_bq / t_q))
            # ---- dequantize -------------------------------------------------------------------
            out = torch.empty(N, K, device="cuda", dtype=torch.bfloat16)
            d = kernels.dequantize_weight(qw, torch.bfloat16, out=out)
            bd = bF.dequantize_4bit(bp, bqs, blocksize=BLOCKSIZE, quant_type="nf4")
            check(bits_equal(d, bd), f"dequantize {tag} bit-exact vs bnb")
            # a device copy that moves the same bytes (2.5 per weight: read 1.25, write 1.25), in the same rounds:
            # the ceiling at this size, launch and ramp included (the 512 MiB copy_tb is the asymptotic one)
            csrc = torch.empty(n * 5 // 8, device="cuda", dtype=torch.uint16)
            cdst = torch.empty_like(csrc)
            t = bench_all({"ours": lambda: kernels.dequantize_weight(qw, torch.bfloat16, out=out),
                           "bnb": lambda: bF.dequantize_4bit(bp, bqs, blocksize=BLOCKSIZE, quant_type="nf4"),
                           "copy": lambda: cdst.copy_(csrc)})
            t_d, t_bd = t["ours"], t["bnb"]
            del csrc, cdst
            bw = n * 2.5 / (t_d * 1e-6) / 1e12
            rows.append(dict(op="dequantize", shape=tag, dq=dq, ours_us=t_d, bnb_us=t_bd, tb_s=bw,
                             frac_copy=bw / copy_tb, bnb_frac_copy=n * 2.5 / (t_bd * 1e-6) / 1e12 / copy_tb,
                             copy_same_bytes_us=t["copy"], frac_same_size_copy=t["copy"] / t_d))
            print(f"{tag:>14} quantize {t_q:8.1f} us (bnb {t_bq:8.1f}, {t_bq / t_q:5.2f}x)  dequantize "
                  f"{t_d:7.1f} us = {bw:.2f} TB/s {bw / copy_tb:.0%} (bnb {t_bd:7.1f})", flush=True)
            wd = d  # the dequantized bf16 weight, the math every matmul variant computes with
            wbytes = qw.nbytes()
            # ---- matmuls ----------------------------------------------------------------------
            for M in ms:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
                ref = x.float() @ wd.float().T
                gref = g.float() @ wd.float()
                fwd = {"ours": lambda: mm.nf4_matmul(x, qw),
                       "dequant+cublas": lambda: mm.nf4_matmul_dequant(x, qw)}
                if M == 1:
                    fwd["fused-gemv3"] = lambda: mm.nf4_matmul_fused(x, qw, path="gemv3")
                    cfg3 = dict(mm._v2_default("gemv3", 1, N, K, BLOCKSIZE), PREFETCH=True)
                    fwd["fused-gemv3-prefetch"] = lambda: mm.nf4_matmul_fused(x, qw, path="gemv3", config=cfg3)
                    fwd["fused-gemv2"] = lambda: mm.nf4_matmul_fused(x, qw, path="gemv2")
                    cfg = dict(mm._v2_default("gemv2", 1, N, K, BLOCKSIZE), XSPLIT=0)
                    fwd["fused-gemv2-strided-x"] = lambda: mm.nf4_matmul_fused(x, qw, path="gemv2", config=cfg)
                    cfg2 = dict(cfg, XSPLIT=2)
                    fwd["fused-gemv2-presplit-x"] = lambda: mm.nf4_matmul_fused(x, qw, path="gemv2", config=cfg2)
                if M <= 16:
                    fwd["fused-mma"] = lambda: mm.nf4_matmul_fused(x, qw, path="mma")
                if 1 < M <= 16:
                    fwd["fused-swap"] = lambda: mm.nf4_matmul_fused(x, qw, path="swap")
                if 16 < M <= args.fused_max_m:  # the fused GEMM is 5-50x slower than cuBLAS above this (README)
                    fwd["fused-gemm"] = lambda: mm.nf4_matmul_fused(x, qw, path="gemm")
                fwd["bnb"] = lambda: bnb.matmul_4bit(x, bp.t(), quant_state=bqs)
                bwd = {"ours": lambda: mm.nf4_matmul_t(g, qw),
                       "dequant+cublas": lambda: mm.nf4_matmul_t_dequant(g, qw)}
                if M <= args.fused_max_m:
                    bwd["fused"] = lambda: mm.nf4_matmul_t_fused(g, qw)
                timed = {}
                for kind, fns, want in (("fwd", fwd, ref), ("bwd", bwd, gref)):
                    for name, fn in fns.items():
                        try:
                            e = rel_err(fn(), want)
                            check(e < 1e-2, f"{kind} {tag} M={M} {name}: rel err {e:.2e}")
                            timed[f"{kind} {name}"] = fn
                        except Exception as ex:  # keep measuring the other variants
                            check(False, f"{kind} {tag} M={M} {name}: {type(ex).__name__}: {str(ex)[:300]}")
                # bf16 cuBLAS in the same rounds as ours (DQ rows time it again: the ratio's two sides come from
                # the same minutes)
                timed["fwd bf16"] = lambda: x @ w.T
                timed["bwd bf16"] = lambda: g @ w
                t = bench_all(timed)
                res = {f"{kind} {name}": t.get(f"{kind} {name}", float("nan"))
                       for kind, fns in (("fwd", fwd), ("bwd", bwd)) for name in fns}
                res["fwd bf16"], res["bwd bf16"] = t["fwd bf16"], t["bwd bf16"]
                if M <= 16:  # decode runs under CUDA graphs: the GPU's time without the host's, next to do_bench's
                    for name, fn in (("ours", fwd["ours"]), ("bnb", fwd["bnb"]), ("bf16", timed["fwd bf16"])):
                        res[f"graph fwd {name}"] = bench_graph(fn)
                row = dict(op="matmul", shape=tag, dq=dq, M=M, weight_bytes=wbytes, **res,
                           weight_tb_s=wbytes / (res["fwd ours"] * 1e-6) / 1e12)
                rows.append(row)
                print(f"{tag:>14} M={M:5d} " + "  ".join(f"{k} {v:8.1f}" for k, v in res.items()), flush=True)
                del x, g, ref, gref
            del qw, bp, bqs, out, d, bd
            torch.cuda.empty_cache()

            save(args, gpu, copy_tb, rows, failures, bnb)  # after every shape: a timeout keeps what was measured
    md = save(args, gpu, copy_tb, rows, failures, bnb)
    print(md)
    print(f"check failures: {len(failures)}")


def save(args, gpu, copy_tb, rows, failures, bnb):
    targets = make_targets(rows, copy_tb)
    commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip()
    result = dict(gpu=torch.cuda.get_device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                  commit=commit, torch=torch.__version__, triton=triton.__version__, bitsandbytes=bnb.__version__,
                  copy_tb_s=copy_tb, blocksize=BLOCKSIZE,
                  timing=f"fastest of {ROUNDS} interleaved do_bench medians (warmup 5 ms, rep 20 ms) per variant",
                  chosen_paths={str(k): v for k, v in mm.chosen_paths().items()},
                  check_failures=failures, targets=targets, targets_graph=graph_targets(rows, copy_tb), rows=rows)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, f"kernels-{gpu}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(os.path.join(args.out_dir, f"kernels-{gpu}.md"), "w") as f:
        f.write(md)
    return md


def make_targets(rows, copy_tb):
    def sel(op, **kw):
        return [r for r in rows if r["op"] == op and all(r.get(k) == v for k, v in kw.items())]
    t = []

    def add(name, values, goal, higher_better, detail):
        if not values:
            return
        worst = min(values) if higher_better else max(values)
        t.append(dict(name=name, measured=round(worst, 3), goal=goal,
                      met=bool(worst >= goal if higher_better else worst <= goal), worst_of=detail))
    add("dequantize bandwidth / copy bandwidth (worst shape, DQ off and on)",
        [r["frac_copy"] for r in sel("dequantize")], 0.90, True, "shapes x DQ")
    add("quantize speedup vs bitsandbytes (worst shape, DQ off and on)",
        [r["speedup"] for r in sel("quantize")], 5.0, True, "shapes x DQ")
    m1 = sel("matmul", M=1)
    add("matmul M=1 speedup vs bitsandbytes matmul_4bit", [r["fwd bnb"] / r["fwd ours"] for r in m1], 2.5, True,
        "shapes x DQ")
    add("matmul M=1 weight bytes / copy bandwidth", [r["weight_tb_s"] / copy_tb for r in m1], 0.70, True,
        "shapes x DQ")
    add("matmul M=16 speedup vs bf16 cuBLAS", [r["fwd bf16"] / r["fwd ours"] for r in sel("matmul", M=16)],
        2.5, True, "shapes x DQ")
    m4k = sel("matmul", M=4096)
    add("matmul forward M=4096 time / bf16 cuBLAS", [r["fwd ours"] / r["fwd bf16"] for r in m4k], 1.03, False,
        "shapes x DQ")
    add("matmul backward (grad_x) M=4096 time / bf16 cuBLAS", [r["bwd ours"] / r["bwd bf16"] for r in m4k], 1.03,
        False, "shapes x DQ")
    return t


def graph_targets(rows, copy_tb):
    """The decode targets again from CUDA-graph times (GPU time without the host's; informational: the
    targets of record are the do_bench ones, which include each call's host time)."""
    t = []
    for name, M, f, goal in (("matmul M=1 speedup vs bitsandbytes matmul_4bit (CUDA graph)", 1,
                              lambda r: r["graph fwd bnb"] / r["graph fwd ours"], 2.5),
                             ("matmul M=1 weight bytes / copy bandwidth (CUDA graph, 70B shapes: weights beyond L2)", 1,
                              lambda r: r["weight_bytes"] / (r["graph fwd ours"] * 1e-6) / 1e12 / copy_tb
                              if r["weight_bytes"] > 64 * 2**20 else None, 0.70),
                             ("matmul M=16 speedup vs bf16 cuBLAS (CUDA graph)", 16,
                              lambda r: r["graph fwd bf16"] / r["graph fwd ours"], 2.5)):
        vals = [v for v in (f(r) for r in rows if r["op"] == "matmul" and r["M"] == M and "graph fwd ours" in r)
                if v is not None and v == v]
        if vals:
            t.append(dict(name=name, measured=round(min(vals), 3), goal=goal, met=bool(min(vals) >= goal),
                          worst_of="shapes x DQ"))
    return t


def markdown(res):
    lines = [f"Measured on {res['gpu']} ({res['date'][:10]}, commit {res['commit']}, torch {res['torch']}, "
             f"triton {res['triton']}, bitsandbytes {res['bitsandbytes']}); device copy "
             f"{res['copy_tb_s']:.2f} TB/s. {res.get('timing', 'do_bench medians')}; microseconds, bf16, blocksize 64.",
             "", "| target | measured (worst case) | goal | met |", "|---|---|---|---|"]
    for t in res["targets"] + res.get("targets_graph", []):
        lines.append(f"| {t['name']} | {t['measured']} | {t['goal']} | {'yes' if t['met'] else 'no'} |")
    lines += ["", "| weight | quantize ours / bnb | dequantize ours / bnb (ours % of copy) | same-bytes copy (its time / "
              "ours) |", "|---|---|---|---|"]
    q = {r["shape"]: r for r in res["rows"] if r["op"] == "quantize"}
    for r in res["rows"]:
        if r["op"] == "dequantize":
            qq = q[r["shape"]]
            same = f"{r['copy_same_bytes_us']:.1f} ({r['frac_same_size_copy']:.0%})" if "copy_same_bytes_us" in r \
                else "-"
            lines.append(f"| {r['shape']} | {qq['ours_us']:.1f} / {qq['bnb_us']:.1f} | {r['ours_us']:.1f} / "
                         f"{r['bnb_us']:.1f} ({r['frac_copy']:.0%}) | {same} |")
    lines += ["", "| weight | M | fwd ours | fwd fused | fwd bnb | fwd bf16 | bwd ours | bwd fused | bwd bf16 | "
              "CUDA graph fwd: ours / bnb / bf16 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["op"] == "matmul":
            fv = [v for k, v in r.items() if k.startswith("fwd fused")]
            fused = f"{min(fv):.1f}" if fv else "-"
            bfused = f"{r['bwd fused']:.1f}" if "bwd fused" in r else "-"
            graph = " / ".join(f"{r[k]:.1f}" for k in ("graph fwd ours", "graph fwd bnb", "graph fwd bf16")) \
                if "graph fwd ours" in r else "-"
            lines.append(f"| {r['shape']} | {r['M']} | {r['fwd ours']:.1f} | {fused} | {r['fwd bnb']:.1f} | "
                         f"{r['fwd bf16']:.1f} | {r['bwd ours']:.1f} | {bfused} | {r['bwd bf16']:.1f} | {graph} |")
    return "\n".join(lines) + "\n"


def plot(res, png_path):
    """Time relative to bf16 cuBLAS (forward) per weight shape and M: ours, best fused kernel, bitsandbytes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in res["rows"] if r["op"] == "matmul" and not r["dq"]]
    shapes = sorted({r["shape"] for r in rows}, key=lambda s: [int(v) for v in s.split("x")])
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.2 * len(shapes), 3.4), sharey=True)
    for ax, shape in zip(axes, shapes):
        rs = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["M"])
        ms = [r["M"] for r in rs]
        for key, label in (("fwd ours", "ours (dispatch)"), ("fwd bnb", "bitsandbytes")):
            ax.plot(ms, [r[key] / r["fwd bf16"] for r in rs], marker="o", label=label)
        fr = [(r["M"], min(v for k, v in r.items() if k.startswith("fwd fused")) / r["fwd bf16"]) for r in rs
              if any(k.startswith("fwd fused") for k in r)]
        ax.plot([m for m, _ in fr], [v for _, v in fr], marker="x", label="best fused kernel")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(shape, fontsize=9)
        ax.set_xlabel("M (rows of x)")
    axes[0].set_ylabel("time / bf16 cuBLAS (x @ W.T)")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"NF4 matmul forward, {res['gpu']}, blocksize 64, no double quant", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--report":   # re-render the table and plot of a results file
        res = json.load(open(sys.argv[2]))
        base = os.path.splitext(sys.argv[2])[0]
        open(base + ".md", "w").write(markdown(res))
        plot(res, base + ".png")
    else:
        main()
