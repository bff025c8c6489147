"""LoRALinear on its own: init as peft, scaling, parameter count, dtypes, dropout on the LoRA branch only."""
import math

import pytest
import torch

from lora import LoRALinear, lora_scaling
from .lora_testlib import assert_close


def test_init_is_peft_init_and_starts_as_the_base():
    torch.manual_seed(0)
    base = torch.nn.Linear(40, 24)
    layer = LoRALinear(base, r=8, lora_alpha=16)
    assert layer.lora_A.weight.shape == (8, 40) and layer.lora_B.weight.shape == (24, 8)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    bound = 1 / math.sqrt(40)  # kaiming_uniform(a=sqrt(5)) on fan_in 40
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.8 * bound
    x = torch.randn(3, 5, 40)
    assert torch.equal(layer(x), base(x))
    n_trainable = sum(p.numel() for n, p in layer.named_parameters() if "lora_" in n)
    assert n_trainable == 8 * (40 + 24)


def test_forward_formula_and_scaling():
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10, bias=False)
    for rs in (False, True):
        layer = LoRALinear(base, r=4, lora_alpha=6, use_rslora=rs)
        torch.nn.init.normal_(layer.lora_B.weight)
        s = 6 / 2 if rs else 6 / 4
        assert layer.scaling == s == lora_scaling(4, 6, rs)
        x = torch.randn(7, 12)
        expected = x @ base.weight.T + s * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
        assert_close(layer(x), expected, 1e-5, f"rslora={rs}")
        assert_close(layer.delta_weight(), s * layer.lora_B.weight @ layer.lora_A.weight, 1e-6, "delta")


def test_adapter_dtype_and_half_base():
    base = torch.nn.Linear(16, 8).to(torch.bfloat16)
    layer = LoRALinear(base, r=2, lora_alpha=4)
    assert layer.lora_A.weight.dtype == torch.float32  # fp32 adapter by default
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = base(x).float() + 2.0 * (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T)
    assert_close(y, expected, 0.05, "bf16 base + fp32 adapter")
    assert LoRALinear(base, r=2, adapter_dtype=torch.bfloat16).lora_B.weight.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad is not None


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_only_on_lora_branch_at_configured_rate(p):
    """With A = B = I and s = 1 the LoRA branch is exactly dropout(x). Over N = 200,000 elements the dropped
    fraction has std sqrt(p(1-p)/N) <= 0.0012; we require |fraction - p| < 0.006 (> 5 std), kept elements
    scaled by 1/(1-p), and the base path unchanged (no dropout on the base)."""
    n, rows = 40, 5000
    torch.manual_seed(0)
    base = torch.nn.Linear(n, n)
    layer = LoRALinear(base, r=n, lora_alpha=n, lora_dropout=p)
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.eye(n))
        layer.lora_B.weight.copy_(torch.eye(n))
    x = torch.rand(rows, n) + 0.5  # no zeros in x
    layer.train()
    branch = layer(x) - base(x)  # (rows, n) = dropout(x)
    dropped = branch.abs() < 1e-4
    frac = dropped.float().mean().item()
    assert abs(frac - p) < 0.006, f"dropped fraction {frac:.4f}, expected {p}"
    assert_close(branch[~dropped], x[~dropped] / (1 - p), 1e-5, "kept elements scaled by 1/(1-p)")
    with torch.no_grad():
        layer.lora_B.weight.zero_()
    assert torch.equal(layer(x), base(x))  # base path: no dropout even in train mode
    layer.eval()
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.eye(n))
    assert_close(layer(x) - base(x), x, 1e-5, "eval mode: no dropout")


def test_bad_rank_and_base():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoRALinear(torch.nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoRALinear(torch.nn.Linear(4, 4), r=-2)
    with pytest.raises(TypeError, match="in_features"):
        LoRALinear(torch.nn.LayerNorm(4), r=2)


def test_autocast_bf16_runs_branch_in_bf16_with_fp32_master_weights():
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 16)
    layer = LoRALinear(base, r=4, lora_alpha=8)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert_close(y, layer(x), 0.1, "autocast bf16 vs fp32")
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.dtype == torch.float32


def test_disable_adapters_and_trainable_parameters():
    from lora import LoraConfig, disable_adapters, inject_lora, trainable_parameters

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    base_out = model(torch.ones(2, 8))
    inject_lora(model, LoraConfig(r=2, target_modules=["0", "2"]))
    torch.nn.init.normal_(model[2].lora_B.weight)
    x = torch.ones(2, 8)
    with disable_adapters(model):
        assert torch.equal(model(x), base_out)
    assert not torch.equal(model(x), base_out)
    assert [p.shape for p in trainable_parameters(model)] == [(2, 8), (8, 2), (2, 8), (4, 2)]
