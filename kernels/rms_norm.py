"""RMSNorm (Zhang & Sennrich, arXiv 1910.07467) with Llama / Hugging Face numerics, forward and backward in Triton.

For each row x (H,) of a tensor (..., H), statistics in float32:

    r    = rsqrt(mean(x^2) + eps)                    float32 scalar per row (saved for backward)
    xhat = x * r                                     float32, then ROUNDED to x.dtype (as LlamaRMSNorm does:
    y    = w * xhat.to(x.dtype)                      `weight * hidden.to(input_dtype)`); y in promote(x, w) dtype

Backward (the rounding of xhat is treated as the identity, as autograd does for a cast), with dy (..., H):

    dxhat = dy * w
    dx    = r * (dxhat - xhat * mean(dxhat * xhat))   per row
    dw    = sum over rows of dy * xhat.to(x.dtype)    accumulated in float32

Layers: `_rms_norm_fwd_kernel` (one program per row), `_rms_norm_bwd_kernel` (one program per group of rows,
partial dw per program summed by torch; none when the weight is frozen), the launchers `rms_norm_forward` /
`rms_norm_backward`, the autograd Function `RMSNormFunction`, the torch reference `rms_norm_reference`, and the
dispatcher `rms_norm` (CUDA -> Triton, CPU -> reference).

Residual form (`residual_rms_norm`, `ResidualRMSNormFunction`): a decoder layer's h = x + a followed by
rms_norm(h), with h going on down the residual stream. The forward kernel adds a in (HAS_RES: reads x and a,
writes h and y), the backward kernel adds the gradient that reached h by the residual branch into dx (HAS_DRES),
so neither the add nor the summing of h's two gradients is a pass of its own.
"""
import torch
import triton
import triton.language as tl

from ._common import check_triton_device, interpreting, sm_count


@triton.jit
def _rms_norm_fwd_kernel(
    # pointers (res_ptr, h_ptr: the residual add, HAS_RES only)
    x_ptr, w_ptr, y_ptr, rstd_ptr, res_ptr, h_ptr,
    # sizes and strides (rows)
    H, stride_x, stride_y, eps,
    # constexpr
    BLOCK_H: tl.constexpr, HAS_RES: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:  # h = x + res rounded to x's dtype (torch's add), stored, then normalized as x would be
        r_in = tl.load(res_ptr + row * H + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r_in.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(h_ptr + row * H + cols, x, mask=mask)
    xf = x.to(tl.float32)
    r = tl.rsqrt(tl.sum(xf * xf, axis=0) / H + eps)                       # rsqrt(x.pow(2).mean(-1) + eps)
    xhat = (xf * r).to(x_ptr.dtype.element_ty)                            # hidden.to(input_dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = w.to(tl.float32) * xhat.to(tl.float32)                           # weight * hidden
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, r)


@triton.jit
def _rms_norm_bwd_kernel(
    # pointers
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, dres_ptr,
    # sizes and strides (rows)
    N, H, stride_dy, stride_x, stride_dx, rows_per_program,
    # constexpr
    BLOCK_H: tl.constexpr, COMPUTE_DW: tl.constexpr, HAS_DRES: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    n_rows = tl.minimum(row_start + rows_per_program, N) - row_start
    for i in range(0, n_rows):
        row64 = row_start + i
        x = tl.load(x_ptr + row64 * stride_x + cols, mask=mask, other=0.0)
        dy = tl.load(dy_ptr + row64 * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        r = tl.load(rstd_ptr + row64)
        xhat = x.to(tl.float32) * r                                       # float32 normalized x
        dxhat = dy * w                                                    # dL/dxhat
        dx = r * (dxhat - xhat * (tl.sum(dxhat * xhat, axis=0) / H))
        if HAS_DRES:  # the gradient that reached x by the residual branch, added before the one rounding
            dx += tl.load(dres_ptr + row64 * H + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row64 * stride_dx + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32)    # dy * hidden.to(input_dtype)
    if COMPUTE_DW:
        tl.store(dw_partial_ptr + pid * BLOCK_H + cols, dw_acc, mask=mask)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(..., H) -> (N, H) with unit stride along H (a copy only when needed)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _num_warps(block_h: int) -> int:
    return 1 if block_h <= 256 else 4 if block_h <= 2048 else 8 if block_h <= 8192 else 16


def _rows_like(t: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """t (same shape and dtype as the rows x2 came from) as contiguous (N, H) rows."""
    t2 = t.reshape(x2.shape)
    return t2 if t2.is_contiguous() else t2.contiguous()


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, residual=None):
    """Triton forward. x (..., H), weight (H,) -> (y (..., H) in promote(x.dtype, weight.dtype), rstd (N,) fp32).
    residual (x's shape and dtype): normalize h = x + residual instead (rounded to x's dtype, as torch adds), and
    return (h, y, rstd): one pass instead of an add and a norm."""
    check_triton_device(x, "rms_norm_forward x")
    H = x.shape[-1]
    if weight.shape != (H,):
        raise ValueError(f"rms_norm weight: expected shape ({H},) for x {tuple(x.shape)}, got {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"rms_norm residual: expected x's shape {tuple(x.shape)} and dtype {x.dtype}, got "
                         f"{tuple(residual.shape)} {residual.dtype}")
    x2 = _as_rows(x)                                                      # (N, H)
    N = x2.shape[0]
    y = torch.empty((N, H), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty((N,), dtype=torch.float32, device=x.device)
    res2 = h = None
    if residual is not None:
        res2 = _rows_like(residual, x2)
        h = torch.empty((N, H), dtype=x.dtype, device=x.device)
    if N > 0:
        block_h = triton.next_power_of_2(H)
        _rms_norm_fwd_kernel[(N,)](x2, weight.contiguous(), y, rstd, res2 if res2 is not None else x2,
                                   h if h is not None else x2, H, x2.stride(0), y.stride(0), eps,
                                   BLOCK_H=block_h, HAS_RES=residual is not None, num_warps=_num_warps(block_h))
    if residual is not None:
        return h.view(x.shape), y.view(*x.shape[:-1], H), rstd
    return y.view(*x.shape[:-1], H), rstd


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      n_programs: int | None = None, need_dw: bool = True, dres=None):
    """Triton backward. dy, x (..., H), weight (H,), rstd (N,) -> (dx like x, dw like weight).
    need_dw=False (a frozen weight, as in LoRA training) skips dw: dw is None, and the zeroed partial sums, their
    sum and its cast (3 launches per norm) are never made. dres (x's shape): a gradient that reached x by another
    branch (the residual), added into dx in the kernel (no separate add)."""
    H = x.shape[-1]
    x2, dy2 = _as_rows(x), _as_rows(dy)                                   # (N, H)
    N = x2.shape[0]
    dx = torch.empty((N, H), dtype=x.dtype, device=x.device)
    dres2 = None
    if dres is not None:
        if dres.shape != x.shape:
            raise ValueError(f"rms_norm_backward dres: expected x's shape {tuple(x.shape)}, got {tuple(dres.shape)}")
        dres2 = _rows_like(dres, x2)
    if n_programs is None:
        sms = 4 if interpreting() else sm_count(x.device)
        n_programs = sms * 2
    n_programs = max(1, min(n_programs, N))
    rows_per_program = triton.cdiv(N, n_programs) if N > 0 else 1
    n_programs = triton.cdiv(N, rows_per_program) if N > 0 else 1
    block_h = triton.next_power_of_2(H)
    # without dw the kernel never touches dw_partial: any float32 pointer stands in
    dw_partial = torch.zeros((n_programs, block_h), dtype=torch.float32, device=x.device) if need_dw else rstd
    if N > 0:
        _rms_norm_bwd_kernel[(n_programs,)](dy2, x2, weight.contiguous(), rstd, dx, dw_partial,
                                            dres2 if dres2 is not None else dy2,
                                            N, H, dy2.stride(0), x2.stride(0), dx.stride(0), rows_per_program,
                                            BLOCK_H=block_h, COMPUTE_DW=need_dw, HAS_DRES=dres2 is not None,
                                            num_warps=_num_warps(block_h))
    dw = dw_partial[:, :H].sum(0).to(weight.dtype) if need_dw else None  # (H,)
    return dx.view(x.shape), dw


class RMSNormFunction(torch.autograd.Function):
    """Autograd over the Triton launchers: y = w * (x * rsqrt(mean(x^2) + eps)).to(x.dtype)."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, rstd, need_dw=ctx.needs_input_grad[1])
        return (dx if ctx.needs_input_grad[0] else None), dw, None


class ResidualRMSNormFunction(torch.autograd.Function):
    """(h, y) = (x + a, rms_norm(x + a)) as one node, a optional (None: h is x itself). The residual stream h
    goes on to the next add, y into the block; backward receives both gradients and adds h's into the norm's dx
    inside the kernel, so no separate add of the two (and, with a, none in the forward either). Saves h (the
    norm's input), the weight and rstd, as RMSNormFunction."""

    @staticmethod
    def forward(ctx, x, a, weight, eps):
        ctx.set_materialize_grads(False)
        if a is None:
            y, rstd = rms_norm_forward(x, weight, eps)
            h = x
        else:
            h, y, rstd = rms_norm_forward(x, weight, eps, residual=a)
        ctx.save_for_backward(h, weight, rstd)
        ctx.has_a = a is not None
        return h if a is not None else x.view_as(x), y

    @staticmethod
    def backward(ctx, dh, dy):
        h, weight, rstd = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        dw = None
        if dy is None:
            dx = dh
        elif need_x or ctx.needs_input_grad[2]:
            dx, dw = rms_norm_backward(dy, h, weight, rstd, need_dw=ctx.needs_input_grad[2], dres=dh)
        else:
            dx = None
        if not need_x:
            dx = None
        return (dx if ctx.needs_input_grad[0] else None), (dx if ctx.has_a and ctx.needs_input_grad[1] else None), \
            dw, None


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Pure torch, exactly transformers' LlamaRMSNorm.forward: (..., H), (H,) -> (..., H)."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm of the last dim: x (..., H), weight (H,) -> (..., H). CUDA -> Triton, CPU -> torch reference."""
    if x.is_cuda:
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def residual_rms_norm(x: torch.Tensor, a, weight: torch.Tensor, eps: float = 1e-6, triton_on_cpu: bool = False):
    """(h, rms_norm(h)) with h = x + a (a None: h = x): the residual stream and its norm, x, a (..., H). CUDA (or
    triton_on_cpu, the interpreter in tests) -> one ResidualRMSNormFunction node where x and a share shape and
    dtype; elsewhere torch's add and the reference norm. Values are those of the separate add and rms_norm."""
    if (x.is_cuda or triton_on_cpu) and (a is None or (a.shape == x.shape and a.dtype == x.dtype)):
        return ResidualRMSNormFunction.apply(x, a, weight, eps)
    h = x if a is None else x + a
    return h, (rms_norm(h, weight, eps) if not triton_on_cpu else RMSNormFunction.apply(h, weight, eps))
