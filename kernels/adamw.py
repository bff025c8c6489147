"""The AdamW 32-bit update of bitsandbytes (train/adamw.py, ../shared/NUMERICS.md) as a Triton kernel.

Per element, step t >= 1, all arithmetic in float32 (states m, v float32; p float32, bf16 or fp16; g any float):

    m = b1*m + (1-b1)*g ;  v = b2*v + (1-b2)*g*g
    c1 = 1 - b1**t ;  c2 = sqrt(1 - b2**t) ;  step_size = -lr * c2 / c1     (host, float64 -> float32)
    p = p + step_size * m / (sqrt(v) + eps*c2)
    p = p * (1 - lr*wd)                           decay_after=True: bitsandbytes' CUDA kernel (default)
  or the decay before the update                  decay_after=False: bitsandbytes' CPU path, torch.optim.AdamW

p is read and written once in its own dtype (float32 math, one round-to-nearest-even store), so a bf16
parameter gets exactly `p.copy_(p.float() updated)` as in train.adamw.adamw_update_.

Two kernels share the math (`_adamw_math`):
  * `_adamw_kernel`: one tensor, BLOCK elements per program.
  * `_adamw_multi_kernel`: many tensors in one launch. A pointer table (int64 addresses of p, g, m, v and the
    element count, one row per tensor) and a block table (tensor index, start element) drive it; the
    addresses are cast back to typed pointers in the kernel. Tensors of one launch share p's and g's dtype.

Public: `adamw_step_` (one tensor; CUDA -> Triton, CPU -> `adamw_step_reference_`), `adamw_update_` (the
same with train.adamw.adamw_update_'s signature, the name train.optim looks for), `adamw_step_multi_`
(lists; CUDA -> one launch per dtype group), and the launchers `adamw_triton_`, `adamw_multi_triton_`.
"""
import functools
import math

import torch
import triton
import triton.language as tl

from ._common import check_triton_device, interpreting

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _scalars(step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float):
    """Host-side float64 scalars, as train.adamw computes them: (1-b1, 1-b2, step_size, eps*c2, 1-lr*wd)."""
    if step < 1:
        raise ValueError(f"adamw step: expected step >= 1, got {step}")
    c1 = 1.0 - beta1 ** step
    c2 = math.sqrt(1.0 - beta2 ** step)
    return 1.0 - beta1, 1.0 - beta2, -lr * c2 / c1, eps * c2, 1.0 - lr * weight_decay


@triton.jit
def _adamw_math(p, g, m, v, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, eps_c2, decay,
                HAS_DECAY: tl.constexpr, DECAY_AFTER: tl.constexpr):
    """float32 in, float32 out: the update of the module docstring."""
    m = m * beta1 + g * one_minus_beta1                                   # m.mul_(b1).add_(g, alpha=1-b1)
    v = v * beta2 + g * g * one_minus_beta2                               # v.mul_(b2).addcmul_(g, g, value=1-b2)
    if HAS_DECAY and not DECAY_AFTER:
        p = p * decay                                                     # p.mul_(1 - lr*wd)
    p = p + step_size * (m / (tl.sqrt(v) + eps_c2))                       # p.add_(m / (v.sqrt() + eps*c2), alpha=ss)
    if HAS_DECAY and DECAY_AFTER:
        p = p * decay                                                     # p.mul_(1 - lr*wd)
    return p, m, v


@triton.jit
def _adamw_elements(p_ptr, g_ptr, m_ptr, v_ptr, i, mask, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size,
                    eps_c2, decay, HAS_DECAY: tl.constexpr, DECAY_AFTER: tl.constexpr):
    """Load p, g (any float dtype -> float32), m, v (float32) at offsets i, update, store in place."""
    p = tl.load(p_ptr + i, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + i, mask=mask, other=0.0)
    v = tl.load(v_ptr + i, mask=mask, other=0.0)
    p, m, v = _adamw_math(p, g, m, v, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, eps_c2, decay,
                          HAS_DECAY, DECAY_AFTER)
    tl.store(m_ptr + i, m, mask=mask)
    tl.store(v_ptr + i, v, mask=mask)
    tl.store(p_ptr + i, p.to(p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adamw_kernel(
    # pointers
    p_ptr, g_ptr, m_ptr, v_ptr,
    # sizes
    n,
    # scalars (float32)
    beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, eps_c2, decay,
    # constexpr
    HAS_DECAY: tl.constexpr, DECAY_AFTER: tl.constexpr, BLOCK: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    _adamw_elements(p_ptr, g_ptr, m_ptr, v_ptr, i, mask, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size,
                    eps_c2, decay, HAS_DECAY, DECAY_AFTER)


@triton.jit
def _typed_ptr(addr, CODE: tl.constexpr):
    """int64 address -> pointer to float32 (0), float16 (1) or bfloat16 (2)."""
    if CODE == 0:
        return addr.to(tl.pointer_type(tl.float32))
    elif CODE == 1:
        return addr.to(tl.pointer_type(tl.float16))
    else:
        return addr.to(tl.pointer_type(tl.bfloat16))


@triton.jit
def _adamw_multi_kernel(
    # pointers: table (n_tensors, 5) int64 = [p, g, m, v addresses, numel]; blocks (n_blocks, 2) int64 = [t, start]
    table_ptr, blocks_ptr,
    # scalars (float32)
    beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, eps_c2, decay,
    # constexpr
    P_CODE: tl.constexpr, G_CODE: tl.constexpr, HAS_DECAY: tl.constexpr, DECAY_AFTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.load(blocks_ptr + 2 * b)                                       # tensor index
    start = tl.load(blocks_ptr + 2 * b + 1)                               # first element of this block
    row = table_ptr + 5 * t
    p_ptr = _typed_ptr(tl.load(row + 0), P_CODE)
    g_ptr = _typed_ptr(tl.load(row + 1), G_CODE)
    m_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 4)
    i = start + tl.arange(0, BLOCK)
    mask = i < n
    _adamw_elements(p_ptr, g_ptr, m_ptr, v_ptr, i, mask, beta1, beta2, one_minus_beta1, one_minus_beta2, step_size,
                    eps_c2, decay, HAS_DECAY, DECAY_AFTER)


def _check(p, g, m, v, what="adamw"):
    if p.dtype not in _DTYPE_CODE or g.dtype not in _DTYPE_CODE:
        raise ValueError(f"{what}: param/grad dtype must be float32, float16 or bfloat16, got {p.dtype}/{g.dtype}")
    for name, t in (("grad", g), ("exp_avg (m)", m), ("exp_avg_sq (v)", v)):
        if t.numel() != p.numel():
            raise ValueError(f"{what}: {name} has {t.numel()} elements, param has {p.numel()}")
    for name, t in (("exp_avg (m)", m), ("exp_avg_sq (v)", v)):
        if t.dtype != torch.float32:
            raise ValueError(f"{what}: {name} must be float32 (32-bit state), got {t.dtype}")


def adamw_triton_(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decay_after=True, block=1024):
    """Triton AdamW step in place on p, m, v (one tensor). Non-contiguous tensors go through contiguous copies."""
    check_triton_device(p, "adamw_triton_ p")
    _check(p, g, m, v, "adamw_triton_")
    omb1, omb2, step_size, eps_c2, decay = _scalars(step, lr, beta1, beta2, eps, weight_decay)
    tensors = [t if t.is_contiguous() else t.contiguous() for t in (p, g, m, v)]
    n = p.numel()
    if n > 0:
        if interpreting():
            block = min(triton.next_power_of_2(n), 1 << 16)
        _adamw_kernel[(triton.cdiv(n, block),)](*tensors, n, beta1, beta2, omb1, omb2, step_size, eps_c2, decay,
                                                HAS_DECAY=weight_decay > 0.0, DECAY_AFTER=decay_after,
                                                BLOCK=block, num_warps=4)
    for dst, src in zip((p, m, v), (tensors[0], tensors[2], tensors[3])):
        if dst is not src:
            dst.copy_(src)


@functools.lru_cache(maxsize=64)
def _block_table(numels: tuple, block: int, device: torch.device) -> torch.Tensor:
    """(n_blocks, 2) int64 [tensor index, start element] covering every tensor in BLOCK steps (cached: the
    optimizer's tensor sizes do not change between steps)."""
    counts = torch.tensor([triton.cdiv(n, block) for n in numels], dtype=torch.int64)
    t = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)        # (n_blocks,)
    first = torch.cumsum(counts, 0) - counts                                                  # (n_tensors,)
    start = (torch.arange(t.numel(), dtype=torch.int64) - first[t]) * block                   # (n_blocks,)
    return torch.stack([t, start], dim=1).contiguous().to(device)


def adamw_multi_triton_(params, grads, ms, vs, step, lr, beta1, beta2, eps, weight_decay, decay_after=True,
                        block=2048):
    """Triton AdamW step over lists of tensors: one launch per (param dtype, grad dtype) group.
    Every tensor must be contiguous and on the same device."""
    if not params:
        return
    check_triton_device(params[0], "adamw_multi_triton_ params[0]")
    omb1, omb2, step_size, eps_c2, decay = _scalars(step, lr, beta1, beta2, eps, weight_decay)
    if interpreting():
        block = min(block, 256)
    groups: dict[tuple, list[int]] = {}
    for k, (p, g, m, v) in enumerate(zip(params, grads, ms, vs, strict=True)):
        _check(p, g, m, v, f"adamw_multi_triton_ tensor {k}")
        if not all(t.is_contiguous() for t in (p, g, m, v)):
            raise ValueError(f"adamw_multi_triton_: tensor {k} (param {tuple(p.shape)}) is not contiguous")
        if p.numel() > 0:
            groups.setdefault((p.dtype, g.dtype), []).append(k)
    device = params[0].device
    for (p_dtype, g_dtype), idx in groups.items():
        rows = [[params[k].data_ptr(), grads[k].data_ptr(), ms[k].data_ptr(), vs[k].data_ptr(), params[k].numel()]
                for k in idx]
        table = torch.tensor(rows, dtype=torch.int64)                                         # (n_tensors, 5)
        if device.type == "cuda":   # pinned + asynchronous: a pageable copy would wait for the GPU to drain
            table = table.pin_memory().to(device, non_blocking=True)
        else:
            table = table.to(device)
        blocks = _block_table(tuple(params[k].numel() for k in idx), block, device)           # (n_blocks, 2)
        _adamw_multi_kernel[(blocks.shape[0],)](table, blocks, beta1, beta2, omb1, omb2, step_size, eps_c2, decay,
                                                P_CODE=_DTYPE_CODE[p_dtype], G_CODE=_DTYPE_CODE[g_dtype],
                                                HAS_DECAY=weight_decay > 0.0, DECAY_AFTER=decay_after,
                                                BLOCK=block, num_warps=4)


@torch.no_grad()
def adamw_step_reference_(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decay_after=True):
    """Pure torch, the same float32 operations as train.adamw.adamw_update_ (kernels may not import train)."""
    g32 = g.float()
    p32 = p if p.dtype == torch.float32 else p.float()
    m.mul_(beta1).add_(g32, alpha=1.0 - beta1)
    v.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
    c1 = 1.0 - beta1 ** step
    c2 = math.sqrt(1.0 - beta2 ** step)
    if weight_decay > 0.0 and not decay_after:
        p32.mul_(1.0 - lr * weight_decay)
    p32.add_(m / (v.sqrt() + eps * c2), alpha=-lr * c2 / c1)
    if weight_decay > 0.0 and decay_after:
        p32.mul_(1.0 - lr * weight_decay)
    if p32 is not p:
        p.copy_(p32)


@torch.no_grad()
def adamw_step_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float,
                beta1: float, beta2: float, eps: float, weight_decay: float, decay_after: bool = True) -> None:
    """One AdamW step in place on p (float32/bf16/fp16, any shape), m and v (float32 like p), given g like p.
    CUDA -> Triton kernel, CPU -> torch reference. decay_after=True is bitsandbytes' CUDA semantics."""
    if p.is_cuda:
        adamw_triton_(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decay_after)
    else:
        adamw_step_reference_(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decay_after)


# train.optim looks for `kernels.adamw_update_` with train.adamw.adamw_update_'s signature
# (p, g, m, v, step, lr, b1, b2, eps, wd, decay_after=True): the same function.
adamw_update_ = adamw_step_


@torch.no_grad()
def adamw_step_multi_(params, grads, ms, vs, step: int, lr: float, beta1: float, beta2: float, eps: float,
                      weight_decay: float, decay_after: bool = True) -> None:
    """adamw_step_ over lists (same step and hyper-parameters). CUDA -> one Triton launch per dtype group
    (non-contiguous tensors fall back to one launch each), CPU -> the torch reference per tensor."""
    if params and params[0].is_cuda:
        contig = [k for k in range(len(params)) if all(t.is_contiguous() for t in (params[k], grads[k], ms[k], vs[k]))]
        rest = sorted(set(range(len(params))) - set(contig))
        adamw_multi_triton_([params[k] for k in contig], [grads[k] for k in contig], [ms[k] for k in contig],
                            [vs[k] for k in contig], step, lr, beta1, beta2, eps, weight_decay, decay_after)
        for k in rest:
            adamw_triton_(params[k], grads[k], ms[k], vs[k], step, lr, beta1, beta2, eps, weight_decay, decay_after)
        return
    for p, g, m, v in zip(params, grads, ms, vs, strict=True):
        adamw_step_reference_(p, g, m, v, step, lr, beta1, beta2, eps, weight_decay, decay_after)
