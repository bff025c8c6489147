"""The host-resident input embedding (llama.fast_path.CPUEmbedding, a pinned 32000 x 4096 bf16 table) on a GPU:
rows gathered on the CPU and copied (the host path: ids to the host, a synchronization, index_select, copy)
against the kernel that reads them from pinned memory over the host link (kernels.gather), and a device-resident
embedding (F.embedding, the table in GPU memory) as the floor. Wall-clock per call from a synchronized start
(what a step waits for), median of 20, at the e2e settings' token counts (diagnostic).

    python benchmarks/diag/embedding_gather.py [--out embedding_gather.json]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from kernels.gather import gather_rows  # noqa: E402


def wall_ms(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return round(statistics.median(ts), 3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    V, C = 32000, 4096
    table = torch.randn(V, C, dtype=torch.bfloat16).pin_memory()
    table_dev = table.to(dev)
    res = dict(gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               table=[V, C], rows={})
    for B, T in ((4, 512), (4, 2048)):
        ids = torch.randint(0, V, (B, T), device=dev)

        def host():
            ids_h = ids.reshape(-1).cpu()
            rows = torch.empty((ids_h.numel(), C), dtype=table.dtype, pin_memory=True)
            torch.index_select(table, 0, ids_h, out=rows)
            return rows.to(dev, non_blocking=True)

        assert torch.equal(gather_rows(table, ids, check_range=False).cpu(), host().cpu())
        r = dict(host_path_ms=wall_ms(host), device_gather_ms=wall_ms(lambda: gather_rows(table, ids, check_range=False)),
                 device_table_ms=wall_ms(lambda: torch.nn.functional.embedding(ids, table_dev)),
                 mib=round(B * T * C * 2 / 2**20, 1))
        r["device_gather_gbps"] = round(B * T * C * 2 / r["device_gather_ms"] / 1e6, 1)
        res["rows"][f"{B}x{T}"] = r
        print(B, T, r, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
