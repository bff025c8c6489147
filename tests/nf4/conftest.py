import json
import os

import pytest
import torch

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "bnb_cuda_golden.safetensors")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of a tensor (so -0.0 != 0.0 and NaN payloads count)."""
    t = t.contiguous().reshape(-1)
    if t.dtype.is_floating_point:
        return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])
    return t


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Fails on a single differing element, naming the first ones."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.numel() == expected.numel(), f"{what}: {actual.numel()} elements != {expected.numel()}"
    a, e = bits(actual), bits(expected)
    bad = (a != e).nonzero().reshape(-1)
    assert bad.numel() == 0, (f"{what}: {bad.numel()} of {a.numel()} elements differ, first at {bad[:5].tolist()}: "
                              f"{actual.reshape(-1)[bad[:5]].tolist()} != {expected.reshape(-1)[bad[:5]].tolist()}")


class Golden:
    def __init__(self, path):
        from safetensors import safe_open
        self.file = safe_open(path, "pt")
        meta = self.file.metadata()
        self.cases = json.loads(meta["cases"])
        self.meta = {k: v for k, v in meta.items() if k != "cases"}

    def get(self, key):
        return self.file.get_tensor(key)


@pytest.fixture(scope="session")
def golden():
    return Golden(GOLDEN)
