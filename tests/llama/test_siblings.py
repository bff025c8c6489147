"""Sibling projections (q, k, v; gate, up) as one autograd node (llama.fast_path.SiblingsFunction): the forward is
bit-identical to each projection's own, the input's gradient is summed in place (nf4_matmul_t(out=...), the
cuBLAS epilogue) instead of by autograd, and anything the node cannot run bit-identically falls back to the
separate projections. CPU, fp32: every kernel call takes its torch reference."""
import copy

import pytest
import torch

import llama.fast_path as fp
from lora.merge import merge_layer
from llama.fast_path import SiblingsFunction, enable_fast_path, run_siblings
from tests.llama.test_fast_path import ALL7, assert_close, batch, loss_and_grads, tiny_lora_model


def graph_nodes(t):
    """Names of every autograd node reachable from t."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.append(type(f).__name__)
        todo.extend(g for g, _ in f.next_functions)
    return names


def fast_pair(targets, nf4, dropout=0.0, checkpointing=False):
    plain = tiny_lora_model(dropout=dropout, targets=targets, nf4=nf4)
    return plain, enable_fast_path(copy.deepcopy(plain), checkpointing=checkpointing)


@pytest.fixture
def ungrouped():
    """Within the test, GROUP_SIBLINGS is switchable and comes back on afterwards."""
    yield
    fp.GROUP_SIBLINGS = True


@pytest.mark.parametrize("targets,nf4", [(ALL7, False), (["q_proj", "v_proj"], True), (["q_proj", "v_proj"], False),
                                         (["k_proj", "up_proj"], True)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_grouped_equals_separate(targets, nf4, checkpointing, ungrouped):
    """Per layer 2 nodes (attention inputs, MLP inputs); loss bit-identical to the separate projections (the same
    forward kernels), gradients within fp32 summation-order error, and both within the plain path's tolerance."""
    plain, fast = fast_pair(targets, nf4, checkpointing=checkpointing)
    ids, labels = batch()
    loss_g = fast(ids, labels=labels).loss
    n_layers = len(fast.model.layers)
    if not checkpointing:     # (a checkpointed layer's nodes live in its recompute, inside the backward)
        # layer 0's attention input needs no gradient (frozen embeddings, frozen norm): nothing to sum, not grouped
        assert graph_nodes(loss_g).count("SiblingsFunctionBackward") == 2 * n_layers - 1
    loss_g, grads_g = loss_and_grads(fast, ids, labels)
    fp.GROUP_SIBLINGS = False
    assert "SiblingsFunctionBackward" not in graph_nodes(fast(ids, labels=labels).loss)
    loss_s, grads_s = loss_and_grads(fast, ids, labels)
    loss_p, grads_p = loss_and_grads(plain, ids, labels)
    assert torch.equal(loss_g, loss_s)
    assert grads_g.keys() == grads_s.keys() == grads_p.keys() and grads_g
    for name in grads_g:
        scale = grads_s[name].abs().max().item()
        assert scale > 0, name
        assert_close(grads_g[name], grads_s[name], 1e-5, 1e-6 * scale, f"grouped vs separate {name}")
        assert_close(grads_g[name], grads_p[name], 1e-4, 1e-5 * scale, f"grouped vs plain {name}")


def test_dropout_masks_and_seed_order(ungrouped):
    """With dropout the group draws each LoRA member's seed in the members' call order, so grouped and separate
    runs from the same generator state see the same masks: equal losses."""
    _, fast = fast_pair(ALL7, nf4=True, dropout=0.25)
    ids, labels = batch()
    loss_g, grads_g = loss_and_grads(fast, ids, labels, seed=11)
    fp.GROUP_SIBLINGS = False
    loss_s, grads_s = loss_and_grads(fast, ids, labels, seed=11)
    assert torch.equal(loss_g, loss_s)
    for name in grads_g:
        scale = grads_s[name].abs().max().item()
        assert_close(grads_g[name], grads_s[name], 1e-5, 1e-6 * scale, name)


def test_fallback_when_a_member_does_not_qualify():
    """A merged adapter on layer 1's k_proj (its base weight then holds the update): that layer's attention inputs
    run as separate projections, its MLP's still as one node; the result still matches the plain model."""
    plain, fast = fast_pair(ALL7, nf4=False)
    for m in (plain, fast):
        merge_layer(m.model.layers[1].self_attn.k_proj)
    ids, labels = batch()
    names = graph_nodes(fast(ids, labels=labels).loss)
    n_layers = len(fast.model.layers)
    assert names.count("SiblingsFunctionBackward") == 2 * n_layers - 2   # (layer 0's attention: see above)
    merged = {n for n, p in plain.named_parameters() if "layers.1.self_attn.k_proj.lora_" in n}
    for m in (plain, fast):                       # a merged adapter is frozen (its update is in the base weight)
        for n, p in m.named_parameters():
            p.requires_grad_(p.requires_grad and n not in merged)
    loss_f, grads_f = loss_and_grads(fast, ids, labels)
    loss_p, grads_p = loss_and_grads(plain, ids, labels)
    assert_close(loss_f, loss_p, 1e-5, 1e-6, "loss")
    assert grads_p.keys() == grads_f.keys() and len(grads_p) == 2 * 7 * 2 - 2
    for name in grads_p:
        scale = grads_p[name].abs().max().item()
        assert_close(grads_f[name], grads_p[name], 1e-4, 1e-5 * scale, name)


def test_unused_output_and_no_input_grad():
    """Only q and v reach the loss: k's adapter gets no gradient (None, as for an unused projection), x's gradient
    is q's and v's parts only. An input without requires_grad is not grouped (nothing to sum)."""
    _, fast = fast_pair(ALL7, nf4=True)
    att = fast.model.layers[0].self_attn
    projs = (att.q_proj, att.k_proj, att.v_proj)
    torch.manual_seed(3)
    x = torch.randn(2, 5, att.q_proj.in_features)
    assert run_siblings(x, projs) is None
    xg = x.clone().requires_grad_(True)
    q, k, v = run_siblings(xg, projs)
    (q.square().sum() + v.sum()).backward()
    assert att.k_proj.lora_A.weight.grad is None and att.k_proj.lora_B.weight.grad is None
    got = {n: p.grad.clone() for n, p in (("qA", att.q_proj.lora_A.weight), ("vB", att.v_proj.lora_B.weight))}
    gx = xg.grad.clone()
    fast.zero_grad(set_to_none=True)
    xs = x.clone().requires_grad_(True)
    (att.q_proj(xs).square().sum() + att.v_proj(xs).sum()).backward()
    assert_close(gx, xs.grad, 1e-5, 1e-6 * xs.grad.abs().max().item(), "grad x")
    for n, p in (("qA", att.q_proj.lora_A.weight), ("vB", att.v_proj.lora_B.weight)):
        assert_close(got[n], p.grad, 1e-6, 1e-7, n)


def test_outputs_are_fresh_tensors():
    """RoPE writes into q and k in place: the node's outputs must not be views of one buffer or of x."""
    _, fast = fast_pair(ALL7, nf4=True)
    mlp = fast.model.layers[0].mlp
    x = torch.randn(3, mlp.gate_proj.in_features, requires_grad=True)
    ys = SiblingsFunction.apply(x, tuple((p.base_layer, p.scaling, 0.0, 0, True, False)
                                         for p in (mlp.gate_proj, mlp.up_proj)),
                                mlp.gate_proj.lora_A.weight, mlp.gate_proj.lora_B.weight,
                                mlp.up_proj.lora_A.weight, mlp.up_proj.lora_B.weight)
    ptrs = {y.untyped_storage().data_ptr() for y in ys} | {x.untyped_storage().data_ptr()}
    assert len(ptrs) == 3 and not any(y._is_view() for y in ys)


def test_hooked_member_is_called_as_a_module():
    """A forward hook on one projection (or a global module hook) keeps its group as separate module calls, so the
    hook sees every call; the other groups stay fused."""
    _, fast = fast_pair(ALL7, nf4=True)
    seen = []
    h = fast.model.layers[1].self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape))
    ids, labels = batch()
    names = graph_nodes(fast(ids, labels=labels).loss)
    h.remove()
    n_layers = len(fast.model.layers)
    assert len(seen) == 1 and names.count("SiblingsFunctionBackward") == 2 * n_layers - 2
    calls = []
    g = torch.nn.modules.module.register_module_forward_hook(lambda m, a, out: calls.append(type(m).__name__))
    try:
        names = graph_nodes(fast(ids, labels=labels).loss)
    finally:
        g.remove()
    assert "SiblingsFunctionBackward" not in names and calls.count("LoRALinear") == 7 * n_layers
