"""Where a graphed step with offloaded checkpoint inputs parts from the eager step (CUDA only).

    python benchmarks/diag/graph_offload_probe.py --out probe.json

The tiny model of tests/train/test_cuda_graph_cuda.py, every layer checkpointed, five optimizer steps of two
micro-batches each (the test's batches and seeds). Four runs from the same weights and seed: eager without
and with offload, graphed without and with offload. For each pair the table gives, per step, the relative
loss difference and the worst LoRA gradient's relative Frobenius difference, so that a failure of the test's
graph + offload case shows whether the offloader (eager vs eager), the graph (graph vs eager, no offload) or
only their combination differs.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tests.train.test_cuda_graph_cuda import _loss, _model, _rel  # noqa: E402


def run(model, steps, graph: bool, seed: int = 11):
    from train.cuda_graph import GraphedStep

    params = [p for p in model.parameters() if p.requires_grad]
    gs = GraphedStep(model, params) if graph else None
    torch.manual_seed(seed)
    out = []
    for mb in steps:
        for p in params:
            p.grad = None
        losses = []
        for inputs in mb:
            if gs is None:
                s = _loss(model, **inputs)
                (s * (1 / 150)).backward()
                losses.append(float(s))
            else:
                losses.append(float(gs(_loss, inputs, scale=1 / 150)))
        torch.cuda.synchronize()
        out.append((losses, [p.grad.clone() for p in params]))
    return out


def compare(a, b):
    rows = []
    for i, ((la, ga), (lb, gb)) in enumerate(zip(a, b)):
        rows.append(dict(step=i, loss_rel=max(abs(x - y) / abs(y) for x, y in zip(la, lb)),
                         grad_rel=max(_rel(x, y) for x, y in zip(ga, gb))))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpointing", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1, help="run the four paths this many times (a flaky difference "
                    "shows as a nonzero row in some repeats)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    reps = [probe(a.checkpointing) for _ in range(max(1, a.repeat))]
    worst = {}
    for res in reps:
        for k, rows in res.items():
            if isinstance(rows, str):
                worst[k] = rows
                continue
            w = max(max(r["loss_rel"], r["grad_rel"]) for r in rows)
            if not isinstance(worst.get(k), str):
                worst[k] = max(worst.get(k, 0.0), w)
    print("worst relative difference over", len(reps), "repeat(s):", worst)
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(dict(gpu=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                           commit=_commit(), repeats=len(reps), worst=worst,
                           results=reps[0] if len(reps) == 1 else reps), fh, indent=1)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or os.environ.get("E2E_COMMIT", "unknown")
    except Exception:  # noqa: BLE001
        return os.environ.get("E2E_COMMIT", "unknown")


def probe(checkpointing):
    gen = torch.Generator().manual_seed(1)
    batches = [[torch.randint(0, 256, (2, 40), generator=gen).cuda() for _ in range(2)] for _ in range(5)]
    batches[4] = batches[3]
    steps = [[{"input_ids": ids, "labels": ids} for ids in mb] for mb in batches]
    base = _model(checkpointing=checkpointing, offload=False)
    runs = {}
    for name, offload, graph in [("eager", False, False), ("eager+offload", True, False),
                                 ("graph", False, True), ("graph+offload", True, True)]:
        m = copy.deepcopy(base)
        if offload:
            from llama.fast_path import enable_fast_path
            enable_fast_path(m, checkpointing=checkpointing, offload=True)
            assert m.model.layers[0]._offloader is not None
        try:
            runs[name] = run(m, steps, graph)
        except Exception as e:  # noqa: BLE001
            runs[name] = f"{type(e).__name__}: {e}"
    res = {}
    for x, y in [("eager+offload", "eager"), ("graph", "eager"), ("graph+offload", "eager+offload"),
                 ("graph+offload", "graph")]:
        if isinstance(runs[x], str) or isinstance(runs[y], str):
            res[f"{x} vs {y}"] = runs[x] if isinstance(runs[x], str) else runs[y]
            continue
        res[f"{x} vs {y}"] = compare(runs[x], runs[y])
    for k, v in res.items():
        print(k)
        if isinstance(v, str):
            print("  ", v)
            continue
        for r in v:
            print(f"   step {r['step']}: loss {r['loss_rel']:.2e}  grads {r['grad_rel']:.2e}")
    return res


if __name__ == "__main__":
    main()
