"""The fast path (llama.fast_path.enable_fast_path) computes what the plain path computes, on a tiny random model.

On CPU tensors every fused op dispatches to its pure-torch reference, so these tests check the wiring (module swaps,
the fused LoRA node and its hand-written backward, the chunked loss, recompute-in-backward checkpointing) in fp32
with tight tolerances; the Triton kernels themselves are tested in tests/kernels/.
"""
import copy

import pytest
import torch
from torch import nn

from llama import LlamaForCausalLM, ModelArgs
from llama.fast_path import (FastAttention, FastDecoderLayer, FastLlamaForCausalLM, FastMLP, FastRMSNorm,
                             LoRAFunction, _keep_mask, disable_fast_path, enable_fast_path)
from lora import LoraConfig, inject_lora, trainable_parameters

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def assert_close(got, want, rtol, atol, what):
    """Fails naming the first element outside |got - want| <= atol + rtol * |want|."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = (got - want).abs() > atol + rtol * want.abs()
    if bad.any():
        i = tuple(int(j) for j in bad.nonzero()[0])
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements off; first at {i}: "
                             f"got {got[i].item():.8g}, want {want[i].item():.8g} (rtol {rtol}, atol {atol})")


def tiny_lora_model(seed=0, dropout=0.0, targets=ALL7, nf4=False):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(ModelArgs.from_name("tiny"))            # GQA: 4 heads, 2 KV heads
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "RMSNorm":
                m.weight.uniform_(0.5, 1.5)                              # non-trivial norm weights
    if nf4:
        from kernels import NF4Linear
        for name, mod in list(model.named_modules()):
            if isinstance(mod, nn.Linear) and name != "lm_head":
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, NF4Linear.from_linear(mod))
    # init_lora_weights=False: B is random too, so the adapter changes the output and its gradients are all non-zero
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                                  init_lora_weights=False))
    return model.train()


def batch(seed=1, B=2, T=24, V=256):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100                                                # some positions without a loss
    return ids, labels


def loss_and_grads(model, ids, labels, seed=5):
    torch.manual_seed(seed)
    model.zero_grad(set_to_none=True)
    loss = model(ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fast_path_matches_plain_loss_and_grads(checkpointing):
    plain = tiny_lora_model()
    fast = enable_fast_path(copy.deepcopy(plain), checkpointing=checkpointing, offload=True)
    ids, labels = batch()
    loss_p, grads_p = loss_and_grads(plain, ids, labels)
    loss_f, grads_f = loss_and_grads(fast, ids, labels)
    assert fast(ids, labels=labels).logits is None                     # the chunked loss makes no full logits
    assert_close(loss_f, loss_p, 1e-5, 1e-6, "loss")
    assert grads_p.keys() == grads_f.keys() and len(grads_p) == 2 * 7 * 2
    for name in grads_p:
        scale = grads_p[name].abs().max().item()
        assert scale > 0, f"{name}: zero gradient on the plain path"
        assert_close(grads_f[name], grads_p[name], 1e-4, 1e-5 * scale, f"grad {name}")


def test_fast_path_logits_without_labels():
    plain = tiny_lora_model()
    fast = enable_fast_path(copy.deepcopy(plain), checkpointing=True)
    ids, _ = batch()
    with torch.no_grad():
        assert_close(fast(ids).logits, plain(ids).logits, 1e-5, 1e-5, "logits")


def test_fast_path_swaps_classes_and_keeps_names():
    model = tiny_lora_model()
    keys = list(model.state_dict().keys())
    enable_fast_path(model, checkpointing=True)
    assert type(model) is FastLlamaForCausalLM
    assert type(model.model.norm) is FastRMSNorm
    layer = model.model.layers[0]
    assert type(layer) is FastDecoderLayer and type(layer.self_attn) is FastAttention and type(layer.mlp) is FastMLP
    assert list(model.state_dict().keys()) == keys
    disable_fast_path(model)
    assert type(model) is LlamaForCausalLM and type(model.model.layers[0].mlp).__name__ == "MLP"
    assert "forward" not in model.model.layers[0].self_attn.q_proj.__dict__
    assert list(model.state_dict().keys()) == keys


def test_checkpoint_recompute_replays_dropout():
    """With dropout, recompute-in-backward must regenerate the same masks: grads equal the non-checkpointed fast
    path's exactly (same seed, same masks)."""
    base = tiny_lora_model(dropout=0.3)
    a = enable_fast_path(copy.deepcopy(base), checkpointing=False)
    b = enable_fast_path(copy.deepcopy(base), checkpointing=True)
    ids, labels = batch()
    la, ga = loss_and_grads(a, ids, labels, seed=9)
    lb, gb = loss_and_grads(b, ids, labels, seed=9)
    assert_close(lb, la, 0, 0, "loss")
    for name in ga:
        assert_close(gb[name], ga[name], 1e-6, 1e-9, f"grad {name}")


def test_fast_path_trains_like_plain_with_optimizer():
    """Ten AdamW steps: the losses of the two paths agree (dropout off, fp32)."""
    plain = tiny_lora_model()
    fast = enable_fast_path(copy.deepcopy(plain), checkpointing=True)
    losses = {}
    for tag, model in (("plain", plain), ("fast", fast)):
        opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-2)
        out = []
        for step in range(10):
            ids, labels = batch(seed=step % 3)
            loss = model(ids, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable_parameters(model), 0.3)
            opt.step()
            opt.zero_grad(set_to_none=True)
            out.append(loss.item())
        losses[tag] = torch.tensor(out)
    assert losses["plain"][-1] < losses["plain"][0] - 0.05, f"plain path did not learn: {losses['plain']}"
    assert_close(losses["fast"], losses["plain"], 1e-4, 1e-5, "losses over 10 steps")


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_function_matches_autograd(p):
    """LoRAFunction's hand-written backward vs autograd over the same math and the same keep-mask."""
    torch.manual_seed(0)
    N, fin, fout, r, s, seed = 37, 48, 40, 6, 0.5, 1234
    base = nn.Linear(fin, fout, bias=True)
    x = torch.randn(N, fin, requires_grad=True)
    A = torch.randn(r, fin, requires_grad=True)
    B = torch.randn(fout, r, requires_grad=True)
    y = LoRAFunction.apply(x, A, B, base, s, p, seed)
    dy = torch.randn_like(y)
    dx, dA, dB = torch.autograd.grad(y, (x, A, B), dy)
    keep = _keep_mask((N, fin), p, seed, x.device, x.dtype) if p > 0 else torch.ones(N, fin)
    if p > 0:
        frac = keep.mean().item()
        assert 0.5 < frac < 0.9 and keep.unique().tolist() == [0.0, 1.0], f"keep-mask fraction {frac}"
    x2, A2, B2 = (t.detach().clone().requires_grad_() for t in (x, A, B))
    xd = x2 * keep / (1 - p)
    y_ref = base(x2) + s * (xd @ A2.t()) @ B2.t()
    dx_r, dA_r, dB_r = torch.autograd.grad(y_ref, (x2, A2, B2), dy)
    assert_close(y, y_ref, 1e-5, 1e-5, "y")
    assert_close(dx, dx_r, 1e-5, 1e-5, "dx")
    assert_close(dA, dA_r, 1e-5, 1e-5, "dA")
    assert_close(dB, dB_r, 1e-5, 1e-5, "dB")


def test_fast_path_nf4_base():
    """NF4 base linears (kernels.NF4Linear, CPU reference): fast and plain losses and LoRA grads agree."""
    plain = tiny_lora_model(nf4=True, targets=["q_proj", "v_proj", "down_proj"])
    fast = enable_fast_path(copy.deepcopy(plain), checkpointing=True)
    ids, labels = batch(T=16)
    loss_p, grads_p = loss_and_grads(plain, ids, labels)
    loss_f, grads_f = loss_and_grads(fast, ids, labels)
    assert_close(loss_f, loss_p, 1e-5, 1e-6, "loss (nf4 base)")
    for name in grads_p:
        scale = grads_p[name].abs().max().item()
        assert_close(grads_f[name], grads_p[name], 1e-4, 1e-5 * scale, f"grad {name} (nf4 base)")


def test_triton_dropout_kernel_in_interpreter():
    """The Triton dropout of the fused LoRA node, in Triton's CPU interpreter (a subprocess, since
    TRITON_INTERPRET is read when kernels are decorated): same seed -> same mask, P(keep) = 1 - p, kept values
    scaled by 1/(1-p) exactly as torch rounds x * scale, and the accumulate form adds exactly that."""
    import os
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from llama import fast_path as fp\n"
        "x = torch.randn(3001, 37)\n"
        "y = fp._dropout_triton(x, 0.1, 12345); y2 = fp._dropout_triton(x, 0.1, 12345)\n"
        "z = fp._dropout_triton(x, 0.1, 999)\n"
        "k = y != 0\n"
        "assert torch.equal(y, y2), 'same seed, different output'\n"
        "assert 0.89 < k.float().mean().item() < 0.91, k.float().mean()\n"
        "assert torch.equal(y[k], x[k] * (1 / 0.9)), 'kept values not x / (1 - p)'\n"
        "assert not torch.equal(z != 0, k), 'different seeds gave the same mask'\n"
        "acc = torch.randn(3001, 37); a0 = acc.clone()\n"
        "fp._dropout_triton(x, 0.1, 12345, out=acc)\n"
        "assert torch.allclose(acc, a0 + y, rtol=0, atol=1e-6), 'accumulate form'\n"
        "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]


def test_seed_slots_bookkeeping():
    """SeedSlots (LoRA dropout seeds in device memory, for CUDA graphs): each call of a step takes the next slot and
    writes the seed the eager call would draw from the CPU generator; a rewound recompute reuses its slots without
    drawing; a capture draws nothing and may not take more slots than the eager steps did; refill() draws one
    step's seeds in call order. The torch mask family cannot read a seed from memory and says so."""
    from llama.fast_path import SeedSlots, _host_seed, seed_slots, _draw_seed

    torch.manual_seed(123)
    want = [_host_seed() for _ in range(3)]
    slots = SeedSlots(torch.device("cpu"), capacity=3)
    torch.manual_seed(123)
    slots.begin_step()
    with seed_slots(slots):
        a = _draw_seed(0.1)
        assert _draw_seed(0.0) == 0                                   # no dropout: no slot, no draw
        state = torch.get_rng_state()
        with slots.rewound(0):
            assert _draw_seed(0.1).data_ptr() == a.data_ptr()         # the recompute reads the forward's slot
        assert torch.equal(torch.get_rng_state(), state)              # ... and drew nothing
        b, c = _draw_seed(0.1), _draw_seed(0.1)
        with pytest.raises(RuntimeError, match="more than 3 dropout LoRA calls"):
            _draw_seed(0.1)
    assert [int(t) for t in (a, b, c)] == want and slots.used == 3
    slots.used = 2
    slots.begin_step(capturing=True)
    state = torch.get_rng_state()
    slots.take(), slots.take()
    assert torch.equal(torch.get_rng_state(), state)                  # a capture draws nothing
    with pytest.raises(RuntimeError, match="takes dropout seed 3, the eager steps took 2"):
        slots.take()
    torch.manual_seed(7)
    want = [_host_seed() for _ in range(2)]
    torch.manual_seed(7)
    slots.refill()
    assert slots.buf[:2].tolist() == want
    with pytest.raises(RuntimeError, match="philox mask family"):
        _keep_mask((4, 4), 0.1, slots.buf[0:1], torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("targets", [ALL7, ["q_proj", "v_proj"]])
def test_norm_outputs_recomputed_same_grads_and_freed(targets, monkeypatch):
    """A layer that keeps its activations saves its norms' outputs (the LoRA A-sides' input) as recipes recomputed
    in backward (llama.fast_path.RECOMPUTE_NORM_OUTPUTS): the same loss and gradients, bit for bit, as saving
    them; and after the forward the norm outputs are freed (held by autograd when saved as tensors)."""
    import weakref

    import llama.fast_path as fp

    ids, labels = batch()
    res, alive = {}, {}
    for on in (False, True):
        monkeypatch.setattr(fp, "RECOMPUTE_NORM_OUTPUTS", on)
        model = enable_fast_path(tiny_lora_model(dropout=0.2, targets=targets, nf4=True))
        refs = []
        hooks = [layer.input_layernorm.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
                 for layer in model.model.layers]
        torch.manual_seed(5)
        loss = model(ids, labels=labels).loss
        for h in hooks:
            h.remove()
        alive[on] = sum(r() is not None for r in refs)
        loss.backward()
        res[on] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert alive[False] == len(refs) and alive[True] == 0, alive
    assert torch.equal(res[True][0], res[False][0])
    for name, g in res[False][1].items():
        assert torch.equal(res[True][1][name], g), name
