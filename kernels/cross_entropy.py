"""Cross entropy over an LM head that never materializes the full (N, V) logits, forward and backward at once.

With hidden states h (N, H), the head W (V, H), labels y (N,) (ignore_index marks positions without a loss) and
n = #{i : y_i != ignore_index}:

    z_i    = h_i @ W^T                                 (V,) logits of row i, in h.dtype (as lm_head computes them)
    lse_i  = log sum_v exp(float32(z_iv))
    loss_i = lse_i - z_{i, y_i}                        0 for ignored rows
    loss   = sum_i loss_i / n                          reduction="mean" (= F.cross_entropy(z.float(), y))
           | sum_i loss_i                              reduction="sum"  (and n, for gradient accumulation)

Gradients (s = 1/n for "mean", 1 for "sum"; the fp32 dz is rounded to h.dtype as autograd does for
`logits.float()`):

    dz_i = s * (softmax(z_i) - onehot(y_i))            0 for ignored rows
    dh   = dz @ W          (N, H)
    dW   = dz^T @ h        (V, H), accumulated in float32 over chunks

Rows are processed `chunk_size` at a time: the chunk's logits (chunk, V) are computed by one matmul, turned
IN PLACE into dz (a fused Triton softmax-CE kernel: two passes over the row, online max/sum, no fp32 copy;
or torch ops), and multiplied back. The gradients are computed during the forward and scaled by the incoming
gradient in backward, so the logits are never recomputed. Peak extra memory: chunk * V elements (+ dW in
float32 when W requires grad).

Layers: `_softmax_ce_kernel` (one program per row), its launcher `softmax_ce_chunk_triton_`, the torch
equivalent `softmax_ce_chunk_torch_`, the autograd Function `ChunkedCrossEntropyFunction`, and the public
`chunked_cross_entropy` (CUDA -> Triton chunk kernel, CPU -> torch chunk ops). The full-logits reference is
`cross_entropy_reference`.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import check_triton_device, interpreting


@triton.jit
def _softmax_ce_kernel(
    # pointers
    logits_ptr, labels_ptr, loss_ptr, scale_ptr,
    # sizes
    V, stride_row, ignore_index,
    # constexpr
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    label = tl.load(labels_ptr + row).to(tl.int64)
    cols = tl.arange(0, BLOCK_V)
    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for off in range(0, V, BLOCK_V):                              # dz = 0 on ignored rows
                tl.store(base + off + cols, tl.zeros((BLOCK_V,), dtype=tl.float32).to(logits_ptr.dtype.element_ty),
                         mask=off + cols < V)
    else:
        # pass 1: online max and sum of exp -> lse = logsumexp(z.float()); every block has a valid column
        m = tl.max(tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32), axis=0)   # running max, () fp32
        d = tl.sum(tl.zeros((BLOCK_V,), dtype=tl.float32), axis=0)                  # running sum of exp(z - m)
        for off in range(0, V, BLOCK_V):
            z = tl.load(base + off + cols, mask=off + cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        # a label outside [0, V) gives a NaN loss (torch raises; the trainer stops on NaN) instead of a stray read
        z_label = tl.load(base + label, mask=(label >= 0) & (label < V), other=float("nan")).to(tl.float32)
        tl.store(loss_ptr + row, lse - z_label)                           # lse - z[label]
        if COMPUTE_GRAD:
            # pass 2: dz = scale * (softmax(z) - onehot(label)), written over z
            scale = tl.load(scale_ptr)
            for off in range(0, V, BLOCK_V):
                mask = off + cols < V
                z = tl.load(base + off + cols, mask=mask, other=0.0).to(tl.float32)
                dz = tl.exp(z - lse) - tl.where(off + cols == label, 1.0, 0.0)
                tl.store(base + off + cols, (dz * scale).to(logits_ptr.dtype.element_ty), mask=mask)


def softmax_ce_chunk_triton_(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                             ignore_index: int = -100, compute_grad: bool = True) -> torch.Tensor:
    """Triton: logits (R, V) (unit stride along V), labels (R,) int, scale () float32 ->
    per-row loss (R,) float32; with compute_grad, logits are overwritten by scale * (softmax - onehot)."""
    check_triton_device(logits, "softmax_ce_chunk_triton_ logits")
    R, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"softmax_ce logits: need unit stride along V, got strides {logits.stride()}")
    loss = torch.empty((R,), dtype=torch.float32, device=logits.device)
    if R > 0:
        block_v = min(triton.next_power_of_2(V), 1 << 16 if interpreting() else 8192)
        _softmax_ce_kernel[(R,)](logits, labels, loss, scale, V, logits.stride(0), ignore_index,
                                 COMPUTE_GRAD=compute_grad, BLOCK_V=block_v,
                                 num_warps=16 if block_v >= 8192 else 8 if block_v >= 2048 else 4)
    return loss


def softmax_ce_chunk_torch_(logits: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor,
                            ignore_index: int = -100, compute_grad: bool = True) -> torch.Tensor:
    """Torch equivalent of `softmax_ce_chunk_triton_` (materializes the chunk in float32)."""
    zf = logits.float()                                                   # (R, V)
    lse = torch.logsumexp(zf, dim=-1)                                     # (R,)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))           # (R,)
    loss = torch.where(valid, lse - zf.gather(1, safe[:, None])[:, 0], torch.zeros_like(lse))
    if compute_grad:
        dz = zf.sub_(lse[:, None]).exp_()                                 # softmax, (R, V)
        dz[torch.arange(dz.shape[0], device=dz.device), safe] -= 1.0
        dz.mul_((valid.float() * scale)[:, None])
        logits.copy_(dz)
    return loss


class ChunkedCrossEntropyFunction(torch.autograd.Function):
    """Autograd: (hidden (N, H), weight (V, H), labels (N,)) -> loss; grads computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, chunk_size, reduction, use_triton, grad_enabled=True):
        N, H = hidden.shape
        V = weight.shape[0]
        w = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        need_dh = ctx.needs_input_grad[0] and grad_enabled               # no gradient work under no_grad
        need_dw = ctx.needs_input_grad[1] and grad_enabled
        n = (labels != ignore_index).sum()                                # () int64, no host sync
        if reduction == "mean":
            scale = 1.0 / n.clamp(min=1).to(torch.float32)               # () float32
        else:
            scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        chunk_fn = softmax_ce_chunk_triton_ if use_triton else softmax_ce_chunk_torch_
        dh = torch.empty_like(hidden) if need_dh else None                # (N, H)
        dw = torch.zeros((V, H), dtype=torch.float32, device=hidden.device) if need_dw else None
        loss_rows = torch.empty((N,), dtype=torch.float32, device=hidden.device)
        for s in range(0, N, chunk_size):
            e = min(s + chunk_size, N)
            h_c = hidden[s:e]                                             # (R, H)
            z = h_c @ w.t()                                               # (R, V) logits in hidden.dtype
            loss_rows[s:e] = chunk_fn(z, labels[s:e], scale, ignore_index, need_dh or need_dw)
            # z now holds dz (R, V)
            if need_dh:
                torch.matmul(z, w, out=dh[s:e])                           # (R, H)
            if need_dw:
                if z.dtype == torch.float32:
                    dw.addmm_(z.t(), h_c)                                 # (V, H)
                else:
                    dw.add_(z.t() @ h_c)
        loss = loss_rows.sum()
        if reduction == "mean":
            loss = loss / n                                               # NaN when every label is ignored
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, dloss):
        dh, dw = ctx.saved_tensors
        gh = None if dh is None else dh * dloss.to(dh.dtype)
        gw = None if dw is None else (dw * dloss).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None, None


def default_chunk_size(N: int, V: int, H: int) -> int:
    """Liger's rule: chunk logits about as large as the hidden states, (N / ceil(V / H)) rows, a power of 2."""
    return triton.next_power_of_2(max(1, triton.cdiv(N, triton.cdiv(V, H))))


def chunked_cross_entropy(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                          ignore_index: int = -100, chunk_size: int | None = None, reduction: str = "mean",
                          use_triton: bool | None = None, return_count: bool = True):
    """Cross entropy of `hidden @ lm_head_weight.T` against `labels` without the full fp32 logits.

    hidden (N, H) (or (..., H) with labels (...)), lm_head_weight (V, H), labels (N,) int64 (already shifted).
    reduction="mean" -> loss () float32, = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index).
    reduction="sum"  -> (loss_sum () float32, n_tokens int): divide by the count of the whole accumulated
    batch, as transformers does for gradient accumulation. return_count=False: the sum alone (counting the tokens
    reads a device value on the host, which a CUDA-graph capture cannot).
    use_triton: None = on CUDA tensors (the fused chunk kernel); False = torch chunk ops.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"chunked_cross_entropy reduction: expected 'mean' or 'sum', got {reduction!r}")
    H = hidden.shape[-1]
    h2 = hidden.reshape(-1, H)                                            # (N, H)
    y = labels.reshape(-1)                                                # (N,)
    if y.shape[0] != h2.shape[0]:
        raise ValueError(f"chunked_cross_entropy labels: expected {h2.shape[0]} labels for hidden "
                         f"{tuple(hidden.shape)}, got {tuple(labels.shape)}")
    if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != H:
        raise ValueError(f"chunked_cross_entropy lm_head_weight: expected (V, {H}), got {tuple(lm_head_weight.shape)}")
    if chunk_size is None:
        chunk_size = default_chunk_size(h2.shape[0], lm_head_weight.shape[0], H)
    if use_triton is None:
        use_triton = hidden.is_cuda
    loss = ChunkedCrossEntropyFunction.apply(h2.contiguous(), lm_head_weight, y.contiguous(), ignore_index,
                                             int(chunk_size), reduction, use_triton, torch.is_grad_enabled())
    if reduction == "sum" and return_count:
        return loss, int((y != ignore_index).sum())
    return loss


def cross_entropy_reference(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                            ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """Full logits, as transformers computes it: F.cross_entropy((h @ W^T).float(), labels)."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ lm_head_weight.t()    # (N, V)
    return F.cross_entropy(logits.float(), labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)
