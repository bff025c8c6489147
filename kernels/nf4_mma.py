"""The tensor-core decode kernel (path "mma"): y = x @ W.T (+ bias) for 1 <= M <= 16 rows of bf16/fp16 x,
reading the 4-bit weight directly, with the looked-up weight fed to `mma.sync` straight from registers.

Why: at M <= 16 the matmul is bound by the weight stream, and the CUDA-core GEMVs (`_nf4_gemv_w_kernel`,
`_nf4_gemv_wm_kernel`) spend per code a table lookup, a widening to float32 and an FMA per row of x: past
4 rows the FMAs cost more than the stream. Here each 32-bit word of 8 codes is looked up once into 4 packed
16-bit pairs (the register table of `kernels/_common.py`, 2 byte permutes per code, no widening) that are
the A operand of `mma.m16n8k16` as they are: the tensor core does every multiply and add, for 1 row of x or
16 (two mma per A fragment past 8 rows), at the same cost per weight byte.

Layout: every tensor in the loop is one-dimensional over the program's 32 * NW threads, one element per
thread (`max_contiguous(..., 1)` keeps Triton from vectorizing a load into another layout), so element e
is lane e % 32 of warp e // 32 and the inline-PTX `mma.sync` sees the fragments where the ISA puts them.
Lane (g, q) = (lane // 4, lane % 4) of a warp, for one "unit" of 64 codes of a row (8 words; one 4-bit block
or part of one, so that one scale covers the unit):
- A (16 rows of W: n0 + g and n0 + g + 8): the lane reads words 2q, 2q + 1 of the unit of both its rows (one
  64-bit load each): 16 codes, physical columns 16q .. 16q + 15 of the unit. mma j (0..3) takes codes
  4j .. 4j + 3 of them as its k = 2q, 2q+1 (a0 / a1) and 2q+8, 2q+9 (a2 / a3): the unit's 64 columns are
  permuted inside the mma, and x is read in the same permutation, so the dot product is unchanged.
- B (8 rows of x: row g, or 8 + g for the second mma): the same 16 columns 16q .. 16q + 15 of row g of x, as 8
  32-bit words (bf16 pairs, even column in the low half, as the A pairs): mma j takes words 2j, 2j + 1.
- D: lane (g, q) ends with y[row 2q and 2q + 1 of x] for rows n0 + g (d0, d1) and n0 + g + 8 (d2, d3) of W.
The 4 mma of a unit start from zero and the unit's float32 sum is multiplied by the block's scale once
(absmax, or the double-quantized one), so the scale is exact: only the table values are rounded, to
bfloat16 for bf16 x (as bitsandbytes' bf16 dequantize rounds value * absmax) or float16 for fp16 x.
Warps of a program take interleaved units of the same rows; their sums are added at the end; SPLIT_K > 1
adds programs' slices into a zeroed float32 y.
LUT 1 (opt-in, `config=dict(LUT=1)`; not among the dispatcher's candidates until it has been timed and checked on
a GPU): the lookup reads a 32 KB per-lane copy of the 256-entry byte -> pair table in shared memory, one
ld.shared per byte instead of 4 prmt per 2 bytes: the loop drops from 236 to 175 SASS instructions a step and
from ~160 to ~45 on the integer pipe (offline sm_90 compile), which moves the bound from the lookup to the
memory stream. The table is declared inside an inline-PTX block (ptxas counts it as static shared memory, beside
Triton's dynamic one) and filled by each program before its loop. The pairs are the register table's, so its
output is bit-equal to LUT 0's (tests/kernels/test_cuda.py::test_mma_shared_table).
Off the GPU (TRITON_INTERPRET=1) the lookup reads the rounded float32 table and the mma is computed by the
same formula over the same lanes (the fragments regrouped by reshape), so the index mapping is tested on
the CPU; only the inline-PTX blocks (lookup, mma, the shared table) are GPU-only.
"""
import functools

import torch
import triton
import triton.language as tl

from ._common import (Launch, WeightPlan, check_word_path, half_table_on, interpreting, mma_pair_table_on, mul_rn, scale_args, sm_count, use_ptx,
                      word_table, word_table_on, word_values, xpair)

MMA_MAX_M = 16
UNIT = 64  # codes of one row per unit (one mma chain, one scale): K and the blocksize must be multiples of it
_LAST = {}  # the last compiled kernel (benchmarks/diag inspect its registers and IR)


def _pairs_asm() -> str:
    """PTX: one word of 8 codes ($4; byte i holds columns 2i (high nibble) and 2i + 1) -> 4 packed 16-bit
    pairs ($0..$3 = columns (0, 1), (2, 3), (4, 5), (6, 7), the even column in the low half), through the
    register table $5..$12 (low bytes L[0..15], high bytes H[0..15], 4 entries a register) and $13 =
    0x44444444. Per 4 codes: 2 prmt look L[c & 7] up among entries 0-7 and 8-15, a third keeps the one bit 3
    asks for (selector t), the same for H, and 2 prmt pair (L, H) bytes into 16-bit values."""
    def four(c, t, o0, o1):
        return (f"prmt.b32 a0, $5, $6, {c};\n prmt.b32 a1, $7, $8, {c};\n prmt.b32 lb, a0, a1, {t};\n"
                f"prmt.b32 a0, $9, $10, {c};\n prmt.b32 a1, $11, $12, {c};\n prmt.b32 hb, a0, a1, {t};\n"
                # lb / hb bytes 0..3 hold codes 1, 0, 3, 2 (selector nibble order): pairs (0, 1) and (2, 3)
                f"prmt.b32 ${o0}, lb, hb, 0x4051;\n prmt.b32 ${o1}, lb, hb, 0x6273;\n")

    # the right shifts as mul.hi (IMAD.HI, the FMA pipe): the integer pipe has the permutes to do
    return ("{\n .reg .b32 c, t, c2, t2, a0, a1, lb, hb;\n"
            "and.b32 c, $4, 0x77777777;\n mul.hi.u32 t, $4, 0x80000000;\n and.b32 t, t, $13;\n"
            "or.b32 t, t, 0x32103210;\n mul.hi.u32 c2, c, 0x10000;\n mul.hi.u32 t2, t, 0x10000;\n" +
            four("c", "t", 0, 1) + four("c2", "t2", 2, 3) + "}")


def _unit_mma_asm(ab: str) -> str:
    """PTX: the 4 chained mma.m16n8k16 of one unit from zero. $0..$3: d0..d3 (float32); $4..$11: the lane's
    8 pairs of row g (columns 16q + 0..15); $12..$19: the same of row g + 8; $20..$27: its 8 words of x."""
    lines = []
    for j in range(4):
        a = f"{{${4 + 2 * j}, ${12 + 2 * j}, ${5 + 2 * j}, ${13 + 2 * j}}}"
        c = "{z, z, z, z}" if j == 0 else "{$0, $1, $2, $3}"
        lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.{ab}.{ab}.f32 {{$0, $1, $2, $3}}, {a}, "
                     f"{{${20 + 2 * j}, ${21 + 2 * j}}}, {c};\n")
    return "{\n .reg .f32 z;\n mov.f32 z, 0f00000000;\n" + "".join(lines) + "}"


# LUT = 1: the 256 byte -> pair table in shared memory, one copy per lane (bank), so that a warp's 32 lookups never
# conflict: 256 x 32 x 4 bytes = 32 KB, declared by this block (function scope; ptxas counts it as static shared
# memory) and filled by every program at its start, word i = entry i / 32, copy i % 32: thread t ($1) writes
# words t, t + T ($3), ... from the 256 pairs at $2, in a loop that ptxas must not unroll (unrolled, its hoisted
# loads took 168-254 registers at 1-2 warps); then every thread waits; $0: the table's address.
SMEM_INIT: tl.constexpr = tl.constexpr(
    ".shared .align 16 .b32 nf4_mma_lut[8192];\n"
    "{\n .reg .b32 i, b, v, a;\n .reg .b64 p;\n .reg .pred q;\n"
    " mov.u32 i, $1;\n"
    "NF4_MMA_LUT_FILL:\n"
    " .pragma \"nounroll\";\n"
    " shr.u32 b, i, 5;\n mul.wide.u32 p, b, 4;\n add.s64 p, p, $2;\n ld.global.nc.b32 v, [p];\n"
    " mov.u32 a, nf4_mma_lut;\n mad.lo.u32 a, i, 4, a;\n st.shared.b32 [a], v;\n"
    " add.u32 i, i, $3;\n setp.lt.u32 q, i, 8192;\n @q bra NF4_MMA_LUT_FILL;\n"
    " bar.sync 0;\n mov.u32 $0, nf4_mma_lut;\n}")
# one word -> its 4 pairs: byte i's address is table + (byte * 32 + lane) * 4 ($5: table + lane * 4)
SMEM_PAIRS: tl.constexpr = tl.constexpr(
    "{\n .reg .b32 t0, t1, t2, t3;\n"
    " and.b32 t0, $4, 255;\n bfe.u32 t1, $4, 8, 8;\n bfe.u32 t2, $4, 16, 8;\n shr.u32 t3, $4, 24;\n"
    " mad.lo.u32 t0, t0, 128, $5;\n mad.lo.u32 t1, t1, 128, $5;\n mad.lo.u32 t2, t2, 128, $5;\n"
    " mad.lo.u32 t3, t3, 128, $5;\n"
    " ld.shared.b32 $0, [t0];\n ld.shared.b32 $1, [t1];\n ld.shared.b32 $2, [t2];\n ld.shared.b32 $3, [t3];\n}")
PAIRS: tl.constexpr = tl.constexpr(_pairs_asm())
MMA_BF16: tl.constexpr = tl.constexpr(_unit_mma_asm("bf16"))
MMA_F16: tl.constexpr = tl.constexpr(_unit_mma_asm("f16"))


@triton.jit
def _pairs(word, tw, table_ptr, USE_PTX: tl.constexpr, LUT: tl.constexpr):
    """A word's 8 codes as the mma's A operand: 4 int32 pairs (GPU) or their 8 float32 values (interpreter).
    tw: the register table (LUT 0) or (this lane's base address in the shared table,) (LUT 1)."""
    if USE_PTX:
        if LUT == 1:
            return tl.inline_asm_elementwise(SMEM_PAIRS, "=r,=r,=r,=r,r,r", [word, tw[0]],
                                             dtype=(tl.int32,) * 4, is_pure=False, pack=1)
        else:
            return tl.inline_asm_elementwise(PAIRS, "=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r",
                                             [word, tw[0], tw[1], tw[2], tw[3], tw[4], tw[5], tw[6], tw[7], tw[8]],
                                             dtype=(tl.int32,) * 4, is_pure=True, pack=1)
    else:
        return word_values(word, tw, table_ptr, False)


@triton.jit
def _smem_table(pair_ptr, e, lane, T: tl.constexpr):
    """LUT 1: declare and fill the shared table, wait for every thread (one inline-PTX block, `SMEM_INIT`), and
    return (this lane's base address,) for `_pairs`."""
    tb = tl.inline_asm_elementwise(SMEM_INIT, "=r,r,l,r", [e, pair_ptr + e * 0, e * 0 + T], dtype=tl.int32,
                                   is_pure=False, pack=1)
    return (tb + lane * 4,)


@triton.jit
def _join16(v):
    """16 tensors [T] -> [T, 16] (v[i] at column i)."""
    a = tl.join(tl.join(tl.join(v[0], v[1]), tl.join(v[2], v[3])), tl.join(tl.join(v[4], v[5]), tl.join(v[6], v[7])))
    b = tl.join(tl.join(tl.join(v[8], v[9]), tl.join(v[10], v[11])),
                tl.join(tl.join(v[12], v[13]), tl.join(v[14], v[15])))
    return tl.reshape(tl.join(a, b), (v[0].shape[0], 16))


@triton.jit
def _emulated_mma(va, vb, x, NW: tl.constexpr, XF16: tl.constexpr):
    """What the 4 mma of a unit compute, from the lanes' values (interpreter): D[i][n] = sum over the unit's
    64 columns of W row i (lanes (i, q) of va, or (i - 8, q) of vb) times x row n (lanes (n, q)); lane (g, q)
    gets D[g][2q], D[g][2q+1], D[g+8][2q], D[g+8][2q+1]."""
    xe0, xo0 = xpair(x[0], XF16)
    xe1, xo1 = xpair(x[1], XF16)
    xe2, xo2 = xpair(x[2], XF16)
    xe3, xo3 = xpair(x[3], XF16)
    xe4, xo4 = xpair(x[4], XF16)
    xe5, xo5 = xpair(x[5], XF16)
    xe6, xo6 = xpair(x[6], XF16)
    xe7, xo7 = xpair(x[7], XF16)
    xs = tl.reshape(_join16((xe0, xo0, xe1, xo1, xe2, xo2, xe3, xo3, xe4, xo4, xe5, xo5, xe6, xo6, xe7, xo7)),
                    (NW, 8, 64))
    wa = tl.reshape(_join16(va), (NW, 8, 64))
    wb = tl.reshape(_join16(vb), (NW, 8, 64))
    da = tl.reshape(tl.sum(wa[:, :, None, :] * xs[:, None, :, :], axis=3), (NW, 8, 4, 2))
    db = tl.reshape(tl.sum(wb[:, :, None, :] * xs[:, None, :, :], axis=3), (NW, 8, 4, 2))
    d0, d1 = tl.split(da)
    d2, d3 = tl.split(db)
    T: tl.constexpr = 32 * NW
    return tl.reshape(d0, (T,)), tl.reshape(d1, (T,)), tl.reshape(d2, (T,)), tl.reshape(d3, (T,))


@triton.jit
def _unit_mma(pa0, pa1, pb0, pb1, x, NW: tl.constexpr, USE_PTX: tl.constexpr, XF16: tl.constexpr):
    """The unit's dot products: (pairs / values of words 0 and 1 of row a, the same of row b, x's 8 words)
    -> d0..d3 (float32, before the scale)."""
    if USE_PTX:
        args = [pa0[0], pa0[1], pa0[2], pa0[3], pa1[0], pa1[1], pa1[2], pa1[3],
                pb0[0], pb0[1], pb0[2], pb0[3], pb1[0], pb1[1], pb1[2], pb1[3],
                x[0], x[1], x[2], x[3], x[4], x[5], x[6], x[7]]
        if XF16:
            return tl.inline_asm_elementwise(MMA_F16, "=r,=r,=r,=r" + ",r" * 24, args,
                                             dtype=(tl.float32,) * 4, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(MMA_BF16, "=r,=r,=r,=r" + ",r" * 24, args,
                                             dtype=(tl.float32,) * 4, is_pure=True, pack=1)
    else:
        va = (pa0[0], pa0[1], pa0[2], pa0[3], pa0[4], pa0[5], pa0[6], pa0[7],
              pa1[0], pa1[1], pa1[2], pa1[3], pa1[4], pa1[5], pa1[6], pa1[7])
        vb = (pb0[0], pb0[1], pb0[2], pb0[3], pb0[4], pb0[5], pb0[6], pb0[7],
              pb1[0], pb1[1], pb1[2], pb1[3], pb1[4], pb1[5], pb1[6], pb1[7])
        return _emulated_mma(va, vb, x, NW, XF16)


@triton.jit
def _fetch_scale(b, absmax_ptr, q_ptr, absmax2_ptr, DOUBLE_QUANT: tl.constexpr):
    """The loads behind block b's scale: absmax, or the 8-bit code and absmax2 (the code's table lookup waits
    for `_scale_of`, so that a prefetch never stalls on it)."""
    if DOUBLE_QUANT:
        return tl.load(q_ptr + b).to(tl.int32), tl.load(absmax2_ptr + b // 256)
    else:
        return tl.load(absmax_ptr + b), 0.0


@triton.jit
def _scale_of(e, f, code8_ptr, offset, DOUBLE_QUANT: tl.constexpr, USE_PTX: tl.constexpr):
    if DOUBLE_QUANT:
        return mul_rn(tl.load(code8_ptr + e), f, USE_PTX) + offset
    else:
        return e


@triton.jit
def _words(w64_ptr, row, KU, uc, q):
    """The lane's two words (columns 16q .. 16q + 15 of unit uc) of one row: one 64-bit load."""
    v = tl.load(w64_ptr + row * (KU * 4) + uc * 4 + q)
    return v.to(tl.int32), (v >> 32).to(tl.int32)


@triton.jit
def _xwords(x64_ptr, xrow, uc, ok):
    """The lane's 8 words of x (columns 16q .. 16q + 15 of unit uc, one row): four 64-bit loads, zero where
    not ok (rows of x past M, units past the slice)."""
    p = x64_ptr + xrow + uc * 16
    v0 = tl.load(p, mask=ok, other=0)
    v1 = tl.load(p + 1, mask=ok, other=0)
    v2 = tl.load(p + 2, mask=ok, other=0)
    v3 = tl.load(p + 3, mask=ok, other=0)
    return (v0.to(tl.int32), (v0 >> 32).to(tl.int32), v1.to(tl.int32), (v1 >> 32).to(tl.int32),
            v2.to(tl.int32), (v2 >> 32).to(tl.int32), v3.to(tl.int32), (v3 >> 32).to(tl.int32))


@triton.jit
def _tile_fetch(packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, ra, rb, KU, KB, uc, q, UPB: tl.constexpr,
                DOUBLE_QUANT: tl.constexpr):
    """One tile's loads for unit uc: rows ra and rb, 2 words each, and their scales' loads."""
    wa0, wa1 = _words(packed_ptr, ra, KU, uc, q)
    wb0, wb1 = _words(packed_ptr, rb, KU, uc, q)
    ea, fa = _fetch_scale(ra * KB + uc // UPB, absmax_ptr, q_ptr, absmax2_ptr, DOUBLE_QUANT)
    eb, fb = _fetch_scale(rb * KB + uc // UPB, absmax_ptr, q_ptr, absmax2_ptr, DOUBLE_QUANT)
    return wa0, wa1, wb0, wb1, ea, fa, eb, fb


@triton.jit
def _step_fetch(x_ptr, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, u, u_hi, KU, KB, q, rows, xo0, xo1, xok0, xok1,
                UPB: tl.constexpr, RT: tl.constexpr, MX: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """Every load of one step at units u (per warp): x's words (1 or 2 groups of 8 rows) and each tile's
    `_tile_fetch`. Units past the slice re-read its last one and meet a zero x; absent groups / tiles repeat
    the first (never loaded twice, never used)."""
    um = u < u_hi
    uc = tl.minimum(u, u_hi - 1)
    x0 = _xwords(x_ptr, xo0, uc, um & xok0)
    x1 = x0
    if MX > 8:
        x1 = _xwords(x_ptr, xo1, uc, um & xok1)
    t0 = _tile_fetch(packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, rows[0], rows[1], KU, KB, uc, q, UPB, DOUBLE_QUANT)
    t1 = t0
    if RT > 1:
        t1 = _tile_fetch(packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, rows[2], rows[3], KU, KB, uc, q, UPB,
                         DOUBLE_QUANT)
    return x0, x1, t0, t1


@triton.jit
def _tile_math(t, x0, x1, c0, c1, tw, table_ptr, code8_ptr, offset, NW: tl.constexpr, MX: tl.constexpr,
               DOUBLE_QUANT: tl.constexpr, USE_PTX: tl.constexpr, XF16: tl.constexpr, LUT: tl.constexpr):
    """One tile's unit: look its 4 words up once, mma against each group of 8 rows of x, scale, accumulate
    (c0, c1: the groups' 4 accumulators)."""
    sa = _scale_of(t[4], t[5], code8_ptr, offset, DOUBLE_QUANT, USE_PTX)
    sb = _scale_of(t[6], t[7], code8_ptr, offset, DOUBLE_QUANT, USE_PTX)
    pa0 = _pairs(t[0], tw, table_ptr, USE_PTX, LUT)
    pa1 = _pairs(t[1], tw, table_ptr, USE_PTX, LUT)
    pb0 = _pairs(t[2], tw, table_ptr, USE_PTX, LUT)
    pb1 = _pairs(t[3], tw, table_ptr, USE_PTX, LUT)
    d = _unit_mma(pa0, pa1, pb0, pb1, x0, NW, USE_PTX, XF16)
    c0 = (c0[0] + d[0] * sa, c0[1] + d[1] * sa, c0[2] + d[2] * sb, c0[3] + d[3] * sb)
    if MX > 8:
        d = _unit_mma(pa0, pa1, pb0, pb1, x1, NW, USE_PTX, XF16)
        c1 = (c1[0] + d[0] * sa, c1[1] + d[1] * sa, c1[2] + d[2] * sb, c1[3] + d[3] * sb)
    return c0, c1


@triton.jit
def _warp_sum(acc, NW: tl.constexpr):
    """Add the warps' accumulators: [32 * NW] -> [32] (lane order)."""
    if NW == 1:
        return acc
    else:
        return tl.sum(tl.reshape(acc, (NW, 32)), axis=0)


@triton.jit
def _store(acc, n, m, N, M, pid_k, bias_ptr, y_ptr, NW: tl.constexpr, HAS_BIAS: tl.constexpr,
           ATOMIC: tl.constexpr):
    """y[m, n] (+ bias[n] once) for one accumulator: rows n of W, rows m of x, one per lane [32]."""
    v = _warp_sum(acc, NW)
    ok = (n < N) & (m < M)
    if HAS_BIAS:
        if pid_k == 0:
            v += tl.load(bias_ptr + n, mask=ok, other=0.0).to(tl.float32)
    if ATOMIC:
        tl.atomic_add(y_ptr + m * N + n, v, mask=ok)
    else:
        tl.store(y_ptr + m * N + n, v.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _store_tile(c, n, m, N, M, pid_k, bias_ptr, y_ptr, NW: tl.constexpr, HAS_BIAS: tl.constexpr,
                ATOMIC: tl.constexpr):
    """A tile's 4 accumulators: rows n, n + 8 of W and m, m + 1 of x."""
    _store(c[0], n, m, N, M, pid_k, bias_ptr, y_ptr, NW, HAS_BIAS, ATOMIC)
    _store(c[1], n, m + 1, N, M, pid_k, bias_ptr, y_ptr, NW, HAS_BIAS, ATOMIC)
    _store(c[2], n + 8, m, N, M, pid_k, bias_ptr, y_ptr, NW, HAS_BIAS, ATOMIC)
    _store(c[3], n + 8, m + 1, N, M, pid_k, bias_ptr, y_ptr, NW, HAS_BIAS, ATOMIC)


@triton.jit
def _mma_tile(n0, x_ptr, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, table_ptr, bias_ptr, y_ptr,
              M, N, KU, KB, u_lo, u_hi, pid_k, offset, tw, warp, g, q, UPB: tl.constexpr, T: tl.constexpr,
              DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PTX: tl.constexpr, NW: tl.constexpr,
              RT: tl.constexpr, MX: tl.constexpr, PREFETCH: tl.constexpr, ATOMIC: tl.constexpr, XF16: tl.constexpr,
              LUT: tl.constexpr):
    """The RT tiles of 16 rows of W from row n0, over units u_lo .. u_hi of K: load, look up, mma, store."""
    # rows of W (rows past N re-read row N - 1): tile 0 rows g, g + 8; tile 1 rows 16 + g, 24 + g
    rows = (tl.minimum(n0 + g, N - 1), tl.minimum(n0 + 8 + g, N - 1),
            tl.minimum(n0 + 16 + g, N - 1), tl.minimum(n0 + 24 + g, N - 1))
    XS = KU * 16                                                           # int64 words per row of x
    xo0 = tl.minimum(g, M - 1) * XS + 4 * q                                # x rows g (group 0), g + 8 (group 1)
    xo1 = tl.minimum(g + 8, M - 1) * XS + 4 * q
    xok0 = g < M
    xok1 = g + 8 < M
    z = tl.zeros((T,), dtype=tl.float32)
    c00 = (z, z, z, z)                                                     # c<tile><group of x rows>
    c01, c10, c11 = c00, c00, c00
    if PREFETCH:
        nxt = _step_fetch(x_ptr, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, u_lo + warp, u_hi, KU, KB, q, rows,
                          xo0, xo1, xok0, xok1, UPB, RT, MX, DOUBLE_QUANT)
    for u0 in range(u_lo, u_hi, NW):
        if PREFETCH:
            x0, x1, t0, t1 = nxt
            nxt = _step_fetch(x_ptr, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, u0 + NW + warp, u_hi, KU, KB, q,
                              rows, xo0, xo1, xok0, xok1, UPB, RT, MX, DOUBLE_QUANT)
        else:
            x0, x1, t0, t1 = _step_fetch(x_ptr, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, u0 + warp, u_hi, KU, KB,
                                         q, rows, xo0, xo1, xok0, xok1, UPB, RT, MX, DOUBLE_QUANT)
        c00, c01 = _tile_math(t0, x0, x1, c00, c01, tw, table_ptr, code8_ptr, offset, NW, MX, DOUBLE_QUANT,
                              USE_PTX, XF16, LUT)
        if RT > 1:
            c10, c11 = _tile_math(t1, x0, x1, c10, c11, tw, table_ptr, code8_ptr, offset, NW, MX, DOUBLE_QUANT,
                                  USE_PTX, XF16, LUT)
    # lane (g, q) holds y for rows 2q, 2q + 1 of x (+ 8 in group 1) and rows n0 + g, n0 + g + 8 of W (+ 16)
    l32 = tl.arange(0, 32)
    m0 = 2 * (l32 % 4)
    ng = n0 + l32 // 4
    _store_tile(c00, ng, m0, N, M, pid_k, bias_ptr, y_ptr, NW, HAS_BIAS, ATOMIC)
    if MX > 8:
        _store_tile(c01, ng, m0 + 8, N, M, pid_k, bias_ptr, y_ptr, NW, HAS_BIAS, ATOMIC)
    if RT > 1:
        _store_tile(c10, ng + 16, m0, N, M, pid_k, bias_ptr, y_ptr, NW, HAS_BIAS, ATOMIC)
        if MX > 8:
            _store_tile(c11, ng + 16, m0 + 8, N, M, pid_k, bias_ptr, y_ptr, NW, HAS_BIAS, ATOMIC)


@triton.jit
def _nf4_mma_kernel(
    # pointers: x and the packed weight viewed as int64 (pairs of 32-bit words)
    x_ptr, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr, table_ptr, tw_ptr, pair_ptr, bias_ptr,
    y_ptr,
    # sizes: M rows of x, N rows of W, KU = K / 64 units per row
    M, N, KU, SPLIT_K,
    # constexpr
    BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PTX: tl.constexpr,
    NW: tl.constexpr, RT: tl.constexpr, MX: tl.constexpr, PREFETCH: tl.constexpr, ATOMIC: tl.constexpr,
    XF16: tl.constexpr, LUT: tl.constexpr, PERSIST: tl.constexpr,
):
    """Y[m, n] = sum_k x[m, k] W[n, k] (+ bias[n]), M <= MX (8 or 16): a program takes RT tiles of 16 rows of W
    (RT 1 or 2) and a slice of K; its NW warps take interleaved units. PREFETCH issues step i + 1's loads
    before step i's arithmetic (the loads of a step are otherwise all a warp has in flight). LUT 0 looks codes up
    in the register table (`prmt`), LUT 1 in a 32 KB shared table (pair_ptr: its 256 entries; 1 load per byte
    instead of 4 `prmt`). PERSIST: fewer programs than tiles, each taking tiles pid, pid + programs, ... (with
    LUT 1 the table is filled once a program instead of once a tile). See the module docstring."""
    T: tl.constexpr = 32 * NW
    UPB: tl.constexpr = BLOCKSIZE // 64                                   # units per 4-bit block
    e = tl.max_contiguous(tl.arange(0, T), 1)
    lane = e % 32
    warp = e // 32
    g = lane // 4
    q = lane % 4
    if LUT == 1 and USE_PTX:
        tw = _smem_table(pair_ptr, e, lane, T)
    else:
        tw = word_table(tw_ptr, lane)
    offset = tl.load(offset_ptr) if DOUBLE_QUANT else 0.0
    KB = KU // UPB
    pid_k = tl.program_id(1)
    per = tl.cdiv(tl.cdiv(KU, SPLIT_K), NW) * NW
    u_lo = pid_k * per
    u_hi = tl.minimum(u_lo + per, KU)
    if PERSIST:
        for tile in range(tl.program_id(0), tl.cdiv(N, 16 * RT), tl.num_programs(0)):
            _mma_tile(tile * (16 * RT), x_ptr, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, table_ptr,
                      bias_ptr, y_ptr, M, N, KU, KB, u_lo, u_hi, pid_k, offset, tw, warp, g, q, UPB, T, DOUBLE_QUANT,
                      HAS_BIAS, USE_PTX, NW, RT, MX, PREFETCH, ATOMIC, XF16, LUT)
    else:
        _mma_tile(tl.program_id(0) * (16 * RT), x_ptr, packed_ptr, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr,
                  table_ptr, bias_ptr, y_ptr, M, N, KU, KB, u_lo, u_hi, pid_k, offset, tw, warp, g, q, UPB, T,
                  DOUBLE_QUANT, HAS_BIAS, USE_PTX, NW, RT, MX, PREFETCH, ATOMIC, XF16, LUT)


# ---------------------------------------------------------------------------------------------------
# launcher
# ---------------------------------------------------------------------------------------------------
def mma_supported(M, K, blocksize, dtype) -> bool:
    """Whether the mma path takes this call (the dispatcher's test; the launcher raises with the reason)."""
    return 1 <= M <= MMA_MAX_M and K % UNIT == 0 and blocksize % UNIT == 0 and \
        dtype in (torch.bfloat16, torch.float16)


# measured best on an H200 (benchmarks/diag/mma_probe.py, CUDA-graph times): 2 tiles and 4 warps with the next
# step's loads in flight on most shapes; 1 tile and 8 warps at K = 28672; 1 tile, no prefetch at M = 1 with
# double quantization; 16 warps splitting K inside the program on the small weights (in place of split-K's
# zeroed float32 output, atomics and cast: 1 launch instead of 3). The dispatcher times all four per shape.
# "mma-smem": the shared-memory table (LUT 1), only where a program's rows are long enough to pay for filling its
# 32 KB: at 8192x28672, M = 1, 67 us against 79 for the best register-table config; on the 8192-4096-wide weights
# it lost by 5-40% (H200, benchmarks/results/diag/mma_probe-lut-NVIDIA_H200-9ad4242.json).
MMA_CANDIDATES = {"mma": dict(RT=2, NW=4, PREFETCH=True), "mma-rt1": dict(RT=1, NW=8, PREFETCH=True),
                  "mma-rt1-nw4": dict(RT=1, NW=4, PREFETCH=False), "mma-nw16": dict(RT=1, NW=16, PREFETCH=True),
                  "mma-smem": dict(RT=1, NW=8, PREFETCH=False, LUT=1)}
SMEM_MIN_K = 16384  # in_features from which "mma-smem" is a candidate


def mma_candidates(K: int) -> list:
    """Names of the MMA_CANDIDATES the dispatcher times for in_features K."""
    return [name for name in MMA_CANDIDATES if name != "mma-smem" or K >= SMEM_MIN_K]


@functools.lru_cache(maxsize=4096)
def mma_default(M, N, K, n_sm, base=None):
    """A config where none is given (GPU): `base` (a key of MMA_CANDIDATES, default "mma"), split K until the
    programs fill the GPU twice over while every warp keeps at least 4 units."""
    cfg = dict(MMA_CANDIDATES[base or "mma"], SPLIT_K=1)
    progs = triton.cdiv(N, 16 * cfg["RT"])
    ku = K // UNIT
    while progs * cfg["SPLIT_K"] < 2 * n_sm and ku // (cfg["SPLIT_K"] * 2) >= 4 * cfg["NW"]:
        cfg["SPLIT_K"] *= 2
    return cfg


class MmaPlan(WeightPlan):
    """Everything about an mma launch that depends only on the weight, M, dtype and config (weight-side
    arguments, constexprs, grid), built once per (weight, M, ...): decode calls each linear once per token."""
    __slots__ = ("wargs", "kw", "grid", "launcher")

    def __init__(self, x, qw, bias, config):
        M, K = x.shape
        N = qw.shape[0]
        self.n, self.k = N, K
        if not 1 <= M <= MMA_MAX_M:
            raise ValueError(f"nf4_matmul_fused: the mma path takes 1 to {MMA_MAX_M} rows, got {M}")
        packed = check_word_path("mma", x, qw, UNIT, 64)
        if config is None:
            config = dict(RT=1, NW=2, SPLIT_K=1) if interpreting() else \
                mma_default(M, N, K, sm_count(x.device))
        config = dict(config)
        unknown = set(config) - {"RT", "NW", "PREFETCH", "SPLIT_K", "LUT", "PERSIST"}
        if unknown:
            raise ValueError(f"nf4_matmul_fused: unknown mma config keys {sorted(unknown)} "
                             "(RT, NW, PREFETCH, SPLIT_K, LUT, PERSIST)")
        persist = config.pop("PERSIST", 0)
        if not isinstance(persist, int) or persist < 0:
            raise ValueError(f"nf4_matmul_fused: mma config PERSIST (programs per SM, 0 = one per tile) must be an "
                             f"int >= 0, got {persist!r}")
        config.setdefault("PREFETCH", False)
        config.setdefault("LUT", 0)
        for key, allowed in (("RT", (1, 2)), ("NW", (1, 2, 4, 8, 16)), ("PREFETCH", (False, True)),
                             ("LUT", (0, 1))):
            if config.setdefault(key, allowed[-1] if key == "RT" else 4) not in allowed:
                raise ValueError(f"nf4_matmul_fused: mma config {key} must be one of {allowed}, got {config[key]}")
        self.split_k = config.pop("SPLIT_K", 1)
        if self.split_k < 1:
            raise ValueError(f"nf4_matmul_fused: mma config SPLIT_K must be >= 1, got {self.split_k}")
        nw = config["NW"]
        a, q, a2, code8, offset, dq = scale_args(qw.absmax, qw.nested, x.device)
        xf16 = x.dtype == torch.float16
        self.bind(qw)
        self.wargs = (packed.view(torch.int64), a, q, a2, code8, offset,
                      half_table_on(qw.quant_type, x.device, bf16=not xf16),
                      word_table_on(qw.quant_type, x.device, bf16=not xf16),
                      mma_pair_table_on(qw.quant_type, x.device, bf16=not xf16))
        tiles = triton.cdiv(N, 16 * config["RT"])
        if persist:  # the interpreter counts one SM
            n_sm = sm_count(x.device) if x.is_cuda else 1
            programs = min(tiles, persist * n_sm)
        else:
            programs = tiles
        self.kw = dict(BLOCKSIZE=qw.blocksize, DOUBLE_QUANT=dq, HAS_BIAS=bias is not None, USE_PTX=use_ptx(x),
                       XF16=xf16, MX=8 if M <= 8 else 16, ATOMIC=self.split_k > 1, PERSIST=programs < tiles,
                       num_warps=nw, **config)
        self.grid = (programs, self.split_k)
        n_w = len(self.wargs)  # x, the weight-side arguments, bias, y, sizes: x, bias and y change per call
        self.launcher = Launch(_nf4_mma_kernel, self.grid, self.kw, varying=(0, n_w + 1, n_w + 2))

    def launch(self, x, bias):
        """y = x @ W.T (+ bias) with this plan: allocate y, launch, nothing else (the hot decode path)."""
        M = x.shape[0]
        x = x.contiguous()
        if x.data_ptr() % 8:  # read as 64-bit words
            x = x.clone()
        y = self.output(M, x)
        _LAST["compiled"] = self.launcher(x.view(torch.int64), *self.wargs, bias if bias is not None else x, y,
                                          M, self.n, self.k // UNIT, self.split_k)
        return y if y.dtype == x.dtype else y.to(x.dtype)
