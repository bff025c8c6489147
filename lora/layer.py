"""`LoRALinear`: a frozen base linear plus a trainable low-rank update (Hu et al. 2021, QLoRA 2023).

    y = base(x) + s * dropout(x) @ A.T @ B.T   (+ s * b_B  with lora_bias)

    x: (..., in)    A: (r, in)    B: (out, r)    y: (..., out)
    s = lora_alpha / r            (use_rslora: s = lora_alpha / sqrt(r), Kalajdzievski 2023)

The base is an `nn.Linear` (dense) or a `kernels.NF4Linear` (QLoRA); anything with `in_features`,
`out_features` and a forward works. The base stays frozen; only A and B (and optionally biases) train.
Trainable parameters per layer: r * (in + out)  (+ out with lora_bias).
Example: Llama-2-7B q_proj, in = out = 4096, r = 64: 64 * 8192 = 524,288 (vs 16.8M in the base).

Initialization as peft: A ~ kaiming_uniform(a=sqrt(5)) (= U(-1/sqrt(in), 1/sqrt(in))), B = 0, so the
layer starts as exactly the base. A and B are kept in `adapter_dtype` (fp32 by default); the input is
cast to it for the LoRA branch and the update is cast back to the base output's dtype. Under autocast the
branch runs in the autocast dtype with fp32 master weights.

Attribute names follow peft so state-dict keys map 1:1 to peft's adapter files:
    <path>.base_layer.weight   <path>.base_layer.bias   <path>.lora_A.weight   <path>.lora_B.weight
(peft's in-memory keys carry an adapter name, `lora_A.default.weight`; its files do not.)
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """s = lora_alpha / r, or lora_alpha / sqrt(r) with rank-stabilized LoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _base_device(base: nn.Module) -> torch.device:
    for t in list(base.parameters(recurse=False)) + list(base.buffers(recurse=False)):
        return t.device
    qweight = getattr(base, "qweight", None)
    if qweight is not None and getattr(qweight, "device", None) is not None:
        return torch.device(qweight.device)
    return torch.device("cpu")


class LoRALinear(nn.Module):
    """y = base_layer(x) + scaling * lora_B(lora_A(lora_dropout(x))).

    Args:
        base: the frozen linear, (..., in) -> (..., out); nn.Linear or kernels.NF4Linear.
        r: rank (> 0).
        lora_alpha: scale numerator.
        lora_dropout: dropout probability on the LoRA branch input (base path never sees dropout).
        use_rslora: scaling = lora_alpha / sqrt(r).
        lora_bias: give lora_B a bias (zero-initialized), as peft's `lora_bias=True`.
        init_lora_weights: True (A kaiming, B zero), "gaussian" (A ~ N(0, 1/r), B zero), False (both random).
        adapter_dtype: dtype of A and B (fp32 by default).
    """

    def __init__(self, base: nn.Module, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                 use_rslora: bool = False, lora_bias: bool = False, init_lora_weights=True,
                 adapter_dtype: torch.dtype = torch.float32):
        super().__init__()
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRALinear: r must be a positive integer, got {r!r}")
        in_features = getattr(base, "in_features", None)
        out_features = getattr(base, "out_features", None)
        if not isinstance(in_features, int) or not isinstance(out_features, int):
            raise TypeError(f"LoRALinear: base {type(base).__name__} has no integer in_features/out_features")
        if lora_bias and getattr(base, "bias", None) is None:
            warnings.warn(f"LoRALinear: lora_bias=True on a base {type(base).__name__} without a bias: "
                          "this layer cannot be merged (as in peft)")
        self.base_layer = base
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        device = _base_device(base)
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=adapter_dtype)  # A: (r, in)
        self.lora_B = nn.Linear(r, out_features, bias=lora_bias, device=device, dtype=adapter_dtype)  # B: (out, r)
        self.merged = False            # True after merge(): the update lives in the base weight
        self.disable_adapter = False   # True: forward = base only
        self.reset_lora_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights=True) -> None:
        """peft's init: A kaiming-uniform(a=sqrt(5)) or N(0, 1/r); B = 0 (False: both kaiming, a random update)."""
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B.weight)
        if self.lora_B.bias is not None:
            nn.init.zeros_(self.lora_B.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)                                      # (..., out)
        if self.merged or self.disable_adapter:
            return y
        xa = self.lora_dropout(x.to(self.lora_A.weight.dtype))     # (..., in)
        update = self.lora_B(self.lora_A(xa)) * self.scaling         # (..., r) -> (..., out)
        return (y + update).to(y.dtype)

    def delta_weight(self, dtype: Optional[torch.dtype] = torch.float32) -> torch.Tensor:
        """dW = s * B @ A, (out, r) @ (r, in) -> (out, in), computed in fp32 (then cast to `dtype`)."""
        dw = (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling
        return dw if dtype is None else dw.to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:.4g}, merged={self.merged}")
