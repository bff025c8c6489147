"""Where an eager training step of our stack spends its host time (diagnostic, one GPU).

In setting (a) of benchmarks/e2e.py (batch 4 x 512, LoRA on q,v) our eager step was slower than the same step
replayed from a CUDA graph by ~2x, so the host, not the GPU, sets its pace. This script builds that model and:
  1. times eager steps (forward / backward / update by CUDA events, and the host's wall time per phase);
  2. runs one step under torch.cuda.set_sync_debug_mode("warn") and lists every operation that synchronized
     the host with the GPU (with the line of our code that called it);
  3. profiles two steps with cProfile (top functions by own time and by cumulative time);
  4. profiles one step with torch.profiler (CPU self time by op, and the GPU's busy time against the wall time).

    python benchmarks/diag/eager_step.py [--setting a] [--size llama-2-7b|tiny] [--out $OUT/eager_step.json]
                                         [--timing-only]   (QLORA_FAST_LAUNCH=0: Triton's own launch path)
The results' commit is E2E_COMMIT where set, else HEAD: a device's copy of the tree may carry a stale .git, so
pass E2E_COMMIT=<hash> from the machine that holds the repository.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import json
import os
import pstats
import sys
import time
import traceback
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks import e2e  # noqa: E402
from llama.fast_path import enable_fast_path  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", default="a")
    ap.add_argument("--size", default="llama-2-7b", choices=["llama-2-7b", "tiny"])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "eager_step.json"))
    ap.add_argument("--timing-only", action="store_true", help="only part 1 (the eager steps' times)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    margs = e2e.model_args(args.size)
    s = e2e.setting_shape(args.setting, margs)
    model = e2e.build_ours(margs, dev, s["targets"], True)
    enable_fast_path(model, checkpointing=False, offload=False, offload_embeddings=dev.type == "cuda")
    opt = e2e.our_optimizer([p for p in model.parameters() if p.requires_grad], dev)
    step = e2e.Step(model, e2e.our_loss, opt, dev)
    ids = [e2e.random_ids(s["batch"], s["seq"], margs.vocab_size, dev, i) for i in range(args.steps)]
    res = dict(gpu=e2e.gpu_name(dev), date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               commit=e2e.git_commit(), setting=args.setting, shape=s)

    # 1. eager steps: GPU phases (events) and host wall time per phase
    rows = []
    for i in range(args.steps):
        e2e.sync(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = e2e.our_loss(model, ids[i])
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        step._update()
        t3 = time.perf_counter()
        e2e.sync(dev)
        t4 = time.perf_counter()
        rows.append(dict(host_forward_ms=(t1 - t0) * 1e3, host_backward_ms=(t2 - t1) * 1e3,
                         host_update_ms=(t3 - t2) * 1e3, wall_ms=(t4 - t0) * 1e3))
    res["eager_steps"] = rows
    print("eager steps (host ms per phase; wall):")
    for r in rows:
        print("  " + "  ".join(f"{k} {v:7.1f}" for k, v in r.items()))

    res["fast_launch"] = os.environ.get("QLORA_FAST_LAUNCH", "1")
    if args.timing_only:
        _write(res, args.out)
        return
    # 2. synchronizing operations in one step
    syncs = []
    if dev.type == "cuda":
        def show(message, category, filename, lineno, file=None, line=None):
            stack = [f"{os.path.relpath(f.filename, ROOT)}:{f.lineno} {f.name}" for f in traceback.extract_stack()
                     if f.filename.startswith(ROOT) and "diag/eager_step" not in f.filename]
            syncs.append(dict(message=str(message)[:200], where=stack[-4:]))
        old = warnings.showwarning
        warnings.showwarning = show
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(ids[0])
        finally:
            torch.cuda.set_sync_debug_mode(0)
            warnings.showwarning = old
        e2e.sync(dev)
    res["syncs"] = syncs
    print(f"synchronizing calls in one step: {len(syncs)}")
    seen = {}
    for sy in syncs:
        key = tuple(sy["where"][-2:])
        seen[key] = seen.get(key, 0) + 1
    for k, n in sorted(seen.items(), key=lambda kv: -kv[1])[:15]:
        print(f"  {n:4d}x  {' <- '.join(reversed(k))}")

    # 3. cProfile over two steps
    prof = cProfile.Profile()          # (the whole profile: the .pstats file next to --out)
    e2e.sync(dev)
    prof.enable()
    for i in range(2):
        step(ids[i])
    e2e.sync(dev)
    prof.disable()
    out = io.StringIO()
    prof.dump_stats(os.path.splitext(os.path.abspath(args.out))[0] + ".pstats")
    st = pstats.Stats(prof, stream=out)
    st.sort_stats("tottime").print_stats(35)
    st.sort_stats("cumulative").print_stats(45)
    res["cprofile"] = out.getvalue()

    # 4. torch.profiler over one step
    if dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile
        e2e.sync(dev)
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            step(ids[1])
            e2e.sync(dev)
        wall = (time.perf_counter() - t0) * 1e3
        ka = p.key_averages()
        gpu_us = sum(e.self_device_time_total for e in ka if e.device_type == torch.autograd.DeviceType.CUDA)
        calls = {e.key: e.count for e in ka if e.key in ("cuLaunchKernelEx", "cudaLaunchKernel", "aten::_to_copy",
                                                          "aten::sum", "cudaMemsetAsync", "aten::mm")}
        res["torch_profiler"] = dict(wall_ms=wall, gpu_kernels_ms=gpu_us / 1e3, calls=calls,
                                     cpu_table=ka.table(sort_by="self_cpu_time_total", row_limit=40),
                                     gpu_table=ka.table(sort_by="self_device_time_total", row_limit=25))
        print(f"profiled step: wall {wall:.1f} ms, GPU kernels {gpu_us / 1e3:.1f} ms, calls {calls}")
        print(res["torch_profiler"]["cpu_table"])
    _write(res, args.out)
    print(res["cprofile"][:12000])


def _write(res, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
