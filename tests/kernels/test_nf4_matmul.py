"""Fused NF4 matmul kernels in the interpreter against float64 math on the same dequantized weight.

Tolerances (relative Frobenius error): float32 inputs 1e-5 (float32 accumulation over K <= 320),
float16 inputs 2e-3 (the output's own float16 rounding is ~3e-4)."""
import dataclasses
import importlib

import pytest
import torch

import nf4
from kernels._common import interpreting

from .helpers import rel_err

mm = importlib.import_module("kernels.nf4_matmul")

pytestmark = pytest.mark.skipif(not interpreting(), reason="CPU interpreter tests; test_cuda.py covers the GPU")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def make(N, K, dq, quant_type="nf4", blocksize=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return nf4.QuantizedWeight4bit.from_tensor(torch.randn(N, K, generator=g), blocksize, quant_type, dq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("M,paths", [(1, ["gemv", "gemv2", "decode", "swap"]),
                                     (5, ["decode", "swap", "gemm"]), (19, ["gemm", "swap"])])
def test_forward_paths(dtype, dq, M, paths):
    N, K = 37, 192                         # odd N; K a multiple of 64 so the blocked paths apply
    qw = make(N, K, dq, seed=M)
    w = qw.dequantize(dtype).double()
    x = torch.randn(M, K).to(dtype)
    b = torch.randn(N).to(dtype)
    ref = x.double() @ w.T + b.double()
    for path in paths:
        y = mm.nf4_matmul_fused(x, qw, b, path=path)
        assert y.dtype == dtype and y.shape == (M, N)
        assert rel_err(y, ref) < TOL[dtype], path
    assert rel_err(mm.nf4_matmul_fused(x, qw), x.double() @ w.T) < TOL[dtype]  # no bias


@pytest.mark.parametrize("quant_type,blocksize", [("nf4", 32), ("fp4", 64), ("nf4", 128)])
def test_forward_rows_straddle_blocks(quant_type, blocksize):
    """K = 200 is not a multiple of the blocksize: 4-bit blocks span two rows of W."""
    qw = make(21, 200, False, quant_type, blocksize)
    w = qw.dequantize(torch.float32).double()
    x = torch.randn(3, 200)
    assert rel_err(mm.nf4_matmul_fused(x, qw, path="decode"), x.double() @ w.T) < 1e-5
    assert rel_err(mm.nf4_matmul_fused(x[:1], qw, path="gemv"), x[:1].double() @ w.T) < 1e-5
    g = torch.randn(3, 21)
    assert rel_err(mm.nf4_matmul_t_fused(g, qw), g.double() @ w) < 1e-5


def test_split_k_and_strided_input():
    qw = make(40, 256, True)
    w = qw.dequantize(torch.float32).double()
    x = torch.randn(256, 6).t()            # (6, 256), non-contiguous
    cfg = dict(BM=16, BN=16, BK=64, SPLIT_K=3, GROUP_M=1)
    assert rel_err(mm.nf4_matmul_fused(x, qw, path="decode", config=cfg), x.double() @ w.T) < 1e-5
    cfg = dict(BM=16, BN=16, NB=2, SPLIT_K=2, LUT=0)
    assert rel_err(mm.nf4_matmul_fused(x, qw, path="swap", config=cfg), x.double() @ w.T) < 1e-5


# LUT modes of the v2 decode kernels: 0/1 read the exact float32 table (one or two gathers), 2 and 3 the
# table rounded to float16 (3 = register permutes on a GPU; the interpreter reads the same float16 values),
# whose relative error (~2^-11 per weight, ~2e-4 on a product) is below a bf16 weight's own rounding.
LUT_TOL = {0: 1e-5, 1: 1e-5, 2: 1e-3, 3: 1e-3}


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("lut", [0, 1, 2, 3])
@pytest.mark.parametrize("M,path,split_k", [(1, "gemv2", 1), (1, "gemv2", 3), (5, "swap", 1), (19, "swap", 2)])
def test_v2_decode_paths(quant_type, dq, lut, M, path, split_k):
    """The v2 GEMV (M = 1) and the swapped tensor-core kernel (small M, x.T as the second operand) against
    float64 math: every LUT mode, split-K, odd N, bias, float32 (tight) inputs."""
    N, K = 37, 320
    qw = make(N, K, dq, quant_type, seed=M + lut)
    w = qw.dequantize(torch.float32).double()
    x = torch.randn(M, K)
    b = torch.randn(N)
    for xsplit in ((0, 1, 2) if path == "gemv2" else (None,)):
        cfg = dict(mm._V2_INTERP[path], LUT=lut, SPLIT_K=split_k)
        if xsplit is not None:
            cfg["XSPLIT"] = xsplit
        y = mm.nf4_matmul_fused(x, qw, b, path=path, config=cfg)
        assert y.shape == (M, N) and y.dtype == torch.float32
        assert rel_err(y, x.double() @ w.T + b.double()) < max(LUT_TOL[lut], 1e-5), (path, lut, xsplit)


def test_v2_paths_fp16_and_bad_input():
    qw = make(24, 256, True, seed=3)
    w = qw.dequantize(torch.float16).double()
    x = torch.randn(3, 256).half()
    assert rel_err(mm.nf4_matmul_fused(x, qw, path="swap"), x.double() @ w.T) < 2e-3
    assert rel_err(mm.nf4_matmul_fused(x[:1], qw, path="gemv2"), x[:1].double() @ w.T) < 2e-3
    with pytest.raises(ValueError, match="one row"):
        mm.nf4_matmul_fused(x, qw, path="gemv2")
    q200 = make(8, 200, False)             # 200 % 64 != 0: no whole-block kernels
    with pytest.raises(ValueError, match="blocksize"):
        mm.nf4_matmul_fused(torch.randn(1, 200), q200, path="gemv2")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_word_gemv(quant_type, dq):
    """The word GEMV (gemv3: one 32-bit word of 8 codes per element, R rows a program) against float64 math
    on the exact dequantized weight: float16 input, then bf16 input through split-K (float32 partial sums);
    odd N (the last program's extra rows re-read row N - 1 and are not stored), K not a multiple of the
    words a step (the last word is re-read against a zero x), blocksizes 32 / 64 / 128. Values come from the
    float16-rounded table, as on the GPU: ~2^-11 per weight, below the float16 output's own rounding."""
    for N, K, bs, cfg in [(37, 320, 64, dict(R=4, WT=16)), (9, 256, 32, dict(R=2, WT=32, PREFETCH=True)),
                          (6, 384, 128, dict(R=1, WT=16))]:
        qw = make(N, K, dq, quant_type, bs, seed=N)
        w = qw.dequantize(torch.float32).double()
        x = torch.randn(1, K)
        b = torch.randn(N)
        y = mm.nf4_matmul_fused(x.half(), qw, b.half(), path="gemv3", config=dict(cfg, SPLIT_K=1))
        assert y.dtype == torch.float16 and y.shape == (1, N)
        assert rel_err(y, x.half().double() @ w.T + b.half().double()) < 2e-3, (N, K, bs)
        xb = x.bfloat16()
        y = mm.nf4_matmul_fused(xb, qw, path="gemv3", config=dict(cfg, SPLIT_K=3))
        assert rel_err(y, xb.double() @ w.T) < 5e-3, (N, K, bs)    # 5e-3: the bf16 output's rounding (2^-9)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_word_gemv_rows(quant_type, dq):
    """The word GEMV at 2..4 rows of x (`_nf4_gemv_wm_kernel`: each weight word looked up once and used for
    every row): M = 3 pads to 4 rows, the padding row re-reads row 2 and is not stored (a stored one would
    write past y); odd N, split-K, blocksizes 32 / 64 / 128."""
    for M, N, K, bs, cfg in [(2, 37, 320, 64, dict(R=2, WT=16)), (3, 9, 256, 32, dict(R=1, WT=16, SPLIT_K=3)),
                             (4, 6, 384, 128, dict(R=2, WT=32)), (3, 11, 192, 64, dict(R=2, WT=16))]:
        qw = make(N, K, dq, quant_type, bs, seed=M)
        w = qw.dequantize(torch.float32).double()
        x = torch.randn(M, K)
        b = torch.randn(N)
        y = mm.nf4_matmul_fused(x.half(), qw, b.half(), path="gemv3", config=cfg)
        assert y.dtype == torch.float16 and y.shape == (M, N)
        assert rel_err(y, x.half().double() @ w.T + b.half().double()) < 2e-3, (M, N, K, bs)
        for m in range(M):  # every row on its own (no row's values leak into another)
            assert rel_err(y[m:m + 1], x[m:m + 1].half().double() @ w.T + b.half().double()) < 2e-3, (M, m)


def test_word_gemv_bad_input():
    qw = make(8, 256, False)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mm.nf4_matmul_fused(torch.randn(1, 256), qw, path="gemv3")
    with pytest.raises(ValueError, match="R = 1, 2 or 4"):
        mm.nf4_matmul_fused(torch.randn(1, 256).half(), qw, path="gemv3", config=dict(R=3, WT=16))
    with pytest.raises(ValueError, match="1 to 4 rows"):
        mm.nf4_matmul_fused(torch.randn(5, 256).half(), qw, path="gemv3")
    with pytest.raises(ValueError, match="R = 1 or 2 rows"):
        mm.nf4_matmul_fused(torch.randn(2, 256).half(), qw, path="gemv3", config=dict(R=4, WT=16))
    with pytest.raises(ValueError, match="prefetches only at M = 1"):
        mm.nf4_matmul_fused(torch.randn(2, 256).half(), qw, path="gemv3", config=dict(WT=16, PREFETCH=True))
    q200 = make(8, 200, False)
    with pytest.raises(ValueError, match="blocksize"):
        mm.nf4_matmul_fused(torch.randn(1, 200).half(), q200, path="gemv3")


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
def test_mma_rows(quant_type, dq):
    """The tensor-core decode kernel (kernels/nf4_mma.py, the mma fragments emulated lane by lane): 1 to 16 rows
    of x (8 and 16 row groups, rows past M re-read and not stored), odd N (rows past N), 1 or 2 tiles of 16
    rows, 1-4 warps interleaving units, split-K with a slice that does not divide into whole steps, the
    next step prefetched, blocksizes 64 / 128 (2 units a block), bias, persistent programs looping over tiles;
    each row of x on its own."""
    for M, N, K, bs, cfg in [(1, 40, 192, 64, dict(RT=1, NW=2)),
                             (3, 37, 256, 128, dict(RT=2, NW=1, PREFETCH=True)),
                             (9, 33, 320, 64, dict(RT=2, NW=2, SPLIT_K=2, PREFETCH=True)),
                             (16, 17, 128, 64, dict(RT=1, NW=4)),
                             (8, 50, 448, 64, dict(RT=2, NW=2, SPLIT_K=3, LUT=1)),
                             # persistent: 2 programs over 5 tiles (3 and 2 each), 1 program over 3 tiles of 32 rows
                             (5, 75, 192, 64, dict(RT=1, NW=2, PERSIST=2)),
                             (12, 70, 256, 64, dict(RT=2, NW=1, PERSIST=1, SPLIT_K=2, PREFETCH=True))]:
        qw = make(N, K, dq, quant_type, bs, seed=M)
        w = qw.dequantize(torch.float32).double()
        x = torch.randn(M, K)
        b = torch.randn(N)
        y = mm.nf4_matmul_fused(x.half(), qw, b.half(), path="mma", config=cfg)
        assert y.dtype == torch.float16 and y.shape == (M, N)
        assert rel_err(y, x.half().double() @ w.T + b.half().double()) < 2e-3, (M, N, K, bs)
        for m in range(M):  # every row on its own (no row's values leak into another)
            assert rel_err(y[m:m + 1], x[m:m + 1].half().double() @ w.T + b.half().double()) < 2e-3, (M, m)


def test_mma_bf16_table():
    """bf16 x: the mma path rounds the table to bfloat16 (as bitsandbytes' bf16 dequantize rounds its values):
    within 4e-3 of float64 math (split-K: float32 y, so the interpreter never stores bf16)."""
    M, N, K = 5, 24, 256
    qw = make(N, K, True, seed=3)
    x = torch.randn(M, K).bfloat16()
    y = mm.nf4_matmul_fused(x, qw, path="mma", config=dict(RT=1, NW=2, SPLIT_K=2))
    assert y.dtype == torch.bfloat16
    ref = x.double() @ qw.dequantize(torch.float32).double().T
    assert rel_err(y, ref) < 4e-3


def test_mma_candidates():
    """The dispatcher offers the mma kernel where it applies (1-16 rows, bf16/fp16, K and blocksize multiples of
    64), first, and nowhere else."""
    specs = mm._forward_specs
    assert list(specs(1, 40, 192, 64, torch.float16, False))[0] == "mma"
    assert list(specs(16, 40, 192, 128, torch.bfloat16, False))[0] == "mma"
    for M, K, bs, dtype in [(17, 192, 64, torch.float16), (4, 192, 64, torch.float32), (4, 192, 32, torch.float16),
                            (4, 96, 32, torch.float16)]:
        assert not any(s and s[0] == "mma" for s in specs(M, 40, K, bs, dtype, False).values()), (M, K, bs, dtype)
    # on a GPU: every register-table config, and the shared-memory table only for long rows
    mma_mod = importlib.import_module("kernels.nf4_mma")
    assert mma_mod.mma_candidates(8192) == ["mma", "mma-rt1", "mma-rt1-nw4", "mma-nw16"]
    assert mma_mod.mma_candidates(28672)[-1] == "mma-smem"
    assert all(mma_mod.MMA_CANDIDATES[n].get("LUT", 0) == 0 for n in mma_mod.mma_candidates(8192))


def test_mma_misaligned_weight_falls_back():
    """A packed weight whose storage is not 8-byte aligned (a view at an odd offset) cannot be read as 64-bit
    words: the public dispatch skips the mma kernel for it (not an error) and the forced path says why."""
    qw = make(40, 192, False, seed=5)
    buf = torch.zeros(qw.packed.numel() + 4, dtype=torch.uint8)
    buf[4:] = qw.packed.reshape(-1)
    odd = dataclasses.replace(qw, packed=buf[4:].view(qw.packed.shape))
    assert odd.packed.data_ptr() % 8 == 4
    x = torch.randn(3, 192).half()
    ref = x.double() @ qw.dequantize(torch.float32).double().T
    assert rel_err(mm.nf4_matmul(x, odd, backend="triton"), ref) < 2e-3
    with pytest.raises(ValueError, match="8-byte aligned"):
        mm.nf4_matmul_fused(x, odd, path="mma")


def test_mma_bad_input():
    qw = make(8, 256, False)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        mm.nf4_matmul_fused(torch.randn(1, 256), qw, path="mma")
    with pytest.raises(ValueError, match="1 to 16 rows"):
        mm.nf4_matmul_fused(torch.randn(17, 256).half(), qw, path="mma")
    with pytest.raises(ValueError, match="RT must be one of"):
        mm.nf4_matmul_fused(torch.randn(1, 256).half(), qw, path="mma", config=dict(RT=3))
    with pytest.raises(ValueError, match="LUT must be one of"):
        mm.nf4_matmul_fused(torch.randn(1, 256).half(), qw, path="mma", config=dict(LUT=2))
    with pytest.raises(ValueError, match="unknown mma config keys"):
        mm.nf4_matmul_fused(torch.randn(1, 256).half(), qw, path="mma", config=dict(R=2))
    with pytest.raises(ValueError, match="PERSIST"):
        mm.nf4_matmul_fused(torch.randn(1, 256).half(), qw, path="mma", config=dict(PERSIST=-1))
    q32 = make(8, 256, False, blocksize=32)
    with pytest.raises(ValueError, match="divisible by 64"):
        mm.nf4_matmul_fused(torch.randn(1, 256).half(), q32, path="mma")
    q96 = make(8, 96, False, blocksize=32)   # 96 = 1.5 units
    with pytest.raises(ValueError, match="divisible by 64"):
        mm.nf4_matmul_fused(torch.randn(1, 96).half(), q96, path="mma")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("M", [1, 18])
def test_grad_x(dtype, dq, M):
    N, K = 45, 130
    qw = make(N, K, dq, seed=M + 1)
    w = qw.dequantize(dtype).double()
    g = torch.randn(M, N).to(dtype)
    ref = g.double() @ w
    assert rel_err(mm.nf4_matmul_t_fused(g, qw), ref) < TOL[dtype]
    cfg = dict(BM=16, BN=16, BK=32, SPLIT_N=2, GROUP_M=1)
    assert rel_err(mm.nf4_matmul_t_fused(g, qw, config=cfg), ref) < TOL[dtype]


def test_dispatch():
    qw = make(30, 128, False)
    x = torch.randn(2, 3, 128)
    ref = x.double() @ qw.dequantize(torch.float32).double().T
    y_torch = mm.nf4_matmul(x, qw)                       # CPU tensor -> the torch reference
    y_triton = mm.nf4_matmul(x, qw, backend="triton")    # forced: the interpreter
    assert y_torch.shape == y_triton.shape == (2, 3, 30)
    assert rel_err(y_torch, ref) < 1e-5 and rel_err(y_triton, ref) < 1e-5
    assert rel_err(mm.nf4_matmul_dequant(x.reshape(6, 128), qw), ref.reshape(6, 30)) < 1e-5
    gx = mm.nf4_matmul_t(torch.randn(2, 3, 30), qw, backend="triton")
    assert gx.shape == (2, 3, 128)
    # odd in_features has no fused kernel: the public function still answers (dequantize + matmul)
    qodd = make(8, 33, False)
    xo = torch.randn(4, 33)
    assert rel_err(mm.nf4_matmul(xo, qodd, backend="triton"), xo.double() @ qodd.dequantize().double().T) < 1e-5
    with pytest.raises(ValueError, match="even in_features"):
        mm.nf4_matmul_fused(xo, qodd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", ["torch", "fused", "dequant"])
def test_grad_x_accumulates_into_out(dtype, path, monkeypatch):
    """nf4_matmul_t(g, W, out=o): o += g @ W in place and o returned, on the reference, the fused kernel and the
    dequantize + matmul (epilogue) path; leading dims of g and o are kept."""
    qw = make(40, 96, True, seed=3)
    g = torch.randn(2, 3, 40).to(dtype)
    prev = torch.randn(2, 3, 96).to(dtype)
    o = prev.clone()
    if path != "torch":
        mm._path_cache.clear()
        monkeypatch.setattr(mm, "_pick", lambda key, candidates, eager=False: path)
    got = mm.nf4_matmul_t(g, qw, backend="torch" if path == "torch" else "triton", out=o)
    assert got is o and o.shape == (2, 3, 96)
    ref = prev.double() + g.double() @ qw.dequantize(dtype).double()
    assert rel_err(o, ref) < TOL[dtype]
    mm._path_cache.clear()


def test_grad_x_out_bad_input():
    qw = make(40, 96, False)
    g = torch.randn(6, 40)
    with pytest.raises(ValueError, match=r"out must be \(6, 96\) torch.float32"):
        mm.nf4_matmul_t(g, qw, out=torch.zeros(6, 95))
    with pytest.raises(ValueError, match="out must be"):
        mm.nf4_matmul_t(g, qw, out=torch.zeros(6, 96, dtype=torch.float64))
    with pytest.raises(ValueError, match="contiguous"):
        mm.nf4_matmul_t(g, qw, out=torch.zeros(96, 6).T)


def test_pipelined_timer_with_fake_events(monkeypatch):
    """The dispatcher's timer (GPU only) on fake CUDA events: short kernels are timed as 3 x 20 back-to-back
    calls, long ones (> 0.5 ms a call) by single calls only, so slow candidates cost a few calls, not 60."""
    clock = {"t": 0.0}
    calls = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.t = None

        def record(self):
            self.t = clock["t"]

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return other.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)

    def kernel(ms):
        def fn():
            calls.append(ms)
            clock["t"] += ms
        return fn

    assert mm._time_pipelined(kernel(0.01)) == pytest.approx(0.01)
    assert len(calls) == 2 + 3 * 20
    calls.clear()
    assert mm._time_pipelined(kernel(2.0)) == pytest.approx(2.0)
    assert len(calls) == 4                       # warm-up, one timed call, two more
    calls.clear()
    assert mm._time_pipelined(kernel(20.0)) == pytest.approx(20.0)
    assert len(calls) == 2


def test_v2_launch_plan_follows_the_weight():
    """The v2 launch plan is cached per weight: replacing the weight's tensors (a reload) or the weight
    object itself must not reuse stale codes or scales."""
    x = torch.randn(1, 128)
    qa, qb = make(16, 128, False, seed=1), make(16, 128, False, seed=2)
    ya = mm.nf4_matmul_fused(x, qa, path="gemv2")
    assert rel_err(ya, x.double() @ qa.dequantize(torch.float32).double().T) < 1e-5
    qa.packed, qa.absmax = qb.packed, qb.absmax                  # same object, new tensors
    yb = mm.nf4_matmul_fused(x, qa, path="gemv2")
    assert rel_err(yb, x.double() @ qb.dequantize(torch.float32).double().T) < 1e-5
    for seed in range(3, 6):                                     # new objects (ids may be reused)
        qn = make(16, 128, True, seed=seed)
        yn = mm.nf4_matmul_fused(x, qn, path="gemv2")
        assert rel_err(yn, x.double() @ qn.dequantize(torch.float32).double().T) < 1e-5
        del qn


@pytest.mark.parametrize("M", [1, 5])
def test_small_m_dispatch_fast_path(M):
    """After its first small-M call, nf4_matmul launches the chosen kernel's plan directly: the same result
    as the full dispatch, for 2-D and batched x, and a replaced or new weight never reuses a stale plan."""
    x = torch.randn(M, 128)
    qa, qb = make(16, 128, False, seed=7), make(16, 128, True, seed=8)
    first = mm.nf4_matmul(x, qa, backend="triton")
    key = (id(qa), M, 128, x.dtype, True, x.device, False)  # CPU: not an eager GPU call
    assert key in mm._FAST and mm._FAST[key].valid_for(qa)
    again = mm.nf4_matmul(x, qa, backend="triton")
    assert torch.equal(first, again)
    assert torch.equal(mm.nf4_matmul(x.view(1, M, 128), qa, backend="triton"), first.view(1, M, 16))
    assert rel_err(first, x.double() @ qa.dequantize(torch.float32).double().T) < 1e-5
    qa.packed, qa.absmax, qa.nested = qb.packed, qb.absmax, qb.nested        # same object, new tensors
    y = mm.nf4_matmul(x, qa, backend="triton")
    assert rel_err(y, x.double() @ qb.dequantize(torch.float32).double().T) < 1e-5
    for seed in range(9, 12):                                                # new objects (ids may be reused)
        qn = make(16, 128, seed % 2 == 0, seed=seed)
        yn = mm.nf4_matmul(x, qn, backend="triton")
        assert rel_err(yn, x.double() @ qn.dequantize(torch.float32).double().T) < 1e-5
        del qn
    assert not mm._FAST.get((id(x), M, 128, x.dtype, True, x.device, False))       # only weights key plans
    assert torch.equal(mm.nf4_matmul(x, qb, backend="torch"),               # the torch backend is untouched
                       torch.nn.functional.linear(x, qb.dequantize(torch.float32)))


def test_pick_interleaves_rounds(monkeypatch):
    """The dispatcher's choice (GPU only; timer faked): every candidate is timed once per round, the rounds one
    after another, and keeps its best, so a burst that slows one candidate in one round does not decide; a
    candidate that raises is never chosen and not retried."""
    script = {("a", 0): 5.0, ("b", 0): 2.0, ("a", 1): 1.0, ("b", 1): 2.0}   # "a" hit by a burst in round 0
    order = []

    def fake_time(fn, calls=20, reps=3):
        return fn()

    def cand(name):
        def fn():
            r = sum(1 for n in order if n == name)
            order.append(name)
            if name == "bad":
                raise RuntimeError("does not compile here")
            return script[(name, r)]
        return fn

    monkeypatch.setattr(mm, "_time_pipelined", fake_time)
    monkeypatch.setattr(mm, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    key = ("test_pick_interleaves_rounds",)
    mm._path_cache.pop(key, None)
    try:
        assert mm._pick(key, {"b": cand("b"), "bad": cand("bad"), "a": cand("a")}) == "a"
        assert order == ["b", "bad", "a"] + ["b", "a"] * (mm.PICK_ROUNDS - 1)
    finally:
        mm._path_cache.pop(key, None)


@pytest.mark.parametrize("M,graphed", [(1, True), (16, True), (32, False), (4096, False)])
def test_pick_times_decode_from_graphs(monkeypatch, M, graphed):
    """Decode-sized calls (M bucket <= 16) are timed both replayed from CUDA graphs (GPU time, for calls being
    captured, as generation runs them) and launched back to back (host included, for eager calls), and keep a
    choice for each; larger ones are timed launched back to back only (timers faked: each candidate returns its
    (graph, eager) times, and which timer ran is what is checked)."""
    used = []

    def timer(kind):
        def fake(fn, calls=20, reps=3):
            used.append(kind)
            return fn()[0 if kind == "graph" else 1]
        return fake

    monkeypatch.setattr(mm, "_time_graph", timer("graph"))
    monkeypatch.setattr(mm, "_time_pipelined", timer("eager"))
    monkeypatch.setattr(mm, "interpreting", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    key = ("fwd", mm._m_bucket(M), (8, 8), False, 64, torch.bfloat16, True)
    # "split": fastest on the GPU, slowest with its extra launches from Python; "single": the reverse
    cands = {"split": lambda: (1.0, 3.0), "single": lambda: (2.0, 2.0)}
    keys = (key, key + ("eager",))
    for k in keys:
        mm._path_cache.pop(k, None)
    try:
        if graphed:
            assert mm._pick(key, cands, eager=True) == "single"
            assert sorted(set(used)) == ["eager", "graph"] and len(used) == 2 * 2 * mm.PICK_ROUNDS
            assert mm._pick(key, cands) == "split" and len(used) == 4 * mm.PICK_ROUNDS   # cached, not re-timed
            assert mm._path_cache[key] == "split" and mm._path_cache[key + ("eager",)] == "single"
        else:
            assert mm._pick(key, cands, eager=True) == "single" == mm._pick(key, cands)
            assert set(used) == {"eager"} and len(used) == 2 * mm.PICK_ROUNDS
            assert key + ("eager",) not in mm._path_cache
    finally:
        for k in keys:
            mm._path_cache.pop(k, None)
