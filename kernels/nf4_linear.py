"""The public NF4 linear: `nf4_linear` (an autograd Function) and the `NF4Linear` module.

    y = x @ dequant(W).T + bias            x (..., in) -> y (..., out)
    grad_x    = grad_y @ dequant(W)        (fused kernel, or dequantize + cuBLAS where that measured faster)
    grad_bias = sum over leading dims of grad_y
    no gradient for W (frozen 4-bit base weight, as in QLoRA)

`NF4Linear.state_dict()` is exactly bitsandbytes `Linear4bit`'s: "weight" (packed uint8), "bias",
"weight.absmax", "weight.quant_map", ["weight.nested_absmax", "weight.nested_quant_map"],
"weight.quant_state.bitsandbytes__nf4" (JSON blob), in that order; `load_state_dict` accepts it.
`.to(device)` / `.cuda()` move the quantized weight; `.to(dtype)` / `.half()` change only the compute
dtype (and the bias), never the codes or scales.
"""
from typing import Optional

import torch
from torch import nn

import nf4
from nf4.serialization import QUANT_STATE_KEY

from .nf4_matmul import nf4_matmul, nf4_matmul_t
from .quantize import quantize_weight


class NF4LinearFunction(torch.autograd.Function):
    """autograd for y = x @ W.T + bias with a frozen QuantizedWeight4bit W."""

    @staticmethod
    def forward(ctx, x, qweight, bias, backend):
        ctx.qweight = qweight
        ctx.backend = backend
        ctx.has_bias = bias is not None
        return nf4_matmul(x, qweight, bias, backend=backend)

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = nf4_matmul_t(grad_y, ctx.qweight, backend=ctx.backend)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, grad_bias, None


def nf4_linear(x: torch.Tensor, qweight: "nf4.QuantizedWeight4bit", bias: Optional[torch.Tensor] = None,
               backend: Optional[str] = None) -> torch.Tensor:
    """y = x @ dequant(qweight).T (+ bias) in x.dtype; x (..., in) -> (..., out).
    backend: None (CUDA -> Triton, CPU -> torch reference), "triton" or "torch"."""
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return NF4LinearFunction.apply(x, qweight, bias, backend)


class NF4Linear(nn.Module):
    """A linear layer whose weight is a frozen 4-bit QuantizedWeight4bit [out_features, in_features]."""

    def __init__(self, qweight: "nf4.QuantizedWeight4bit", bias: Optional[torch.Tensor] = None,
                 compute_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(f"NF4Linear: weight must be 2-D [out, in], got shape {tuple(qweight.shape)}")
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.compute_dtype = compute_dtype

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight, bias=None, blocksize=64, quant_type="nf4", double_quant=False,
                    compute_dtype=None) -> "NF4Linear":
        """Quantize a dense [out, in] weight (Triton on CUDA, the nf4 reference on CPU)."""
        qw = quantize_weight(weight.detach(), blocksize, quant_type, double_quant)
        return cls(qw, bias, compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize=64, quant_type="nf4", double_quant=False,
                    compute_dtype=None) -> "NF4Linear":
        return cls.from_weight(linear.weight, linear.bias, blocksize, quant_type, double_quant, compute_dtype)

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        dtype = self.compute_dtype or in_dtype
        y = nf4_linear(x.to(dtype), self.qweight, self.bias)
        return y.to(in_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.qweight.quant_type}, blocksize={self.qweight.blocksize}, "
                f"double_quant={self.qweight.double_quant}, compute_dtype={self.compute_dtype}")

    # ---- device / dtype moves -------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse) if "recurse" in _apply_params() else super()._apply(fn)
        probe = fn(torch.empty(0, dtype=self.compute_dtype or self.qweight.dtype, device=self.qweight.device))
        if probe.device != self.qweight.device:
            self.qweight = self.qweight.to(probe.device)
        if probe.dtype != (self.compute_dtype or self.qweight.dtype) and probe.dtype.is_floating_point:
            self.compute_dtype = probe.dtype                    # codes and scales keep their dtypes
        return self

    # ---- bitsandbytes Linear4bit state-dict form ------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        sd = self.qweight.to_bnb_state_dict(prefix + "weight")
        destination[prefix + "weight"] = sd.pop(prefix + "weight")
        super()._save_to_state_dict(destination, prefix, keep_vars)    # bias, right after weight
        for k, v in sd.items():
            destination[k] = v

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        mine = {k: v for k, v in state_dict.items() if k == wkey or k.startswith(wkey + ".")}
        if wkey not in mine:
            missing_keys.append(wkey)
        else:
            try:
                qw = nf4.QuantizedWeight4bit.from_bnb_state_dict(mine, wkey)
            except (KeyError, ValueError) as e:
                error_msgs.append(f"NF4Linear {wkey}: {e}")
            else:
                if tuple(qw.shape) != (self.out_features, self.in_features):
                    error_msgs.append(f"NF4Linear {wkey}: shape {tuple(qw.shape)} in the checkpoint, "
                                      f"{(self.out_features, self.in_features)} in the model")
                else:
                    self.qweight = qw.to(self.qweight.device)
        rest = {k: v for k, v in state_dict.items() if k.startswith(prefix) and k not in mine}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _apply_params():
    import inspect
    return inspect.signature(nn.Module._apply).parameters


def is_bnb_weight_key(key: str) -> bool:
    """True for the keys a Linear4bit weight adds to a state dict besides "weight" itself."""
    return key.endswith((".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")) or QUANT_STATE_KEY in key
