import torch

from nf4.tables import FP4_TABLE, NF4_TABLE, code_table, nf4_table_from_quantiles, nf4_thresholds


def test_nf4_table_from_normal_quantiles():
    rebuilt = nf4_table_from_quantiles()
    assert (rebuilt.double() - torch.tensor(NF4_TABLE, dtype=torch.float64)).abs().max() <= 1e-7
    assert rebuilt[7] == 0 and rebuilt[0] == -1 and rebuilt[15] == 1


def test_thresholds_are_cuda_literals_not_midpoints():
    t = nf4_thresholds()
    table = code_table("nf4")
    mid = (table[:-1] + table[1:]) / 2
    assert torch.all(t[1:] > t[:-1])
    differ = (t != mid).nonzero().reshape(-1).tolist()
    assert differ == [0, 8, 12, 14]  # 1 ulp off the float32 midpoint (NUMERICS.md)
    ulps = (t.view(torch.int32) - mid.view(torch.int32)).abs()
    assert ulps.max() == 1


def test_fp4_table_is_sign_magnitude():
    t = code_table("fp4")
    assert torch.equal(t[8:], -t[:8])
    assert len(FP4_TABLE) == 16 and max(FP4_TABLE) == 1.0
