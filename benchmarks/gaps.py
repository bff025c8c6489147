"""Where a GPU stream sits idle: the gaps between its kernels in a torch.profiler Chrome trace.

The kernel sum of a step (benchmarks/e2e.py breakdown) says how much of the step the GPU computes; this says why it
does not compute the rest. For every gap on the busiest stream (the compute stream) it looks up the host call that
launched the kernel after the gap (the trace links them by correlation id):

* **host-bound**: the launch happened after the gap began (the GPU ran out of queued work: Python, the
  dispatcher, a synchronizing call or an allocation kept the host busy);
* **waiting**: the kernel was queued before the gap began and still did not start: it waited on another stream
  (an event wait on the offload copies) or on a host-to-device copy in the same stream.

Gaps are summed by the class of the kernel after them (classify_name) and by the host-side CPU op that was open
when the late launch happened, so a report reads "host-bound 40 ms before cuBLAS matmuls, inside aten::item".

    python -m benchmarks.gaps trace.json [--steps 2]
"""
import argparse
import bisect
import json
import sys
from collections import defaultdict

# ops names that a gap attribution skips as too generic (they enclose everything)
_OUTER = ("ProfilerStep", "## ", "forward", "backward", "Optimizer.")


def _events(trace):
    ev = trace["traceEvents"] if isinstance(trace, dict) else trace
    return [e for e in ev if e.get("ph") == "X" and "dur" in e]


def analyze(trace, steps: int = 1, classify_name=None, min_gap_us: float = 2.0, top: int = 12) -> dict:
    """Gap report of a Chrome trace (dict with traceEvents, or its event list) covering `steps` steps; times in ms
    per step. classify_name(kernel name) -> class (default: the name itself, cut at 60 characters)."""
    cls = classify_name or (lambda n: n[:60])
    ev = _events(trace)
    gpu = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        raise ValueError("the trace holds no GPU kernels (was ProfilerActivity.CUDA on?)")
    busy = defaultdict(float)
    for e in gpu:
        busy[e.get("args", {}).get("stream", e.get("tid"))] += e["dur"]
    stream = max(busy, key=busy.get)
    ks = sorted((e for e in gpu if e.get("args", {}).get("stream", e.get("tid")) == stream), key=lambda e: e["ts"])
    launches, syncs = {}, defaultdict(float)          # host API calls: launches by correlation id, and syncs
    for e in ev:
        if e.get("cat") in ("cuda_runtime", "cuda_driver"):
            if "correlation" in e.get("args", {}):
                launches[e["args"]["correlation"]] = e
            if "ynchronize" in e["name"]:
                syncs[e["name"]] += e["dur"]
    cpu_ops = sorted((e for e in ev if e.get("cat") == "cpu_op" and not e["name"].startswith(_OUTER)),
                     key=lambda e: e["ts"])
    starts = [e["ts"] for e in cpu_ops]

    def innermost_op(t, tid):
        """The innermost CPU op on host thread tid open at time t (None if none)."""
        i = bisect.bisect_right(starts, t)
        best = None
        for e in reversed(cpu_ops[max(0, i - 400):i]):
            if e.get("tid") == tid and e["ts"] <= t <= e["ts"] + e["dur"]:
                if best is None or e["dur"] < best["dur"]:
                    best = e
        return best["name"] if best else None

    span = ks[-1]["ts"] + ks[-1]["dur"] - ks[0]["ts"]
    host_bound = defaultdict(lambda: [0.0, 0])
    waiting = defaultdict(lambda: [0.0, 0])
    host_ops = defaultdict(lambda: [0.0, 0])
    total = {"host-bound": 0.0, "waiting": 0.0, "unlinked": 0.0}
    for prev, nxt in zip(ks, ks[1:]):
        gap = nxt["ts"] - (prev["ts"] + prev["dur"])
        if gap < min_gap_us:
            continue
        launch = launches.get(nxt.get("args", {}).get("correlation"))
        key = f"{cls(prev['name'])} -> {cls(nxt['name'])}"
        if launch is None:
            total["unlinked"] += gap
            continue
        if launch["ts"] > prev["ts"] + prev["dur"]:      # queued only after the stream went idle
            late = min(gap, launch["ts"] - (prev["ts"] + prev["dur"]))
            total["host-bound"] += late
            host_bound[key][0] += late
            host_bound[key][1] += 1
            op = innermost_op(launch["ts"], launch.get("tid")) or launch["name"]
            host_ops[op][0] += late
            host_ops[op][1] += 1
            rest = gap - late
        else:
            rest = gap
        if rest > 0:
            total["waiting"] += rest
            waiting[key][0] += rest
            waiting[key][1] += 1

    def table(d):
        rows = sorted(d.items(), key=lambda kv: -kv[1][0])[:top]
        return [[k, round(v[0] / 1e3 / steps, 3), round(v[1] / steps, 1)] for k, v in rows]

    return dict(
        stream=stream, span_ms=round(span / 1e3 / steps, 3), busy_ms=round(busy[stream] / 1e3 / steps, 3),
        idle_ms=round((span - busy[stream]) / 1e3 / steps, 3),
        idle_ms_by_cause={k: round(v / 1e3 / steps, 3) for k, v in total.items()},
        other_streams_busy_ms={str(s): round(b / 1e3 / steps, 2) for s, b in busy.items() if s != stream},
        host_bound_gaps=table(host_bound), host_bound_by_cpu_op=table(host_ops), waiting_gaps=table(waiting),
        host_sync_calls_ms={k: round(v / 1e3 / steps, 2) for k, v in sorted(syncs.items(), key=lambda kv: -kv[1])},
        columns="[before -> after, ms per step, gaps per step]",
        note=f"gaps >= {min_gap_us} us on the busiest stream; host-bound: the next kernel was launched after the "
             "stream went idle (its CPU op named); waiting: it was queued but waited (another stream, a copy)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1)
    a = ap.parse_args(argv)
    try:
        with open(a.trace) as f:
            trace = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"{a.trace}: not a readable Chrome trace JSON ({e})")
    print(json.dumps(analyze(trace, a.steps), indent=1))


if __name__ == "__main__":
    main()
