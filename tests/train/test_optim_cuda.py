"""GPU only (run on a CUDA machine): our paged AdamW against bitsandbytes' CUDA kernels, and paging itself.

On a CPU-only machine these are skipped: there is no CUDA kernel to compare with and no managed memory.
The measured differences are printed (pytest -s) so the GPU run reports them.
"""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HP = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)


def _pair(cls_ours, cls_bnb, shape, steps, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    p0 = torch.randn(shape, device="cuda", generator=g) * 0.1
    p1, p2 = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    o1, o2 = cls_ours([p1], **HP), cls_bnb([p2], **HP)
    worst = 0.0
    for _ in range(steps):
        grad = torch.randn(shape, device="cuda", generator=g) * 0.01
        p1.grad, p2.grad = grad.clone(), grad.clone()
        o1.step()
        o2.step()
        worst = max(worst, float((p1 - p2).abs().max()))
    return p1, p2, o1, o2, worst


def test_paged_adamw32_vs_bnb_cuda_kernel():
    bnb = pytest.importorskip("bitsandbytes")
    from train.optim import PagedAdamW32bit

    p1, p2, o1, _, worst = _pair(PagedAdamW32bit, bnb.optim.PagedAdamW32bit, (1024, 513), 20)
    print(f"\nPagedAdamW32bit vs bitsandbytes CUDA, 20 steps: max |dp| = {worst:.3e}")
    torch.testing.assert_close(p1, p2, atol=1e-6, rtol=0)  # fast-math in bnb: ~3e-7 (NUMERICS.md)
    assert getattr(o1.state[p1]["state1"], "is_paged", False)  # >= 1e5 elements: managed memory


def test_paged_adamw8bit_vs_bnb_cuda_kernel():
    bnb = pytest.importorskip("bitsandbytes")
    from train.optim import PagedAdamW8bit

    p1, p2, o1, o2, worst = _pair(PagedAdamW8bit, bnb.optim.PagedAdamW8bit, (1024, 513), 20)
    print(f"\nPagedAdamW8bit vs bitsandbytes CUDA, 20 steps: max |dp| = {worst:.3e}")
    err = (p1 - p2).abs()
    assert err.mean() < 6e-5 and (err / (p2.abs() + 1e-9)).mean() < 6e-4  # bitsandbytes' own 8-bit bounds
    assert o1.state[p1]["state1"].dtype == torch.uint8


def test_managed_memory_roundtrip_and_prefetch():
    from train.paged import paged_zeros, prefetch

    t = paged_zeros((1000, 300), torch.float32, "cuda")
    assert t.is_cuda and t.is_paged and float(t.abs().sum()) == 0.0
    t.add_(1.5)
    prefetch(t)
    torch.cuda.synchronize()
    assert float(t.sum()) == 1.5 * 300_000
    u = paged_zeros((7,), torch.uint8, "cuda")
    u.fill_(3)
    assert u.cpu().tolist() == [3] * 7


def test_paged_states_prefetched_only_when_memory_ran_short(monkeypatch):
    """PagedAdamW prefetches its managed states on the first step; later steps skip the prefetch while free GPU
    memory stays above the margin (pages leave the GPU only when it runs out), and prefetch again below it. The
    update is the same either way."""
    import train.optim as optim

    calls = []
    real = optim.prefetch
    monkeypatch.setattr(optim, "prefetch", lambda t, d=None: (calls.append(t.data_ptr()), real(t, d)))
    ps = [torch.nn.Parameter(torch.randn(512, 512, device="cuda")) for _ in range(3)]
    opt = optim.PagedAdamW32bit(ps, **HP)
    assert getattr(opt._buffer(ps[0], torch.float32), "is_paged", False)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    assert len(calls) == 6                                           # first step: both states of 3 params
    opt.step()
    free = torch.cuda.mem_get_info()[0]
    if free > max(optim.PREFETCH_FREE_MARGIN, torch.cuda.mem_get_info()[1] // 20):
        assert len(calls) == 6, "a second step with free memory prefetched again"
    monkeypatch.setattr(optim, "PREFETCH_FREE_MARGIN", 1 << 62)      # "memory ran short": prefetch
    opt.step()
    assert len(calls) >= 12
