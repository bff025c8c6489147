"""GPU only: the training step replayed from CUDA graphs (train/cuda_graph.py) against the same step run eagerly.

On a CPU-only machine these are skipped: CUDA graphs need a CUDA device. The seed slots that let a replay draw
new dropout masks are checked on the CPU in Triton's interpreter (tests/llama/fast_dropout_checks.py,
check_seed_slots_match_host_seeds); the config errors in tests/train/test_loop.py.
"""
import copy

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _model(dropout=0.1, checkpointing=1, seed=0, offload_embeddings=False, offload=False, **arch):
    from kernels import NF4Linear
    from llama import LlamaForCausalLM, ModelArgs
    from llama.fast_path import enable_fast_path
    from lora import LoraConfig, inject_lora

    torch.manual_seed(seed)
    model = LlamaForCausalLM(ModelArgs.from_name("tiny", **arch)).cuda()
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear) and name != "lm_head":
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NF4Linear.from_linear(mod))
    model.requires_grad_(False)
    inject_lora(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=ALL7,
                                  init_lora_weights=False))
    return enable_fast_path(model.cuda().train(), checkpointing=checkpointing, offload=offload,
                            offload_embeddings=offload_embeddings)


def _loss(model, input_ids, labels):
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        return model(input_ids, labels=labels, loss_reduction="sum").loss


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _graphed_matches_eager(eager_m, graph_m, steps, loss_fn, scale, seed):
    """steps: per optimizer step, its micro-batches as loss_fn(model, **inputs) keyword dicts. Runs them eagerly
    from torch seed `seed`, then through a GraphedStep from the same seed, and asserts per step the same losses
    (1e-5 relative) and LoRA gradients (1e-4 relative Frobenius). Returns (the GraphedStep, eager grads per step)."""
    from train.cuda_graph import GraphedStep

    params_e = [p for p in eager_m.parameters() if p.requires_grad]
    params_g = [p for p in graph_m.parameters() if p.requires_grad]
    gs = GraphedStep(graph_m, params_g)
    torch.manual_seed(seed)
    eager = []
    for mb in steps:
        for p in params_e:
            p.grad = None
        losses = []
        for inputs in mb:
            s = loss_fn(eager_m, **inputs)
            (s * scale).backward()
            losses.append(float(s))
        eager.append((losses, [p.grad.clone() for p in params_e]))
    torch.manual_seed(seed)
    for i, mb in enumerate(steps):
        for p in params_g:
            p.grad = None
        losses = [float(gs(loss_fn, inputs, scale=scale)) for inputs in mb]
        want_l, want_g = eager[i]
        for a, b in zip(losses, want_l):
            assert abs(a - b) <= 1e-5 * abs(b), f"step {i}: loss {a} vs eager {b}"
        worst = max(_rel(p.grad, g) for p, g in zip(params_g, want_g))
        assert worst < 1e-4, f"step {i}: LoRA grads differ from eager by {worst:.2e} (relative Frobenius)"
    return gs, [g for _, g in eager]


@pytest.mark.parametrize("checkpointing,offload_embeddings,offload", [(0, False, False), (1, False, False),
                                                                     (1, True, False), (2, False, True)])
def test_graphed_step_matches_eager(checkpointing, offload_embeddings, offload):
    """Five steps (2 warm-up, capture + replay, 2 replays) on the same batches as five eager steps from the same
    CPU generator state: the same losses and LoRA gradients (the same dropout masks), and the masks change from
    step to step. Gradients accumulate over two micro-batches with the loss scale as the Trainer sets it.
    offload_embeddings: the embedding table in pinned host memory (its rows copied to the device in the graph);
    offload: the checkpointed layers' inputs in pinned host memory (copies on the offloader's side stream)."""
    eager_m = _model(checkpointing=checkpointing, offload=offload)
    graph_m = copy.deepcopy(eager_m)
    if offload_embeddings:
        from llama.fast_path import enable_fast_path
        for m in (eager_m, graph_m):
            enable_fast_path(m, checkpointing=checkpointing, offload=offload, offload_embeddings=True)
        assert graph_m.model.embed_tokens.weight.device.type == "cpu"
    gen = torch.Generator().manual_seed(1)
    batches = [[torch.randint(0, 256, (2, 40), generator=gen).cuda() for _ in range(2)] for _ in range(5)]
    batches[4] = batches[3]                                   # same data twice: only the masks differ
    steps = [[{"input_ids": ids, "labels": ids} for ids in mb] for mb in batches]
    gs, grads = _graphed_matches_eager(eager_m, graph_m, steps, _loss, scale=1 / 150, seed=11)
    assert gs.captures == 1 and gs.eager_calls == 0
    assert max(_rel(a, b) for a, b in zip(grads[3], grads[4])) > 1e-2, "steps 4 and 5 drew the same masks"


def test_trainer_cuda_graph_matches_eager(tmp_path):
    """train.loop with cuda_graph: the losses of 6 steps (2 micro-batches each) equal the eager fast path's from the
    same seed. Dropout 0: the graphed micro-batches are padded to a multiple of 64 tokens, which moves the rows of
    the philox mask counters (test_graphed_step_matches_eager checks the masks, unpadded)."""
    from tests.train.conftest import ByteTokenizer
    from tests.train.test_loop import cfg_for, tiny_data
    from train.loop import Trainer

    ds = tiny_data(ByteTokenizer(), n=24)
    kw = dict(max_steps=6, lora_dropout=0.0, bf16=True, fast_path=True, optim="paged_adamw_32bit")
    res = {}
    for graph in (False, True):
        torch.manual_seed(3)
        model = _model(dropout=0.0, checkpointing=1, seed=4)
        tr = Trainer(model, cfg_for(tmp_path / str(graph), cuda_graph=graph, **kw), ds, pad_id=2, device="cuda")
        res[graph] = tr.train().losses
        if graph:
            assert tr.graph.captures >= 1, "no batch shape was captured"
    assert len(res[True]) == 6
    torch.testing.assert_close(torch.tensor(res[True]), torch.tensor(res[False]), rtol=2e-3, atol=0)


def test_graphed_step_with_left_padding_mask():
    """A batch whose attention mask is not right-padded (left padding: the mask reaches the masked SDPA path and its
    backward) captures and replays with the same losses and LoRA gradients as the eager step (dropout 0.1)."""
    eager_m = _model(checkpointing=1)
    graph_m = copy.deepcopy(eager_m)
    gen = torch.Generator().manual_seed(5)
    ids = [torch.randint(0, 256, (2, 48), generator=gen).cuda() for _ in range(4)]
    mask = torch.ones(2, 48, dtype=torch.long, device="cuda")
    mask[0, :7] = 0                                           # row 0 left-padded by 7
    labels = [i.masked_fill(mask == 0, -100) for i in ids]

    def loss_fn(model, input_ids, labels, attention_mask):
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            return model(input_ids, attention_mask=attention_mask, labels=labels, loss_reduction="sum").loss

    steps = [[{"input_ids": i, "labels": y, "attention_mask": mask}] for i, y in zip(ids, labels)]
    gs, _ = _graphed_matches_eager(eager_m, graph_m, steps, loss_fn, scale=0.01, seed=12)
    assert gs.captures == 1


def test_offloaded_capture_peak_is_the_eager_peak():
    """With every layer checkpointed and its input offloaded, capturing the step takes no more memory than the
    eager step it records: the offloader orders its side-stream copies by events, so every block is reusable
    during the capture as it is eagerly (blocks marked with record_stream are not, until the capture ends: the
    capture then held every layer's input and prefetched copy at once, 2 x n_layers x B x T x C x 2 bytes)."""
    from train.cuda_graph import GraphedStep

    n_layers, B, T, C = 8, 4, 256, 256
    model = _model(checkpointing=True, offload=True, num_hidden_layers=n_layers, hidden_size=C,
                   intermediate_size=4 * C, num_attention_heads=4, num_key_value_heads=4, head_dim=C // 4,
                   max_position_embeddings=T)
    assert model.model.layers[0]._offloader is not None
    gs = GraphedStep(model, [p for p in model.parameters() if p.requires_grad], warmup=2)
    ids = torch.randint(0, 256, (B, T), device="cuda")
    peaks = []
    for _ in range(4):                                   # 2 eager warm-ups, the capture (+ first replay), a replay
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        gs(_loss, {"input_ids": ids, "labels": ids}, scale=1e-3)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated())
        for p in model.parameters():
            p.grad = None
    assert gs.captures == 1
    layer_input = B * T * C * 2
    eager, capture = peaks[1], peaks[2]
    assert capture - eager < n_layers * layer_input // 2, \
        f"capture peak {capture / 2**20:.1f} MiB vs eager {eager / 2**20:.1f} MiB (one layer input: " \
        f"{layer_input / 2**20:.2f} MiB)"
