"""GPU only: enable_fast_path(offload_saved=k) on CUDA (llama/offload.py: side stream, events, pinned buffers).

The bookkeeping is checked on the CPU in tests/llama/test_offload.py; here: the same loss and gradients as
without offloading (bf16 autocast, eager and replayed from a CUDA graph), and the memory it saves.
"""
import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

N_LAYERS, B, T, C = 6, 2, 256, 256


def _model(offload_saved=0, checkpointing=False):
    """The graph tests' NF4 + LoRA model at N_LAYERS x C; checkpointed layers (the first `checkpointing`) offload
    their inputs, the next `offload_saved` layers what they save."""
    from tests.train.test_cuda_graph_cuda import _model as graph_test_model

    offload = bool(checkpointing)
    m = graph_test_model(checkpointing=checkpointing, offload=offload, num_hidden_layers=N_LAYERS, hidden_size=C,
                         intermediate_size=4 * C, num_attention_heads=4, num_key_value_heads=4, head_dim=C // 4,
                         max_position_embeddings=T)
    if offload_saved:
        from llama.fast_path import enable_fast_path
        enable_fast_path(m, checkpointing=checkpointing, offload=offload, offload_saved=offload_saved)
        m.model.layers[0]._saved_offloader.min_bytes = 0     # these activations are below the default 1 MiB
    return m


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _step(model, ids, seed=7):
    from tests.train.test_cuda_graph_cuda import _loss

    torch.manual_seed(seed)
    for p in model.parameters():
        p.grad = None
    loss = _loss(model, ids, ids)
    (loss * 1e-3).backward()
    return float(loss), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("k", [2, N_LAYERS])
def test_offload_saved_matches_on_cuda(k):
    """Three steps: the losses and LoRA gradients equal those without offloading (flash attention's backward
    adds in a nondeterministic order: 1e-5 relative)."""
    ref = _model()
    m = copy.deepcopy(ref)
    from llama.fast_path import enable_fast_path
    enable_fast_path(m, offload_saved=k)
    off = m.model.layers[0]._saved_offloader
    off.min_bytes = 0
    assert off is not None and off.cuda and off.layers == list(range(k))
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        ids = torch.randint(0, 256, (B, T), generator=gen).cuda()
        l0, g0 = _step(ref, ids)
        l1, g1 = _step(m, ids)
        assert abs(l0 - l1) <= 1e-5 * abs(l0), f"step {step}: loss {l1} vs {l0}"
        worst = max(_rel(a, b) for a, b in zip(g1, g0))
        assert worst < 1e-5, f"step {step}: gradients differ by {worst:.2e} (relative Frobenius)"
    assert off.stats["tensors"] >= 8 * k * 3, off.stats


def test_offload_saved_lowers_the_peak():
    """Offloading every layer's saved activations takes the step's peak down by at least half of what the
    layers keep without it (measured as the peak without offloading minus the peak with every layer
    checkpointed)."""
    ids = torch.randint(0, 256, (B, T), device="cuda")
    peaks = {}
    for name, kw in [("keep", {}), ("ckpt", dict(checkpointing=True)), ("offload", dict(offload_saved=N_LAYERS))]:
        m = _model(**kw)
        _step(m, ids)                                     # warm-up: kernel choices, host buffers
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _step(m, ids)
        torch.cuda.synchronize()
        peaks[name] = torch.cuda.max_memory_allocated() - base
        del m
        torch.cuda.empty_cache()
    kept = peaks["keep"] - peaks["ckpt"]
    assert kept > 0, peaks
    assert peaks["keep"] - peaks["offload"] >= kept / 2, \
        f"offloading saved {(peaks['keep'] - peaks['offload']) / 2**20:.1f} MiB of {kept / 2**20:.1f} MiB: {peaks}"


@pytest.mark.parametrize("checkpointing", [0, 2])
def test_graphed_step_with_offloaded_saved_activations(checkpointing):
    """A CUDA-graph capture of a step whose first layers offload their saved activations (after `checkpointing`
    checkpointed ones, as e2e's mixed variant) replays with the same losses and gradients as the eager step, and
    the masks change from step to step."""
    from tests.train.test_cuda_graph_cuda import _graphed_matches_eager, _loss

    eager_m = _model(offload_saved=3, checkpointing=checkpointing)
    assert eager_m.model.layers[0]._saved_offloader.layers == list(range(checkpointing, checkpointing + 3))
    graph_m = copy.deepcopy(eager_m)
    assert graph_m.model.layers[0]._saved_offloader is not eager_m.model.layers[0]._saved_offloader
    gen = torch.Generator().manual_seed(1)
    batches = [[torch.randint(0, 256, (B, T), generator=gen).cuda() for _ in range(2)] for _ in range(5)]
    batches[4] = batches[3]
    steps = [[{"input_ids": ids, "labels": ids} for ids in mb] for mb in batches]
    gs, grads = _graphed_matches_eager(eager_m, graph_m, steps, _loss, scale=1e-3, seed=11)
    assert gs.captures == 1 and gs.eager_calls == 0
    assert max(_rel(a, b) for a, b in zip(grads[3], grads[4])) > 1e-2, "steps 4 and 5 drew the same masks"
    assert graph_m.model.layers[0]._saved_offloader.stats["tensors"] > 0
