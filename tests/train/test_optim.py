"""Paged AdamW 32/8-bit against bitsandbytes' CPU optimizers and torch.optim.AdamW."""
import math

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from train.adamw import (adamw_update_, create_dynamic_map, dequantize_blockwise_8bit,
                         quantize_blockwise_8bit)
from train.config import TrainConfig
from train.optim import PagedAdamW8bit, PagedAdamW32bit, build_optimizer


def _params(seed, shapes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * 0.1 for s in shapes]


def _run(opt_cls, params, grads, **kw):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = opt_cls(ps, **kw)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
    return ps, opt


def _grads(seed, shapes, steps, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * scale for s in shapes] for _ in range(steps)]


SHAPES = [(64, 33), (300,), (17, 5)]
HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def test_dynamic_maps_equal_bitsandbytes():
    import bitsandbytes.functional as F

    assert torch.equal(create_dynamic_map(True), F.create_dynamic_map(signed=True))
    assert torch.equal(create_dynamic_map(False), F.create_dynamic_map(signed=False))


def test_adamw32_matches_bnb_cpu_20_steps():
    params, grads = _params(0, SHAPES), _grads(1, SHAPES, 20)
    ours, _ = _run(PagedAdamW32bit, params, grads, **HP)          # CPU: decay before, like bnb's CPU path
    ref, _ = _run(bnb.optim.AdamW32bit, params, grads, **HP)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.data, b.data, atol=1e-6, rtol=0)
        # the same float32 operations in the same order: bit-identical
        assert torch.equal(a.data, b.data), (a.data - b.data).abs().max()


def test_adamw32_matches_torch_adamw_bnb_bounds():
    params, grads = _params(2, SHAPES), _grads(3, SHAPES, 20)
    ours, _ = _run(PagedAdamW32bit, params, grads, **HP)
    ref, _ = _run(torch.optim.AdamW, params, grads, **HP)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.data, b.data, atol=1e-6, rtol=1e-5)


def test_decay_after_is_cuda_formula():
    """decay_after=True (bitsandbytes' CUDA kernel) against the NUMERICS.md formula in float64."""
    params, grads = _params(4, [(40, 7)]), _grads(5, [(40, 7)], 20)
    ours, _ = _run(PagedAdamW32bit, params, grads, decay_after=True, **HP)
    p = params[0].double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    lr, (b1, b2), eps, wd = HP["lr"], HP["betas"], HP["eps"], HP["weight_decay"]
    for t, (g,) in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        c1, c2 = 1 - b1 ** t, math.sqrt(1 - b2 ** t)
        p = p - lr * (c2 / c1) * m / (v.sqrt() + eps * c2)
        p = p * (1 - lr * wd)
    torch.testing.assert_close(ours[0].data.double(), p, atol=1e-6, rtol=0)
    # and the placement matters: decay-before differs from it by more than rounding
    before, _ = _run(PagedAdamW32bit, params, grads, decay_after=False, **HP)
    assert not torch.equal(before[0].data, ours[0].data)


def test_swappable_update_fn_is_called():
    calls = []

    def spy(*args, **kw):
        calls.append(kw["decay_after"])
        adamw_update_(*args, **kw)

    params, grads = _params(6, [(8, 8)]), _grads(7, [(8, 8)], 3)
    _run(PagedAdamW32bit, params, grads, update_fn=spy, **HP)
    assert calls == [False, False, False]


def test_blockwise_8bit_roundtrip_error_small():
    x = torch.randn(1000 * 256 + 17) * 0.01
    code = create_dynamic_map(True)
    q, absmax = quantize_blockwise_8bit(x, code)
    assert q.dtype == torch.uint8 and absmax.shape == (1001,)
    y = dequantize_blockwise_8bit(q, absmax, code)
    rel = (x - y).abs() / absmax.repeat_interleave(256)[: x.numel()]
    assert rel.max() < 0.02  # half the widest gap of the dynamic map near 1.0 (~0.014) + slack
    # nearest code: no other code is closer
    xs = x / absmax.repeat_interleave(256)[: x.numel()]
    best = (xs[:4096, None] - code[None, :]).abs().min(1).values
    got = (xs[:4096] - code[q[:4096].long()]).abs()
    torch.testing.assert_close(got, best, atol=1e-7, rtol=0)


def _assert_most_close(a, b, atol, rtol, max_error_count=0):
    bad = (~torch.isclose(a, b, atol=atol, rtol=rtol)).sum().item()
    assert bad <= max_error_count, f"{bad} elements not close (atol {atol}, rtol {rtol})"


@pytest.mark.parametrize("reference", ["bnb_cpu_8bit", "torch_adamw"])
def test_adamw8bit_within_bnb_test_bounds(reference):
    """bitsandbytes 0.50's tests/test_optim.py::test_optimizer8bit bounds (float32), one step at a time from
    identical parameters and states (their test re-synchronises parameters and states after every step too):
    states: fewer than 20 elements outside isclose(atol 3e-3, rtol 1e-3); parameters: isclose(1e-5, 1e-3)
    everywhere, mean abs error < 6e-5, mean relative error < 6e-4."""
    import bitsandbytes.functional as F

    shape = (256, 257)  # 65792 elements, a partial last block
    p0 = torch.randn(shape, generator=torch.Generator().manual_seed(8)) * 0.1
    p1 = torch.nn.Parameter(p0.clone())
    p2 = torch.nn.Parameter(p0.clone())
    ours = PagedAdamW8bit([p1], **HP)
    ref = bnb.optim.AdamW8bit([p2], **HP) if reference == "bnb_cpu_8bit" else torch.optim.AdamW([p2], **HP)
    gen = torch.Generator().manual_seed(9)
    for i in range(30):
        g = torch.randn(shape, generator=gen) * 0.01
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        assert ours.state[p1]["state1"].dtype == torch.uint8
        m1, v1 = ours.dequantized_state(p1)
        if reference == "bnb_cpu_8bit":
            s = ref.state[p2]
            m2 = F.dequantize_blockwise(s["state1"], absmax=s["absmax1"], code=s["qmap1"], blocksize=256)
            v2 = F.dequantize_blockwise(s["state2"], absmax=s["absmax2"], code=s["qmap2"], blocksize=256)
        else:
            m2, v2 = ref.state[p2]["exp_avg"], ref.state[p2]["exp_avg_sq"]
        for a, b in ((m1, m2), (v1, v2)):
            assert (~torch.isclose(a, b, atol=3e-3, rtol=1e-3)).sum().item() < 20
        _assert_most_close(p1.data, p2.data, atol=1e-5, rtol=1e-3, max_error_count=0)
        err = (p1.data - p2.data).abs()
        assert err.mean() < 6e-5
        assert (err / (p2.data.abs() + 1e-9)).mean() < 6e-4
        # re-synchronise: the reference continues from our parameters and states
        p2.data.copy_(p1.data)
        if reference == "bnb_cpu_8bit":
            for k in ("state1", "state2", "absmax1", "absmax2"):
                ref.state[p2][k].copy_(ours.state[p1][k])
        else:
            ref.state[p2]["exp_avg"].copy_(m1)
            ref.state[p2]["exp_avg_sq"].copy_(v1)


def test_8bit_small_params_keep_32bit_state():
    params, grads = _params(10, [(4095,), (64, 64)]), _grads(11, [(4095,), (64, 64)], 2)
    ps, opt = _run(PagedAdamW8bit, params, grads, **HP)
    assert opt.state[ps[0]]["state1"].dtype == torch.float32
    assert opt.state[ps[1]]["state1"].dtype == torch.uint8
    assert opt.state[ps[1]]["absmax1"].shape == (16,)


@pytest.mark.parametrize("cls", [PagedAdamW32bit, PagedAdamW8bit])
def test_state_dict_roundtrip_continues_identically(cls, tmp_path):
    shapes = [(80, 64), (10,)]
    params, grads = _params(12, shapes), _grads(13, shapes, 6)
    full, _ = _run(cls, params, grads, **HP)
    half, opt = _run(cls, params, grads[:3], **HP)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    ps = [torch.nn.Parameter(p.data.clone()) for p in half]
    opt2 = cls(ps, **HP)
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt"))
    for gs in grads[3:]:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(ps, full):
        assert torch.equal(a.data, b.data)


def test_build_optimizer_names_and_errors():
    cfg = TrainConfig(learning_rate=3e-4, weight_decay=0.001)
    p = torch.nn.Parameter(torch.zeros(3))
    frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)
    assert isinstance(build_optimizer("paged_adamw_32bit", [p, frozen], cfg), PagedAdamW32bit)
    assert isinstance(build_optimizer("paged_adamw_8bit", [p], cfg), PagedAdamW8bit)
    o = build_optimizer("adamw_torch", [p], cfg)
    assert isinstance(o, torch.optim.AdamW) and o.param_groups[0]["lr"] == 3e-4
    assert len(build_optimizer("paged_adamw_32bit", [p, frozen], cfg).param_groups[0]["params"]) == 1
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        build_optimizer("sgd", [p], cfg)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer("paged_adamw_32bit", [frozen], cfg)
    with pytest.raises(ValueError, match="beta"):
        PagedAdamW32bit([p], betas=(1.0, 0.999))


def test_cpu_states_are_plain_tensors_and_paging_is_cuda_only():
    from train.paged import paged_zeros

    t = paged_zeros((3, 4), torch.float32, "cpu")
    assert t.shape == (3, 4) and not getattr(t, "is_paged", False) and t.abs().sum() == 0
    ps, opt = _run(PagedAdamW32bit, _params(14, [(400, 300)]), _grads(15, [(400, 300)], 1), **HP)
    assert not getattr(opt.state[ps[0]]["state1"], "is_paged", False)  # >= 1e5 elements, but on the CPU


def test_kernels_adamw_reference_is_a_drop_in_update_fn():
    """kernels/ (Triton AdamW, owned there) exposes the same signature; its CPU reference must agree bit for bit."""
    kadamw = pytest.importorskip("kernels.adamw")
    params, grads = _params(16, SHAPES), _grads(17, SHAPES, 5)
    for decay_after in (False, True):
        a, _ = _run(PagedAdamW32bit, params, grads, decay_after=decay_after, **HP)
        b, _ = _run(PagedAdamW32bit, params, grads, decay_after=decay_after, update_fn=kadamw.adamw_update_, **HP)
        for x, y in zip(a, b):
            assert torch.equal(x.data, y.data)
