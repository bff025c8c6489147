"""kernels.gather on a CUDA GPU: the kernel reads rows from a pinned host table (zero-copy) and equals
index_select bit for bit in bf16; it can be captured in a CUDA graph and replayed with new ids; the fast path's
host-resident embedding uses it (checked on its first call) and GraphedStep then runs it inside the graph."""
import pytest
import torch

from kernels.gather import gather_rows

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (pinned host memory, UVA)")


def test_gather_from_pinned_host_bf16():
    dev = torch.device("cuda")
    table = torch.randn(32000, 4096, dtype=torch.bfloat16).pin_memory()
    ids = torch.randint(0, 32000, (4, 2048), device=dev)
    got = gather_rows(table, ids)
    assert got.device == ids.device
    assert torch.equal(got.cpu(), table[ids.reshape(-1).cpu()])
    bad = torch.zeros(1, dtype=torch.int32).pin_memory()
    ids[0, 5] = 32000
    got = gather_rows(table, ids, check_range=False, bad=bad)
    torch.cuda.synchronize()
    assert bad.item() == 1 and torch.equal(got[5].cpu(), torch.zeros(4096, dtype=torch.bfloat16))


def test_gather_captured_in_a_graph():
    dev = torch.device("cuda")
    table = torch.randn(1000, 520, dtype=torch.float16).pin_memory()
    ids = torch.randint(0, 1000, (333,), device=dev)
    gather_rows(table, ids, check_range=False)                   # compile outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s), torch.cuda.graph(g):
        out = gather_rows(table, ids, check_range=False)
    torch.cuda.current_stream().wait_stream(s)
    for seed in range(3):
        ids.copy_(torch.randint(0, 1000, (333,), generator=torch.Generator().manual_seed(seed)))
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), table[ids.cpu()])


def test_fast_path_embedding_gathers_on_device_and_in_the_graph():
    from llama.fast_path import CPUEmbedding
    from tests.train.test_cuda_graph_cuda import _loss, _model
    from train.cuda_graph import GraphedStep

    plain = _model(dropout=0.0, checkpointing=1)
    ref = plain.model.embed_tokens.weight.detach().clone()
    model = _model(dropout=0.0, checkpointing=1, offload_embeddings=True)
    emb = model.model.embed_tokens
    assert type(emb) is CPUEmbedding and emb.weight.is_pinned()
    ids = torch.randint(0, 256, (2, 40), device="cuda")
    assert torch.equal(emb(ids), ref[ids]) and emb._gather_state()["ok"] is True
    gs = GraphedStep(model, [p for p in model.parameters() if p.requires_grad])
    losses = [gs(_loss, dict(input_ids=ids, labels=ids)).item() for _ in range(4)]    # 2 eager, capture, replay
    assert gs.captures == 1
    assert all(e.rows is None for e in gs.entries.values())                  # no rows gathered on the host
    with torch.no_grad():
        want = _loss(plain, ids, ids).item()
    assert max(abs(x - want) for x in losses) <= 1e-3 * abs(want), (losses, want)
