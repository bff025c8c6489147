"""The kernel checks on a real GPU in bf16 (and fp16/fp32): bit equality with the nf4 reference and with
bitsandbytes where it is installed, matmul/grad relative errors, NF4Linear on CUDA. Skipped without CUDA."""
import json

import pytest
import torch

import nf4
from nf4.blockwise import canonical_nan

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU (bf16 Triton kernels); the CPU tests run them in the interpreter",
                allow_module_level=True)

import kernels  # noqa: E402
import importlib  # noqa: E402

mm = importlib.import_module("kernels.nf4_matmul")

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bF
except Exception:  # pragma: no cover
    bnb = None


def assert_bits_equal(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    av, bv = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    bad = (av != bv).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.numel()} bytes differ, first at byte {bad[0].item()}"


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def weird(n, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, device="cuda", generator=g) * 3
    x[:64] = 0.0           # an all-zero block
    x[100] = float("nan")  # a NaN
    x[200] = 1e-40         # a denormal
    return x.to(dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_dequantize_bit_exact(quant_type, blocksize, dtype):
    x = weird(1_000_003, dtype, 1)
    p, a = kernels.quantize_4bit(x, blocksize, quant_type)
    pr, ar = nf4.quantize_4bit(x, blocksize, quant_type)
    assert_bits_equal(p, pr, "packed")
    assert_bits_equal(a, ar, "absmax")
    st, sr = kernels.double_quantize(a), nf4.double_quantize(ar)
    assert_bits_equal(st.q, sr.q, "double-quant q")
    assert_bits_equal(st.absmax2, sr.absmax2, "double-quant absmax2")
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        d = kernels.dequantize_4bit(p, a, x.shape, blocksize, quant_type, out_dtype)
        assert_bits_equal(d, nf4.dequantize_4bit(pr, ar, x.shape, blocksize, quant_type, out_dtype), "dequantize")
        d2 = kernels.dequantize_4bit(p, None, x.shape, blocksize, quant_type, out_dtype, nested=st)
        r2 = nf4.dequantize_4bit(pr, nf4.double_dequantize(sr), x.shape, blocksize, quant_type, out_dtype)
        assert_bits_equal(canonical_nan(d2), r2, "dequantize (double quant)")


@pytest.mark.skipif(bnb is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("dq", [False, True])
def test_bit_exact_with_bitsandbytes(dq):
    w = torch.randn(3000, 1024, device="cuda", dtype=torch.bfloat16)
    qw = kernels.quantize_weight(w, 64, "nf4", dq)
    bp, bqs = bF.quantize_4bit(w, blocksize=64, compress_statistics=dq, quant_type="nf4")
    assert_bits_equal(qw.packed, bp, "packed vs bnb")
    if dq:
        assert_bits_equal(qw.nested.q, bqs.absmax, "q vs bnb")
        assert_bits_equal(qw.nested.absmax2, bqs.state2.absmax, "absmax2 vs bnb")
        assert float(qw.nested.offset) == float(bqs.offset)
    else:
        assert_bits_equal(qw.absmax, bqs.absmax, "absmax vs bnb")
    assert_bits_equal(kernels.dequantize_weight(qw, torch.bfloat16), bF.dequantize_4bit(bp, bqs), "dequant vs bnb")


# explicit configs: every path compiles once, without autotuning (keeps this file at a couple of minutes)
CONFIGS = {
    "gemv": dict(BN=16, BK=256), "gemv2": dict(BN=4, NB=8, LUT=3), "gemv3": dict(R=4, WT=256),
    "gemv3_split": dict(R=2, WT=128, SPLIT_K=3), "gemv2_exact": dict(BN=4, NB=4, LUT=1, SPLIT_K=3, XSPLIT=0),
    "decode": dict(BM=16, BN=32, BK=256, SPLIT_K=1, GROUP_M=1), "swap": dict(BM=16, BN=64, NB=2, LUT=3),
    "swap_split": dict(BM=16, BN=32, NB=4, LUT=0, SPLIT_K=2),
    "gemm": dict(BM=64, BN=128, BK=64, SPLIT_K=1, GROUP_M=8, num_warps=4, num_stages=3),
    "split_k": dict(BM=16, BN=32, BK=128, SPLIT_K=4, GROUP_M=1),
}
T_CONFIGS = [dict(BM=64, BN=64, BK=128, SPLIT_N=1, GROUP_M=8), dict(BM=16, BN=64, BK=64, SPLIT_N=4, GROUP_M=1)]


def _setup(M, dq, N=1000, K=768):
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    qw = kernels.quantize_weight(w, 64, "nf4", dq)
    wd = qw.dequantize(torch.bfloat16).double()
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(M, N, device="cuda", dtype=torch.bfloat16)
    return qw, x, b, g, x.double() @ wd.T + b.double(), g.double() @ wd


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("M", [1, 5, 33, 1500])
def test_matmul_and_grad(M, dq):
    qw, x, b, g, ref, gref = _setup(M, dq)
    paths = (["gemv", "gemv2", "gemv2_exact", "gemv3", "gemv3_split", "decode", "swap", "swap_split"] if M == 1 else
             (["decode", "swap", "swap_split", "gemm"] if M <= 16 else ["gemm", "swap"]))
    for p in paths:
        path = p.split("_")[0]
        assert rel_err(mm.nf4_matmul_fused(x, qw, b, path=path, config=CONFIGS[p]), ref) < 1e-2, p
    if M <= 16:
        assert rel_err(mm.nf4_matmul_fused(x, qw, b, path="decode", config=CONFIGS["split_k"]), ref) < 1e-2
        # the register (prmt) table and the float16-pair table in memory hold the same values: the two agree
        # to the bf16 output's rounding (the compiler may order the float32 sums differently)
        path = "gemv2" if M == 1 else "swap"
        cfg = dict(CONFIGS[path])
        regs = mm.nf4_matmul_fused(x, qw, b, path=path, config=cfg)
        mem = mm.nf4_matmul_fused(x, qw, b, path=path, config=dict(cfg, LUT=2))
        e = rel_err(regs, mem)
        assert e < 4e-3, (path, e, rel_err(regs, ref), rel_err(mem, ref))
    assert rel_err(mm.nf4_matmul_dequant(x, qw, b), ref) < 1e-2
    assert rel_err(mm.nf4_matmul_t_dequant(g, qw), gref) < 1e-2
    for cfg in T_CONFIGS:
        assert rel_err(mm.nf4_matmul_t_fused(g, qw, config=cfg), gref) < 1e-2, cfg


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_word_gemv(quant_type, dq, dtype):
    """The word GEMV (register-table lookup in PTX) against float64 math and against the v2 GEMV reading the
    same float16 values from memory (LUT 2): odd N (a last program with fewer than R rows), K not a multiple
    of the words a step, blocksizes 32 and 128, split-K, bias."""
    for N, K, bs, cfg in [(1001, 1344, 64, dict(R=4, WT=256)),
                          (515, 2048, 32, dict(R=2, WT=512, SPLIT_K=4, PREFETCH=True)),
                          (67, 640, 128, dict(R=1, WT=128, num_warps=1))]:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        qw = kernels.quantize_weight(w, bs, quant_type, dq)
        x = torch.randn(1, K, device="cuda", dtype=dtype)
        b = torch.randn(N, device="cuda", dtype=dtype)
        ref = x.double() @ qw.dequantize(torch.float32).double().T + b.double()
        y = mm.nf4_matmul_fused(x, qw, b, path="gemv3", config=cfg)
        assert y.dtype == dtype and y.shape == (1, N)
        assert rel_err(y, ref) < 4e-3, (N, K, bs, rel_err(y, ref))
        mem = mm.nf4_matmul_fused(x, qw, b, path="gemv2", config=dict(BN=4, NB=2, LUT=2, SPLIT_K=1))
        assert rel_err(y, mem) < 4e-3, (N, K, bs)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_word_gemv_rows(dq, dtype, quant_type):
    """The word GEMV at 2..4 rows of x (each weight word looked up once for all rows): the row of x past M = 3
    is computed from row 2 and not stored, odd N, K not a multiple of the words a step, split-K, blocksize 32;
    against float64 math and the tensor-core swap kernel."""
    for M, N, K, bs, cfg in [(2, 1001, 1344, 64, dict(R=2, WT=128)), (3, 515, 2048, 32, dict(R=1, WT=64,
                             SPLIT_K=4, num_warps=2)), (4, 67, 640, 64, dict(R=2, WT=256, num_warps=8)),
                             (4, 1000, 768, 64, dict(R=1, WT=128, SPLIT_K=2))]:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        qw = kernels.quantize_weight(w, bs, quant_type, dq)
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        b = torch.randn(N, device="cuda", dtype=dtype)
        ref = x.double() @ qw.dequantize(torch.float32).double().T + b.double()
        y = mm.nf4_matmul_fused(x, qw, b, path="gemv3", config=cfg)
        assert y.dtype == dtype and y.shape == (M, N)
        assert rel_err(y, ref) < 4e-3, (M, N, K, bs, rel_err(y, ref))
        assert rel_err(y, mm.nf4_matmul_fused(x, qw, b, path="swap")) < 6e-3, (M, N, K, bs)
        assert rel_err(kernels.nf4_matmul(x, qw, b), ref) < 1e-2        # whichever path the dispatcher times best


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_mma_rows(dq, dtype, quant_type):
    """The tensor-core decode kernel (inline-PTX mma.m16n8k16 on looked-up weight words) at 1-16 rows of x:
    odd N, 1 or 2 tiles, 2-8 warps, split-K, prefetch, blocksizes 64 / 128, bias; against float64 math, each
    row of x alone, the swap kernel and the dispatcher."""
    for M, N, K, bs, cfg in [(1, 1001, 1344, 64, dict(RT=2, NW=4, PREFETCH=True)),
                             (3, 515, 2048, 128, dict(RT=1, NW=8, SPLIT_K=4)),
                             (9, 67, 640, 64, dict(RT=2, NW=2, SPLIT_K=3, PREFETCH=True)),
                             (16, 1000, 768, 64, None), (8, 4096, 4096, 64, None)]:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        qw = kernels.quantize_weight(w, bs, quant_type, dq)
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        b = torch.randn(N, device="cuda", dtype=dtype)
        ref = x.double() @ qw.dequantize(torch.float32).double().T + b.double()
        y = mm.nf4_matmul_fused(x, qw, b, path="mma", config=cfg)
        assert y.dtype == dtype and y.shape == (M, N)
        tol = 4e-3 if dtype == torch.bfloat16 else 2e-3
        assert rel_err(y, ref) < tol, (M, N, K, bs, rel_err(y, ref))
        for m in range(M):
            assert rel_err(y[m], ref[m]) < tol, (M, m)
        assert rel_err(y, mm.nf4_matmul_fused(x, qw, b, path="swap")) < 6e-3, (M, N, K, bs)
        assert rel_err(kernels.nf4_matmul(x, qw, b), ref) < 1e-2        # whichever path the dispatcher times best


@pytest.mark.parametrize("dq", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mma_shared_table(dq, dtype):
    """The mma kernel's shared-memory lookup (LUT 1: a 32 KB per-lane table, 1 ld.shared per byte) reads the same
    packed pairs as the register table (LUT 0), so the outputs are bit-equal; and within tolerance of float64."""
    for M, N, K, cfg in [(1, 1001, 1344, dict(RT=2, NW=4, PREFETCH=True)), (16, 515, 2048, dict(RT=1, NW=8)),
                         (5, 4096, 4096, dict(RT=1, NW=16, PREFETCH=True)), (3, 67, 640, dict(RT=2, NW=2, SPLIT_K=3))]:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        qw = kernels.quantize_weight(w, 64, "nf4", dq)
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        b = torch.randn(N, device="cuda", dtype=dtype)
        y0 = mm.nf4_matmul_fused(x, qw, b, path="mma", config=dict(cfg, LUT=0))
        y1 = mm.nf4_matmul_fused(x, qw, b, path="mma", config=dict(cfg, LUT=1))
        if cfg.get("SPLIT_K", 1) == 1:  # split-K adds slices with atomics, in any order
            assert_bits_equal(y1, y0, f"LUT 1 vs 0 {M}x{N}x{K}")
        ref = x.double() @ qw.dequantize(torch.float32).double().T + b.double()
        assert rel_err(y1, ref) < (4e-3 if dtype == torch.bfloat16 else 2e-3), (M, N, K, rel_err(y1, ref))


@pytest.mark.parametrize("lut", [0, 1])
def test_mma_persistent(lut):
    """PERSIST: fewer programs than tiles, each looping over tiles (with LUT 1 filling its shared table once).
    The tiles' arithmetic is the same, so the output is bit-equal to one program a tile; and within tolerance of
    float64 math."""
    # more than 3 tiles an SM (132 on an H100 / H200), so that PERSIST 1 and 3 both loop
    for M, N, K, dq, cfg in [(1, 16003, 512, False, dict(RT=1, NW=8)), (16, 19205, 640, True, dict(RT=2, NW=4)),
                             (5, 28672 // 4, 1024, False, dict(RT=1, NW=4, PREFETCH=True))]:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        qw = kernels.quantize_weight(w, 64, "nf4", dq)
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        base = dict(cfg, LUT=lut, SPLIT_K=1)
        y0 = mm.nf4_matmul_fused(x, qw, path="mma", config=base)
        for persist in (1, 3):
            assert mm._v2_plan(x, qw, None, "mma", dict(base, PERSIST=persist)).kw["PERSIST"], "not persistent"
            y = mm.nf4_matmul_fused(x, qw, path="mma", config=dict(base, PERSIST=persist))
            assert_bits_equal(y, y0, f"PERSIST={persist} LUT={lut} {M}x{N}x{K}")
        ref = x.double() @ qw.dequantize(torch.float32).double().T
        assert rel_err(y, ref) < 4e-3, (M, N, K, rel_err(y, ref))


@pytest.mark.parametrize("dq", [False, True])
def test_fast_launch_alignments_and_lifetime(dq):
    """The launch plans call the compiled kernel's runner once a specialization is known (kernels/_common.py
    Launch). x or out at another alignment (16, 8 or 2 bytes) must take Triton's path for its own
    specialization: every result is bit-equal to the same call on a fresh, aligned copy (dequantize: to the
    nf4 reference). Freeing the weight frees its tensors (the plans leave their caches). (Counting
    torch.cuda.memory_allocated instead failed at 6e3bf5f on the first parametrization only: 8 MiB that the
    first dispatcher timing in the process allocates and keeps, not the weight's.)"""
    import gc
    import weakref
    N, K = 1024, 4096
    for seed in range(3):  # the second and third calls launch through the runners kept by the first
        w = weird(N * K, torch.bfloat16, seed).view(N, K)
        w.view(-1)[100] = 1.0  # no NaN: the double quantization's offset (the mean) must be a number
        qa = kernels.quantize_weight(w, 64, "nf4", dq)
        pr, ar = nf4.quantize_4bit(w, 64, "nf4")
        assert_bits_equal(qa.packed, pr, f"quantize call {seed}: codes")
        if dq:  # the offset is torch's float32 mean on the GPU (within 1 ulp of the float64 one, NUMERICS.md)
            sr = nf4.double_quantize(ar, offset=qa.nested.offset)
            assert_bits_equal(qa.nested.q, sr.q, f"quantize call {seed}: 8-bit scales")
            assert_bits_equal(qa.nested.absmax2, sr.absmax2, f"quantize call {seed}: absmax2")
        else:
            assert_bits_equal(qa.absmax, ar, f"quantize call {seed}: absmax")
    del w, qa, pr, ar
    qw = kernels.quantize_weight(torch.randn(N, K, device="cuda", dtype=torch.bfloat16), 64, "nf4", dq)
    ref = qw.dequantize(torch.bfloat16)
    buf = torch.empty(N * K + 16, device="cuda", dtype=torch.bfloat16)
    for off in (0, 4, 1, 0, 4, 1):
        d = kernels.dequantize_weight(qw, torch.bfloat16, out=buf[off:off + N * K].view(N, K))
        assert_bits_equal(d, ref, f"dequantize into out at element offset {off}")
    xb = torch.randn(16 * K + 16, device="cuda", dtype=torch.bfloat16)
    wd = ref.double()
    for M in (1, 4, 16):
        for off in (0, 4, 1, 0, 4, 1):
            x = xb[off:off + M * K].view(M, K)
            y = kernels.nf4_matmul(x, qw)
            plan = mm._FAST.get((id(qw), M, K, x.dtype, True, x.device, True))    # an eager call's plan
            y2 = kernels.nf4_matmul(x.clone(), qw)
            assert plan is not None or mm._path_cache[("fwd", M, (N, K), dq, 64, x.dtype, True, "eager")] == "dequant"
            if plan is not None and plan.split_k == 1:  # split-K programs add with atomics, in any order
                assert_bits_equal(y, y2, f"M={M} x at element offset {off}")
            assert rel_err(y, y2) < 1e-3 and rel_err(y, x.double() @ wd.T) < 1e-2, (M, off)
    parts = [weakref.ref(t) for t in (qw.packed, qw.absmax if qw.absmax is not None else qw.nested.q)]
    assert any(p.qw_ref() is qw for c in (mm._FAST, mm._V2_PLANS) for p in c.values())
    del qw, ref, wd, d, y, y2, plan
    gc.collect()
    assert all(r() is None for r in parts), "the weight's tensors outlived it (held by a launch plan)"


@pytest.mark.parametrize("M", [1, 16])
def test_dispatch_eager_and_graphed(M):
    """A decode-sized call keeps two choices (kernels/nf4_matmul.py _pick): one for calls launched from Python and
    one for calls captured into a CUDA graph. Both run correctly: eagerly, then captured and replayed."""
    N, K = 4096, 11008  # a long K over few rows: split K is a candidate, with its extra launches
    qw = kernels.quantize_weight(torch.randn(N, K, device="cuda", dtype=torch.bfloat16), 64, "nf4", False)
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    ref = x.double() @ qw.dequantize(torch.bfloat16).double().T
    y_eager = kernels.nf4_matmul(x, qw)
    key = ("fwd", M, (N, K), False, 64, torch.bfloat16, True)
    assert key in mm._path_cache and key + ("eager",) in mm._path_cache
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kernels.nf4_matmul(x, qw)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_graph = kernels.nf4_matmul(x, qw)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y_eager, ref) < 1e-2 and rel_err(y_graph, ref) < 1e-2, (mm._path_cache[key],
                                                                           mm._path_cache[key + ("eager",)])


@pytest.mark.parametrize("M", [1, 300])
def test_public_dispatch(M):
    """nf4_matmul / nf4_matmul_t time their candidate paths once, then reuse the choice."""
    qw, x, b, g, ref, gref = _setup(M, False)
    assert rel_err(kernels.nf4_matmul(x, qw, b), ref) < 1e-2
    assert rel_err(kernels.nf4_matmul(x, qw, b), ref) < 1e-2    # cached path
    assert rel_err(kernels.nf4_matmul_t(g, qw), gref) < 1e-2


def test_nf4linear_cuda_autograd_and_moves():
    lin = torch.nn.Linear(512, 300).cuda().to(torch.bfloat16)
    m = kernels.NF4Linear.from_linear(lin, double_quant=True)
    assert m.qweight.device.type == "cuda"
    x = torch.randn(2, 7, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    y.float().square().sum().backward()
    xr = x.detach().double().requires_grad_()
    yr = xr @ m.qweight.dequantize(torch.bfloat16).double().T + m.bias.double()
    yr.square().sum().backward()
    assert rel_err(y, yr) < 1e-2 and rel_err(x.grad, xr.grad) < 2e-2
    mc = m.to("cpu")
    assert mc.qweight.device.type == "cpu" and mc.qweight.nested.absmax2.dtype == torch.float32
    mh = mc.cuda().half()
    assert mh.qweight.device.type == "cuda" and mh.compute_dtype == torch.float16
    assert mh.qweight.nested.absmax2.dtype == torch.float32 and mh.qweight.packed.dtype == torch.uint8


@pytest.mark.skipif(bnb is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("dq", [False, True])
def test_state_dict_equals_bitsandbytes_linear4bit(dq):
    lin = torch.nn.Linear(256, 96)
    ref = bnb.nn.Linear4bit(256, 96, compute_dtype=torch.float32, compress_statistics=dq, quant_type="nf4")
    ref.load_state_dict(lin.state_dict())
    ref = ref.cuda()
    ours = kernels.NF4Linear.from_linear(lin.cuda(), double_quant=dq)
    sd, sr = ours.state_dict(), ref.state_dict()
    assert list(sd) == list(sr)
    for k in sr:
        if "quant_state" in k:
            assert json.loads(bytes(sd[k].tolist())) == json.loads(bytes(sr[k].tolist()))
        else:
            assert_bits_equal(sd[k], sr[k], k)
    x = torch.randn(5, 256, device="cuda")
    assert rel_err(ours(x), ref(x)) < 1e-4
