"""Fused NF4 matmuls that read the 4-bit weight directly (no dequantized copy in memory).

W is a QuantizedWeight4bit of shape [N, K] (out, in). Element (n, k) is flat index f = n*K + k: its code
is a nibble of byte f // 2 (high nibble when f is even) and its scale is absmax[f // blocksize]. With K
even, the two nibbles of one byte are columns k and k+1 of the same row, so a byte tile splits into an
"even columns" and an "odd columns" weight tile and no interleaving is needed:

    forward   y      = x @ W.T (+ bias)   = x[:, 0::2] @ W_hi.T + x[:, 1::2] @ W_lo.T      x (M, K) -> (M, N)
    backward  grad_x = grad_y @ W         : grad_x[:, 0::2] = grad_y @ W_hi,  grad_x[:, 1::2] = grad_y @ W_lo

Each weight tile is dequantized in registers (table[code] * scale, rounded to the compute dtype, exactly
what bitsandbytes' dequantize produces) and fed to tl.dot with float32 accumulation.

Paths (chosen by `nf4_matmul` / `nf4_matmul_t` on CUDA):
- 1 <= M <= 16, bf16/fp16, K and blocksize multiples of 64: `kernels/nf4_mma.py` (path "mma"), the looked-up
  weight words fed to mma.m16n8k16 from registers (no layout conversion, no shared memory); timed per shape
  against the GEMVs and the swap kernel below.
- M = 1, bf16/fp16, K % blocksize == 0: `_nf4_gemv_w_kernel` (path "gemv3"), the word GEMV: every loop tensor
  is one-dimensional over 32-bit words of 8 codes, so nothing is converted between register layouts; one
  inline-PTX block per word looks its 8 codes up in the float16 register table; R rows a program share x;
  optionally the next step's loads carried across the loop (PREFETCH). Timed against the v2 GEMV per shape.
- 2 <= M <= 4, bf16/fp16, K % blocksize == 0: `_nf4_gemv_wm_kernel` (path "gemv3" at M > 1), the same word GEMV
  with each looked-up weight word used for every row of x; timed against the swap kernel per shape.
- M = 1, K % blocksize == 0: `_nf4_gemv_v2_kernel`, memory-bound CUDA-core dot products (x read as
  one row split in registers, as two stride-2 reads, or pre-split per block by the launcher: timed). Each program
  streams (rows, blocks, bytes) tiles; the 4-bit codes are looked up in a float16 copy of the table held
  in registers (`prmt` byte permutes, kernels/_common.py) instead of two memory gathers per byte, and the
  block's scale multiplies its partial dot product once. Numerics: table values rounded to float16
  (2^-11 relative, finer than the bf16 weight the reference multiplies) and the scale applied after the
  block sum, so the result is within a few 1e-4 of dequantize + matmul, not bit-equal. LUT=0/1 keep the
  exact float32 table (tests).
- 2 <= M <= 16, K % blocksize == 0: `_nf4_decode_swap_kernel`, tensor cores on y.T = W @ x.T so the
  dequantized weight (rounded like dequantize) is the dot's register operand and x the small one.
- the older tiled kernels (`_nf4_matmul_kernel` with decode or GEMM tiles, `_nf4_gemv_kernel`) where K is
  not a multiple of the blocksize, and as the fused GEMM for M > 16;
- dequantize into a scratch tensor (the caching allocator reuses it between calls) + cuBLAS: the
  documented fallback, used where it measures faster (large M; see README "Kernel benchmarks").
The choice between them is timed once per (M bucket, shape, scales, dtype) on the GPU (`_pick`): replayed
from CUDA graphs for M <= 16 (decode: the GPU's time), launched back to back above.
CPU tensors run the pure-torch reference (nf4 dequantize + torch matmul).
"""
import functools
import inspect

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import Launch, WeightPlan, check_triton_device, check_word_path, code_table_on, half_table_on, interpreting, load_scales, \
    mul_rn, pair_table_on, scale_args, sm_count, unpack_values, unpack_values_lut, use_ptx, word_table, word_table_on, \
    word_values, xpair
from . import prefetch
from .dequantize import dequantize_4bit_triton, dequantize_weight
from .nf4_mma import MmaPlan, mma_candidates, mma_default, mma_supported

DECODE_MAX_M = 16
GEMV3_MAX_M = 4   # the word GEMV takes up to 4 rows of x: past that its FMAs cost more than the swap kernel's mma


# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _dequant_tile(flat, mask, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr,
                  BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, USE_PTX: tl.constexpr, DTYPE: tl.constexpr):
    """Weights at flat indices `flat` (even) and `flat + 1`, as DTYPE: (W_hi, W_lo)."""
    byte = tl.load(packed_ptr + flat // 2, mask=mask, other=0)
    scale = load_scales(flat // BLOCKSIZE, mask, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                        DOUBLE_QUANT, USE_PTX)
    hi, lo = unpack_values(byte, table_ptr)
    return (hi * scale).to(DTYPE), (lo * scale).to(DTYPE)


@triton.jit
def _nf4_matmul_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr, bias_ptr, y_ptr,
    # sizes and strides
    M, N, K, stride_xm, stride_xk, stride_ym, stride_yn,
    # constexpr
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PTX: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]); program = (BM x BN tile, K slice)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = pid // (GROUP_M * num_n)                                         # grouped order for L2 reuse
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % size_m
    pid_n = (pid % (GROUP_M * num_n)) // size_m
    rm = pid_m * BM + tl.arange(0, BM)                                      # (BM,)
    rn = pid_n * BN + tl.arange(0, BN)                                      # (BN,)
    rj = tl.arange(0, BK // 2)                                              # byte column in a K tile
    mmask = rm < M
    nmask = rn < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_chunk = tl.cdiv(K, SPLIT_K * BK) * BK
    k_lo = pid_k * k_chunk
    k_hi = tl.minimum(k_lo + k_chunk, K)
    for k0 in range(k_lo, k_hi, BK):
        ke = k0 + 2 * rj                                                    # even columns, (BK/2,)
        kmask = ke < K
        xp = x_ptr + rm[:, None] * stride_xm + ke[None, :] * stride_xk      # (BM, BK/2)
        xmask = mmask[:, None] & kmask[None, :]
        x_even = tl.load(xp, mask=xmask, other=0.0)
        x_odd = tl.load(xp + stride_xk, mask=xmask, other=0.0)
        flat = rn[None, :] * K + ke[:, None]                                # (BK/2, BN)
        w_hi, w_lo = _dequant_tile(flat, kmask[:, None] & nmask[None, :], packed_ptr, absmax_ptr, q_ptr,
                                   absmax2_ptr, code8_ptr, offset_ptr, table_ptr, BLOCKSIZE, DOUBLE_QUANT,
                                   USE_PTX, dtype)
        acc = tl.dot(x_even, w_hi, acc, input_precision=PRECISION)          # (BM, BN)
        acc = tl.dot(x_odd, w_lo, acc, input_precision=PRECISION)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    yp = y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn
    if SPLIT_K == 1:
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
    else:  # y is a zeroed float32 buffer
        tl.atomic_add(yp, acc, mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _nf4_gemv_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr, bias_ptr, y_ptr,
    # sizes
    N, K,
    # constexpr
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PTX: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr,
):
    """y[n] = sum_k x[k] * W[n, k] (+ bias[n]) for one row x: BN rows of W per program, float32 FMAs."""
    pid = tl.program_id(0)
    rn = pid * BN + tl.arange(0, BN)
    rj = tl.arange(0, BK // 2)
    nmask = rn < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BN, BK // 2), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ke = k0 + 2 * rj                                                    # (BK/2,)
        kmask = ke < K
        x_even = tl.load(x_ptr + ke, mask=kmask, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + ke + 1, mask=kmask, other=0.0).to(tl.float32)
        flat = rn[:, None] * K + ke[None, :]                                # (BN, BK/2)
        w_hi, w_lo = _dequant_tile(flat, nmask[:, None] & kmask[None, :], packed_ptr, absmax_ptr, q_ptr,
                                   absmax2_ptr, code8_ptr, offset_ptr, table_ptr, BLOCKSIZE, DOUBLE_QUANT,
                                   USE_PTX, dtype)
        acc += w_hi.to(tl.float32) * x_even[None, :] + w_lo.to(tl.float32) * x_odd[None, :]
    y = tl.sum(acc, axis=1)                                                 # (BN,)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _nf4_gemv_v2_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr, bias_ptr, y_ptr,
    # sizes
    N, K, SPLIT_K,
    # constexpr
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PTX: tl.constexpr,
    BN: tl.constexpr, NB: tl.constexpr, ATOMIC: tl.constexpr, LUT: tl.constexpr, XSPLIT: tl.constexpr,
):
    """y[n] = sum_b absmax[n, b] * sum_{k in block b} table[code(n, k)] * x[k] for one row x, K % BLOCKSIZE == 0.

    Memory-bound: each program streams BN rows x NB whole 4-bit blocks a step as (BN, NB, BLOCKSIZE/2)
    contiguous bytes; the scale multiplies the block's partial dot product once instead of every weight,
    and x is loaded contiguously and split into even/odd columns in registers. Program = (BN rows, K slice);
    with SPLIT_K > 1 the slices add into a zeroed float32 y."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    HB: tl.constexpr = BLOCKSIZE // 2
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    kb = K // BLOCKSIZE
    per = tl.cdiv(tl.cdiv(kb, SPLIT_K), NB) * NB                            # blocks per K slice
    b_lo = pid_k * per
    b_hi = tl.minimum(b_lo + per, kb)
    rb = tl.arange(0, NB)
    rj = tl.arange(0, HB)
    re = tl.arange(0, BLOCKSIZE)
    acc = tl.zeros((BN, NB), dtype=tl.float32)
    for b0 in range(b_lo, b_hi, NB):
        bidx = b0 + rb
        bmask = bidx < b_hi
        m2 = nmask[:, None] & bmask[None, :]                                # (BN, NB)
        sidx = rn[:, None] * kb + bidx[None, :]                             # global block index
        byte = tl.load(packed_ptr + sidx[:, :, None] * HB + rj[None, None, :], mask=m2[:, :, None], other=0)
        scale = load_scales(sidx, m2, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr, DOUBLE_QUANT,
                            USE_PTX)                                        # (BN, NB)
        if XSPLIT == 1:  # one contiguous load, split into even / odd columns in registers
            xv = tl.load(x_ptr + bidx[:, None] * BLOCKSIZE + re[None, :], mask=bmask[:, None], other=0.0)
            xe, xo = tl.split(tl.reshape(xv.to(tl.float32), (NB, HB, 2)))  # (NB, HB)
        elif XSPLIT == 2:  # x pre-split per block by the launcher: [even columns | odd columns], two contiguous loads
            xp = x_ptr + bidx[:, None] * BLOCKSIZE + rj[None, :]
            xe = tl.load(xp, mask=bmask[:, None], other=0.0).to(tl.float32)
            xo = tl.load(xp + HB, mask=bmask[:, None], other=0.0).to(tl.float32)
        else:  # two stride-2 loads (x is small and cached; no register shuffle)
            xp = x_ptr + bidx[:, None] * BLOCKSIZE + 2 * rj[None, :]
            xe = tl.load(xp, mask=bmask[:, None], other=0.0).to(tl.float32)
            xo = tl.load(xp + 1, mask=bmask[:, None], other=0.0).to(tl.float32)
        hi, lo = unpack_values_lut(byte, table_ptr, LUT, USE_PTX)                    # (BN, NB, HB)
        acc += tl.sum(hi * xe[None, :, :] + lo * xo[None, :, :], axis=2) * scale
    y = tl.sum(acc, axis=1)                                                 # (BN,)
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
    if ATOMIC:
        tl.atomic_add(y_ptr + rn, y, mask=nmask)
    else:
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _word_slice(KW, SPLIT_K, WT: tl.constexpr):
    """This program's K slice, words [w_lo, w_hi) (whole steps of WT words, SPLIT_K slices), and one step's
    word offsets. Contiguity hint 1: the word loads would otherwise be vectorized into a layout the x loads
    cannot share."""
    pid_k = tl.program_id(1)
    per = tl.cdiv(tl.cdiv(KW, SPLIT_K), WT) * WT
    w_lo = pid_k * per
    return pid_k, w_lo, tl.minimum(w_lo + per, KW), tl.max_contiguous(tl.arange(0, WT), 1)


@triton.jit
def _word_fetch(wrow_ptr, srow, absmax_ptr, q_ptr, absmax2_ptr, wc, bidx, DOUBLE_QUANT: tl.constexpr):
    """The loads of one row's step: its words and, per word, the block's absmax (or its 8-bit code and
    absmax2: the code's table lookup waits for `_word_fma`, so that a prefetch never stalls on it)."""
    word = tl.load(wrow_ptr + wc)
    b = srow + bidx
    if DOUBLE_QUANT:
        return word, tl.load(q_ptr + b).to(tl.int32), tl.load(absmax2_ptr + b // 256)
    else:
        return word, tl.load(absmax_ptr + b), 0.0


@triton.jit
def _word_step(x_ptr, p0, p1, p2, p3, s0, s1, s2, s3, absmax_ptr, q_ptr, absmax2_ptr, w, w_hi,
               WPB: tl.constexpr, R: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """Every load of one step at words w: x's 4 int32 words (zero past w_hi) and each row's `_word_fetch`
    (words past w_hi clamped to the last one). Rows a program does not have repeat row 0's values: never
    loaded, never used."""
    wm = w < w_hi
    wc = tl.minimum(w, w_hi - 1)
    bidx = wc // WPB
    xa = tl.load(x_ptr + 4 * w, mask=wm, other=0)
    xb = tl.load(x_ptr + 4 * w + 1, mask=wm, other=0)
    xc = tl.load(x_ptr + 4 * w + 2, mask=wm, other=0)
    xd = tl.load(x_ptr + 4 * w + 3, mask=wm, other=0)
    d0, e0, f0 = _word_fetch(p0, s0, absmax_ptr, q_ptr, absmax2_ptr, wc, bidx, DOUBLE_QUANT)
    d1, e1, f1 = d0, e0, f0
    d2, e2, f2 = d0, e0, f0
    d3, e3, f3 = d0, e0, f0
    if R > 1:
        d1, e1, f1 = _word_fetch(p1, s1, absmax_ptr, q_ptr, absmax2_ptr, wc, bidx, DOUBLE_QUANT)
    if R > 2:
        d2, e2, f2 = _word_fetch(p2, s2, absmax_ptr, q_ptr, absmax2_ptr, wc, bidx, DOUBLE_QUANT)
        d3, e3, f3 = _word_fetch(p3, s3, absmax_ptr, q_ptr, absmax2_ptr, wc, bidx, DOUBLE_QUANT)
    return xa, xb, xc, xd, d0, e0, f0, d1, e1, f1, d2, e2, f2, d3, e3, f3


@triton.jit
def _word_fma(acc, word, s0, s1, code8_ptr, offset, table_ptr, tw, x0, x1, x2, x3, x4, x5, x6, x7,
              DOUBLE_QUANT: tl.constexpr, USE_PTX: tl.constexpr):
    """acc + scale * (the word's 8-code dot product with x)."""
    sc, v = _word_decode(word, s0, s1, code8_ptr, offset, table_ptr, tw, DOUBLE_QUANT, USE_PTX)
    return _word_dot(acc, v, (x0, x1, x2, x3, x4, x5, x6, x7), sc)


@triton.jit
def _word_row_out(acc, n, N, pid_k, bias_ptr, y_ptr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    y = tl.sum(acc, axis=0)
    if HAS_BIAS:
        if pid_k == 0:
            y += tl.load(bias_ptr + n, mask=n < N, other=0.0).to(tl.float32)
    if ATOMIC:
        tl.atomic_add(y_ptr + n, y, mask=n < N)
    else:
        tl.store(y_ptr + n, y.to(y_ptr.dtype.element_ty), mask=n < N)


@triton.jit
def _nf4_gemv_w_kernel(
    # pointers (x and the packed weight viewed as int32 words)
    x_ptr, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr, tw_ptr, bias_ptr, y_ptr,
    # sizes: N rows, KW = K / 8 words per row
    N, KW, SPLIT_K,
    # constexpr
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PTX: tl.constexpr,
    R: tl.constexpr, WT: tl.constexpr, ATOMIC: tl.constexpr, XF16: tl.constexpr, PREFETCH: tl.constexpr,
):
    """y[n] = sum_k x[k] * W[n, k] (+ bias[n]) for one row x of bf16/fp16, K % BLOCKSIZE == 0: the word GEMV.

    Every tensor of the loop is one-dimensional over WT words (one word = 8 codes = 4 bytes of one row), so
    every load, the table lookup and the FMAs share one register layout: no layout conversion through
    shared memory (the v2 kernel's (rows, blocks, bytes) tiles needed three per step, its stall). A program
    takes R rows (R in 1, 2, 4), which share each step's x words (4 int32 loads = 8 columns, widened once);
    per row and word: one load, the scale, 8 register-table lookups and 8 FMAs, the scale applied to the
    word's partial sum. Program = (R rows, K slice); SPLIT_K > 1 adds into a zeroed float32 y. Words past
    the slice's end re-read its last word and meet a zero x; rows past N re-read row N - 1 and are not stored.
    PREFETCH issues step i + 1's loads before step i's arithmetic (80 registers instead of 56 at R 4, WT 256).
    Numerics as the v2 kernel's register table: values rounded to float16, within a few 1e-4."""
    WPB: tl.constexpr = BLOCKSIZE // 8                                      # words per 4-bit block
    KB = KW // WPB
    n0 = tl.program_id(0) * R
    pid_k, w_lo, w_hi, rw = _word_slice(KW, SPLIT_K, WT)
    tw = word_table(tw_ptr, rw % 32)  # the register table: one copy per lane, in plain registers
    offset = tl.load(offset_ptr) if DOUBLE_QUANT else 0.0
    r0, r1 = tl.minimum(n0, N - 1), tl.minimum(n0 + 1, N - 1)              # rows past N re-read row N - 1
    r2, r3 = tl.minimum(n0 + 2, N - 1), tl.minimum(n0 + 3, N - 1)
    p0, p1, p2, p3 = packed_ptr + r0 * KW, packed_ptr + r1 * KW, packed_ptr + r2 * KW, packed_ptr + r3 * KW  # rows
    s0, s1, s2, s3 = r0 * KB, r1 * KB, r2 * KB, r3 * KB                    # their first 4-bit block
    a0 = tl.zeros((WT,), dtype=tl.float32)
    a1 = tl.zeros((WT,), dtype=tl.float32)
    a2 = tl.zeros((WT,), dtype=tl.float32)
    a3 = tl.zeros((WT,), dtype=tl.float32)
    # PREFETCH: software pipelining by hand, the loads of step i + 1 are issued before step i's arithmetic
    # (Triton pipelines only loads that feed tl.dot); it holds a step's loads in registers across the loop
    if PREFETCH:
        xa, xb, xc, xd, d0, e0, f0, d1, e1, f1, d2, e2, f2, d3, e3, f3 = _word_step(
            x_ptr, p0, p1, p2, p3, s0, s1, s2, s3, absmax_ptr, q_ptr, absmax2_ptr, w_lo + rw, w_hi, WPB, R,
            DOUBLE_QUANT)
    for w0 in range(w_lo, w_hi, WT):
        if not PREFETCH:  # this step's loads, then its arithmetic
            xa, xb, xc, xd, d0, e0, f0, d1, e1, f1, d2, e2, f2, d3, e3, f3 = _word_step(
                x_ptr, p0, p1, p2, p3, s0, s1, s2, s3, absmax_ptr, q_ptr, absmax2_ptr, w0 + rw, w_hi, WPB, R,
                DOUBLE_QUANT)
        x0, x1 = xpair(xa, XF16)
        x2, x3 = xpair(xb, XF16)
        x4, x5 = xpair(xc, XF16)
        x6, x7 = xpair(xd, XF16)
        c0, g0, h0 = d0, e0, f0
        c1, g1, h1 = d1, e1, f1
        c2, g2, h2 = d2, e2, f2
        c3, g3, h3 = d3, e3, f3
        if PREFETCH:  # the next step (past the end: clamped addresses, zero x, never used)
            xa, xb, xc, xd, d0, e0, f0, d1, e1, f1, d2, e2, f2, d3, e3, f3 = _word_step(
                x_ptr, p0, p1, p2, p3, s0, s1, s2, s3, absmax_ptr, q_ptr, absmax2_ptr, w0 + WT + rw, w_hi, WPB, R,
                DOUBLE_QUANT)
        a0 = _word_fma(a0, c0, g0, h0, code8_ptr, offset, table_ptr, tw, x0, x1, x2, x3, x4, x5, x6, x7,
                       DOUBLE_QUANT, USE_PTX)
        if R > 1:
            a1 = _word_fma(a1, c1, g1, h1, code8_ptr, offset, table_ptr, tw, x0, x1, x2, x3, x4, x5, x6, x7,
                           DOUBLE_QUANT, USE_PTX)
        if R > 2:
            a2 = _word_fma(a2, c2, g2, h2, code8_ptr, offset, table_ptr, tw, x0, x1, x2, x3, x4, x5, x6, x7,
                           DOUBLE_QUANT, USE_PTX)
            a3 = _word_fma(a3, c3, g3, h3, code8_ptr, offset, table_ptr, tw, x0, x1, x2, x3, x4, x5, x6, x7,
                           DOUBLE_QUANT, USE_PTX)
    _word_row_out(a0, n0, N, pid_k, bias_ptr, y_ptr, HAS_BIAS, ATOMIC)
    if R > 1:
        _word_row_out(a1, n0 + 1, N, pid_k, bias_ptr, y_ptr, HAS_BIAS, ATOMIC)
    if R > 2:
        _word_row_out(a2, n0 + 2, N, pid_k, bias_ptr, y_ptr, HAS_BIAS, ATOMIC)
        _word_row_out(a3, n0 + 3, N, pid_k, bias_ptr, y_ptr, HAS_BIAS, ATOMIC)


@triton.jit
def _word_x8(xrow_ptr, w, wm, XF16: tl.constexpr):
    """One row of x at words w: its 8 columns per word (4 int32 loads, zero past the slice) as float32."""
    x0, x1 = xpair(tl.load(xrow_ptr + 4 * w, mask=wm, other=0), XF16)
    x2, x3 = xpair(tl.load(xrow_ptr + 4 * w + 1, mask=wm, other=0), XF16)
    x4, x5 = xpair(tl.load(xrow_ptr + 4 * w + 2, mask=wm, other=0), XF16)
    x6, x7 = xpair(tl.load(xrow_ptr + 4 * w + 3, mask=wm, other=0), XF16)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _word_dot(acc, v, x, sc):
    """acc + sc * (8 weight values v . 8 columns x of one row)."""
    p = v[0] * x[0] + v[1] * x[1] + v[2] * x[2] + v[3] * x[3] + v[4] * x[4] + v[5] * x[5] + v[6] * x[6] + v[7] * x[7]
    return acc + p * sc


@triton.jit
def _word_decode(word, s0, s1, code8_ptr, offset, table_ptr, tw, DOUBLE_QUANT: tl.constexpr, USE_PTX: tl.constexpr):
    """A word's block scale and its 8 table values."""
    if DOUBLE_QUANT:
        sc = mul_rn(tl.load(code8_ptr + s0), s1, USE_PTX) + offset
    else:
        sc = s0
    return sc, word_values(word, tw, table_ptr, USE_PTX)


@triton.jit
def _nf4_gemv_wm_kernel(
    # pointers (x and the packed weight viewed as int32 words)
    x_ptr, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr, tw_ptr, bias_ptr, y_ptr,
    # sizes: M rows of x, N rows of W, KW = K / 8 words per row
    M, N, KW, SPLIT_K,
    # constexpr
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PTX: tl.constexpr,
    R: tl.constexpr, MX: tl.constexpr, WT: tl.constexpr, ATOMIC: tl.constexpr, XF16: tl.constexpr,
):
    """Y[m, n] = sum_k x[m, k] * W[n, k] (+ bias[n]) for 2 <= M <= MX rows of x (MX 2 or 4): the word GEMV
    of `_nf4_gemv_w_kernel` with each weight word looked up once and used for every row of x. A program takes
    R rows of W (1 or 2) and all M rows of x; per step, every row of x's words are widened once and shared by
    the R rows. Rows of x past M re-read row M - 1 and are not stored; the rest as the M = 1 kernel."""
    WPB: tl.constexpr = BLOCKSIZE // 8                                      # words per 4-bit block
    KB = KW // WPB
    n0 = tl.program_id(0) * R
    pid_k, w_lo, w_hi, rw = _word_slice(KW, SPLIT_K, WT)
    tw = word_table(tw_ptr, rw % 32)
    offset = tl.load(offset_ptr) if DOUBLE_QUANT else 0.0
    r0, r1 = tl.minimum(n0, N - 1), tl.minimum(n0 + 1, N - 1)
    p0, p1 = packed_ptr + r0 * KW, packed_ptr + r1 * KW
    s0, s1 = r0 * KB, r1 * KB
    XS = 4 * KW                                                             # int32 words per row of x
    q0, q1 = x_ptr, x_ptr + tl.minimum(1, M - 1) * XS                       # rows of x past M re-read row M - 1
    q2, q3 = x_ptr + tl.minimum(2, M - 1) * XS, x_ptr + tl.minimum(3, M - 1) * XS
    # accumulators a<row of W><row of x> (those of rows past MX stay unused: the compiler drops them)
    a00 = tl.zeros((WT,), dtype=tl.float32)
    a01, a02, a03 = a00, a00, a00
    a10, a11, a12, a13 = a00, a00, a00, a00
    for w0 in range(w_lo, w_hi, WT):
        w = w0 + rw
        wm = w < w_hi
        wc = tl.minimum(w, w_hi - 1)
        bidx = wc // WPB
        d0, e0, f0 = _word_fetch(p0, s0, absmax_ptr, q_ptr, absmax2_ptr, wc, bidx, DOUBLE_QUANT)
        if R > 1:
            d1, e1, f1 = _word_fetch(p1, s1, absmax_ptr, q_ptr, absmax2_ptr, wc, bidx, DOUBLE_QUANT)
        x0 = _word_x8(q0, w, wm, XF16)
        x1 = _word_x8(q1, w, wm, XF16)
        x2, x3 = x0, x1
        if MX > 2:
            x2 = _word_x8(q2, w, wm, XF16)
            x3 = _word_x8(q3, w, wm, XF16)
        sc, v = _word_decode(d0, e0, f0, code8_ptr, offset, table_ptr, tw, DOUBLE_QUANT, USE_PTX)
        a00, a01, a02, a03 = _word_x_dots(a00, a01, a02, a03, v, sc, x0, x1, x2, x3, MX)
        if R > 1:
            sc, v = _word_decode(d1, e1, f1, code8_ptr, offset, table_ptr, tw, DOUBLE_QUANT, USE_PTX)
            a10, a11, a12, a13 = _word_x_dots(a10, a11, a12, a13, v, sc, x0, x1, x2, x3, MX)
    _word_x_rows_out(a00, a01, a02, a03, n0, N, M, pid_k, bias_ptr, y_ptr, HAS_BIAS, ATOMIC, MX)
    if R > 1:
        _word_x_rows_out(a10, a11, a12, a13, n0 + 1, N, M, pid_k, bias_ptr, y_ptr, HAS_BIAS, ATOMIC, MX)


@triton.jit
def _word_x_dots(a0, a1, a2, a3, v, sc, x0, x1, x2, x3, MX: tl.constexpr):
    """One row of W's word values v (scale sc) against MX rows of x: their 2 or 4 accumulators."""
    a0 = _word_dot(a0, v, x0, sc)
    a1 = _word_dot(a1, v, x1, sc)
    if MX > 2:
        a2 = _word_dot(a2, v, x2, sc)
        a3 = _word_dot(a3, v, x3, sc)
    return a0, a1, a2, a3


@triton.jit
def _word_x_rows_out(a0, a1, a2, a3, n, N, M, pid_k, bias_ptr, y_ptr, HAS_BIAS: tl.constexpr,
                     ATOMIC: tl.constexpr, MX: tl.constexpr):
    """Element n of rows 0..MX-1 of y (row m at y_ptr + m * N); rows of x past M are not stored."""
    _word_row_out(a0, n, N, pid_k, bias_ptr, y_ptr, HAS_BIAS, ATOMIC)
    _word_rows_out(a1, n, N, 1, M, pid_k, bias_ptr, y_ptr, HAS_BIAS, ATOMIC)
    if MX > 2:
        _word_rows_out(a2, n, N, 2, M, pid_k, bias_ptr, y_ptr, HAS_BIAS, ATOMIC)
        _word_rows_out(a3, n, N, 3, M, pid_k, bias_ptr, y_ptr, HAS_BIAS, ATOMIC)


@triton.jit
def _word_rows_out(acc, n, N, m, M, pid_k, bias_ptr, y_ptr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    """Row m of y (if m < M): `_word_row_out` at y_ptr + m * N."""
    if m < M:
        _word_row_out(acc, n, N, pid_k, bias_ptr, y_ptr + m * N, HAS_BIAS, ATOMIC)


@triton.jit
def _nf4_decode_swap_kernel(
    # pointers
    x_ptr, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr, bias_ptr, y_ptr,
    # sizes and strides
    M, N, K, stride_xm, stride_xk, stride_ym, stride_yn, SPLIT_K,
    # constexpr
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PTX: tl.constexpr,
    PRECISION: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, NB: tl.constexpr, ATOMIC: tl.constexpr,
    LUT: tl.constexpr,
):
    """Small-M y = x @ W.T (+ bias) on tensor cores, K % BLOCKSIZE == 0, computed transposed:
    y.T tile (BN, BM) = W tile (BN, BK) @ x.T tile (BK, BM), so the dequantized weight is the dot's first
    operand straight from registers (row-major, no transpose) and the few rows of x are the small second
    operand. Program = (BN rows of W, BM rows of x, K slice); SPLIT_K > 1 adds into a zeroed float32 y."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    HB: tl.constexpr = BLOCKSIZE // 2
    BK2: tl.constexpr = NB * HB
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    mmask = rm < M
    nmask = rn < N
    kb = K // BLOCKSIZE
    per = tl.cdiv(tl.cdiv(kb, SPLIT_K), NB) * NB
    b_lo = pid_k * per
    b_hi = tl.minimum(b_lo + per, kb)
    rb = tl.arange(0, NB)
    rj = tl.arange(0, HB)
    rk = tl.arange(0, BK2)
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BN, BM), dtype=tl.float32)
    for b0 in range(b_lo, b_hi, NB):
        bidx = b0 + rb
        bmask = bidx < b_hi
        m2 = nmask[:, None] & bmask[None, :]
        sidx = rn[:, None] * kb + bidx[None, :]
        byte = tl.load(packed_ptr + sidx[:, :, None] * HB + rj[None, None, :], mask=m2[:, :, None], other=0)
        scale = load_scales(sidx, m2, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr, DOUBLE_QUANT,
                            USE_PTX)[:, :, None]
        hi, lo = unpack_values_lut(byte, table_ptr, LUT, USE_PTX)
        w_hi = tl.reshape((hi * scale).to(dtype), (BN, BK2))                # (BN, BK/2), rounded like dequantize
        w_lo = tl.reshape((lo * scale).to(dtype), (BN, BK2))
        ke = b0 * BLOCKSIZE + 2 * rk                                        # even columns (BK/2,)
        xmask = (ke < b_hi * BLOCKSIZE)[:, None] & mmask[None, :]
        xp = x_ptr + ke[:, None] * stride_xk + rm[None, :] * stride_xm     # (BK/2, BM): x.T
        xe = tl.load(xp, mask=xmask, other=0.0)
        xo = tl.load(xp + stride_xk, mask=xmask, other=0.0)
        acc = tl.dot(w_hi, xe, acc, input_precision=PRECISION)
        acc = tl.dot(w_lo, xo, acc, input_precision=PRECISION)
    if HAS_BIAS:
        if pid_k == 0:
            acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[:, None]
    yp = y_ptr + rm[None, :] * stride_ym + rn[:, None] * stride_yn
    omask = nmask[:, None] & mmask[None, :]
    if ATOMIC:
        tl.atomic_add(yp, acc, mask=omask)
    else:
        tl.store(yp, acc.to(y_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _nf4_matmul_t_kernel(
    # pointers
    g_ptr, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr, gx_ptr,
    # sizes and strides
    M, N, K, stride_gm, stride_gn, stride_xm, stride_xk,
    # constexpr
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, USE_PTX: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """grad_x[m, k] = sum_n grad_y[m, n] * W[n, k]; program = (BM x BK tile of grad_x, N slice)."""
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_k = tl.cdiv(K, BK)
    group = pid // (GROUP_M * num_k)
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_k)) % size_m
    pid_k = (pid % (GROUP_M * num_k)) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    ke = pid_k * BK + 2 * tl.arange(0, BK // 2)                             # even output columns, (BK/2,)
    mmask = rm < M
    kmask = ke < K
    dtype = g_ptr.dtype.element_ty
    acc_even = tl.zeros((BM, BK // 2), dtype=tl.float32)
    acc_odd = tl.zeros((BM, BK // 2), dtype=tl.float32)
    n_chunk = tl.cdiv(N, SPLIT_N * BN) * BN
    n_lo = pid_n * n_chunk
    n_hi = tl.minimum(n_lo + n_chunk, N)
    for n0 in range(n_lo, n_hi, BN):
        rn = n0 + tl.arange(0, BN)
        nmask = rn < N
        g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn,
                    mask=mmask[:, None] & nmask[None, :], other=0.0)        # (BM, BN)
        flat = rn[:, None] * K + ke[None, :]                                # (BN, BK/2)
        w_hi, w_lo = _dequant_tile(flat, nmask[:, None] & kmask[None, :], packed_ptr, absmax_ptr, q_ptr,
                                   absmax2_ptr, code8_ptr, offset_ptr, table_ptr, BLOCKSIZE, DOUBLE_QUANT,
                                   USE_PTX, dtype)
        acc_even = tl.dot(g, w_hi, acc_even, input_precision=PRECISION)
        acc_odd = tl.dot(g, w_lo, acc_odd, input_precision=PRECISION)
    # interleave: (BM, BK/2, 2) -> (BM, BK), column 2j from acc_even[:, j], 2j+1 from acc_odd[:, j]
    acc = tl.reshape(tl.join(acc_even, acc_odd), (BM, BK))
    rk = pid_k * BK + tl.arange(0, BK)
    gp = gx_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk
    omask = mmask[:, None] & (rk < K)[None, :]
    if SPLIT_N == 1:
        tl.store(gp, acc.to(gx_ptr.dtype.element_ty), mask=omask)
    else:
        tl.atomic_add(gp, acc, mask=omask)


# ---------------------------------------------------------------------------------------------------
# configurations: fixed small ones under the interpreter, autotuned on the GPU
# ---------------------------------------------------------------------------------------------------
def _cfg(num_warps, num_stages, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


_DECODE_CONFIGS = [
    _cfg(4, 4, BM=16, BN=16, BK=256, SPLIT_K=1, GROUP_M=1),
    _cfg(4, 4, BM=16, BN=32, BK=256, SPLIT_K=1, GROUP_M=1),
    _cfg(4, 3, BM=16, BN=32, BK=512, SPLIT_K=1, GROUP_M=1),
    _cfg(8, 3, BM=16, BN=64, BK=256, SPLIT_K=1, GROUP_M=1),
]
_GEMM_CONFIGS = [
    _cfg(8, 3, BM=128, BN=128, BK=64, SPLIT_K=1, GROUP_M=8),
    _cfg(8, 3, BM=128, BN=256, BK=64, SPLIT_K=1, GROUP_M=8),
    _cfg(4, 4, BM=64, BN=128, BK=64, SPLIT_K=1, GROUP_M=8),
    _cfg(8, 4, BM=64, BN=256, BK=64, SPLIT_K=1, GROUP_M=8),
]
_GEMV_CONFIGS = [
    _cfg(4, 4, BN=8, BK=512),
    _cfg(4, 4, BN=16, BK=256),
    _cfg(8, 3, BN=16, BK=512),
    _cfg(4, 3, BN=32, BK=256),
]
_GEMM_T_CONFIGS = [
    _cfg(8, 3, BM=128, BN=64, BK=128, SPLIT_N=1, GROUP_M=8),
    _cfg(8, 3, BM=128, BN=64, BK=256, SPLIT_N=1, GROUP_M=8),
    _cfg(4, 4, BM=64, BN=64, BK=128, SPLIT_N=1, GROUP_M=8),
]
_DECODE_T_CONFIGS = [
    _cfg(4, 4, BM=16, BN=64, BK=64, SPLIT_N=1, GROUP_M=1),
    _cfg(4, 4, BM=16, BN=128, BK=64, SPLIT_N=1, GROUP_M=1),
    _cfg(4, 3, BM=16, BN=64, BK=128, SPLIT_N=1, GROUP_M=1),
]

_tuned = {}


def _kernel(name):
    """The autotuned variant of a kernel (GPU), built on first use."""
    if name not in _tuned:
        base, configs = {
            "decode": (_nf4_matmul_kernel, _DECODE_CONFIGS), "gemm": (_nf4_matmul_kernel, _GEMM_CONFIGS),
            "gemv": (_nf4_gemv_kernel, _GEMV_CONFIGS), "gemm_t": (_nf4_matmul_t_kernel, _GEMM_T_CONFIGS),
            "decode_t": (_nf4_matmul_t_kernel, _DECODE_T_CONFIGS),
        }[name]
        keys = ["N", "K"] if name.startswith("gemv") else ["M", "N", "K"]
        kw = {}
        if "do_bench" in inspect.signature(triton.autotune).parameters:  # shorter timing than the default
            kw["do_bench"] = lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)
        _tuned[name] = triton.autotune(configs, key=keys + ["DOUBLE_QUANT"], **kw)(base)
    return _tuned[name]


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _weight_args(qw, device):
    a, q, a2, code8, offset, dq = scale_args(qw.absmax, qw.nested, device)
    return (qw.packed, a, q, a2, code8, offset, code_table_on(qw.quant_type, device)), dq


def _check(x, qw, what):
    check_triton_device(x, what)
    if qw.packed.device != x.device:
        raise ValueError(f"{what}: weight on {qw.packed.device}, input on {x.device}")
    if len(qw.shape) != 2:
        raise ValueError(f"{what}: expected a 2-D weight [out, in], got shape {tuple(qw.shape)}")
    if qw.shape[1] % 2:
        raise ValueError(f"{what}: fused kernels need an even in_features, got {qw.shape[1]}")
    if qw.shape[0] * qw.shape[1] >= 2**31:
        raise ValueError(f"{what}: weight of {qw.shape[0] * qw.shape[1]} elements overflows int32 indexing")


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------
def nf4_matmul_fused(x, qw, bias=None, path=None, config=None):
    """Fused y = x @ W.T (+ bias), x (M, K) -> (M, N) in x.dtype. path: "mma" (M <= 16, kernels/nf4_mma.py),
    "gemv3" (M <= 4), "gemv2" / "gemv" (M = 1), "swap" / "decode" (BM = 16) or "gemm"; None picks by M.
    config: dict of constexprs (+ num_warps) to bypass autotuning."""
    _check(x, qw, "nf4_matmul_fused")
    M, K = x.shape
    N = qw.shape[0]
    if qw.shape[1] != K:
        raise ValueError(f"nf4_matmul_fused: x has {K} features, weight expects {qw.shape[1]}")
    if path is None:
        blocked = K % qw.blocksize == 0
        path = (("gemv2" if blocked else "gemv") if M == 1 else
                (("swap" if blocked else "decode") if M <= DECODE_MAX_M else "gemm"))
    if path not in ("mma", "gemv3", "gemv2", "gemv", "swap", "decode", "gemm"):
        raise ValueError(f"nf4_matmul_fused: unknown path {path!r} (mma, gemv3, gemv2, gemv, swap, decode, gemm)")
    if path in ("mma", "gemv3", "gemv2", "swap"):
        return _launch_v2(x, qw, bias, path, config)
    wargs, dq = _weight_args(qw, x.device)
    has_bias = bias is not None
    bias_arg = bias if has_bias else x
    common = dict(BLOCKSIZE=qw.blocksize, DOUBLE_QUANT=dq, HAS_BIAS=has_bias, USE_PTX=use_ptx(x))
    if config is None and interpreting():
        config = {"gemv": {"BN": 16, "BK": 64}}.get(
                      path, {"BM": 16, "BN": 16, "BK": 32, "SPLIT_K": 1, "GROUP_M": 2})
    if path == "gemv":
        if M != 1:
            raise ValueError(f"nf4_matmul_fused: the gemv path takes one row, got {M}")
        x = x.contiguous()
        y = torch.empty((1, N), dtype=x.dtype, device=x.device)
        kern = _nf4_gemv_kernel if config else _kernel("gemv")
        grid = lambda meta: (triton.cdiv(N, meta["BN"]),)  # noqa: E731
        kern[grid](x, *wargs, bias_arg, y, N, K, **common, **(config or {}))
        return y
    split_k = (config or {}).get("SPLIT_K", 1)
    y = (torch.zeros if split_k > 1 else torch.empty)((M, N), dtype=torch.float32 if split_k > 1 else x.dtype,
                                                      device=x.device)
    kern = _nf4_matmul_kernel if config else _kernel(path)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(N, meta["BN"]), meta["SPLIT_K"])  # noqa: E731
    kern[grid](x, *wargs, bias_arg, y, M, N, K, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
               **common, PRECISION=_precision(x.dtype), **(config or {}))
    return y.to(x.dtype)


_LAST = {}  # the last compiled v2 kernel (benchmarks/diag inspect its registers and IR)
_V2_INTERP = {"gemv2": dict(BN=4, NB=2, SPLIT_K=1, LUT=1), "swap": dict(BM=16, BN=16, NB=2, SPLIT_K=1, LUT=1),
              "gemv3": dict(WT=16, SPLIT_K=1)}


@functools.lru_cache(maxsize=4096)
def _v2_default(path, M, N, K, blocksize, dtype=torch.bfloat16):
    """A config for the v2 decode kernels where none is given (GPU): enough programs to fill the GPU.
    float32 inputs keep the exact float32 table (LUT 1): the float16 register table (LUT 3) is only
    below the weight's own rounding for bf16/fp16 compute."""
    n_sm = sm_count(torch.cuda.current_device())
    # measured best on an H200 (benchmarks/diag/gemv_probe.py): the register table, 4 rows x 8 blocks a step
    kb = K // blocksize
    if path == "gemv3":  # the word GEMV: R rows a program, WT words a step
        # H200 probe (benchmarks/results/diag/gemv3_probe-*): R 4, WT 256, 4 warps best or within 3% at the 70B
        # shapes; the hand-pipelined loads (PREFETCH) gained nothing measurable at these occupancies
        # at 2-4 rows of x (gemv3m_probe-*, from gemv3_probe.py --ms): R 2, WT 64, 2 warps best but at K = 28672
        cfg = dict(R=4, WT=256, SPLIT_K=1, PREFETCH=False, num_warps=4) if M == 1 else \
            dict(R=2, WT=64, SPLIT_K=1, num_warps=2)
        progs, kb = triton.cdiv(N, cfg["R"]), K // 8 // cfg["WT"]  # kb: steps of WT words per row
    elif path == "gemv2":
        cfg = dict(BN=4, NB=8, SPLIT_K=1, LUT=3, num_warps=4)
        progs = triton.cdiv(N, cfg["BN"])
    else:
        cfg = dict(BM=16, BN=64, NB=2, SPLIT_K=1, LUT=3, num_warps=4)
        progs = triton.cdiv(N, cfg["BN"]) * triton.cdiv(M, cfg["BM"])
    if dtype == torch.float32 and path != "gemv3":
        cfg["LUT"] = 1
    while progs * cfg["SPLIT_K"] < 2 * n_sm and kb // (cfg["SPLIT_K"] * 2) >= 4 * cfg.get("NB", 1):
        cfg["SPLIT_K"] *= 2
    return cfg


_V2_PLANS = {}  # (path, id(qw), M, dtype, bias?, device, config) -> _V2Plan: what a launch needs besides x and y


class _V2Plan(WeightPlan):
    """Everything about a v2 launch that depends only on the weight, M and the config (kernel, grid,
    weight-side arguments, constexprs), built once: decode calls the same linear thousands of times and
    the host's time per call is what small shapes are bound by."""
    __slots__ = ("kernel", "grid", "wargs", "kw", "path", "launcher")

    def __init__(self, x, qw, bias, path, config):
        M, K = x.shape
        N = qw.shape[0]
        self.path, self.n, self.k = path, N, K
        if config is None:
            config = _V2_INTERP[path] if interpreting() else _v2_default(path, M, N, K, qw.blocksize, x.dtype)
        config = dict(config)
        self.bind(qw)
        if path == "gemv3":
            self._word_gemv(x, qw, bias, config)
            return
        if path == "gemv2":
            config.setdefault("XSPLIT", 1)
        lut = config.setdefault("LUT", 1)
        self.split_k = config.pop("SPLIT_K", 1)
        config["ATOMIC"] = self.split_k > 1
        a, q, a2, code8, offset, dq = scale_args(qw.absmax, qw.nested, x.device)
        if lut >= 3:  # the register table; the launcher names the quant type, the interpreter reads float16 pairs
            lut = config["LUT"] = 3 if qw.quant_type == "nf4" else 4
        table = code_table_on(qw.quant_type, x.device) if lut == 0 else \
            pair_table_on(qw.quant_type, x.device, lut >= 2)
        self.wargs = (qw.packed, a, q, a2, code8, offset, table)
        self.kw = dict(BLOCKSIZE=qw.blocksize, DOUBLE_QUANT=dq, HAS_BIAS=bias is not None, USE_PTX=use_ptx(x),
                       **config)
        if path == "gemv2":
            self.kernel, self.grid = _nf4_gemv_v2_kernel, (triton.cdiv(N, config["BN"]), self.split_k)
        else:
            self.kw["PRECISION"] = _precision(x.dtype)
            self.kernel = _nf4_decode_swap_kernel
            self.grid = (triton.cdiv(N, config["BN"]), triton.cdiv(M, config["BM"]), self.split_k)
        self._bind_launcher()

    def _bind_launcher(self):
        n_w = len(self.wargs)  # x, the weight-side arguments, bias, y, sizes: x, bias, y (and strides) change
        strides = tuple(range(n_w + 6, n_w + 10)) if self.path == "swap" else ()
        self.launcher = Launch(self.kernel, self.grid, self.kw, varying=(0, n_w + 1, n_w + 2) + strides)

    def _word_gemv(self, x, qw, bias, config):
        packed = check_word_path("gemv3", x, qw, 8, 32)
        M = x.shape[0]
        rows = (1, 2, 4) if M == 1 else (1, 2)
        if config.get("R", rows[-1]) not in rows:
            allowed = "1, 2 or 4" if M == 1 else "1 or 2"
            raise ValueError(f"nf4_matmul_fused: gemv3 takes R = {allowed} rows of W a program at M = {M}, "
                             f"got {config['R']}")
        config.setdefault("R", rows[-1])
        config.setdefault("WT", 256 if M == 1 else 64)
        if M == 1:
            config.setdefault("PREFETCH", False)
        elif config.pop("PREFETCH", False):
            raise ValueError("nf4_matmul_fused: gemv3 prefetches only at M = 1")
        self.split_k = config.pop("SPLIT_K", 1)
        config["ATOMIC"] = self.split_k > 1
        a, q, a2, code8, offset, dq = scale_args(qw.absmax, qw.nested, x.device)
        self.wargs = (packed.view(torch.int32), a, q, a2, code8, offset, half_table_on(qw.quant_type, x.device),
                      word_table_on(qw.quant_type, x.device))
        self.kw = dict(BLOCKSIZE=qw.blocksize, DOUBLE_QUANT=dq, HAS_BIAS=bias is not None, USE_PTX=use_ptx(x),
                       XF16=x.dtype == torch.float16, **config)
        if M > 1:
            self.kw["MX"] = 1 << (M - 1).bit_length()                       # 2 or 4
        self.kernel = _nf4_gemv_w_kernel if M == 1 else _nf4_gemv_wm_kernel
        self.grid = (triton.cdiv(self.n, config["R"]), self.split_k)
        self._bind_launcher()


def _launch_v2(x, qw, bias, path, config):
    """Launch the v2 GEMV (M = 1) or the swapped small-M tensor-core kernel. config: constexprs
    (BN, NB, SPLIT_K, LUT, BM for "swap") plus num_warps / num_stages; None: the default for the shape."""
    return _launch_plan(_v2_plan(x, qw, bias, path, config), x, bias)


def _v2_plan(x, qw, bias, path, config):
    """The cached _V2Plan for this weight, M, dtype, bias and config (built on first use, after the checks)."""
    M, K = x.shape
    if K % qw.blocksize:
        raise ValueError(f"nf4_matmul_fused: path {path} needs in_features % blocksize == 0, got {K}")
    if path == "gemv2" and M != 1:
        raise ValueError(f"nf4_matmul_fused: the gemv path takes one row, got {M}")
    if path == "gemv3" and M > GEMV3_MAX_M:
        raise ValueError(f"nf4_matmul_fused: the gemv3 path takes 1 to {GEMV3_MAX_M} rows, got {M}")
    key = (path, id(qw), M, x.dtype, bias is None, x.device,
           None if config is None else tuple(sorted(config.items())))
    plan = _V2_PLANS.get(key)
    if plan is None or not plan.valid_for(qw):
        if len(_V2_PLANS) > 4096:  # weights come and go (tests, reloads): start over rather than grow
            _V2_PLANS.clear()
        plan = (MmaPlan(x, qw, bias, config) if path == "mma" else _V2Plan(x, qw, bias, path, config)).store(
            _V2_PLANS, key)
    return plan


def _launch_plan(plan, x, bias):
    """y = x @ W.T (+ bias) with a built plan: allocate y, launch, nothing else (the hot decode path)."""
    if plan.__class__ is MmaPlan:
        return plan.launch(x, bias)
    M, K = x.shape
    N = plan.n
    bias_arg = bias if bias is not None else x
    y = plan.output(M, x)
    if plan.path == "gemv3":
        x = x.contiguous()
        if x.data_ptr() % 4:  # read as 32-bit pairs
            x = x.clone()
        sizes = (N, K // 8, plan.split_k) if M == 1 else (M, N, K // 8, plan.split_k)
        _LAST["compiled"] = plan.launcher(x.view(torch.int32), *plan.wargs, bias_arg, y, *sizes)
    elif plan.path == "gemv2":
        x = x.contiguous()
        if plan.kw["XSPLIT"] == 2:  # per 4-bit block: the even columns, then the odd ones
            x = x.view(K // plan.kw["BLOCKSIZE"], plan.kw["BLOCKSIZE"] // 2, 2).transpose(1, 2).contiguous()
        _LAST["compiled"] = plan.launcher(x, *plan.wargs, bias_arg, y, N, K, plan.split_k)
    else:
        _LAST["compiled"] = plan.launcher(x, *plan.wargs, bias_arg, y, M, N, K, x.stride(0), x.stride(1),
                                          y.stride(0), y.stride(1), plan.split_k)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def nf4_matmul_t_fused(g, qw, path=None, config=None):
    """Fused grad_x = g @ W, g (M, N) -> (M, K) in g.dtype."""
    _check(g, qw, "nf4_matmul_t_fused")
    M, N = g.shape
    K = qw.shape[1]
    if qw.shape[0] != N:
        raise ValueError(f"nf4_matmul_t_fused: grad has {N} features, weight has {qw.shape[0]} rows")
    if path is None:
        path = "decode_t" if M <= DECODE_MAX_M else "gemm_t"
    wargs, dq = _weight_args(qw, g.device)
    if config is None and interpreting():
        config = {"BM": 16, "BN": 16, "BK": 32, "SPLIT_N": 1, "GROUP_M": 2}
    split_n = (config or {}).get("SPLIT_N", 1)
    gx = (torch.zeros if split_n > 1 else torch.empty)((M, K), dtype=torch.float32 if split_n > 1 else g.dtype,
                                                       device=g.device)
    kern = _nf4_matmul_t_kernel if config else _kernel(path)
    grid = lambda meta: (triton.cdiv(M, meta["BM"]) * triton.cdiv(K, meta["BK"]), meta["SPLIT_N"])  # noqa: E731
    kern[grid](g, *wargs, gx, M, N, K, g.stride(0), g.stride(1), gx.stride(0), gx.stride(1),
               BLOCKSIZE=qw.blocksize, DOUBLE_QUANT=dq, USE_PTX=use_ptx(g), PRECISION=_precision(g.dtype),
               **(config or {}))
    return gx.to(g.dtype)


def _dequantized(qw, dtype, rows=0):
    """W dequantized by the Triton kernel: on a GPU through the weight's cached launch plan (dequantize_weight),
    or, with kernels.prefetch.ENABLED and more than DECODE_MAX_M rows, taken from the side stream's prefetch of it
    (then the next weight's dequantize starts beside this GEMM); in the interpreter through the kernel's launcher
    (dequantize_weight would take the CPU reference there)."""
    if qw.packed.is_cuda:
        if prefetch.ENABLED and rows > DECODE_MAX_M:     # (the decode sizes' choices are timed in CUDA graphs)
            return prefetch.prefetcher(qw.packed.device, dequantize_weight).take(qw, dtype)
        return dequantize_weight(qw, dtype)
    return dequantize_4bit_triton(qw.packed, qw.absmax, qw.shape, qw.blocksize, qw.quant_type, dtype, qw.nested)


def nf4_matmul_dequant(x, qw, bias=None):
    """Fallback: dequantize W into a scratch tensor (Triton), then cuBLAS: y = x @ W.T (+ bias)."""
    return F.linear(x, _dequantized(qw, x.dtype, x.numel() // max(1, x.shape[-1])), bias)


def nf4_matmul_t_dequant(g, qw):
    """Fallback: grad_x = g @ dequantize(W) through cuBLAS."""
    return g @ _dequantized(qw, g.dtype, g.numel() // max(1, g.shape[-1]))


# ---------------------------------------------------------------------------------------------------
# public dispatch
# ---------------------------------------------------------------------------------------------------
def _triton_ok(x, qw):
    return ((x.is_cuda or interpreting()) and len(qw.shape) == 2 and qw.shape[1] % 2 == 0
            and qw.shape[0] * qw.shape[1] < 2**31)


_path_cache = {}


def _m_bucket(M):
    return M if M <= DECODE_MAX_M else 1 << (M - 1).bit_length()


def _time_pipelined(fn, calls=20, reps=3):
    """Milliseconds per call of `fn` launched back to back (as a model runs them), best of `reps`: where
    the host's launch overhead exceeds the kernel this measures the host, which is then the real cost.
    (Timing each call between its own events, as do_bench does, adds the host's gap to every candidate
    and made the choice between microsecond kernels noisy.)"""
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    end.synchronize()
    one = start.elapsed_time(end)
    if one > 0.5:  # a long kernel: the host's overhead is negligible and 60 calls would cost seconds
        for _ in range(2 if one < 5.0 else 0):
            start.record()
            fn()
            end.record()
            end.synchronize()
            one = min(one, start.elapsed_time(end))
        return one
    best = float("inf")
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / calls)
    return best


def _time_graph(fn, calls=20, reps=3):
    """Milliseconds per call of `fn` replayed from a CUDA graph of `calls` calls (best of `reps`): the GPU's
    time without the host's, as decoding runs (llama.generate replays each step from a graph)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(reps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / calls)
    del graph
    return best


PICK_ROUNDS = 2  # _pick times every candidate once per round, round after round, and keeps each one's best


def _is_decode(key) -> bool:
    """A decode-sized key (kind fwd / bwd, M bucket <= DECODE_MAX_M): chosen separately for graphs and eager calls."""
    return len(key) > 2 and key[0] in ("fwd", "bwd") and isinstance(key[1], int) and key[1] <= DECODE_MAX_M


def _cache_key(key, eager: bool):
    return key + ("eager",) if eager and _is_decode(key) else key


def _eager_call(t: torch.Tensor) -> bool:
    """A call launched from Python (not captured into a CUDA graph): decode keys choose by host + GPU time."""
    return t.is_cuda and not torch.cuda.is_current_stream_capturing()


def _pick(key, candidates, eager=False):
    """Name of the fastest candidate for `key`, timed on the GPU on first use (like Triton's autotuner, one
    level up: fused kernel vs dequantize + cuBLAS), best of PICK_ROUNDS interleaved rounds: on a shared H100
    a sequential timing once chose dequantize + cuBLAS at 4096x11008, M = 16, where the fused kernel was
    faster in every other measurement of the run. The interpreter, CUDA-graph capture and forced paths take
    the first candidate.

    Decode-sized keys (M <= DECODE_MAX_M) get two choices, both timed here: replayed from CUDA graphs (the GPU's
    time, as llama.generate runs decode) for calls being captured, and launched back to back (host included) for
    eager calls (`eager`). They differ where a candidate costs more launches: split K zeroes a float32 output
    and casts it (3 launches), which a graph replays at ~2 us each and Python launches at 10-30 us each (H200,
    6e3bf5f: 4096x11008 at M = 16 took 30 us from a graph and 56 us launched from Python)."""
    ckey = _cache_key(key, eager)
    if ckey in _path_cache:
        return _path_cache[ckey]
    names = list(candidates)
    if len(names) == 1 or interpreting() or not torch.cuda.is_available() or \
            torch.cuda.is_current_stream_capturing():
        return names[0]
    decode = _is_decode(key)
    timers = {"graph": _time_graph, "eager": _time_pipelined} if decode else {"eager": _time_pipelined}
    times = {mode: dict.fromkeys(names, float("inf")) for mode in timers}
    failed = set()
    for _ in range(PICK_ROUNDS):  # candidates interleaved: a burst of contention slows one round, not a choice
        for name in names:
            for mode, timer in timers.items():
                if name in failed:
                    continue
                try:
                    times[mode][name] = min(times[mode][name], timer(candidates[name], reps=2))
                except Exception:  # a config that fails to compile, run or be captured here is simply not chosen
                    failed.add(name)
                    for t in times.values():
                        t[name] = float("inf")
    if decode:
        _path_cache[key] = min(names, key=times["graph"].get)
        _path_cache[_cache_key(key, True)] = min(names, key=times["eager"].get)
    else:
        _path_cache[key] = min(names, key=times["eager"].get)
    return _path_cache[ckey]


@functools.lru_cache(maxsize=4096)
def _forward_specs(M, N, K, blocksize, dtype, on_gpu):
    """{candidate name: (fused path, config) or None for dequantize + cuBLAS} for a forward of M rows."""
    specs = {}
    blocked = K % blocksize == 0
    if mma_supported(M, K, blocksize, dtype):  # tensor cores from registers: timed against the GEMVs / swap kernel
        if on_gpu:
            n_sm = sm_count(torch.cuda.current_device())
            for name in mma_candidates(K):
                specs[name] = ("mma", mma_default(M, N, K, n_sm, name))
        else:
            specs["mma"] = ("mma", None)
    if M == 1:
        if blocked and K % 8 == 0 and blocksize % 8 == 0 and dtype in (torch.bfloat16, torch.float16):
            cfg3 = _v2_default("gemv3", 1, N, K, blocksize, dtype) if on_gpu else None
            specs["gemv3"] = ("gemv3", cfg3)
            if cfg3 is not None:  # step i + 1's loads carried across the loop: faster on long weights, but
                # 80 registers instead of 56 cost a second wave of programs at N = 4096-8192 (H200)
                specs["gemv3-prefetch"] = ("gemv3", dict(cfg3, PREFETCH=True))
        if blocked:  # x split in registers, or read twice with stride 2: measured per shape
            cfg = _v2_default("gemv2", 1, N, K, blocksize, dtype) if on_gpu else None
            specs["gemv2"] = ("gemv2", cfg)
            if cfg is not None:
                specs["gemv2-strided-x"] = ("gemv2", dict(cfg, XSPLIT=0))
                if N * K >= 32 * 2**20:  # the extra split kernel only pays where the weight stream is long
                    specs["gemv2-presplit-x"] = ("gemv2", dict(cfg, XSPLIT=2))
        else:
            specs["gemv"] = ("gemv", None)
    elif M <= DECODE_MAX_M:
        if M <= GEMV3_MAX_M and blocked and K % 8 == 0 and blocksize % 8 == 0 and \
                dtype in (torch.bfloat16, torch.float16):  # the word GEMV, each weight word used for every row
            specs["gemv3"] = ("gemv3", _v2_default("gemv3", M, N, K, blocksize, dtype) if on_gpu else None)
        specs["swap" if blocked else "decode"] = ("swap" if blocked else "decode", None)
    else:
        specs["gemm"] = ("gemm", None)
    specs["dequant"] = None
    return specs


def _run_forward(spec, x2, qw, bias):
    if spec is None:
        return nf4_matmul_dequant(x2, qw, bias)
    return nf4_matmul_fused(x2, qw, bias, path=spec[0], config=spec[1])


def _fused_plan(spec, x2, qw, bias):
    """The launch plan of a v2 forward candidate (gemv2 / swap), after nf4_matmul_fused's checks; None for the
    other candidates (dequantize + cuBLAS, the v1 kernels), which run through _run_forward."""
    if spec is None or spec[0] not in ("mma", "gemv3", "gemv2", "swap"):
        return None
    _check(x2, qw, "nf4_matmul")
    if qw.shape[1] != x2.shape[1]:
        raise ValueError(f"nf4_matmul_fused: x has {x2.shape[1]} features, weight expects {qw.shape[1]}")
    return _v2_plan(x2, qw, bias, *spec)


def _forward_candidates(x2, qw, bias):
    """{name: zero-argument call} for the dispatcher to time: each as later calls will run it (the v2
    kernels through their launch plan, as nf4_matmul's small-M fast path launches them)."""
    specs = _forward_specs(x2.shape[0], qw.shape[0], x2.shape[1], qw.blocksize, x2.dtype, x2.is_cuda)
    out = {}
    for name, spec in specs.items():
        try:
            plan = _fused_plan(spec, x2, qw, bias)
        except ValueError:  # the mma path's alignment (a weight view at an odd offset): not a candidate
            if spec[0] != "mma":
                raise
            continue
        out[name] = functools.partial(_run_forward, spec, x2, qw, bias) if plan is None else \
            functools.partial(_launch_plan, plan, x2, bias)
    return out


_FAST = {}  # (id(qw), M, K, dtype, bias?, device, eager?) -> the _V2Plan that nf4_matmul chose for a small-M call


def nf4_matmul(x, qw, bias=None, backend=None):
    """y = x @ W.T (+ bias): x (..., K), W a QuantizedWeight4bit [N, K] -> y (..., N) in x.dtype.
    backend: None (CUDA -> Triton, CPU -> torch reference), "triton" or "torch".
    On CUDA the path (gemv / decode / fused GEMM / dequantize + cuBLAS) is the fastest measured for this
    (M bucket, N, K, scales, dtype) on first use. Once a small-M call (M <= DECODE_MAX_M) has chosen a
    fused kernel, later calls with the same weight, M, dtype and bias go straight to its launch plan:
    decode calls each linear once per token and small weights are bound by this host time. Small-M calls
    captured into a CUDA graph and calls launched from Python may choose different kernels (see `_pick`)."""
    K = x.shape[-1]
    x2 = x if x.dim() == 2 else x.reshape(-1, K)                            # (M, K)
    eager = _eager_call(x)
    fast_key = (id(qw), x2.shape[0], K, x.dtype, bias is None, x.device, eager)
    if backend != "torch" and (x.is_cuda or backend == "triton"):
        plan = _FAST.get(fast_key)
        if plan is not None and plan.valid_for(qw):
            y = _launch_plan(plan, x2, bias)
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], plan.n)
    backend = backend or ("triton" if x.is_cuda else "torch")
    if backend == "torch" or not _triton_ok(x, qw):
        y = F.linear(x2, dequantize_weight(qw, x.dtype), bias)
    else:
        key = ("fwd", _m_bucket(x2.shape[0]), tuple(qw.shape), qw.double_quant, qw.blocksize, x.dtype, bias is None)
        name = _path_cache.get(_cache_key(key, eager)) or _pick(key, _forward_candidates(x2, qw, bias), eager)
        spec = _forward_specs(x2.shape[0], qw.shape[0], K, qw.blocksize, x2.dtype, x2.is_cuda)[name]
        try:
            plan = _fused_plan(spec, x2, qw, bias)
        except ValueError:  # chosen for this shape, but this weight's storage is not 8-byte aligned for mma
            if spec[0] != "mma":
                raise
            spec = plan = None
        if plan is None:
            y = _run_forward(spec, x2, qw, bias)
        else:
            if len(_FAST) > 4096:  # weights come and go: start over rather than grow
                _FAST.clear()
            plan.store(_FAST, fast_key)
            y = _launch_plan(plan, x2, bias)
    return y.reshape(*x.shape[:-1], qw.shape[0])


def _accumulate_out(out, g2, K, what):
    """out as the (M, K) matrix that g2 @ W is added into (checked: shape, dtype, device, contiguity)."""
    if out.shape[-1] != K or out.numel() != g2.shape[0] * K or out.dtype != g2.dtype or out.device != g2.device:
        raise ValueError(f"{what}: out must be ({g2.shape[0]}, {K}) {g2.dtype} on {g2.device} (rows may be split "
                         f"over leading dims), got {tuple(out.shape)} {out.dtype} on {out.device}")
    o2 = out.view(-1, K) if out.is_contiguous() else None
    if o2 is None:
        raise ValueError(f"{what}: out must be contiguous (it is accumulated into in place)")
    return o2


def nf4_matmul_t(g, qw, backend=None, out=None):
    """grad_x = g @ W: g (..., N), W [N, K] -> (..., K) in g.dtype. Same dispatch as nf4_matmul.

    out: a contiguous tensor of grad_x's shape and dtype to accumulate into, ``out += g @ W``, returned. Where
    W is dequantized for cuBLAS (large M, and the CPU reference) the sum is the GEMM's epilogue (beta = 1: one
    rounding, no separate pass over out); the fused kernels add their result. The backward of sibling
    projections that read one input (q, k, v; gate, up) sums their grad_x this way (llama/fast_path.py)."""
    backend = backend or ("triton" if g.is_cuda else "torch")
    lead = g.shape[:-1]
    g2 = g.reshape(-1, g.shape[-1])
    K = qw.shape[1]
    o2 = None if out is None else _accumulate_out(out, g2, K, "nf4_matmul_t")
    if backend == "torch" or not _triton_ok(g, qw):
        w = dequantize_weight(qw, g.dtype)
        if o2 is not None:
            o2.addmm_(g2, w)
            return out
        gx = g2 @ w
    else:
        key = ("bwd", _m_bucket(g2.shape[0]), tuple(qw.shape), qw.double_quant, qw.blocksize, g.dtype)
        eager = _eager_call(g)
        name = _path_cache.get(_cache_key(key, eager)) or _pick(key, {"fused": lambda: nf4_matmul_t_fused(g2, qw),
                                                                      "dequant": lambda: nf4_matmul_t_dequant(g2, qw)},
                                                                eager)
        if o2 is not None:
            if name == "fused":
                o2.add_(nf4_matmul_t_fused(g2, qw))
            else:
                o2.addmm_(g2, _dequantized(qw, g.dtype, g2.shape[0]))
            return out
        gx = nf4_matmul_t_fused(g2, qw) if name == "fused" else nf4_matmul_t_dequant(g2, qw)
    return gx.reshape(*lead, K)


def chosen_paths():
    """{key: path} chosen so far on this process's GPU (for benchmarks and debugging)."""
    return dict(_path_cache)
