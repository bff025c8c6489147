"""The launch fast path (kernels/_common.py `Launch`) and the launch plans' lifetime, on the CPU.

`Launch` is checked against a stand-in kernel that records how it was called: Triton's path first, the
compiled kernel's runner (every parameter in signature order) while the varying arguments specialize the
same, Triton's path again when they do not. The plans are checked to leave their caches when the weight dies."""
import gc
import importlib
import weakref

import pytest
import torch

import nf4
from kernels._common import Launch, _spec, interpreting

mm = importlib.import_module("kernels.nf4_matmul")


class FakeCompiled:
    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("runner", grid, args))


class FakeKernel:
    """kernel[grid](*args, **kw) as Triton's JITFunction: records the call, returns a 'compiled kernel'."""
    arg_names = ["x_ptr", "w_ptr", "y_ptr", "n", "BLOCK", "FLAG"]

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.log.append(("triton", grid, args, kw))
            return FakeCompiled(self.log)
        return launch


@pytest.fixture
def compiled_mode(monkeypatch):
    """Launch's fast path is off in the interpreter; these tests exercise it with the stand-in kernel."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("QLORA_FAST_LAUNCH", raising=False)


def test_launch_uses_runner_while_specialization_holds(compiled_mode):
    k = FakeKernel()
    w = torch.zeros(64)
    buf = torch.zeros(64)
    launch = Launch(k, (7,), dict(FLAG=True, BLOCK=32, num_warps=4), varying=(0, 2))
    x, y = buf[0:16], torch.zeros(16)
    launch(x, w, y, 48)
    assert k.log[-1] == ("triton", (7, 1, 1), (x, w, y, 48), dict(FLAG=True, BLOCK=32, num_warps=4))
    x2, y2 = buf[16:32], torch.zeros(16)           # another 16-byte-aligned float32 view: same specialization
    launch(x2, w, y2, 48)
    assert k.log[-1] == ("runner", (7, 1, 1), (x2, w, y2, 48, 32, True))   # constexprs in signature order
    x3 = buf[1:17]                                  # 4-byte offset: Triton would compile another variant
    launch(x3, w, y2, 48)
    assert k.log[-1][0] == "triton" and k.log[-1][2][0] is x3
    launch(buf[2:18].half()[:16].float(), w, y2, 48)  # a fresh tensor, aligned again: back on a runner
    assert k.log[-1][0] == "runner"
    launch(buf[5:21], w, y2, 48)                      # the misaligned specialization has its own runner now
    assert k.log[-1][0] == "runner"
    launch(buf[0:16].half(), w, y2, 48)              # another dtype
    assert k.log[-1][0] == "triton"
    assert len(launch.runners) == 3


def test_launch_fast_path_off(compiled_mode, monkeypatch):
    monkeypatch.setenv("QLORA_FAST_LAUNCH", "0")
    k = FakeKernel()
    launch = Launch(k, (2, 3), dict(BLOCK=32, FLAG=False), varying=(0,))
    x, w, y = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    for _ in range(3):
        launch(x, w, y, 4)
    assert [e[0] for e in k.log] == ["triton"] * 3 and k.log[0][1] == (2, 3, 1)


def test_launch_needs_every_constexpr(compiled_mode):
    """A parameter left to its default is not in `kw`: the runner could not be given it, so no fast path."""
    k = FakeKernel()
    launch = Launch(k, (1,), dict(BLOCK=32), varying=(0,))
    x, w, y = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    launch(x, w, y, 4)
    launch(x, w, y, 4)
    assert [e[0] for e in k.log] == ["triton", "triton"]


def test_spec_follows_triton():
    a = torch.zeros(8)
    assert _spec(a) == (torch.float32, True) and _spec(a[1:]) == (torch.float32, False)
    assert _spec(1) == (True, False, True, False) and _spec(32) == (False, True, True, False)
    assert _spec(2**40)[2] is False and _spec(2**63)[3] is True and _spec(True) != _spec(1)


SAMPLES = [0, 1, 2, 15, 16, 32, 48, 2**31 - 1, 2**31, 2**40, 2**63, 2**64 - 1, -1, -16, -2**31, -2**31 - 1, True,
           False, None, 0.5, 3.0]


def test_spec_is_at_least_as_fine_as_triton():
    """Two arguments with the same _spec get the same specialization from Triton's own function (so a cached
    runner is never called with arguments its kernel was not compiled for)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip("this triton has no native_specialize_impl to compare with")
    base = torch.zeros(64)
    samples = SAMPLES + [base[0:8], base[1:9], base[4:12], base.half()[0:8], base.half()[1:9],
                         base.to(torch.bfloat16)[8:16], torch.zeros(3, dtype=torch.int64)]
    triton_spec = lambda a: native_specialize_impl(BaseBackend, a, False, True, True)  # noqa: E731
    for a in samples:
        for b in samples:
            if _spec(a) == _spec(b):
                assert triton_spec(a) == triton_spec(b), (a, b)


@pytest.mark.skipif(not interpreting(), reason="the interpreter runs the plans on the CPU")
@pytest.mark.parametrize("M", [1, 4])
def test_plans_leave_caches_with_their_weight(M):
    """nf4_matmul caches a launch plan per weight (holding its tensors); when the weight object dies the plan
    leaves every cache, so the weight's memory is freed (it used to stay until 4096 plans accumulated)."""
    qw = nf4.QuantizedWeight4bit.from_tensor(torch.randn(48, 128), 64, "nf4", True)
    x = torch.randn(M, 128, dtype=torch.float16)
    y = mm.nf4_matmul(x, qw, backend="triton")
    assert y.shape == (M, 48)
    mine = [c for c in (mm._V2_PLANS, mm._FAST) for p in c.values() if p.qw_ref() is qw]
    assert mine, "nf4_matmul cached no plan for the weight"
    packed = weakref.ref(qw.packed)
    del qw
    gc.collect()
    assert packed() is None, "the weight's packed codes outlived it"
    assert all(p.qw_ref() is not None for c in (mm._V2_PLANS, mm._FAST) for p in c.values())
