"""What stays alive on the GPU after e2e.run_stack returns (diagnostic). keep_codes_ab saw every run after the
first peak about 3.1 GiB higher (the NF4 weights' size): this runs the same variant --runs times and after each
prints the allocated memory once the run is freed, and the largest live CUDA tensors with their referrer chains
(what holds them).

    python benchmarks/diag/leak_probe.py [--setting b] [--variant ours+ckpt-offload] [--runs 2] [--out leak.json]
"""
import argparse
import gc
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks import e2e  # noqa: E402


def describe(o) -> str:
    t = type(o)
    name = f"{t.__module__}.{t.__qualname__}"
    if isinstance(o, dict):
        keys = list(o.keys())[:4]
        return f"{name} keys {[str(k)[:60] for k in keys]} (len {len(o)})"
    if isinstance(o, (list, tuple)):
        return f"{name} len {len(o)}"
    if hasattr(o, "__code__"):
        return f"{name} {o.__code__.co_filename}:{o.__code__.co_firstlineno}"
    if t.__name__ == "cell":
        return "cell"
    if t.__name__ == "frame":
        return f"frame {o.f_code.co_filename}:{o.f_lineno}"
    return name


def chains(obj, depth=4, skip=()):
    """Referrer chains of obj up to depth (the first two referrers per level, ignoring this probe's frames)."""
    out = []

    def walk(o, path, d):
        if d == depth:
            out.append(" <- ".join(path))
            return
        refs = [r for r in gc.get_referrers(o) if id(r) not in skip and not (type(r).__name__ == "frame"
                                                                              and r.f_code.co_filename == __file__)]
        if not refs:
            out.append(" <- ".join(path + ["(no referrer: module-level or C++)"]))
            return
        for r in refs[:2]:
            walk(r, path + [describe(r)], d + 1)

    walk(obj, [describe(obj)], 0)
    return out[:6]


def live_cuda(min_mib=8.0, top=8):
    gc.collect()
    ts = []
    for o in gc.get_objects():
        try:
            if torch.is_tensor(o) and o.is_cuda:
                ts.append(o)
        except Exception:  # noqa: BLE001
            pass
    seen, big = set(), []
    for t in ts:
        try:
            key = t.untyped_storage().data_ptr()
            mib = t.untyped_storage().nbytes() / 2**20
        except Exception:  # noqa: BLE001
            continue
        if key in seen:
            continue
        seen.add(key)
        big.append((mib, t))
    big.sort(key=lambda x: -x[0])
    total = sum(m for m, _ in big)
    rows = [dict(mib=round(m, 1), shape=list(t.shape), dtype=str(t.dtype)) for m, t in big[:top] if m >= min_mib]
    for r, (m, t) in zip(rows, big):
        r["held_by"] = chains(t, skip={id(ts), id(big)})
    return round(total / 1024, 3), len(big), rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", default="b")
    ap.add_argument("--variant", default="ours+ckpt-offload")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", default="llama-2-7b", choices=["llama-2-7b", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device(a.device)
    variant = next(v for v in e2e.OUR_VARIANTS[a.setting] if v["name"] == a.variant)
    args = e2e.model_args(a.size)
    out = dict(gpu=e2e.gpu_name(dev), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               commit=e2e.git_commit("E2E_COMMIT"), setting=a.setting, variant=a.variant, runs=[])
    for r in range(a.runs):
        e2e.free(dev)
        before = e2e.alloc_gib(dev)
        res, _ = e2e.run_stack("ours", args, dev, a.setting, variant, a.steps, True)
        e2e.free(dev)
        gib, n, rows = live_cuda() if dev.type == "cuda" else (None, None, [])
        run = dict(run=r, allocated_before_gib=before, peak_gib=round(res["peak_gib"], 3),
                   allocated_after_gib=e2e.alloc_gib(dev), live_cuda_tensor_gib=gib, live_cuda_tensors=n,
                   largest=rows)
        out["runs"].append(run)
        print(json.dumps(run, indent=1), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
