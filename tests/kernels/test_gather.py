"""kernels.gather in Triton's CPU interpreter: rows gathered by the kernel equal torch.index_select bit for bit
(fp32, fp16; int32 and int64 ids; odd widths), out-of-range ids raise (check_range) or give zero rows and a flag,
and bad arguments are named. llama.fast_path.CPUEmbedding on top of it: the first call is checked against the
host gather, a failing kernel falls back to the host path, and bad ids raise. (CUDA: test_gather_cuda.py, with
a pinned host table and a CUDA graph.)"""
import os

import torch

if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
    import pytest

    pytest.skip("interpreter tests run on CPU machines; on a GPU run test_gather_cuda.py", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch.nn as nn  # noqa: E402

from kernels import gather  # noqa: E402
from kernels.gather import gather_rows  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("V,C,n", [(50, 37, 13), (7, 16, 1), (300, 70, 41)])
def test_gather_rows_bit_exact(dtype, id_dtype, V, C, n):
    g = torch.Generator().manual_seed(V * C + n)
    table = torch.randn(V, C, generator=g).to(dtype)
    ids = torch.randint(0, V, (n,), generator=g, dtype=torch.int64)
    ids[0] = V - 1
    got = gather_rows(table, ids.to(id_dtype))
    assert torch.equal(got, torch.index_select(table, 0, ids))
    out = torch.full((n, C), 7.0, dtype=dtype)
    assert gather_rows(table, ids.view(1, n).to(id_dtype), out=out) is out and torch.equal(out, table[ids])


def test_gather_rows_strided_table_and_empty():
    big = torch.randn(20, 64)
    table = big[:, 5:40]                         # rows 64 apart, contiguous within a row
    ids = torch.tensor([3, 19, 0, 3])
    assert torch.equal(gather_rows(table, ids), table[ids])
    assert gather_rows(table, ids[:0]).shape == (0, 35)


def test_gather_rows_out_of_range():
    table = torch.randn(10, 24)
    ids = torch.tensor([1, 10, 2, -1])
    with pytest.raises(IndexError, match=r"\[0, 10\).*min -1 max 10"):
        gather_rows(table, ids)
    bad = torch.zeros(1, dtype=torch.int32)
    got = gather_rows(table, ids, check_range=False, bad=bad)
    assert bad.item() == 1
    assert torch.equal(got[0], table[1]) and torch.equal(got[2], table[2])
    assert torch.equal(got[1], torch.zeros(24)) and torch.equal(got[3], torch.zeros(24))
    bad.zero_()
    gather_rows(table, torch.tensor([0, 9]), check_range=False, bad=bad)
    assert bad.item() == 0


def test_gather_rows_bad_arguments():
    table = torch.randn(10, 24)
    with pytest.raises(ValueError, match="2-d tensor with contiguous rows"):
        gather_rows(table.t(), torch.tensor([0]))
    with pytest.raises(ValueError, match="2-d tensor"):
        gather_rows(torch.randn(10), torch.tensor([0]))
    with pytest.raises(ValueError, match="integer tensor, got torch.float32"):
        gather_rows(table, torch.tensor([0.0]))
    with pytest.raises(ValueError, match=r"out must be \(2, 24\)"):
        gather_rows(table, torch.tensor([0, 1]), out=torch.empty(3, 24))
    with pytest.raises(ValueError, match="bad must be an int32 tensor of one element"):
        gather_rows(table, torch.tensor([0, 1]), check_range=False, bad=torch.zeros(2, dtype=torch.int32))


def cpu_embedding(V=40, C=24, seed=0):
    from llama.fast_path import CPUEmbedding

    torch.manual_seed(seed)
    emb = nn.Embedding(V, C)
    emb.weight.requires_grad_(False)
    ref = emb.weight.detach().clone()
    emb.__class__ = CPUEmbedding
    emb._device = torch.device("cpu")
    return emb, ref


def test_cpu_embedding_device_gather_checked_once():
    emb, ref = cpu_embedding()
    ids = torch.tensor([[1, 39, 0], [5, 5, 2]])
    assert torch.equal(emb(ids), ref[ids])
    st = emb._gather_state()
    assert st["ok"] is True and st["why"] is None
    ids2 = torch.tensor([[7, 8]])
    assert torch.equal(emb(ids2), ref[ids2])


def test_cpu_embedding_falls_back_when_the_kernel_fails(monkeypatch):
    emb, ref = cpu_embedding()

    def broken(*a, **k):
        raise RuntimeError("Pointer argument (at 0) cannot be accessed from Triton (cpu tensor?)")

    monkeypatch.setattr(gather, "gather_rows", broken)
    ids = torch.tensor([[3, 4]])
    assert torch.equal(emb(ids), ref[ids])
    st = emb._gather_state()
    assert st["ok"] is False and "cannot be accessed" in st["why"]
    monkeypatch.undo()
    assert torch.equal(emb(ids), ref[ids]) and st["ok"] is False     # for good: the host path stays


def test_cpu_embedding_wrong_rows_fall_back(monkeypatch):
    emb, ref = cpu_embedding()
    real = gather.gather_rows
    monkeypatch.setattr(gather, "gather_rows", lambda *a, **k: real(*a, **k) + 1)
    ids = torch.tensor([[3, 4]])
    assert torch.equal(emb(ids), ref[ids])
    assert emb._gather_state()["why"] == "the device gather differed from the host gather"


def test_cpu_embedding_out_of_range_ids():
    emb, ref = cpu_embedding(V=40)
    with pytest.raises(IndexError, match=r"\[0, 40\)"):
        emb(torch.tensor([[0, 40]]))                 # the first (checked) call raises at once
    assert emb(torch.tensor([[1, 2]])).shape == (1, 2, 24)
    out = emb(torch.tensor([[1, 41]]))               # later calls: zero rows, flagged ...
    assert torch.equal(out[0, 1], torch.zeros(24))
    with pytest.raises(IndexError, match=r"earlier call's input ids were outside \[0, 40\)"):
        emb(torch.tensor([[1, 2]]))                  # ... and the next call raises
    assert torch.equal(emb(torch.tensor([[1, 2]])), ref[torch.tensor([[1, 2]])])


def test_cpu_embedding_host_path_switch():
    from llama.fast_path import CPUEmbedding

    emb, ref = cpu_embedding()
    CPUEmbedding.DEVICE_GATHER = False
    try:
        ids = torch.tensor([[3, 4, 39]])
        assert torch.equal(emb(ids), ref[ids]) and emb._gather_state()["ok"] is None
        with pytest.raises(IndexError):
            emb(torch.tensor([[40]]))
    finally:
        CPUEmbedding.DEVICE_GATHER = True
