"""Assertions shared by the kernel tests."""
import torch


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Fail on a single differing byte; names the first one."""
    assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
    av, bv = a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)
    bad = (av != bv).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.numel()} of {av.numel()} bytes differ, first at byte {bad[0].item()}"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (relative Frobenius error); NaN anywhere gives NaN (fails any bound)."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
