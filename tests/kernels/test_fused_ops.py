"""The fused training kernels (RMSNorm, RoPE, SwiGLU, chunked cross entropy, AdamW) run in Triton's CPU
interpreter at small odd shapes, in float32 and float16, against torch references: outputs and every gradient.

Tolerances are relative Frobenius errors ||a - b|| / ||b|| against a float64 evaluation of the same math
(the "truth"), plus a per-element bound that names the first bad element:
    float32: 1e-5     float16: 2e-3  (fp16 eps is 9.8e-4; a single rounding gives ~3e-4)
and, in fp16, the kernel is no further from the truth than twice the torch reference run in fp16 (what
transformers computes). bf16 is checked on a GPU (test_fused_ops_cuda.py): the interpreter mangles bf16 stores.
"""
import os

import torch

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    import pytest

    pytest.skip("interpreter tests run on CPU machines; on a GPU run test_fused_ops_cuda.py",
                allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: the kernels run on the CPU

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernels.adamw import adamw_multi_triton_, adamw_step_, adamw_triton_, adamw_update_  # noqa: E402
from kernels.cross_entropy import (chunked_cross_entropy, cross_entropy_reference,  # noqa: E402
                                   softmax_ce_chunk_torch_, softmax_ce_chunk_triton_)
from kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_reference  # noqa: E402
from kernels.rope import RoPEFunction, apply_rope, apply_rope_reference  # noqa: E402
from kernels.swiglu import SwiGLUFunction, swiglu, swiglu_backward, swiglu_reference  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.float16]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str, elem_atol: float = None):
    """Relative Frobenius error <= tol, and every element within elem_atol + 10*tol*|expected| (default
    elem_atol = 10*tol*max|expected|): fails on a single bad element, naming it."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values at {(~torch.isfinite(a)).nonzero()[:5].tolist()}"
    err = rel_err(a, e)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"
    atol = 10 * tol * e.abs().max().item() if elem_atol is None else elem_atol
    bad = ((a - e).abs() > atol + 10 * tol * e.abs()).nonzero()
    assert bad.numel() == 0, (f"{what}: {bad.shape[0]} elements off, first at {bad[0].tolist()}: "
                              f"{a[tuple(bad[0])].item()} vs {e[tuple(bad[0])].item()}")


def grads64(fn, inputs, douts):
    """Outputs and input gradients of fn evaluated in float64 on copies of `inputs`."""
    xs = [x.detach().double().requires_grad_() for x in inputs]
    outs = fn(*xs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gs = torch.autograd.grad(outs, xs, [d.double() for d in douts])
    return outs, gs


# ------------------------------------------------------------------------------------------------- RMSNorm
@pytest.mark.parametrize("dtype,w_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                           (torch.float16, torch.float32)])
def test_rms_norm_triton_vs_reference(dtype, w_dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 37, generator=g) * 2 + 0.5).to(dtype).requires_grad_()   # (B, T, H), H odd
    w = (1 + 0.2 * torch.randn(37, generator=g)).to(w_dtype).requires_grad_()
    eps = 1e-6
    y = RMSNormFunction.apply(x, w, eps)
    assert y.dtype == torch.promote_types(dtype, w_dtype)
    dy = torch.randn(y.shape, generator=g).to(y.dtype)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    assert dx.dtype == dtype and dw.dtype == w_dtype
    (y64,), (dx64, dw64) = grads64(lambda a, b: rms_norm_reference(a, b, eps), (x, w), (dy,))
    tol = TOL[dtype]
    assert_close(y, y64, tol, "rms_norm y")
    assert_close(dx, dx64, tol, "rms_norm dx")
    assert_close(dw, dw64, tol, "rms_norm dw")
    # the reference in the input dtype (what transformers computes) agrees as closely
    yr = rms_norm_reference(x.detach(), w.detach(), eps)
    assert_close(y, yr, tol, "rms_norm y vs same-dtype reference")
    assert rel_err(y, y64) <= max(2 * rel_err(yr, y64), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_frozen_weight_skips_dw(dtype):
    """A frozen norm weight (LoRA training) gets no dw: same dx bit for bit, and the dw partial sums, their sum
    and cast are not made (the backward returns None for it)."""
    from kernels.rms_norm import rms_norm_backward, rms_norm_forward
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 11, 40, generator=g) + 0.3).to(dtype)
    w = (1 + 0.1 * torch.randn(40, generator=g)).to(dtype)
    dy = torch.randn(x.shape, generator=g).to(dtype)
    _, rstd = rms_norm_forward(x, w, 1e-6)
    dx_all, dw_all = rms_norm_backward(dy, x, w, rstd, n_programs=3)
    dx_only, dw_none = rms_norm_backward(dy, x, w, rstd, n_programs=3, need_dw=False)
    assert dw_none is None and dw_all is not None and dw_all.shape == (40,)
    assert torch.equal(dx_only, dx_all)
    xr = x.clone().requires_grad_()
    RMSNormFunction.apply(xr, w, 1e-6).backward(dy)                # w does not require grad
    assert torch.equal(xr.grad, dx_all.view(x.shape))
    assert w.grad is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_a", [True, False])
def test_residual_rms_norm(dtype, with_a):
    """(h, y) = (x + a, rms_norm(x + a)) as one node: h bit-equal to torch's add and y to the plain kernel on that h
    (the forward adds in the norm's pass); the gradients of x (and a) are the norm's dx plus h's own gradient,
    summed inside the backward kernel, against float64 autograd of the separate ops. With a = None, h is x."""
    from kernels.rms_norm import ResidualRMSNormFunction, residual_rms_norm, rms_norm_forward
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(3, 5, 37, generator=g) + 0.2).to(dtype).requires_grad_()
    a = (torch.randn(3, 5, 37, generator=g) * 0.5).to(dtype).requires_grad_() if with_a else None
    w = (1 + 0.2 * torch.randn(37, generator=g)).to(dtype)
    h, y = ResidualRMSNormFunction.apply(x, a, w, 1e-6)
    h_ref = (x + a).detach() if with_a else x.detach()
    assert torch.equal(h, h_ref) and torch.equal(y, rms_norm_forward(h_ref, w, 1e-6)[0])
    dh = torch.randn(h.shape, generator=g).to(dtype)
    dy = torch.randn(y.shape, generator=g).to(dtype)
    ins = (x, a) if with_a else (x,)
    got = torch.autograd.grad((h, y), ins, (dh, dy))

    def separate(*t):
        hh = t[0] + t[1] if with_a else t[0] * 1
        return hh, rms_norm_reference(hh, w.double(), 1e-6)
    _, want = grads64(separate, ins, (dh, dy))
    for name, gv, wv in zip(("dx", "da"), got, want):
        assert gv.dtype == dtype
        assert_close(gv, wv, TOL[dtype], f"residual_rms_norm {name}")
    if with_a:
        assert torch.equal(got[0], got[1])
    # only one of the two outputs used: the other's gradient is absent, not zero-filled
    gx_y, = torch.autograd.grad(ResidualRMSNormFunction.apply(x, a, w, 1e-6)[1], (x,), dy)
    gx_h, = torch.autograd.grad(ResidualRMSNormFunction.apply(x, a, w, 1e-6)[0], (x,), dh)
    assert torch.equal(gx_h, dh)
    _, (want_y,) = grads64(lambda t: rms_norm_reference(t + a.double() if with_a else t, w.double(), 1e-6), (x,),
                           (dy,))
    assert_close(gx_y, want_y, TOL[dtype], "dx from y alone")
    # the public dispatcher: the node in the interpreter, torch's add + the reference on CPU tensors
    h2, y2 = residual_rms_norm(x.detach(), None if a is None else a.detach(), w, 1e-6)
    assert torch.equal(h2, h_ref) and torch.equal(y2, rms_norm_reference(h_ref, w, 1e-6))


def test_residual_rms_norm_bad_input():
    from kernels.rms_norm import rms_norm_backward, rms_norm_forward
    x, w = torch.randn(4, 9), torch.rand(9)
    with pytest.raises(ValueError, match="residual: expected x's shape"):
        rms_norm_forward(x, w, 1e-5, residual=torch.randn(4, 8))
    with pytest.raises(ValueError, match="residual: expected x's shape .* and dtype"):
        rms_norm_forward(x, w, 1e-5, residual=torch.randn(4, 9).half())
    _, rstd = rms_norm_forward(x, w, 1e-5)
    with pytest.raises(ValueError, match="dres: expected x's shape"):
        rms_norm_backward(torch.randn(4, 9), x, w, rstd, dres=torch.randn(9, 4))


def test_rms_norm_public_cpu_is_reference():
    x, w = torch.randn(4, 9), torch.rand(9)
    assert torch.equal(rms_norm(x, w, 1e-5), rms_norm_reference(x, w, 1e-5))
    with pytest.raises(ValueError, match="weight"):
        RMSNormFunction.apply(x, torch.ones(8), 1e-5)


# ---------------------------------------------------------------------------------------------------- RoPE
def _rope_inputs(dtype, batched_cos, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, H, Hkv, T, D = 2, 5, 3, 7, 12
    q = torch.randn(B, T, H, D, generator=g).to(dtype).transpose(1, 2)            # (B, H, T, D), non-contiguous
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)                          # (B, H_kv, T, D)
    pos = torch.arange(T)[None] + torch.tensor([[0], [3]])                         # (B, T) per-row positions
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))                     # (D/2,)
    a = pos[..., None].float() * inv                                               # (B, T, D/2)
    a = torch.cat((a, a), dim=-1)                                                  # (B, T, D)
    if not batched_cos:
        a = a[0]                                                                   # (T, D)
    return q, k, a.cos().to(dtype), a.sin().to(dtype)


def rope_triton(q, k, cos, sin, inplace=False):
    return RoPEFunction.apply(q, cos, sin, inplace), RoPEFunction.apply(k, cos, sin, inplace)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batched_cos", [False, True])
def test_rope_triton_vs_reference(dtype, batched_cos):
    q, k, cos, sin = _rope_inputs(dtype, batched_cos)
    q, k = q.requires_grad_(), k.requires_grad_()
    qo, ko = rope_triton(q, k, cos, sin)
    assert qo.stride() == q.stride()                                               # layout kept
    g = torch.Generator().manual_seed(1)
    dq, dk = torch.randn(qo.shape, generator=g).to(dtype), torch.randn(ko.shape, generator=g).to(dtype)
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    (q64, k64), (gq64, gk64) = grads64(lambda a, b: apply_rope_reference(a, b, cos.double(), sin.double()),
                                       (q, k), (dq, dk))
    tol = TOL[dtype]
    for name, a, e in (("q", qo, q64), ("k", ko, k64), ("dq", gq, gq64), ("dk", gk, gk64)):
        assert_close(a, e, tol, f"rope {name}")
    qr, _ = apply_rope_reference(q.detach(), k.detach(), cos, sin)
    assert rel_err(qo, q64) <= max(2 * rel_err(qr, q64), 1e-6)


def test_rope_inplace_and_backward_is_inverse():
    q, k, cos, sin = _rope_inputs(torch.float32, True)
    q = q.contiguous()
    qo, ko = rope_triton(q.clone(), k.clone(), cos, sin)
    leaf_q, leaf_k = q.clone().requires_grad_(), k.clone().requires_grad_()
    qi, ki = rope_triton(leaf_q * 1, leaf_k * 1, cos, sin, True)                  # in place on non-leaf copies
    assert torch.equal(qi, qo) and torch.equal(ki, ko)
    gq, gk = torch.autograd.grad((qi, ki), (leaf_q, leaf_k), (qo, ko))
    # the backward is the rotation by -a: applied to rope(x) it gives x back
    assert_close(gq, q, 1e-6, "rope backward(rope(q))")
    assert_close(gk, k, 1e-6, "rope backward(rope(k))")


@pytest.mark.parametrize("inplace", [False, True])
def test_rope_on_projection_views_gradient_reaches_the_projection(inplace):
    g = torch.Generator().manual_seed(2)
    B, T, H, D = 2, 5, 3, 8
    x = torch.randn(B, T, H * D, generator=g, requires_grad=True)
    W = torch.randn(H * D, H * D, generator=g)
    _, _, cos, sin = _rope_inputs(torch.float32, False)
    cos, sin = cos[:T, :D], sin[:T, :D]                                            # (T, D)

    def loss_and_grad(rope):
        q = (x @ W).view(B, T, H, D).transpose(1, 2)                               # (B, H, T, D) views
        k = (x * 2).view(B, T, H, D).transpose(1, 2)
        qo, ko = rope(q, k, cos, sin)
        loss = (qo * 3).sum() + (ko ** 2).sum()
        (gx,) = torch.autograd.grad(loss, (x,))
        return loss, gx

    loss, gx = loss_and_grad(lambda q, k, c, s_: rope_triton(q, k, c, s_, inplace))
    loss_ref, gx_ref = loss_and_grad(apply_rope_reference)
    assert abs(loss.item() - loss_ref.item()) <= 1e-5 * abs(loss_ref.item())
    assert_close(gx, gx_ref, 1e-5, "rope d projection input")


def test_rope_public_cpu_is_reference_and_bad_shape():
    q, k, cos, sin = _rope_inputs(torch.float32, False)
    for a, b in zip(apply_rope(q, k, cos, sin), apply_rope_reference(q, k, cos, sin)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="cos/sin"):
        RoPEFunction.apply(q, cos[:-1], sin[:-1], False)


# -------------------------------------------------------------------------------------------------- SwiGLU
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_triton_vs_reference(dtype):
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(3, 5, 67, generator=g) * 3).to(dtype).requires_grad_()     # (B, T, F), F odd
    up = torch.randn(3, 5, 67, generator=g).to(dtype).requires_grad_()
    h = SwiGLUFunction.apply(gate, up)
    dh = torch.randn(h.shape, generator=g).to(dtype)
    dg, du = torch.autograd.grad(h, (gate, up), dh)
    (h64,), (dg64, du64) = grads64(swiglu_reference, (gate, up), (dh,))
    tol = TOL[dtype]
    assert_close(h, h64, tol, "swiglu h")
    assert_close(dg, dg64, tol, "swiglu d gate")
    assert_close(du, du64, tol, "swiglu d up")
    assert rel_err(h, h64) <= max(2 * rel_err(swiglu_reference(gate.detach(), up.detach()), h64), 1e-6)
    assert torch.equal(swiglu(gate.detach(), up.detach()), swiglu_reference(gate.detach(), up.detach()))


def test_swiglu_backward_in_place():
    """out=(gate, up): the gradients overwrite the inputs they are computed from, bit-equal to a fresh output."""
    g = torch.Generator().manual_seed(1)
    gate, up, dh = (torch.randn(7, 45, generator=g) for _ in range(3))
    dg, du = swiglu_backward(dh, gate, up)
    g2, u2 = gate.clone(), up.clone()
    rg, ru = swiglu_backward(dh, g2, u2, out=(g2, u2))
    assert rg is g2 and ru is u2 and torch.equal(g2, dg) and torch.equal(u2, du)
    with pytest.raises(ValueError, match="contiguous"):
        swiglu_backward(dh, gate, up, out=(torch.empty(45, 7).t(), torch.empty_like(up)))


# ------------------------------------------------------------------------------------------- cross entropy
def _ce_inputs(dtype, seed=0, N=37, H=24, V=301):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)                              # (N, H)
    weight = (0.3 * torch.randn(V, H, generator=g)).to(dtype)                      # (V, H)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    labels[16:32] = -100                                                           # a whole chunk ignored
    return hidden, weight, labels


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_ce_chunk_kernel_vs_torch(dtype):
    hidden, weight, labels = _ce_inputs(dtype)
    z = (hidden @ weight.t())                                                      # (N, V)
    scale = torch.tensor(0.25)
    z_tri, z_ref = z.clone(), z.clone()
    loss_tri = softmax_ce_chunk_triton_(z_tri, labels, scale)
    loss_ref = softmax_ce_chunk_torch_(z_ref, labels, scale)
    tol = TOL[dtype]
    assert_close(loss_tri, loss_ref, tol, "softmax_ce loss rows")
    assert_close(z_tri, z_ref, tol, "softmax_ce dz")
    assert (z_tri[labels == -100] == 0).all() and (loss_tri[labels == -100] == 0).all()
    # a label outside [0, V) (and not ignore_index) gives a NaN loss for its row only
    bad = labels.clone()
    bad[1] = z.shape[1]
    loss_bad = softmax_ce_chunk_triton_(z.clone(), bad, scale)
    assert torch.isnan(loss_bad[1]) and torch.isfinite(loss_bad[2:]).all()
    # the forward-only variant leaves the logits alone
    z_keep = z.clone()
    assert_close(softmax_ce_chunk_triton_(z_keep, labels, scale, compute_grad=False), loss_ref, tol, "loss only")
    assert torch.equal(z_keep, z)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("use_triton", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chunked_cross_entropy_vs_full_logits(dtype, use_triton, reduction):
    hidden, weight, labels = _ce_inputs(dtype)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = chunked_cross_entropy(h, w, labels, chunk_size=16, reduction=reduction, use_triton=use_triton)
    if reduction == "sum":
        loss, n = out
        assert n == int((labels != -100).sum())
    else:
        loss = out
    dh, dw = torch.autograd.grad(loss * 1.5, (h, w))                                # upstream gradient != 1
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    loss64 = F.cross_entropy(h64 @ w64.t(), labels, ignore_index=-100, reduction=reduction)
    dh64, dw64 = torch.autograd.grad(loss64 * 1.5, (h64, w64))
    tol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - loss64.item()) <= tol * abs(loss64.item()), f"loss {loss.item()} vs {loss64.item()}"
    assert_close(dh, dh64, tol, "chunked CE d hidden")
    assert_close(dw, dw64, tol, "chunked CE d weight")
    assert dh.dtype == dtype and dw.dtype == dtype
    # the same as transformers' full fp32 logits in the input dtype
    ref = cross_entropy_reference(hidden, weight, labels, reduction=reduction)
    assert abs(loss.item() - ref.item()) <= tol * abs(ref.item())


def test_chunked_cross_entropy_frozen_head_and_shapes():
    hidden, weight, labels = _ce_inputs(torch.float32, seed=3, N=20)
    h = hidden.view(4, 5, -1).clone().requires_grad_()                              # (B, T, H), labels (B, T)
    loss = chunked_cross_entropy(h, weight, labels.view(4, 5), chunk_size=7, use_triton=True)
    (dh,) = torch.autograd.grad(loss, (h,))
    h64 = hidden.double().requires_grad_()
    loss64 = F.cross_entropy(h64 @ weight.double().t(), labels, ignore_index=-100)
    (dh64,) = torch.autograd.grad(loss64, (h64,))
    assert abs(loss.item() - loss64.item()) <= 1e-5 * loss64.item()
    assert_close(dh.view(20, -1), dh64, 1e-5, "chunked CE d hidden (frozen head)")
    with torch.no_grad():                                                          # loss only, no gradient work
        assert chunked_cross_entropy(h, weight, labels.view(4, 5), chunk_size=7, use_triton=True).item() == loss.item()
    with pytest.raises(ValueError, match="labels"):
        chunked_cross_entropy(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(hidden, weight, labels, reduction="none")


# --------------------------------------------------------------------------------------------------- AdamW
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
SHAPES = [(37,), (5, 13), (300,)]


def _adam_run(update, p_dtype, steps=10, decay_after=True, multi=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g).to(p_dtype) for s in SHAPES]
    ms = [torch.zeros(s) for s in SHAPES]
    vs = [torch.zeros(s) for s in SHAPES]
    for step in range(1, steps + 1):
        gs = [torch.randn(s, generator=g).to(p_dtype) for s in SHAPES]
        if multi:
            update(ps, gs, ms, vs, step, HP["lr"], HP["beta1"], HP["beta2"], HP["eps"], HP["weight_decay"],
                   decay_after)
        else:
            for p, gr, m, v in zip(ps, gs, ms, vs):
                update(p, gr, m, v, step, HP["lr"], HP["beta1"], HP["beta2"], HP["eps"], HP["weight_decay"],
                       decay_after=decay_after)
    return ps, ms, vs


@pytest.mark.parametrize("decay_after", [True, False])
@pytest.mark.parametrize("multi", [False, True])
def test_adamw_kernel_vs_train_adamw_fp32(decay_after, multi):
    from train.adamw import adamw_update_ as train_update
    ours = _adam_run(adamw_multi_triton_ if multi else adamw_triton_, torch.float32, decay_after=decay_after,
                     multi=multi)
    ref = _adam_run(train_update, torch.float32, decay_after=decay_after)
    for what, a_list, e_list in zip(("param", "exp_avg", "exp_avg_sq"), ours, ref):
        for k, (a, e) in enumerate(zip(a_list, e_list)):
            torch.testing.assert_close(a, e, atol=1e-6, rtol=0, msg=lambda m: f"AdamW {what} {k}: {m}")


def test_adamw_kernel_fp16_params_and_mixed_groups():
    from train.adamw import adamw_update_ as train_update
    ours = _adam_run(adamw_triton_, torch.float16, steps=4)
    ref = _adam_run(train_update, torch.float16, steps=4)
    for a, e in zip(ours[0], ref[0]):                                             # at most one fp16 ulp apart
        torch.testing.assert_close(a, e, atol=1e-6, rtol=1e-3)
    for a, e in zip(ours[1] + ours[2], ref[1] + ref[2]):
        torch.testing.assert_close(a, e, atol=1e-6, rtol=0)
    # one call over fp32 and fp16 params: two pointer-table groups
    g = torch.Generator().manual_seed(5)
    ps = [torch.randn(33, generator=g), torch.randn(7, 3, generator=g).half(), torch.randn(70, generator=g)]
    gs = [torch.randn(p.shape, generator=g).to(p.dtype) for p in ps]
    ms, vs = [torch.rand(p.shape, generator=g) for p in ps], [torch.rand(p.shape, generator=g) for p in ps]
    ref_state = [[t.clone() for t in lst] for lst in (ps, ms, vs)]
    adamw_multi_triton_(ps, gs, ms, vs, 3, **HP)
    for k in range(3):
        train_update(ref_state[0][k], gs[k], ref_state[1][k], ref_state[2][k], 3, HP["lr"], HP["beta1"],
                     HP["beta2"], HP["eps"], HP["weight_decay"], decay_after=True)
        torch.testing.assert_close(ps[k], ref_state[0][k], atol=1e-6, rtol=1e-3 if ps[k].dtype == torch.half else 0)
        torch.testing.assert_close(ms[k], ref_state[1][k], atol=1e-6, rtol=0)
        torch.testing.assert_close(vs[k], ref_state[2][k], atol=1e-6, rtol=0)


def test_adamw_public_cpu_is_train_reference_bitwise():
    from train.adamw import adamw_update_ as train_update
    ours = _adam_run(adamw_step_, torch.float32, decay_after=False)
    ref = _adam_run(train_update, torch.float32, decay_after=False)
    for a_list, e_list in zip(ours, ref):
        for a, e in zip(a_list, e_list):
            assert torch.equal(a, e)
    assert adamw_update_ is adamw_step_
    p = torch.zeros(4)
    with pytest.raises(ValueError, match="float32"):
        adamw_triton_(p, p, torch.zeros(4, dtype=torch.half), torch.zeros(4), 1, **HP)
    with pytest.raises(ValueError, match="step"):
        adamw_triton_(p, p, torch.zeros(4), torch.zeros(4), 0, **HP)
