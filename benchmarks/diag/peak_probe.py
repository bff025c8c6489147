"""What is live at a training step's peak GPU memory: our stack at an e2e setting, eager, recorded with the CUDA
caching allocator's history and replayed to the moment of the step's largest allocated total.

    python benchmarks/diag/peak_probe.py --setting a --checkpointing 0 --out peak.json

For each live block at the peak: its size and the innermost frames of its allocation in this repository; the
blocks are grouped by that frame (the "site") and summed, largest first, with their size per token and
their most common block sizes. Steps 1-2 warm up (kernel choices, optimizer states); the
history covers step 3 only. CUDA only.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from benchmarks import e2e  # noqa: E402
from llama.fast_path import enable_fast_path  # noqa: E402


def site_of(frames) -> str:
    """The innermost frame in this repository outside benchmarks/ (file:line function), else the innermost in
    benchmarks/ (the harness allocated it), else the innermost Python frame (its folder and file)."""
    def name(f, path):
        return f"{path}:{f.get('line')} {f.get('name')}"

    ours = [f for f in frames if f.get("filename", "").startswith(ROOT + os.sep)]
    for f in ours:
        if not os.path.relpath(f["filename"], ROOT).startswith("benchmarks" + os.sep):
            return name(f, os.path.relpath(f["filename"], ROOT))
    if ours:
        return name(ours[0], os.path.relpath(ours[0]["filename"], ROOT))
    for f in frames:
        fn = f.get("filename", "")
        if fn.endswith(".py"):
            return name(f, "/".join(fn.split("/")[-2:]))
    return "?"


def live_at_peak(trace):
    """Replay alloc / free events: (peak bytes, {addr: (size, frames)} live at the peak). One pass finds where
    the running total peaks, a second rebuilds the live set up to there (no copy of it at every new peak)."""
    def replay(events):
        live, total = {}, 0
        for ev in events:
            if ev["action"] == "alloc":
                live[ev["addr"]] = (ev["size"], ev.get("frames", []))
                total += ev["size"]
            elif ev["action"] == "free_requested" and ev["addr"] in live:
                total -= live.pop(ev["addr"])[0]
            yield live, total

    peak, at = -1, 0
    for i, (_, total) in enumerate(replay(trace)):
        if total > peak:
            peak, at = total, i
    live = {}
    for live, _ in replay(trace[:at + 1]):
        pass
    return peak, dict(live)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", default="a", choices=["a", "b"])
    ap.add_argument("--checkpointing", type=int, default=0, help="0: none, 32: every layer, k: the first k")
    ap.add_argument("--offload", type=int, default=1)
    ap.add_argument("--graph", type=int, default=0, help="1: the step through e2e.GraphStep; step 3 is the capture")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    dev = torch.device("cuda")
    args = e2e.model_args("llama-2-7b")
    s = e2e.setting_shape(a.setting, args)
    model = e2e.build_ours(args, dev, s["targets"], True)
    ck = False if a.checkpointing == 0 else (True if a.checkpointing >= args.num_hidden_layers else a.checkpointing)
    enable_fast_path(model, checkpointing=ck, offload=bool(a.offload and ck), offload_embeddings=True)
    opt = e2e.our_optimizer([p for p in model.parameters() if p.requires_grad], dev)
    step = (e2e.GraphStep if a.graph else e2e.Step)(model, e2e.our_loss, opt, dev)
    ids = [e2e.random_ids(s["batch"], s["seq"], args.vocab_size, dev, i) for i in range(3)]
    for i in range(2):
        step(ids[i])
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)
    step(ids[2])
    torch.cuda.synchronize()
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    peak_torch = torch.cuda.max_memory_allocated()
    trace = [ev for tr in snap["device_traces"] for ev in tr]
    peak_delta, at_peak = live_at_peak(trace)
    by_site = collections.defaultdict(lambda: [0, 0, collections.Counter()])
    for size, frames in at_peak.values():
        e = by_site[site_of(frames)]
        e[0] += size
        e[1] += 1
        e[2][size] += 1
    tokens = s["batch"] * s["seq"]
    rows = []
    for site, (b, n, sizes) in sorted(by_site.items(), key=lambda kv: -kv[1][0]):
        rows.append(dict(site=site, mib=round(b / 2**20, 1), blocks=n,
                         kib_per_token=round(b / 1024 / tokens, 2),
                         common_sizes_mib=[(round(sz / 2**20, 2), c) for sz, c in sizes.most_common(3)]))
    res = dict(gpu=torch.cuda.get_device_name(), setting=a.setting, checkpointing=a.checkpointing, graph=a.graph,
               offload=a.offload, commit=e2e.git_commit(), tokens=tokens,
               allocated_before_step_gib=round(base / 2**30, 3), peak_gib=round(peak_torch / 2**30, 3),
               peak_from_history_gib=round((base + peak_delta) / 2**30, 3),
               step_allocations_live_at_peak_gib=round(peak_delta / 2**30, 3), sites=rows)
    print(f"{res['gpu']} setting {a.setting} checkpointing {a.checkpointing} graph {a.graph}: before step "
          f"{res['allocated_before_step_gib']} GiB, peak {res['peak_gib']} GiB (history: "
          f"{res['peak_from_history_gib']}); live step allocations at the peak {res['step_allocations_live_at_peak_gib']} GiB")
    for r in rows[:a.top]:
        print(f"  {r['mib']:9.1f} MiB {r['blocks']:5d} blocks {r['kib_per_token']:7.2f} KiB/token  {r['site']}  "
              f"{r['common_sizes_mib']}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
