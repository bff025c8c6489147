"""SwiGLU gate (Shazeer, arXiv 2002.05202) of the Llama MLP, forward and backward in Triton.

Elementwise over gate g and up u of the same shape (..., F), in float32 with one rounding at the store:

    s = sigmoid(g),  silu(g) = g * s
    h = silu(g) * u                                  (Llama: down_proj(act_fn(gate_proj(x)) * up_proj(x)))

Backward with dh:

    dg = dh * u * s * (1 + g * (1 - s))              (d silu / dg = s + g * s * (1 - s))
    du = dh * silu(g)

Layers: `_swiglu_fwd_kernel`, `_swiglu_bwd_kernel` (flat, BLOCK elements per program), the launchers
`swiglu_forward` / `swiglu_backward`, the autograd Function `SwiGLUFunction`, the torch reference
`swiglu_reference`, and the dispatcher `swiglu` (CUDA -> Triton, CPU -> reference).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_triton_device, interpreting


@triton.jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u                                             # F.silu(g) * u
    tl.store(h_ptr + i, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    dh = tl.load(dh_ptr + i, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)                                                     # torch.sigmoid(g)
    dg = dh * u * s * (1.0 + g * (1.0 - s))                               # dh * u * d silu(g)/dg
    du = dh * g * s                                                       # dh * F.silu(g)
    tl.store(dg_ptr + i, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + i, du.to(du_ptr.dtype.element_ty), mask=mask)


def _block(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), 1 << 16) if interpreting() else 1024


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Triton forward: gate, up (..., F) -> h (..., F) in gate's dtype."""
    check_triton_device(gate, "swiglu_forward gate")
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    g, u = gate.contiguous(), up.contiguous()
    h = torch.empty_like(g)
    n = g.numel()
    if n > 0:
        block = _block(n)
        _swiglu_fwd_kernel[(triton.cdiv(n, block),)](g, u, h, n, BLOCK=block, num_warps=4)
    return h


def swiglu_backward(dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, out=None):
    """Triton backward: dh, gate, up (..., F) -> (d gate, d up) in the dtypes of gate and up.
    out: optional contiguous (d gate, d up) to write into; they may be gate and up themselves (every
    element is read before it is written)."""
    g, u, dh = gate.contiguous(), up.contiguous(), dh.contiguous()
    if out is None:
        dg, du = torch.empty_like(g), torch.empty_like(u)
    else:
        dg, du = out
        if not (dg.is_contiguous() and du.is_contiguous() and dg.shape == g.shape and du.shape == u.shape):
            raise ValueError(f"swiglu_backward out: expected contiguous tensors of shape {tuple(g.shape)}, got "
                             f"{tuple(dg.shape)} and {tuple(du.shape)}")
    n = g.numel()
    if n > 0:
        block = _block(n)
        _swiglu_bwd_kernel[(triton.cdiv(n, block),)](dh, g, u, dg, du, n, BLOCK=block, num_warps=4)
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    """Autograd over the Triton launchers: h = silu(gate) * up."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dh):
        gate, up = ctx.saved_tensors
        dg, du = swiglu_backward(dh, gate, up)
        return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Pure torch, as the Llama MLP computes it: F.silu(gate) * up."""
    return F.silu(gate) * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """h = silu(gate) * up for gate, up (..., F). CUDA -> Triton, CPU -> torch reference."""
    if gate.is_cuda:
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)
