"""group_by_length sampler against transformers' LengthGroupedSampler."""
import pytest
import torch

tpu = pytest.importorskip("transformers.trainer_pt_utils")

from train.sampler import LengthGroupedSampler, RandomSampler, get_length_grouped_indices


@pytest.mark.parametrize("n, bs", [(1000, 4), (37, 8), (5, 4), (401, 16)])
def test_same_indices_as_transformers(n, bs):
    lengths = torch.randint(1, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    for seed in (0, 42):
        ours = LengthGroupedSampler(lengths, bs, seed=seed)
        ref = tpu.LengthGroupedSampler(bs, lengths=lengths, generator=torch.Generator().manual_seed(seed))
        assert list(ours) == list(ref)
        assert get_length_grouped_indices(lengths, bs, generator=torch.Generator().manual_seed(seed)) == list(
            tpu.get_length_grouped_indices(lengths, bs, generator=torch.Generator().manual_seed(seed)))


def test_megabatches_sorted_and_longest_first():
    lengths = list(range(1, 401))
    idx = list(LengthGroupedSampler(lengths, 4, seed=1))
    assert sorted(idx) == list(range(400))
    assert lengths[idx[0]] == 400
    mb = 4 * min(400 // 16, 50)
    for s in range(0, 400, mb):
        chunk = [lengths[i] for i in idx[s + 1: s + mb]]  # position 0 may hold the swapped element
        assert chunk == sorted(chunk, reverse=True)


def test_epochs_differ_and_resume_skips():
    s = RandomSampler(50, seed=3)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1 and sorted(e0) == sorted(e1)
    s.set_epoch(1, start_index=20)
    assert list(s) == e1[20:] and len(s) == 30
