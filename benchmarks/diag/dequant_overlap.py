"""Does the NF4 dequantize overlap with cuBLAS when it runs on a side stream? (diagnostic, CUDA only)

A decoder layer's base linears each run "dequantize W into bf16, then cuBLAS". The dequantize is memory-bound
(~9 ms of a graphed 4 x 512 step on an H200), the GEMM compute-bound, so running the dequantize of the *next*
weight on a second stream while the current GEMM runs could hide part of it: the question is how much, given that
a GEMM's programs fill the SMs. This times one layer's seven linears (q, k, v, o, gate, up, down at Llama-2-7B
shapes), forward (x @ W^T) and backward (dy @ W) at each row count, three ways, each replayed from a CUDA graph
(no host time in the numbers):

    serial        dequantize W_i, GEMM W_i, in order, one stream (what the fast path does today)
    side          dequantize W_{i+1} on a side stream while GEMM W_i runs (two scratch buffers)
    side-hi       the same, the side stream at the highest priority (its programs are scheduled first)

and, as bounds, the GEMMs alone (bf16 weights already there) and the dequantizes alone. The "hidden" column is
the share of the dequantizes' time that overlap removed: (serial - side) / (serial - gemm only).

A second table asks the same of one GEMM (issue #3's forward at M = 4096): W's rows dequantized in c chunks, the
GEMM of chunk i (y^T[chunk i] = W[chunk i] @ x^T, a row block of y^T) running while chunk i+1 dequantizes on
the high-priority side stream, against dequantize-then-GEMM and the bf16 GEMM alone ("equal": y bit-equal to the
unchunked GEMM's, which cuBLAS need not give when N changes).

    python benchmarks/diag/dequant_overlap.py [--rows 2048,8192] [--out overlap.json]
"""
from __future__ import annotations

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

from kernels import dequantize_weight, quantize_weight  # noqa: E402

SHAPES = dict(q=(4096, 4096), k=(4096, 4096), v=(4096, 4096), o=(4096, 4096), gate=(11008, 4096),
              up=(11008, 4096), down=(4096, 11008))


def graphed(fn):
    """fn captured into a CUDA graph (after a warm-up call on a side stream); returns the replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def us(fn) -> float:
    return round(triton.testing.do_bench(fn, warmup=25, rep=100) * 1e3, 1)


def layer_fns(ws, qws, x, dys, backward, bufs, side, side_hi):
    """The four variants of one layer's linears as closures (outputs into preallocated tensors)."""
    names = list(SHAPES)
    outs = {n: torch.empty((x.shape[0], (SHAPES[n][1] if backward else SHAPES[n][0])), device=x.device,
                           dtype=x.dtype) for n in names}

    def gemm(n, w):
        if backward:
            torch.mm(dys[n], w, out=outs[n])
        else:
            torch.mm(x, w.t(), out=outs[n])

    def dq(n, buf):
        return dequantize_weight(qws[n], x.dtype, out=buf[:SHAPES[n][0] * SHAPES[n][1]].view(SHAPES[n]))

    def gemm_only():
        for n in names:
            gemm(n, ws[n])

    def dq_only():
        for i, n in enumerate(names):
            dq(n, bufs[i % 2])

    def serial():
        for i, n in enumerate(names):
            gemm(n, dq(n, bufs[0]))

    def overlapped(stream):
        def run():
            main = torch.cuda.current_stream()
            ready = [torch.cuda.Event() for _ in names]
            used = [torch.cuda.Event() for _ in names]
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                dq(names[0], bufs[0])
                ready[0].record()
            for i, n in enumerate(names):
                if i + 1 < len(names):
                    with torch.cuda.stream(stream):
                        if i >= 1:
                            stream.wait_event(used[i - 1])    # buffer (i + 1) % 2 was GEMM i-1's
                        dq(names[i + 1], bufs[(i + 1) % 2])
                        ready[i + 1].record()
                main.wait_event(ready[i])
                gemm(n, bufs[i % 2][:SHAPES[n][0] * SHAPES[n][1]].view(SHAPES[n]))
                used[i].record()
            main.wait_stream(stream)
        return run

    return dict(gemm_only=gemm_only, dequant_only=dq_only, serial=serial, side=overlapped(side),
                side_hi=overlapped(side_hi)), outs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=lambda v: [int(r) for r in v.split(",")], default=[2048, 8192])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    ws, qws = {}, {}
    for n, (o, i) in SHAPES.items():
        w = torch.randn(o, i, device=dev, dtype=dt) * 0.02
        qws[n] = quantize_weight(w, 64, "nf4", True)
        ws[n] = dequantize_weight(qws[n], dt)            # the GEMMs' bf16 weights: the same values
    big = max(o * i for o, i in SHAPES.values())
    bufs = [torch.empty(big, device=dev, dtype=dt) for _ in range(2)]
    lo, hi = torch.cuda.Stream.priority_range() if hasattr(torch.cuda.Stream, "priority_range") else (0, -1)
    side, side_hi = torch.cuda.Stream(), torch.cuda.Stream(priority=min(lo, hi))
    res = dict(gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               commit=os.environ.get("E2E_COMMIT", ""), rows={})
    lines = []
    for M in a.rows:
        x = torch.randn(M, 4096, device=dev, dtype=dt)
        dys = {n: torch.randn(M, SHAPES[n][0], device=dev, dtype=dt) for n in SHAPES}
        for backward in (False, True):
            fns, outs = layer_fns(ws, qws, x, dys, backward, bufs, side, side_hi)
            t, got = {}, {}
            for name, fn in fns.items():
                replay = graphed(fn)
                for o in outs.values():
                    o.zero_()
                replay()
                torch.cuda.synchronize()
                got[name] = [o.clone() for o in outs.values()]
                t[name] = us(replay)
            # the overlapped variants give the serial outputs bit for bit (same kernels, same buffers' values)
            bad = [n for n in ("side", "side_hi") if not all(torch.equal(p, q) for p, q in zip(got[n], got["serial"]))]
            if bad:
                raise SystemExit(f"dequant_overlap: {bad} differ from the serial outputs at {M} rows")
            dq_cost = t["serial"] - t["gemm_only"]
            row = dict(t, hidden_side=round((t["serial"] - t["side"]) / dq_cost, 3) if dq_cost > 0 else None,
                       hidden_side_hi=round((t["serial"] - t["side_hi"]) / dq_cost, 3) if dq_cost > 0 else None)
            key = f"M={M} {'backward' if backward else 'forward'}"
            res["rows"][key] = row
            lines.append(f"{key:>18}: gemm {t['gemm_only']:8.1f}  dequant {t['dequant_only']:7.1f}  serial "
                         f"{t['serial']:8.1f}  side {t['side']:8.1f} ({row['hidden_side']})  side-hi "
                         f"{t['side_hi']:8.1f} ({row['hidden_side_hi']}) us/layer")
            print(lines[-1], flush=True)
    res["check"] = "side and side_hi outputs bit-equal to serial at every row count"
    res["chunked"] = {}
    M = 4096
    for (N, K) in ((4096, 4096), (11008, 4096), (28672, 8192)):
        w = torch.randn(N, K, device=dev, dtype=dt) * 0.02
        qw = quantize_weight(w, 64, "nf4", True)
        wd = dequantize_weight(qw, dt)
        x = torch.randn(M, K, device=dev, dtype=dt)
        y = torch.empty(N, M, device=dev, dtype=dt)        # y^T: each chunk's output is a block of rows
        buf = torch.empty(N, K, device=dev, dtype=dt)
        t = dict(bf16=us(graphed(lambda: torch.mm(wd, x.t(), out=y))))

        def serial():
            dequantize_weight(qw, dt, out=buf)
            torch.mm(buf, x.t(), out=y)
        t["serial"] = us(graphed(serial))
        row = dict(t)
        for c in (2, 4):
            n_c = N // c
            # each chunk quantized on its own (its own double-quantization offset): the same kernels and bytes
            parts = [quantize_weight(w[i * n_c:(i + 1) * n_c], 64, "nf4", True) for i in range(c)]
            wc = torch.cat([dequantize_weight(q_, dt) for q_ in parts])
            torch.mm(wc, x.t(), out=y)
            ref_c = y.clone()

            def chunked_serial(parts=parts, n_c=n_c, c=c):
                for i in range(c):
                    dequantize_weight(parts[i], dt, out=buf[i * n_c:(i + 1) * n_c])
                    torch.mm(buf[i * n_c:(i + 1) * n_c], x.t(), out=y[i * n_c:(i + 1) * n_c])
            row[f"chunks{c}_one_stream"] = us(graphed(chunked_serial))

            def chunked(parts=parts, n_c=n_c, c=c):
                main = torch.cuda.current_stream()
                side_hi.wait_stream(main)
                ready = [torch.cuda.Event() for _ in range(c)]
                with torch.cuda.stream(side_hi):
                    for i in range(c):
                        dequantize_weight(parts[i], dt, out=buf[i * n_c:(i + 1) * n_c])
                        ready[i].record()
                for i in range(c):
                    main.wait_event(ready[i])
                    torch.mm(buf[i * n_c:(i + 1) * n_c], x.t(), out=y[i * n_c:(i + 1) * n_c])
                main.wait_stream(side_hi)
            y.zero_()
            replay = graphed(chunked)
            replay()
            torch.cuda.synchronize()
            row[f"chunks{c}_equal"] = bool(torch.equal(y, ref_c))
            row[f"chunks{c}"] = us(replay)
        res["chunked"][f"{N}x{K}"] = row
        lines.append(f"M=4096 {N}x{K}: " + "  ".join(f"{k} {v}" for k, v in row.items()))
        print(lines[-1], flush=True)
    print(f"== {res['gpu']} {res['date']} commit {res['commit']}")
    print("\n".join(lines))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
