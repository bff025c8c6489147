"""The fast path's LoRA dropout and MLP tail: the philox-family Triton kernels (mask, fused A-side matmuls) in
Triton's CPU interpreter, and on CPU tensors the `SwiGLUDownFunction` node and the recompute that skips the
MLP's output."""
import contextlib
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from llama import fast_path as fp

from . import fast_dropout_checks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def interpreter_results():
    """Runs every check of fast_dropout_checks.py once, in a subprocess with TRITON_INTERPRET=1."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "llama", "fast_dropout_checks.py")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
    out = {}
    for line in r.stdout.splitlines():
        status, _, rest = line.partition(" ")
        name, _, why = rest.partition(":")
        out[name.strip()] = (status, why.strip())
    return out, r.stderr[-3000:]


@pytest.mark.parametrize("name", sorted(fast_dropout_checks.CHECKS))
def test_philox_dropout_in_interpreter(interpreter_results, name):
    results, stderr = interpreter_results
    assert name in results, f"check {name} did not run; stderr: {stderr}"
    status, why = results[name]
    assert status == "ok", why


def _close(got, want, rtol, atol, what):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, what
    err = (got - want).abs() - (atol + rtol * want.abs())
    assert err.max().item() <= 0, f"{what}: max excess {err.max().item():.3g}"


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("chunk_rows", [2048, 7])
def test_swiglu_down_matches_autograd(p, recompute, chunk_rows, monkeypatch):
    """SwiGLUDownFunction (torch mask family on CPU) vs autograd over down(silu(g) * u) with LoRA and the same
    keep-mask; in recompute mode the output is a zero-stride placeholder and dg, du land in g, u's storage.
    chunk_rows: the backward's row chunks (the torch family with dropout keeps one chunk)."""
    monkeypatch.setattr(fp, "_MLP_CHUNK_ROWS", chunk_rows)
    torch.manual_seed(0)
    N, F_, C, r, s, seed = 29, 40, 24, 6, 0.5, 4321
    base = nn.Linear(F_, C, bias=True).requires_grad_(False)
    g = torch.randn(N, F_, requires_grad=True)
    u = torch.randn(N, F_, requires_grad=True)
    A = torch.randn(r, F_, requires_grad=True)
    B = torch.randn(C, r, requires_grad=True)
    g1, u1 = g * 1, u * 1                                     # non-leaf inputs (in place is allowed on these)
    y = fp.SwiGLUDownFunction.apply(g1, u1, A, B, base, C, s, p, seed, not recompute, recompute)
    dy = torch.randn(N, C)
    dg, du, dA, dB = torch.autograd.grad(y, (g, u, A, B), dy)
    keep = fp._keep_mask((N, F_), p, seed, g.device, g.dtype) if p > 0 else torch.ones(N, F_)
    g2, u2, A2, B2 = (t.detach().clone().requires_grad_() for t in (g, u, A, B))
    h = torch.nn.functional.silu(g2) * u2
    y_ref = base(h) + s * ((h * keep / (1 - p)) @ A2.t()) @ B2.t()
    want = torch.autograd.grad(y_ref, (g2, u2, A2, B2), dy)
    if recompute:
        assert y.stride() == (0, 0) and y.shape == (N, C)
    else:
        _close(y, y_ref, 1e-5, 1e-5, "y")
    for got, w, what in zip((dg, du, dA, dB), want, ("dg", "du", "dA", "dB")):
        _close(got, w, 1e-5, 1e-5 * w.abs().max().item(), what)


def test_swiglu_down_without_lora():
    """A frozen down projection without an adapter: the node gives down(silu(g) * u) and its input grads."""
    torch.manual_seed(1)
    base = nn.Linear(16, 8, bias=False).requires_grad_(False)
    g, u = torch.randn(5, 16, requires_grad=True), torch.randn(5, 16, requires_grad=True)
    y = fp.SwiGLUDownFunction.apply(g * 1, u * 1, None, None, base, 8, 1.0, 0.0, 0, True, False)
    dy = torch.randn(5, 8)
    dg, du = torch.autograd.grad(y, (g, u), dy)
    g2, u2 = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    y_ref = base(torch.nn.functional.silu(g2) * u2)
    dg_r, du_r = torch.autograd.grad(y_ref, (g2, u2), dy)
    _close(y, y_ref, 1e-6, 1e-6, "y")
    _close(dg, dg_r, 1e-5, 1e-6, "dg")
    _close(du, du_r, 1e-5, 1e-6, "du")


def test_recompute_skips_the_down_projection(monkeypatch):
    """With checkpointing, a layer's backward reruns its forward without the down projection's matmul (the
    output is never read): down's base runs once per layer (the no-grad forward), the other linears twice."""
    from tests.llama.test_fast_path import batch, tiny_lora_model

    model = fp.enable_fast_path(tiny_lora_model(dropout=0.1), checkpointing=True)
    calls = {}
    real = fp._base_forward

    def counting(base, x2):
        calls[id(base)] = calls.get(id(base), 0) + 1
        return real(base, x2)

    monkeypatch.setattr(fp, "_base_forward", counting)
    ids, labels = batch()
    model(ids, labels=labels).loss.backward()
    for layer in model.model.layers:
        assert calls[id(layer.mlp.down_proj.base_layer)] == 1
        assert calls[id(layer.mlp.up_proj.base_layer)] == 2
        assert calls[id(layer.self_attn.q_proj.base_layer)] == 2


class _HostOffloader:
    """A CPU stand-in for ActivationOffloader: keeps copies, records save/prefetch/load calls in order."""

    def __init__(self):
        self.store, self.fetched, self.calls = {}, set(), []

    def save(self, i, x):
        self.calls.append(("save", i))
        self.store[i] = x.detach().clone()

    def release_saved(self):
        self.calls.append(("release", None))

    def prefetch(self, i):
        if i < 0 or i not in self.store or i in self.fetched:
            return
        self.calls.append(("prefetch", i))
        self.fetched.add(i)

    def load(self, i):
        self.prefetch(i)
        self.fetched.discard(i)
        self.calls.append(("load", i))
        return self.store[i]


def test_offloaded_recompute_prefetches_after_the_mlp_backward():
    """OffloadedCheckpoint with an offloader (CUDA-only in enable_fast_path, stubbed here): the same grads as
    checkpointing without one, and layer i's recompute prefetches layer i-1's input from its backward (after
    the MLP half), before layer i-1 loads it."""
    from tests.llama.test_fast_path import batch, loss_and_grads, tiny_lora_model

    plain = fp.enable_fast_path(tiny_lora_model(dropout=0.2), checkpointing=True)
    off = fp.enable_fast_path(tiny_lora_model(dropout=0.2), checkpointing=True)
    stub = _HostOffloader()
    for layer in off.model.layers:
        layer._offloader = stub
    ids, labels = batch()
    loss_p, grads_p = loss_and_grads(plain, ids, labels, seed=3)
    loss_o, grads_o = loss_and_grads(off, ids, labels, seed=3)
    _close(loss_o, loss_p, 0, 0, "loss")
    for name in grads_p:
        _close(grads_o[name], grads_p[name], 1e-6, 1e-9, f"grad {name}")
    n = len(off.model.layers)
    fwd = [c for c in stub.calls if c[0] in ("save", "release")]
    assert fwd == [c for i in range(n) for c in (("save", i), ("release", None))], fwd   # each copy let go
    bwd = [c for c in stub.calls if c[0] not in ("save", "release")]
    want = []
    for i in reversed(range(n)):
        want += [("load", i)] + ([("prefetch", i - 1)] if i > 0 else [])
    assert bwd == [("prefetch", n - 1)] + want, bwd


def test_path_choice_times_candidates_in_interleaved_rounds(monkeypatch):
    """The first-use choice of a philox-family path (CUDA only; here with fake candidates, timer and correctness
    check): every candidate is timed once in each of _PATH_ROUNDS interleaved rounds and keeps its best, so one
    slow round (contention) does not decide; split wins only when under 0.9x the best fused time."""
    class Ref:
        is_cuda, dtype, device = True, torch.bfloat16, torch.device("cpu")

    def run(times):                      # times: {name: [ms of round 1, 2, 3]}
        called, left = [], {n: iter(t) for n, t in times.items()}
        cands = {n: (lambda *a, n=n: called.append(n)) for n in times}

        def timer(fn, reps=5):
            fn()
            return next(left[called[-1]])
        monkeypatch.setattr(fp, "_candidates", lambda op: cands)
        monkeypatch.setattr(fp, "_time_ms", timer)
        monkeypatch.setattr(fp, "_fused_ok_names", lambda *a, **k: ["fused0", "fused1"])
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
        fp._PATHS.clear()
        try:
            return fp._path("xa", 8192, 4096, 64, Ref(), (None, None, 0.1, 1, 0, None)), called
        finally:
            fp._PATHS.clear()

    assert fp._PATH_ROUNDS == 3
    # a fused candidate that the first-use check rejected is listed with its reason
    def check(op, K, R, dtype, device, names, kc, why):
        why["fused1"] = "RuntimeError: PassManager::run failed"
        return ["fused0"]
    monkeypatch.setattr(fp, "_fused_ok_names", check)
    monkeypatch.setattr(fp, "_candidates", lambda op: {"fused0": lambda *a: None, "fused1": None,
                                                       "split": lambda *a: None})
    monkeypatch.setattr(fp, "_time_ms", lambda fn, reps=5: 1.0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    fp._PATHS.clear()
    try:
        assert fp._path("xa", 8192, 4096, 64, Ref(), (None, None, 0.1, 1, 0, None)) == "fused0"
        assert fp.lora_kernel_paths()["xa N>=4096 4096 64 bfloat16 rejected"] == {
            "fused1": "RuntimeError: PassManager::run failed"}
    finally:
        fp._PATHS.clear()
        monkeypatch.undo()
    # fused0 hit by a burst in round 1 only: still the fastest
    name, called = run({"fused0": [9.0, 1.0, 1.0], "fused1": [1.2, 1.2, 1.3], "split": [1.05, 1.05, 1.1]})
    assert called == ["fused0", "fused1", "split"] * 3 and name == "fused0"
    # split under 0.9x the best fused: chosen
    assert run({"fused0": [1.0] * 3, "fused1": [1.2] * 3, "split": [0.8, 0.85, 0.8]})[0] == "split"
    # split faster, but not by 10%: fused (the split path also holds an (N, K) temporary)
    assert run({"fused0": [1.0] * 3, "fused1": [1.2] * 3, "split": [0.95] * 3})[0] == "fused0"


def test_launch_fallback_is_recorded(monkeypatch):
    """A chosen fused candidate that fails at launch runs the split path instead (same mask), and the failure is
    listed in lora_kernel_paths() (once per op and candidate), not only printed by the compiler."""
    calls = []

    def broken(*a):
        calls.append("fused0")
        raise RuntimeError("PassManager::run failed\n(the MLIR dump)")

    monkeypatch.setattr(fp, "_candidates", lambda op: {"fused0": broken, "split": lambda *a: calls.append("split")})
    monkeypatch.setattr(fp, "_interpreting", lambda: False)
    fp._PATHS.clear()
    try:
        fp._run("xa", "fused0", ())
        fp._run("xa", "fused0", ())
        assert calls == ["fused0", "split"] * 2
        assert fp.lora_kernel_paths() == {"launch fallback xa fused0": "RuntimeError: PassManager::run failed"}
    finally:
        fp._PATHS.clear()


def test_offloader_deepcopy_gives_the_copy_its_own(monkeypatch):
    """A deep copy of a model whose layers share one ActivationOffloader shares one new offloader among its own
    layers: a new side stream and no host buffers (the original's stay its own). torch.cuda.Stream is replaced
    by a stand-in: the offloader is CUDA-only."""
    import copy

    class FakeStream:
        made = 0

        def __init__(self, device):
            FakeStream.made += 1

    from tests.llama.test_fast_path import tiny_lora_model

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    model = fp.enable_fast_path(tiny_lora_model(), checkpointing=True)
    off = fp.ActivationOffloader(torch.device("cpu"))
    off.host[0] = torch.ones(3)
    for layer in model.model.layers:
        layer._offloader = off
    twin = copy.deepcopy(model)
    offs = {id(layer._offloader) for layer in twin.model.layers}
    new = twin.model.layers[0]._offloader
    assert len(offs) == 1 and new is not off and new.stream is not off.stream and FakeStream.made == 2
    assert new.host == {} and off.host[0].sum() == 3


def test_offloader_keeps_host_buffers_a_graph_captured(monkeypatch):
    """A layer input saved while a CUDA graph is being captured pins its host buffer: a batch of another shape
    that replaces the buffer in `host` leaves the captured one alive (freed, the pinned block could be handed
    to another tensor that the graph's replays would then overwrite); a buffer no capture used is let go."""
    import weakref

    class FakeStream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

        def wait_event(self, ev):
            pass

    class FakeEvent:
        def record(self, stream=None):
            pass

    capturing = [False]
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    off = fp.ActivationOffloader(torch.device("cpu"))
    off._host_empty = lambda shape, dtype: torch.empty(shape, dtype=dtype)
    off.save(0, torch.ones(2, 3))
    off.release_saved()
    eager_buf = weakref.ref(off.host[0])
    off.save(0, torch.ones(4, 3))                      # another shape, no capture: the old buffer goes
    off.release_saved()
    assert eager_buf() is None and off.host[0].shape == (4, 3)
    capturing[0] = True
    off.save(0, torch.full((4, 3), 2.0))               # captured: this buffer is held
    off.release_saved()
    capturing[0] = False
    held = weakref.ref(off.host[0])
    off.save(0, torch.ones(5, 3))
    off.release_saved()
    assert held() is not None and held() is off.graph_held[0] and off.host[0].shape == (5, 3)
    assert torch.equal(off.load(0), torch.ones(5, 3))
    off.free()
    assert held() is None and off.host == {}
