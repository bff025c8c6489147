"""Rotary position embedding (RoFormer, arXiv 2104.09864) on q and k, Hugging Face "rotate half" layout, in Triton.

With x (B, H, T, D) split into halves x1 = x[..., :D/2], x2 = x[..., D/2:] and cos, sin (T, D) or (B, T, D)
(for Llama cos = [cos a, cos a], sin = [sin a, sin a]; any values work):

    rope(x)   = x * cos + rotate_half(x) * sin,     rotate_half([x1, x2]) = [-x2, x1]
              = [x1*cos1 - x2*sin1,  x2*cos2 + x1*sin2]

The map is linear in x, so the backward is its transpose (rotation by -a when the halves of cos/sin agree):

    dx = dy * cos + rotate_half^T(dy * sin),        rotate_half^T([y1, y2]) = [y2, -y1]
       = [dy1*cos1 + dy2*sin2,  dy2*cos2 - dy1*sin1]

Arithmetic in float32, one rounding to x.dtype at the store (Hugging Face rounds after each bf16 op).
q and k may have different head counts (GQA) and any strides (e.g. a transposed (B, T, H, D) projection).

Layers: `_rope_kernel` (one program per (b, block of positions), all heads of one tensor), the launcher `rope_forward`
(also the backward with `backward=True`), the autograd Function `RoPEFunction` (one tensor, optionally in place), the
torch reference `apply_rope_reference`, and the dispatcher `apply_rope` (CUDA -> Triton, CPU -> reference).
"""
import torch
import triton
import triton.language as tl

from ._common import check_triton_device, interpreting


@triton.jit
def _rope_kernel(
    # pointers
    x_ptr, cos_ptr, sin_ptr, out_ptr,
    # sizes
    T, H, HALF,
    # strides of x (B, H, T, D), out (B, H, T, D), cos/sin (B, T, D) with stride_cb = 0 when shared over B
    sxb, sxh, sxt, sxd, sob, soh, sot, sod, scb, sct, scd,
    # constexpr
    BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK_T * BLOCK_H)                                   # (R,) flattened (t, h) pairs
    t = (tl.program_id(1).to(tl.int64) * BLOCK_T + r // BLOCK_H)[:, None]  # (R, 1)
    h = (r % BLOCK_H)[:, None]                                            # (R, 1)
    j = tl.arange(0, BLOCK_HALF)[None, :]                                 # (1, BLOCK_HALF) index within a half
    mask = (t < T) & (h < H) & (j < HALF)                                 # (R, BLOCK_HALF)
    c_row = cos_ptr + b * scb + t * sct
    s_row = sin_ptr + b * scb + t * sct
    cos1 = tl.load(c_row + j * scd, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(c_row + (j + HALF) * scd, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(s_row + j * scd, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(s_row + (j + HALF) * scd, mask=mask, other=0.0).to(tl.float32)
    x_base = x_ptr + b * sxb + t * sxt + h * sxh
    x1 = tl.load(x_base + j * sxd, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_base + (j + HALF) * sxd, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * cos1 + x2 * sin2                                        # dy1*cos1 + dy2*sin2
        y2 = x2 * cos2 - x1 * sin1                                        # dy2*cos2 - dy1*sin1
    else:
        y1 = x1 * cos1 - x2 * sin1                                        # x1*cos1 - x2*sin1
        y2 = x2 * cos2 + x1 * sin2                                        # x2*cos2 + x1*sin2
    o_base = out_ptr + b * sob + t * sot + h * soh
    tl.store(o_base + j * sod, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_base + (j + HALF) * sod, y2.to(out_ptr.dtype.element_ty), mask=mask)


def _cos_sin_strides(cos: torch.Tensor, B: int, T: int, D: int):
    """cos (T, D) or (B, T, D) (or (B, 1, T, D)) -> a (B', T, D) view and its strides (batch stride 0 if shared)."""
    c = cos
    if c.dim() == 4 and c.shape[1] == 1:
        c = c[:, 0]                                                       # (B, T, D)
    if c.dim() == 2:
        c = c[None]                                                       # (1, T, D)
    if c.dim() != 3 or c.shape[1:] != (T, D) or c.shape[0] not in (1, B):
        raise ValueError(f"rope cos/sin: expected shape ({T}, {D}) or ({B}, {T}, {D}), got {tuple(cos.shape)}")
    return c, (0 if c.shape[0] == 1 else c.stride(0), c.stride(1), c.stride(2))


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None,
                 backward: bool = False) -> torch.Tensor:
    """Triton rotation of x (B, H, T, D) by cos/sin ((T, D) or (B, T, D)) into `out` (new if None; may be x).
    backward=True applies the transpose (the gradient of the forward)."""
    check_triton_device(x, "rope_forward x")
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"rope x: expected (B, H, T, D) with even D, got {tuple(x.shape)}")
    B, H, T, D = x.shape
    c, (scb, sct, scd) = _cos_sin_strides(cos, B, T, D)
    s, s_strides = _cos_sin_strides(sin, B, T, D)
    if s_strides != (scb, sct, scd) or s.shape[0] != c.shape[0]:         # one set of strides for both
        Bc = max(c.shape[0], s.shape[0])
        c, s = c.expand(Bc, T, D).contiguous(), s.expand(Bc, T, D).contiguous()
        scb, sct, scd = (0 if Bc == 1 else c.stride(0)), c.stride(1), c.stride(2)
    if out is None:
        out = torch.empty_like(x)                                         # keeps x's layout
    if x.numel() > 0:
        block_h, block_half = triton.next_power_of_2(H), triton.next_power_of_2(D // 2)
        # about 4096 (t, h, j) elements per half per program; the interpreter takes whole rows (fewer programs)
        budget = 1 << 16 if interpreting() else 4096
        block_t = max(1, min(triton.next_power_of_2(T), budget // (block_h * block_half)))
        _rope_kernel[(B, triton.cdiv(T, block_t))](x, c, s, out, T, H, D // 2,
                                                   *x.stride(), *out.stride(), scb, sct, scd,
                                                   BACKWARD=backward, BLOCK_T=block_t, BLOCK_H=block_h,
                                                   BLOCK_HALF=block_half, num_warps=4)
    return out


class RoPEFunction(torch.autograd.Function):
    """Autograd over the Triton launcher for one tensor x (B, H, T, D); cos/sin get no gradient.
    inplace=True writes into x (also when x is a view, e.g. a transposed projection: one output per Function,
    as autograd requires for in-place ops on views)."""

    @staticmethod
    def forward(ctx, x, cos, sin, inplace=False):
        out = rope_forward(x, cos, sin, out=x if inplace else None)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rope_forward(dy, cos, sin, backward=True), None, None, None


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)                                           # (..., D/2) each
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Pure torch, transformers' apply_rotary_pos_emb: q (B, H, T, D), k (B, H_kv, T, D), cos/sin (T, D) or
    (B, T, D) -> (q_rot, k_rot)."""
    if cos.dim() == 3:
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)                     # (B, 1, T, D)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inplace: bool = False):
    """RoPE on q (B, H, T, D) and k (B, H_kv, T, D) with cos/sin (T, D) or (B, T, D) -> (q_rot, k_rot).
    CUDA -> Triton (in place into q, k when inplace=True), CPU -> torch reference (always out of place)."""
    if q.is_cuda:
        return RoPEFunction.apply(q, cos, sin, inplace), RoPEFunction.apply(k, cos, sin, inplace)
    return apply_rope_reference(q, k, cos, sin)
