"""benchmarks/gaps.py on a hand-built Chrome trace: which idle time of the compute stream is host-bound (the next
kernel launched after the stream went idle, attributed to the innermost CPU op open at the launch) and which is
waiting (queued, started late), per step; other streams do not count as the compute stream's work."""
import json

import pytest

from benchmarks import gaps


def kernel(name, ts, dur, corr, stream=7):
    return dict(ph="X", cat="kernel", name=name, ts=ts, dur=dur, args={"stream": stream, "correlation": corr})


def launch(ts, corr, tid=1, cat="cuda_runtime"):
    return dict(ph="X", cat=cat, name="cudaLaunchKernel" if cat == "cuda_runtime" else "cuLaunchKernelEx", ts=ts,
                dur=1, tid=tid, args={"correlation": corr})


def op(name, ts, dur, tid=1):
    return dict(ph="X", cat="cpu_op", name=name, ts=ts, dur=dur, tid=tid)


def trace():
    ev = [
        kernel("gemm_a", 100, 50, 1), launch(10, 1),
        # gap 150..200: launched at 180 (host-bound 30 us inside aten::item, the rest 20 us waiting)
        kernel("gemm_b", 200, 50, 2), launch(180, 2), op("aten::linear", 170, 20), op("aten::item", 175, 10),
        # gap 250..400: launched at 20, long before: waiting 150 us
        kernel("_rope_kernel", 400, 10, 3), launch(20, 3, cat="cuda_driver"),     # Triton: the driver API
        # gap 410..411 (< min_gap_us): ignored
        kernel("_rope_kernel", 411, 10, 4), launch(21, 4),
        # a copy on another stream overlapping the gap: not the compute stream
        dict(ph="X", cat="gpu_memcpy", name="Memcpy DtoH", ts=260, dur=100, args={"stream": 20, "correlation": 9}),
        op("ProfilerStep#1", 0, 1000),
    ]
    return {"traceEvents": ev}


def test_gaps_split_by_cause():
    r = gaps.analyze(trace(), steps=1)
    assert r["stream"] == 7
    assert r["busy_ms"] == pytest.approx(0.12)
    assert r["span_ms"] == pytest.approx(0.321)
    assert r["idle_ms_by_cause"] == {"host-bound": 0.03, "waiting": 0.17, "unlinked": 0.0}
    assert r["host_bound_gaps"] == [["gemm_a -> gemm_b", 0.03, 1.0]]
    assert r["host_bound_by_cpu_op"] == [["aten::item", 0.03, 1.0]]
    assert r["waiting_gaps"][0] == ["gemm_b -> _rope_kernel", 0.15, 1.0]
    assert r["other_streams_busy_ms"] == {"20": 0.1}


def test_gaps_per_step_and_classes():
    r = gaps.analyze(trace(), steps=2, classify_name=lambda n: "matmul" if "gemm" in n else "rope")
    assert r["idle_ms_by_cause"]["waiting"] == pytest.approx(0.085)
    assert r["host_bound_gaps"] == [["matmul -> matmul", 0.015, 0.5]]


def test_gaps_needs_gpu_kernels(tmp_path):
    with pytest.raises(ValueError, match="no GPU kernels"):
        gaps.analyze({"traceEvents": [op("aten::mm", 0, 5)]})
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit, match="t.json"):
        gaps.main([str(bad)])
    good = tmp_path / "g.json"
    good.write_text(json.dumps(trace()))
    gaps.main([str(good)])


def test_e2e_breakdown_carries_the_gap_report_on_cpu():
    """The e2e breakdown's plumbing on the CPU (tiny model): the profile runs, and the gap report says why it is
    empty (no GPU kernels) instead of failing the breakdown."""
    import torch

    from benchmarks import e2e

    bd = e2e.breakdown(e2e.model_args("tiny"), torch.device("cpu"), True, seq=32, batch=2, setting="b")
    assert bd["setting"] == "b" and bd["kernel_sum_ms"] == 0          # no device kernels on the CPU
    assert bd["step_ms"] is None and bd["phase_ms"] == {}              # phases are CUDA events
    assert "no GPU kernels" in bd["gaps"]["error"]
