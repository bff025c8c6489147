"""kernels/prefetch.py: the learned weight order and the side-stream dequantize prefetch.

On the CPU the bookkeeping runs without streams (what is prefetched, when a guess is dropped, dead weights); the
CUDA tests (skipped here) check that nf4_matmul's outputs are bit-identical with the prefetch on, eagerly, under
a CUDA-graph capture and through GraphedStep."""
import gc
import importlib

import pytest
import torch

import nf4
from kernels import prefetch

mm = importlib.import_module("kernels.nf4_matmul")


def _weights(n, shape=(32, 64), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nf4.QuantizedWeight4bit.from_tensor(torch.randn(shape, generator=g), 64, "nf4", False) for _ in range(n)]


class _Counting:
    """A dequantize that records what it was asked for (and writes into out when given one)."""

    def __init__(self):
        self.calls = []

    def __call__(self, qw, dtype, out):
        self.calls.append(id(qw))
        w = _reference(qw, dtype)
        if out is None:
            return w
        out.copy_(w)
        return out


def _reference(qw, dtype=torch.float32):
    return nf4.dequantize_4bit(qw.packed, qw.absmax, qw.shape, qw.blocksize, qw.quant_type, dtype)


def test_repeated_order_is_prefetched_and_values_are_the_weights():
    ws = _weights(4)
    deq = _Counting()
    p = prefetch.DequantPrefetcher("cpu", deq, streams=False)
    order = [0, 1, 2, 3, 3, 2, 1, 0]               # a "forward" then a "backward": every weight twice a step
    for step in range(3):
        for i in order:
            got = p.take(ws[i], torch.float32)
            assert torch.equal(got, _reference(ws[i])), f"step {step}: weight {i} dequantized wrong"
    # step 1 learns the pairs; from step 2 on every take but the step's first is a prefetched one
    assert p.stats["hits"] >= 2 * len(order) - 4, p.stats
    # each take dequantizes exactly once: by the prefetch or in place (no double work on a hit)
    assert len(deq.calls) == p.stats["misses"] + p.stats["launched"], (len(deq.calls), p.stats)
    assert p.stats["dropped"] <= 2, p.stats


def test_a_wrong_guess_is_dropped_and_the_right_weight_returned():
    ws = _weights(3)
    p = prefetch.DequantPrefetcher("cpu", _Counting(), streams=False)
    for i in (0, 1, 2, 0, 1, 2):
        p.take(ws[i], torch.float32)
    assert p.pending is not None and p.pending[0]() is ws[0]     # after (1, 2) comes 0
    got = p.take(ws[1], torch.float32)                           # the order changed
    assert torch.equal(got, _reference(ws[1]))
    assert p.stats["dropped"] == 1
    # a different dtype is not the pending one either
    p.forget()
    for i in (0, 1, 2, 0, 1):
        p.take(ws[i], torch.float32)
    assert p.pending is not None and p.pending[0]() is ws[2]
    got = p.take(ws[2], torch.float16)
    assert got.dtype == torch.float16 and torch.equal(got, _reference(ws[2], torch.float16))


def test_dead_weights_are_not_prefetched_and_memory_is_bounded():
    ws = _weights(3)
    p = prefetch.DequantPrefetcher("cpu", _Counting(), streams=False)
    for i in (0, 1, 2, 0, 1):
        p.take(ws[i], torch.float32)
    assert p.pending is not None and p.pending[0]() is ws[2]
    p.join()
    assert p.pending is None
    assert p._expected(ws[0], ws[1]) is ws[2]
    del ws[2]
    gc.collect()
    assert p._expected(ws[0], ws[1]) is None       # (0, 1) was followed by a weight that is gone: no prefetch
    # at most one buffer is pending at any time
    prefetch._MAX_PAIRS, old = 4, prefetch._MAX_PAIRS
    try:
        more = _weights(12, seed=1)
        for _ in range(2):
            for w in more:
                p.take(w, torch.float32)
                assert len(p.next_of) <= 4
    finally:
        prefetch._MAX_PAIRS = old


def test_cpu_matmul_never_prefetches(monkeypatch):
    monkeypatch.setattr(prefetch, "ENABLED", True)
    ws = _weights(2)
    x = torch.randn(40, 64)
    before = dict(prefetch._PREFETCHERS)
    y = mm.nf4_matmul(x, ws[0])
    assert torch.equal(y, x @ _reference(ws[0]).t())
    assert prefetch._PREFETCHERS == before


# ------------------------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (side streams, CUDA graphs)")


def _cuda_weights(n, shapes=((256, 128), (384, 128), (128, 384))):
    from kernels import quantize_weight
    g = torch.Generator(device="cuda").manual_seed(3)
    return [quantize_weight(torch.randn(shapes[i % len(shapes)], device="cuda", generator=g) * 0.02, 64, "nf4", True)
            for i in range(n)]


def _layer(xs, ws):
    """A forward and a backward over the weights, through the dequantize path (M = 96 rows)."""
    outs = []
    for x, w in zip(xs, ws):
        outs.append(mm.nf4_matmul_dequant(x, w))
    for x, w in zip(reversed(outs), reversed(ws)):
        outs.append(mm.nf4_matmul_t_dequant(x, w))
    return outs


@cuda
def test_cuda_prefetch_is_bit_identical_eager_and_captured(monkeypatch):
    ws = _cuda_weights(6)
    xs = [torch.randn(96, w.shape[1], device="cuda", dtype=torch.bfloat16) for w in ws]
    monkeypatch.setattr(prefetch, "ENABLED", False)
    want = _layer(xs, ws)
    monkeypatch.setattr(prefetch, "ENABLED", True)
    prefetch.reset()
    for step in range(3):
        got = _layer(xs, ws)
        for i, (a, b) in enumerate(zip(got, want)):
            assert torch.equal(a, b), f"eager step {step}: output {i} differs with the prefetch on"
    p = prefetch._PREFETCHERS[torch.device("cuda", torch.cuda.current_device())]
    assert p.stats["hits"] >= 10, p.stats
    # captured: the side stream forked and joined inside the graph; replays give the same outputs
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _layer(xs, ws)
        prefetch.join()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    hits = p.stats["hits"]
    with torch.cuda.graph(g):
        got = _layer(xs, ws)
        prefetch.join()
    assert p.stats["hits"] > hits, "nothing was prefetched inside the capture"
    g.replay()
    torch.cuda.synchronize()
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"graph replay: output {i} differs with the prefetch on"
    prefetch.reset()


@cuda
def test_cuda_graphed_step_with_prefetch_matches_eager(monkeypatch):
    """The tiny model's training step through GraphedStep with every NF4 linear on the dequantize path and the
    prefetch on: the same losses and gradients as the eager step without it."""
    import copy

    from tests.train.test_cuda_graph_cuda import _graphed_matches_eager, _loss, _model

    monkeypatch.setattr(mm, "_pick", lambda key, cands, eager=False: "dequant" if "dequant" in cands else
                        next(iter(cands)))
    monkeypatch.setattr(mm, "_path_cache", {})
    eager_m = _model(checkpointing=1)
    graph_m = copy.deepcopy(eager_m)
    gen = torch.Generator().manual_seed(2)
    batches = [[torch.randint(0, 256, (2, 40), generator=gen).cuda()] for _ in range(4)]
    steps = [[{"input_ids": ids, "labels": ids} for ids in mb] for mb in batches]
    monkeypatch.setattr(prefetch, "ENABLED", False)
    orig = graph_m.forward

    def graphed_forward(*a, **k):      # the eager reference runs first, all of it: the prefetch is off there
        prefetch.ENABLED = True
        return orig(*a, **k)

    graph_m.forward = graphed_forward
    prefetch.reset()
    _graphed_matches_eager(eager_m, graph_m, steps, _loss, scale=1.0, seed=5)
    p = prefetch._PREFETCHERS[torch.device("cuda", torch.cuda.current_device())]
    assert p.stats["hits"] > 0, p.stats
    prefetch.reset()
