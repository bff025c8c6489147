"""benchmarks/diag/peak_probe.py's replay of the allocator history (the CUDA run itself needs a GPU)."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "diag"))

import peak_probe  # noqa: E402


def test_live_at_peak_replays_allocs_and_frees():
    """The peak is the largest running total of the step's allocations; the live set is the one at that moment
    (a later, smaller total does not replace it; frees of blocks allocated before the history are ignored)."""
    tr = [dict(action="alloc", addr=1, size=10, frames=[]), dict(action="alloc", addr=2, size=5, frames=[]),
          dict(action="free_requested", addr=1, size=10), dict(action="free_requested", addr=99, size=7),
          dict(action="alloc", addr=3, size=4, frames=[]), dict(action="free_completed", addr=1, size=10)]
    peak, live = peak_probe.live_at_peak(tr)
    assert peak == 15 and sorted(live) == [1, 2]
    tr.append(dict(action="alloc", addr=4, size=20, frames=[]))
    peak, live = peak_probe.live_at_peak(tr)
    assert peak == 29 and sorted(live) == [2, 3, 4]


def test_site_is_the_innermost_repository_frame():
    frames = [dict(filename="/usr/lib/python3/site-packages/torch/functional.py", line=5, name="f"),
              dict(filename=os.path.join(ROOT, "kernels", "rope.py"), line=92, name="rope_forward"),
              dict(filename=os.path.join(ROOT, "llama", "fast_path.py"), line=73, name="forward")]
    assert peak_probe.site_of(frames) == "kernels/rope.py:92 rope_forward"
    assert peak_probe.site_of(frames[:1]) == "torch/functional.py:5 f"
    assert peak_probe.site_of([]) == "?"
    bench = [dict(filename=os.path.join(ROOT, "benchmarks", "e2e.py"), line=1, name="x")]
    assert peak_probe.site_of(bench + frames) == "kernels/rope.py:92 rope_forward"   # the library's frame first
    assert peak_probe.site_of(frames[:1] + bench) == "benchmarks/e2e.py:1 x"          # else the harness's
