"""Tile layouts of the NF4 quantize kernel (diagnostic, one GPU run, well under a minute on an H100).

For each weight shape (bf16, blocksize 64, nf4) it checks every variant of kernels/quantize.py at every
(rows, num_warps) config bit for bit against the current kernel ("reshape" at its default config), then
times with triton.testing.do_bench (median, after warm-up): the current kernel, each variant at each
config, bitsandbytes' quantize_4bit when installed, and a device copy (clone of the same bf16 tensor) as
the bandwidth reference. Effective bandwidth counts the bytes the quantizer must move: n * 2 read,
n / 2 codes and n / 64 * 4 absmax written; the copy moves 2 * n * 2.

    python benchmarks/diag/quantize_variants.py [--out PATH] [--quick]      # GPU
    python benchmarks/diag/quantize_variants.py --cpu-check                 # correctness only, interpreter

--out defaults to benchmarks/results/diag/quantize_variants-<gpu>.json. --cpu-check runs the correctness
part (and the table/JSON code, with single-run wall times that mean nothing) in Triton's CPU interpreter
on tiny shapes in float16 / float32 (and bfloat16 for the integer-only "words" kernel).
"""
import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = [(4096, 4096), (11008, 4096), (8192, 8192), (28672, 8192)]
CPU_SHAPES = [(37, 96), (64, 64), (33, 65)]  # tails, an odd element count
VARIANTS = ("reshape", "pairs", "words")
ROWS = (8, 16, 32)
WARPS = (2, 4, 8)
BLOCKSIZE, QUANT_TYPE = 64, "nf4"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None,
                    help="JSON path (default benchmarks/results/diag/quantize_variants-<gpu>.json)")
    ap.add_argument("--quick", action="store_true", help="two shapes, fewer configs")
    ap.add_argument("--cpu-check", action="store_true", help="bit-exactness only, in the Triton CPU interpreter")
    ap.add_argument("--shapes", default=None, help="comma-separated NxK list instead of the default shapes")
    ap.add_argument("--all-configs", action="store_true", help="sweep num_warps for the current kernel too")
    ap.add_argument("--budget-s", type=float, default=45.0,
                    help="stop timing new configs this many seconds after start (the run stays under a minute)")
    return ap.parse_args()


args = parse_args()
if args.cpu_check:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are decorated: before importing kernels/

import torch  # noqa: E402

if not args.cpu_check and not torch.cuda.is_available():
    sys.exit("quantize_variants: needs a CUDA GPU (use --cpu-check for the interpreter correctness check)")

# benchmarks/kernels.py would shadow the kernels package
sys.path = [p for p in sys.path if not os.path.abspath(p or ".").startswith(os.path.join(ROOT, "benchmarks"))]
sys.path.insert(0, ROOT)
import nf4  # noqa: E402
from kernels.quantize import _rows_for, quantize_4bit_triton, words_variant_applies  # noqa: E402


def git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:
        return None


def same_bits(a, b):
    return a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def timer(cpu):
    if cpu:
        def measure(fn):
            fn()
            t = time.perf_counter()
            fn()
            return (time.perf_counter() - t) * 1e6
        return measure
    from triton.testing import do_bench

    def measure(fn):
        return do_bench(fn, warmup=5, rep=25, return_mode="median") * 1e3  # us
    return measure


def main():
    cpu = args.cpu_check
    device = "cpu" if cpu else "cuda"
    measure = timer(cpu)
    t0 = time.time()
    gpu = "cpu-interpreter" if cpu else torch.cuda.get_device_name()
    shapes = CPU_SHAPES if cpu else (SHAPES[:2] if args.quick else SHAPES)
    if args.shapes:
        shapes = [tuple(int(v) for v in t.split("x")) for t in args.shapes.split(",")]
    rows_list, warps_list = ((8, 16), (4,)) if (args.quick or cpu) else (ROWS, WARPS)
    configs = [("reshape", _rows_for(BLOCKSIZE), 4)]  # the current kernel at its default config first
    sweep = [("reshape", r, w) for r, w in itertools.product(rows_list, warps_list if args.all_configs else (4,))]
    sweep += list(itertools.product(VARIANTS[1:], rows_list, warps_list))
    configs += [c for c in sweep if c != configs[0]]
    dtypes = (torch.float16, torch.float32, torch.bfloat16) if cpu else (torch.bfloat16,)
    try:
        import bitsandbytes.functional as bF
    except Exception as e:
        print(f"# bitsandbytes not importable ({e!r}): no bnb column"[:300])
        bF = None
    res = dict(gpu=gpu, commit=git_commit(), blocksize=BLOCKSIZE, quant_type=QUANT_TYPE, cpu_check=cpu,
               timer="single run (meaningless)" if cpu else "do_bench median, warmup 5 ms, rep 25 ms",
               rows=[])
    failures, broken = [], set()
    if not cpu:  # compile every config once, on a tensor with the big shapes' specializations (n % 16 == 0)
        tc = time.time()
        w = torch.randn(64, 1024, device=device).to(torch.bfloat16)
        for variant, rows, warps in configs:
            try:
                quantize_4bit_triton(w, BLOCKSIZE, QUANT_TYPE, rows=rows, num_warps=warps, variant=variant)
            except Exception as e:  # keep going: the other configs still tell something
                broken.add((variant, rows, warps))
                failures.append(f"compile {variant} rows={rows} warps={warps}: {type(e).__name__}: {e}"[:500])
        torch.cuda.synchronize()
        res["compile_s"] = time.time() - tc
        print(f"# compiled {len(configs)} configs in {res['compile_s']:.1f} s", flush=True)
    print(f"# {gpu}  commit {res['commit']}  blocksize {BLOCKSIZE} {QUANT_TYPE}", flush=True)
    print("# us: median per call (launch included); TB/s: (n*2 read + n/2 + absmax written) / time; /copy: that over"
          " the clone's TB/s;\n# x bnb: bitsandbytes time / this; vs cur: current kernel (reshape, default config)"
          " time / this; words>p: ran the pairs kernel (odd n)")
    print(f"{'shape':>12} {'dtype':>8} {'kernel':>8} {'rows':>4} {'warps':>5} {'us':>9} {'TB/s':>6} "
          f"{'/copy':>6} {'x bnb':>6} {'vs cur':>6}  exact", flush=True)
    for (N, K), dtype in itertools.product(shapes, dtypes):
        g = torch.Generator(device=device).manual_seed(N * K)
        x = (torch.randn(N, K, device=device, generator=g) * 0.02).to(dtype)
        if cpu:  # the special values the kernels must agree on
            x.view(-1)[[3, 70, 130]] = torch.tensor([float("nan"), float("inf"), 1e-40], dtype=dtype)
        n = x.numel()
        moved = n * x.element_size() + n // 2 + (-(-n // BLOCKSIZE)) * 4
        copy_us = measure(lambda: x.clone())
        copy_tb = 2 * n * x.element_size() / (copy_us * 1e-6) / 1e12
        bnb_us = None
        if bF is not None and not cpu and dtype == torch.bfloat16:
            try:
                bnb_us = measure(lambda: bF.quantize_4bit(x, blocksize=BLOCKSIZE, quant_type=QUANT_TYPE))
            except Exception as e:
                print(f"# bitsandbytes failed: {e!r}"[:300])
        interp_bf16 = cpu and dtype == torch.bfloat16  # the interpreter runs no bfloat16 arithmetic:
        if interp_bf16:                                  # only the integer-only words kernel, vs the reference
            ref_p, ref_a = nf4.quantize_4bit(x, BLOCKSIZE, QUANT_TYPE)
        else:
            ref_p, ref_a = quantize_4bit_triton(x, BLOCKSIZE, QUANT_TYPE)
        if cpu and not interp_bf16:  # the current kernel against the torch reference as well
            rp, ra = nf4.quantize_4bit(x, BLOCKSIZE, QUANT_TYPE)
            if not (same_bits(ref_p, rp) and same_bits(ref_a, ra)):
                failures.append(f"{N}x{K} {dtype} reshape vs nf4 reference")
        shape = dict(shape=f"{N}x{K}", N=N, K=K, dtype=str(dtype).replace("torch.", ""), copy_us=copy_us,
                     copy_tb_s=copy_tb, bnb_us=bnb_us, bytes_moved=moved, kernels=[])
        cur_us = None
        dt = shape["dtype"]
        print(f"{shape['shape']:>12} {dt:>8} {'copy':>8} {'':>4} {'':>5} {copy_us:9.1f} {copy_tb:6.2f} "
              f"{1:6.2f}", flush=True)
        if bnb_us is not None:
            print(f"{shape['shape']:>12} {dt:>8} {'bnb':>8} {'':>4} {'':>5} {bnb_us:9.1f} "
                  f"{moved / (bnb_us * 1e-6) / 1e12:6.2f} {moved / (bnb_us * 1e-6) / 1e12 / copy_tb:6.2f}", flush=True)
        for variant, rows, warps in configs:
            if interp_bf16 and (variant != "words" or not words_variant_applies(x)) or (variant, rows, warps) in broken:
                continue
            try:
                p, a = quantize_4bit_triton(x, BLOCKSIZE, QUANT_TYPE, rows=rows, num_warps=warps, variant=variant)
            except Exception as e:
                failures.append(f"{shape['shape']} {dt} {variant} rows={rows} warps={warps}: "
                                f"{type(e).__name__}: {e}"[:500])
                shape["kernels"].append(dict(variant=variant, rows=rows, num_warps=warps, error=repr(e)[:500],
                                             exact=False, us=None))
                continue
            exact = same_bits(p, ref_p) and same_bits(a, ref_a)
            if not exact:
                failures.append(f"{shape['shape']} {dt} {variant} rows={rows} warps={warps}")
            kernel = variant if variant != "words" or words_variant_applies(x) else "pairs"  # what ran
            row = dict(variant=variant, kernel=kernel, rows=rows, num_warps=warps, exact=exact, us=None)
            if time.time() - t0 < args.budget_s or (variant, rows, warps) == configs[0]:  # guard the minute
                us = measure(lambda: quantize_4bit_triton(x, BLOCKSIZE, QUANT_TYPE, rows=rows, num_warps=warps,
                                                          variant=variant))
                if (variant, rows, warps) == configs[0]:
                    cur_us = us
                tb = moved / (us * 1e-6) / 1e12
                row.update(us=us, tb_s=tb, frac_copy=tb / copy_tb, speedup_vs_bnb=bnb_us / us if bnb_us else None,
                           speedup_vs_current=cur_us / us if cur_us else None)
                xb = f"{bnb_us / us:6.2f}" if bnb_us else f"{'-':>6}"
                xc = f"{cur_us / us:6.2f}" if cur_us else f"{'-':>6}"
                name = variant if kernel == variant else f"{variant}>{kernel[0]}"
                print(f"{shape['shape']:>12} {dt:>8} {name:>8} {rows:4d} {warps:5d} {us:9.1f} {tb:6.2f} "
                      f"{tb / copy_tb:6.2f} {xb} {xc}  {'yes' if exact else 'NO'}", flush=True)
            shape["kernels"].append(row)
        timed = [k for k in shape["kernels"] if k["us"] is not None and k["exact"]]
        if timed:
            best = min(timed, key=lambda k: k["us"])
            shape["best"] = {k: best[k] for k in ("variant", "rows", "num_warps", "us")}
            vs = f" ({cur_us / best['us']:.2f}x the current kernel at its default)" if cur_us else ""
            print(f"{'':>12} best: {best['variant']} rows={best['rows']} warps={best['num_warps']} "
                  f"{best['us']:.1f} us{vs}", flush=True)
        res["rows"].append(shape)
    res["failures"] = failures
    res["elapsed_s"] = time.time() - t0
    if time.time() - t0 >= args.budget_s:
        res["note"] = f"timing budget of {args.budget_s} s hit: configs without 'us' were checked, not timed"
    out = args.out
    if out is None:
        tag = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_")
        out = (os.path.join(os.environ.get("TMPDIR", "/tmp"), "quantize_variants-cpu-check.json") if cpu else
               os.path.join(ROOT, "benchmarks", "results", "diag", f"quantize_variants-{tag}.json"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"# wrote {out} ({res['elapsed_s']:.1f} s)")
    if failures:
        print("FAILED (not bit-exact or not compiled):\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("all variants bit-exact with the current kernel")


if __name__ == "__main__":
    main()
