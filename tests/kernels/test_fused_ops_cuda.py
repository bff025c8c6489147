"""The fused training kernels on a real GPU through the public functions, in bf16 (plus fp32 for AdamW), at
model-like shapes: outputs and every gradient against float64 evaluations of the same math and against the
torch reference in bf16 (what transformers computes). Skipped without CUDA.

Tolerances (relative Frobenius error vs float64): bf16 1e-2 (bf16 eps is 7.8e-3; one rounding gives ~2e-3),
and the kernel no further from float64 than twice the bf16 torch reference. AdamW: 10 steps, fp32, atol 1e-6
against train.adamw on the same GPU (and against bitsandbytes' AdamW32bit where it is installed).
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set (by another test module in this process?): bf16 needs compiled Triton; "
                "run this file on its own", allow_module_level=True)

from kernels.adamw import adamw_multi_triton_, adamw_step_, adamw_step_multi_  # noqa: E402
from kernels.cross_entropy import chunked_cross_entropy, cross_entropy_reference  # noqa: E402
from kernels.rms_norm import rms_norm, rms_norm_reference  # noqa: E402
from kernels.rope import apply_rope, apply_rope_reference  # noqa: E402
from kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

DEV = torch.device("cuda")
BF16_TOL = 1e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_close(actual, expected, tol, what, ref_lowp=None):
    """Relative Frobenius error <= max(tol, 2 * error of the low-precision torch reference), finite values,
    and no single element off by more than 10*tol*(max|expected| + |expected|) (names the first)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    bound = tol if ref_lowp is None else max(tol, 2 * rel_err(ref_lowp, e))
    err = rel_err(a, e)
    assert err <= bound, f"{what}: relative error {err:.3g} > {bound:.3g}"
    bad = ((a - e).abs() > 10 * tol * (e.abs().max() + e.abs())).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} elements off, first at {bad[0].tolist()}"


def run_both(fn_fast, fn_ref, inputs, douts_seed=1):
    """(outputs, grads) of fn_fast on `inputs`, of fn_ref in float64 and of fn_ref in the inputs' dtype."""
    res = []
    for fn, cast in ((fn_fast, None), (fn_ref, torch.float64), (fn_ref, None)):
        xs = [(x.detach() if cast is None else x.detach().to(cast)).requires_grad_() for x in inputs]
        outs = fn(*xs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = torch.Generator(device=DEV).manual_seed(douts_seed)
        douts = [torch.randn(o.shape, generator=g, device=DEV).to(o.dtype) for o in outs]
        res.append((outs, torch.autograd.grad(outs, xs, douts)))
    return res


# ------------------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("shape", [(2, 333, 4096), (3, 129, 576), (5, 1000)])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_rms_norm_cuda_bf16(shape, w_dtype):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = (torch.randn(shape, generator=g, device=DEV) * 3 + 0.5).to(torch.bfloat16)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g, device=DEV)).to(w_dtype)
    (y, (dx, dw)), (y64, (dx64, dw64)), (ylp, (dxlp, dwlp)) = run_both(
        lambda a, b: rms_norm(a, b, 1e-5), lambda a, b: rms_norm_reference(a, b, 1e-5), (x, w))
    assert y[0].dtype == torch.promote_types(torch.bfloat16, w_dtype) and dx.dtype == torch.bfloat16
    assert dw.dtype == w_dtype
    assert_close(y[0], y64[0], BF16_TOL, "rms_norm y", ylp[0])
    assert_close(dx, dx64, BF16_TOL, "rms_norm dx", dxlp)
    assert_close(dw, dw64, BF16_TOL, "rms_norm dw", dwlp)


def test_rms_norm_cuda_frozen_weight_same_dx():
    """A frozen weight (LoRA training) skips dw in the kernel (COMPUTE_DW): dx bit-equal to the dw-computing
    launch, no gradient for the weight."""
    from kernels.rms_norm import rms_norm_backward, rms_norm_forward
    g = torch.Generator(device=DEV).manual_seed(1)
    x = (torch.randn(2, 333, 4096, generator=g, device=DEV) * 3 + 0.5).to(torch.bfloat16)
    w = (1 + 0.2 * torch.randn(4096, generator=g, device=DEV)).to(torch.bfloat16)
    dy = torch.randn(x.shape, generator=g, device=DEV).to(torch.bfloat16)
    _, rstd = rms_norm_forward(x, w, 1e-5)
    dx_all, dw_all = rms_norm_backward(dy, x, w, rstd)
    dx_only, dw_none = rms_norm_backward(dy, x, w, rstd, need_dw=False)
    assert dw_none is None and dw_all.shape == (4096,) and torch.equal(dx_only, dx_all)
    xr = x.clone().requires_grad_()
    rms_norm(xr, w, 1e-5).backward(dy)
    assert torch.equal(xr.grad, dx_all) and w.grad is None


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_residual_rms_norm_cuda_bf16(w_dtype):
    """The residual form (h, y) = (x + a, rms_norm(x + a)) at Llama width in bf16: h bit-equal to torch's add, y
    bit-equal to the plain kernel on that h (what the fast path's recomputed norm outputs rely on: the two
    kernel variants must reduce in the same order), and the gradients of x and a (the norm's dx plus h's own
    gradient, summed in the kernel) against float64 and the bf16 torch reference of the separate ops."""
    from kernels.rms_norm import ResidualRMSNormFunction, rms_norm_forward
    g = torch.Generator(device=DEV).manual_seed(4)
    x = (torch.randn(3, 257, 4096, generator=g, device=DEV) * 2 + 0.3).to(torch.bfloat16).requires_grad_()
    a = torch.randn(3, 257, 4096, generator=g, device=DEV).to(torch.bfloat16).requires_grad_()
    w = (1 + 0.2 * torch.randn(4096, generator=g, device=DEV)).to(w_dtype)
    h, y = ResidualRMSNormFunction.apply(x, a, w, 1e-5)
    h_ref = (x + a).detach()
    assert torch.equal(h, h_ref)
    assert torch.equal(y, rms_norm_forward(h_ref, w, 1e-5)[0]), "the HAS_RES kernel normalizes differently"
    hn, yn = ResidualRMSNormFunction.apply(x, None, w, 1e-5)
    assert torch.equal(hn, x) and torch.equal(yn, rms_norm_forward(x.detach(), w, 1e-5)[0])
    dh = torch.randn(h.shape, generator=g, device=DEV).to(torch.bfloat16)
    dy = torch.randn(y.shape, generator=g, device=DEV).to(y.dtype)
    dx, da = torch.autograd.grad((h, y), (x, a), (dh, dy))
    assert torch.equal(dx, da)

    def separate(x_, a_, w_):
        hh = x_ + a_
        return hh, rms_norm_reference(hh, w_, 1e-5)
    x64, a64 = x.detach().double().requires_grad_(), a.detach().double().requires_grad_()
    dx64, = torch.autograd.grad(separate(x64, a64, w.double()), (x64,), (dh.double(), dy.double()))
    xl, al = x.detach().clone().requires_grad_(), a.detach().clone().requires_grad_()
    dxlp, = torch.autograd.grad(separate(xl, al, w), (xl,), (dh, dy))
    assert_close(dx, dx64, BF16_TOL, "residual_rms_norm dx", dxlp)


# ---------------------------------------------------------------------------------------------------- RoPE
@pytest.mark.parametrize("batched_cos", [False, True])
@pytest.mark.parametrize("B,H,Hkv,T,D", [(2, 32, 32, 257, 128), (3, 9, 3, 100, 64)])
def test_rope_cuda_bf16(batched_cos, B, H, Hkv, T, D):
    g = torch.Generator(device=DEV).manual_seed(0)
    q = torch.randn(B, T, H, D, generator=g, device=DEV).to(torch.bfloat16).transpose(1, 2)  # (B, H, T, D)
    k = torch.randn(B, T, Hkv, D, generator=g, device=DEV).to(torch.bfloat16).transpose(1, 2)
    pos = torch.arange(T, device=DEV)[None] + torch.arange(B, device=DEV)[:, None] * 7          # (B, T)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=DEV).float() / D))
    a = pos[..., None].float() * inv
    a = torch.cat((a, a), -1)                                                                     # (B, T, D)
    if not batched_cos:
        a = a[0]
    cos, sin = a.cos().to(torch.bfloat16), a.sin().to(torch.bfloat16)
    (o, gr), (o64, gr64), (olp, grlp) = run_both(
        lambda x, y: apply_rope(x, y, cos, sin),
        lambda x, y: apply_rope_reference(x, y, cos.to(x.dtype), sin.to(x.dtype)), (q, k))
    for name, i in (("q", 0), ("k", 1)):
        assert_close(o[i], o64[i], BF16_TOL, f"rope {name}", olp[i])
        assert_close(gr[i], gr64[i], BF16_TOL, f"rope d{name}", grlp[i])
    # in place: same values, written into q and k
    qc, kc = q.clone(), k.clone()
    qi, ki = apply_rope(qc, kc, cos, sin, inplace=True)
    assert qi.data_ptr() == qc.data_ptr() and torch.equal(qi, o[0]) and torch.equal(ki, o[1])


# -------------------------------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("shape", [(2, 513, 11008), (3, 77, 1536)])
def test_swiglu_cuda_bf16(shape):
    g = torch.Generator(device=DEV).manual_seed(0)
    gate = (torch.randn(shape, generator=g, device=DEV) * 3).to(torch.bfloat16)
    up = torch.randn(shape, generator=g, device=DEV).to(torch.bfloat16)
    (h, (dg, du)), (h64, (dg64, du64)), (hlp, (dglp, dulp)) = run_both(swiglu, swiglu_reference, (gate, up))
    assert_close(h[0], h64[0], BF16_TOL, "swiglu h", hlp[0])
    assert_close(dg, dg64, BF16_TOL, "swiglu d gate", dglp)
    assert_close(du, du64, BF16_TOL, "swiglu d up", dulp)


# ------------------------------------------------------------------------------------------- cross entropy
@pytest.mark.parametrize("N,H,V,chunk", [(999, 576, 49152, None), (1531, 4096, 32000, 256)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_cross_entropy_cuda_bf16(N, H, V, chunk, reduction):
    g = torch.Generator(device=DEV).manual_seed(0)
    hidden = torch.randn(N, H, generator=g, device=DEV).to(torch.bfloat16)
    weight = (torch.randn(V, H, generator=g, device=DEV) / H ** 0.5 * 4).to(torch.bfloat16)
    labels = torch.randint(0, V, (N,), generator=g, device=DEV)
    labels[: N // 3] = -100                                                 # a prompt that is not trained on
    labels[N // 3:: 7] = -100

    def fast(h, w):
        out = chunked_cross_entropy(h, w, labels, chunk_size=chunk, reduction=reduction)
        return out[0] if reduction == "sum" else out

    def ref(h, w):
        return cross_entropy_reference(h, w, labels, reduction=reduction)

    (loss, (dh, dw)), (loss64, (dh64, dw64)), (losslp, (dhlp, dwlp)) = run_both(fast, ref, (hidden, weight))
    # same bf16 logits as transformers' lm_head: the loss agrees closely with its bf16 computation
    assert abs(loss[0].item() - losslp[0].item()) <= 1e-3 * abs(losslp[0].item())
    assert abs(loss[0].item() - loss64[0].item()) <= BF16_TOL * abs(loss64[0].item())
    assert_close(dh, dh64, 2 * BF16_TOL, "chunked CE d hidden", dhlp)
    assert_close(dw, dw64, 2 * BF16_TOL, "chunked CE d weight", dwlp)
    if reduction == "sum":
        assert chunked_cross_entropy(hidden, weight, labels, reduction="sum")[1] == int((labels != -100).sum())


def test_chunked_cross_entropy_cuda_peak_memory_below_full_logits():
    N, H, V = 4096, 1024, 32000
    hidden = torch.randn(N, H, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(V, H, device=DEV, dtype=torch.bfloat16) * 0.03
    labels = torch.randint(0, V, (N,), device=DEV)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    chunked_cross_entropy(hidden, weight, labels).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < N * V * 4 / 4, f"chunked CE used {extra / 2**20:.0f} MiB over its inputs; fp32 logits are " \
                                  f"{N * V * 4 / 2**20:.0f} MiB"


# --------------------------------------------------------------------------------------------------- AdamW
HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1e-2)
SHAPES = [(64, 4096), (11008, 64), (4097,), (3, 5)]


def _adam_states(p_dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    ps = [(torch.randn(s, generator=g, device=DEV) * 0.1).to(p_dtype) for s in SHAPES]
    grads = [[(torch.randn(s, generator=g, device=DEV) * 0.01).to(p_dtype) for s in SHAPES] for _ in range(10)]
    return ps, [torch.zeros(s, device=DEV) for s in SHAPES], [torch.zeros(s, device=DEV) for s in SHAPES], grads


@pytest.mark.parametrize("p_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("multi", [False, True])
def test_adamw_cuda_vs_train_adamw(p_dtype, multi):
    from train.adamw import adamw_update_ as train_update
    ps, ms, vs, grads = _adam_states(p_dtype)
    rp, rm, rv = [p.clone() for p in ps], [m.clone() for m in ms], [v.clone() for v in vs]
    for step, gs in enumerate(grads, start=1):
        if multi:
            adamw_step_multi_(ps, gs, ms, vs, step, **HP)
        else:
            for p, gr, m, v in zip(ps, gs, ms, vs):
                adamw_step_(p, gr, m, v, step, **HP)
        for p, gr, m, v in zip(rp, gs, rm, rv):
            train_update(p, gr, m, v, step, HP["lr"], HP["beta1"], HP["beta2"], HP["eps"], HP["weight_decay"],
                         decay_after=True)
    rtol = 0 if p_dtype == torch.float32 else 2 ** -7                     # bf16: at most one ulp apart
    for k in range(len(SHAPES)):
        torch.testing.assert_close(ps[k], rp[k], atol=1e-6, rtol=rtol, msg=lambda m: f"param {k}: {m}")
        torch.testing.assert_close(ms[k], rm[k], atol=1e-6, rtol=0, msg=lambda m: f"exp_avg {k}: {m}")
        torch.testing.assert_close(vs[k], rv[k], atol=1e-6, rtol=0, msg=lambda m: f"exp_avg_sq {k}: {m}")


def test_adamw_cuda_multi_mixed_groups_and_noncontiguous():
    g = torch.Generator(device=DEV).manual_seed(1)
    ps = [torch.randn(300, 70, generator=g, device=DEV), torch.randn(70, 300, generator=g, device=DEV).bfloat16(),
          torch.randn(40, 30, generator=g, device=DEV).t()]                 # last: non-contiguous
    gs = [torch.randn(p.shape, generator=g, device=DEV).to(p.dtype) for p in ps]
    ms = [torch.rand(p.shape, generator=g, device=DEV) for p in ps]
    vs = [torch.rand(p.shape, generator=g, device=DEV) for p in ps]
    want = [[t.clone() for t in lst] for lst in (ps, ms, vs)]
    adamw_step_multi_(ps, gs, ms, vs, 4, **HP)
    for k in range(3):
        adamw_step_(want[0][k], gs[k], want[1][k], want[2][k], 4, **HP)
        torch.testing.assert_close(ps[k].float(), want[0][k].float(), atol=1e-6,
                                   rtol=2 ** -7 if ps[k].dtype == torch.bfloat16 else 0)
        torch.testing.assert_close(ms[k], want[1][k], atol=1e-6, rtol=0)
        torch.testing.assert_close(vs[k], want[2][k], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="contiguous"):
        adamw_multi_triton_(ps, gs, ms, vs, 5, **HP)


def test_adamw_cuda_vs_bitsandbytes_adamw32bit():
    bnb = pytest.importorskip("bitsandbytes")
    ps, ms, vs, grads = _adam_states(torch.float32, seed=2)
    bp = [torch.nn.Parameter(p.clone()) for p in ps]
    opt = bnb.optim.AdamW32bit(bp, lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                               weight_decay=HP["weight_decay"])
    for step, gs in enumerate(grads, start=1):
        for p, gr in zip(bp, gs):
            p.grad = gr.clone()
        opt.step()
        for p, gr, m, v in zip(ps, gs, ms, vs):
            adamw_step_(p, gr, m, v, step, **HP)
    for k in range(len(SHAPES)):                                           # NUMERICS.md: ~3e-7 after 10 steps
        torch.testing.assert_close(ps[k], bp[k].detach(), atol=1e-6, rtol=0, msg=lambda m: f"param {k}: {m}")
        torch.testing.assert_close(ms[k], opt.state[bp[k]]["state1"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(vs[k], opt.state[bp[k]]["state2"], atol=1e-6, rtol=1e-5)
