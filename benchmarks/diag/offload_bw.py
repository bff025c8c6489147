"""Host-link bandwidth for activation offloading, on a GPU (diagnostic): pinned device-to-host and host-to-device
copies on a side stream, alone, both directions at once, and under a bf16 matmul load on the main stream (how much
the copies slow the matmuls, and the matmuls the copies). Decides how many layers' saved activations a training
step can keep in host memory instead of recomputing them.

    python benchmarks/diag/offload_bw.py [--out offload_bw.json]
"""
import argparse
import json
import time

import torch


def _gbps(nbytes: int, ms: float) -> float:
    return round(nbytes / ms / 1e6, 1)


def _timed(fn, reps: int = 5) -> float:
    """Median wall ms of fn() between device syncs (fn queues work on several streams)."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t) * 1e3)
    return sorted(out)[len(out) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    side, side2 = torch.cuda.Stream(), torch.cuda.Stream()
    res = dict(gpu=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               rows=[])
    for mib in (16, 64, 256):
        n = mib << 20
        d = torch.empty(n, dtype=torch.uint8, device=dev)
        d2 = torch.empty(n, dtype=torch.uint8, device=dev)
        h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        h2 = torch.empty(n, dtype=torch.uint8, pin_memory=True)

        def d2h():
            with torch.cuda.stream(side):
                h.copy_(d, non_blocking=True)

        def h2d():
            with torch.cuda.stream(side):
                d.copy_(h, non_blocking=True)

        def both():
            with torch.cuda.stream(side):
                h.copy_(d, non_blocking=True)
            with torch.cuda.stream(side2):
                d2.copy_(h2, non_blocking=True)
        res["rows"].append(dict(mib=mib, d2h_gbps=_gbps(n, _timed(d2h)), h2d_gbps=_gbps(n, _timed(h2d)),
                                both_gbps_each=_gbps(n, _timed(both))))
    # under load: 8 x (8192 x 4096 @ 4096 x 11008) bf16 on the main stream, 256 MiB each way on the side
    x = torch.randn(8192, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(11008, 4096, device=dev, dtype=torch.bfloat16)
    n = 256 << 20
    d = torch.empty(n, dtype=torch.uint8, device=dev)
    d2 = torch.empty(n, dtype=torch.uint8, device=dev)
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    h2 = torch.empty(n, dtype=torch.uint8, pin_memory=True)

    def mm():
        for _ in range(8):
            x @ w.T
    ev = {}

    def mm_and_copies():
        s0, s1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        c0, c1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        side.wait_stream(torch.cuda.current_stream())
        side2.wait_stream(torch.cuda.current_stream())
        s0.record()
        with torch.cuda.stream(side):
            c0.record(side)
            h.copy_(d, non_blocking=True)
            c1.record(side)
        with torch.cuda.stream(side2):
            d2.copy_(h2, non_blocking=True)
        mm()
        s1.record()
        ev["mm"], ev["copy"] = (s0, s1), (c0, c1)
    t_mm = _timed(mm)
    t_both = _timed(mm_and_copies)
    torch.cuda.synchronize()
    mm_ms = ev["mm"][0].elapsed_time(ev["mm"][1])
    copy_ms = ev["copy"][0].elapsed_time(ev["copy"][1])
    flop = 8 * 2 * 8192 * 4096 * 11008
    res["under_load"] = dict(matmul_alone_ms=round(t_mm, 3), matmul_alone_tflops=round(flop / t_mm / 1e9, 1),
                             matmul_with_copies_ms=round(mm_ms, 3), wall_ms=round(t_both, 3),
                             d2h_256mib_under_load_ms=round(copy_ms, 3),
                             d2h_gbps_under_load=_gbps(n, copy_ms))
    print(json.dumps(res, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
