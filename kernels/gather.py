"""Embedding rows gathered on the GPU straight from a table in pinned host memory (zero-copy).

A frozen input embedding kept in pinned host memory (llama.fast_path.CPUEmbedding, V * C * 2 bytes off the GPU:
0.24 GiB for Llama-2-7B) used to be gathered on the CPU: copy the ids to the host (a synchronization: the host
waits for the GPU's queued work), index_select B*T rows there (about 40 ms for 8,192 rows of 4,096 bf16 values on a
2-core host), then copy them to the GPU. The GPU idles through all of it. Pinned host memory is mapped into the
GPU's address space (CUDA unified virtual addressing), so a kernel can read the rows it needs over the host link
directly: B*T*C*2 bytes (64 MiB at 8,192 tokens: about 1.3 ms at 50 GB/s), no synchronization, no host work, and a
CUDA graph can capture it like any other kernel.

    gather_rows(table, ids)  ->  table[ids]  (len(ids), C) on ids' device

Exact (a copy). CUDA ids and a pinned (or CUDA) table run the kernel; anything else runs torch.index_select.
"""
import torch
import triton
import triton.language as tl

from ._common import interpreting


@triton.jit
def _gather_rows_kernel(table_ptr, ids_ptr, out_ptr, bad_ptr, n, C, V, stride_t, stride_o, BR: tl.constexpr,
                        BC: tl.constexpr, FLAG: tl.constexpr):
    # out[r, :] = table[ids[r], :]; program = BR rows x BC columns. An id outside [0, V) gives a zero row (the
    # table is never read outside its rows) and, with FLAG, sets bad_ptr[0] = 1.
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    rm = r < n
    cm = c < C
    idx = tl.load(ids_ptr + r, mask=rm, other=0).to(tl.int64)
    ok = (idx >= 0) & (idx < V)
    v = tl.load(table_ptr + idx[:, None] * stride_t + c[None, :], mask=(rm & ok)[:, None] & cm[None, :], other=0.0)
    tl.store(out_ptr + r.to(tl.int64)[:, None] * stride_o + c[None, :], v, mask=rm[:, None] & cm[None, :])
    if FLAG:
        nbad = tl.sum((rm & ~ok).to(tl.int32), axis=0)
        if nbad > 0:
            tl.store(bad_ptr, 1)


def device_gather_possible(table: torch.Tensor, ids: torch.Tensor) -> bool:
    """The kernel can run: CUDA ids (or the interpreter), and a table on that GPU or in pinned host memory."""
    if interpreting():
        return True
    if not ids.is_cuda:
        return False
    return table.is_cuda or (table.device.type == "cpu" and table.is_pinned())


def gather_rows(table: torch.Tensor, ids: torch.Tensor, out: torch.Tensor = None, check_range: bool = True,
                bad: torch.Tensor = None) -> torch.Tensor:
    """table[ids.reshape(-1)] as a (n, C) tensor on ids' device. table (V, C) with contiguous rows, in pinned host
    memory or on ids' GPU; ids an integer tensor.

    Ids outside [0, V): check_range raises IndexError before anything runs (it reads the ids' min and max back: a
    synchronization). Without it the kernel writes zero rows for them and, given `bad` (an int32 tensor of one
    element the GPU can write: pinned host or device memory), sets bad[0] = 1, for the caller to check later
    without synchronizing (llama.fast_path.CPUEmbedding does at its next call)."""
    if table.dim() != 2 or table.stride(1) != 1:
        raise ValueError(f"gather_rows: table must be a 2-d tensor with contiguous rows, got shape "
                         f"{tuple(table.shape)} strides {table.stride()}")
    if ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
        raise ValueError(f"gather_rows: ids must be an integer tensor, got {ids.dtype}")
    ids = ids.reshape(-1)
    V, C = table.shape
    n = ids.numel()
    if out is None:
        out = torch.empty((n, C), dtype=table.dtype, device=ids.device)
    elif tuple(out.shape) != (n, C) or out.dtype != table.dtype or out.stride(1) != 1:
        raise ValueError(f"gather_rows: out must be ({n}, {C}) {table.dtype} with contiguous rows, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if check_range and n:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= V:
            raise IndexError(f"gather_rows: ids must lie in [0, {V}) (the table's rows), got min {lo} max {hi}")
    if not device_gather_possible(table, ids):
        return out.copy_(torch.index_select(table, 0, ids.to(table.device)))
    if n == 0:
        return out
    if bad is not None and (bad.dtype != torch.int32 or bad.numel() != 1):
        raise ValueError(f"gather_rows: bad must be an int32 tensor of one element, got {bad.dtype} "
                         f"{tuple(bad.shape)}")
    BC = 16 if interpreting() else min(1024, triton.next_power_of_2(C))
    BR = 4 if interpreting() else max(1, 4096 // BC)
    _gather_rows_kernel[(triton.cdiv(n, BR), triton.cdiv(C, BC))](
        table, ids, out, bad if bad is not None else ids, n, C, V, table.stride(0), out.stride(0), BR=BR, BC=BC,
        FLAG=bad is not None, num_warps=4)
    return out
