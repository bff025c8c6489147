"""The kernels' inline-PTX blocks run on the CPU through a small PTX interpreter (tests/kernels/ptx_emu.py): the
very strings the GPU compiles, for a warp of 32 lanes in lockstep, against the tables and math they stand for.
This checks selectors, byte and register orders and the shared table's layout without a GPU (the GPU tests in
test_cuda.py check the compiled kernels)."""
import importlib
import random

import pytest
import torch

from kernels import _common as C

from .ptx_emu import Warp, bf16_to_f32, f16_to_f32

mma = importlib.import_module("kernels.nf4_mma")


def _words(n, seed):
    rnd = random.Random(seed)
    return [rnd.getrandbits(32) for _ in range(n)] + [0, 0xFFFFFFFF, 0x01234567, 0x89ABCDEF]


def _expected_pairs(word, pairs):
    """The 4 pairs of a word: byte i -> pairs[byte i] (columns 2i, 2i + 1, the even one in the low half)."""
    return [pairs[(word >> 8 * i) & 0xFF] & 0xFFFFFFFF for i in range(4)]


def _over_words(asm: str, n_out: int, words: list, regs: list, warp=None):
    """Run `asm` on a warp (a fresh one unless given) over `words`, 32 lanes at a time (the last chunk padded
    with zero words), the word in operand 0 and `regs` after it: yields (outputs, lane, word) for every lane."""
    assert words, "no words to check"
    warp = warp or Warp()
    for k in range(0, len(words), 32):
        chunk = (words[k:k + 32] + [0] * 32)[:32]
        out = warp.run(asm, n_out, [chunk] + regs)
        for lane, w in enumerate(chunk):
            yield out, lane, w


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("bf16", [True, False])
def test_register_table_pairs(quant_type, bf16):
    """The mma kernel's register-table lookup (`PAIRS`: prmt on the table's low / high bytes, then the pairing
    permutes) gives, for every byte of a word, the 16-bit values of its two codes, even column in the low half."""
    tw = [int(v) & 0xFFFFFFFF for v in C.word_table_on(quant_type, "cpu", bf16=bf16)[:9]]
    pairs = [int(v) for v in C.mma_pair_table_on(quant_type, "cpu", bf16=bf16)]
    for out, lane, w in _over_words(mma.PAIRS.value, 4, _words(60, 1), tw):
        assert [out[j][lane] for j in range(4)] == _expected_pairs(w, pairs), hex(w)


@pytest.mark.parametrize("nw", [1, 4, 16])
@pytest.mark.parametrize("bf16", [True, False])
def test_shared_table_fill_and_lookup(nw, bf16):
    """LUT 1: `SMEM_INIT` run by every warp of a program of nw warps fills word i of the 32 KB table with entry
    i // 32 (copy i % 32, lane i % 32's bank) exactly once; `SMEM_PAIRS` at lane l's base then returns the same
    pairs as the register table, for every byte."""
    pairs = [int(v) & 0xFFFFFFFF for v in C.mma_pair_table_on("nf4", "cpu", bf16=bf16)]
    warp = Warp()
    gbase = 0x10000
    for e, v in enumerate(pairs):
        warp.glob[gbase + 4 * e] = v
    T = 32 * nw
    table = None
    for w in range(nw):
        (tb,) = warp.run(mma.SMEM_INIT.value, 1, [[w * 32 + lane for lane in range(32)], gbase, T])
        assert len(set(tb)) == 1
        table = tb[0]
    assert len(warp.shared) == 8192
    for i in range(8192):
        assert warp.shared[table + 4 * i] == pairs[i // 32], i
    addr = [[table + 4 * lane for lane in range(32)]]
    for out, lane, w in _over_words(mma.SMEM_PAIRS.value, 4, _words(60, 2), addr, warp):
        assert [out[j][lane] for j in range(4)] == _expected_pairs(w, pairs), hex(w)


@pytest.mark.parametrize("bf16", [True, False])
def test_unit_mma(bf16):
    """`MMA_BF16` / `MMA_F16` (4 chained mma.m16n8k16 from zero) with the kernel's lane mapping: lane (g, q) holds
    pairs of columns 16q .. 16q + 15 of rows g and g + 8 of W and the same columns of row g of x; lane (g, q) gets
    y[x row 2q, 2q + 1] of W rows g, g + 8 = the unit's 64-column dot products."""
    torch.manual_seed(3)
    dt = torch.bfloat16 if bf16 else torch.float16
    W = torch.randn(16, 64).to(dt)
    X = torch.randn(8, 64).to(dt)
    bits = lambda t: t.view(torch.int16).to(torch.int64) & 0xFFFF  # noqa: E731
    Wb, Xb = bits(W), bits(X)

    def pair(row_bits, c):  # columns c, c + 1 -> one 32-bit register, c in the low half
        return int(row_bits[c]) | int(row_bits[c + 1]) << 16

    ins = [[0] * 32 for _ in range(24)]
    for lane in range(32):
        g, q = lane // 4, lane % 4
        for j in range(8):  # the lane's 8 pairs of row g, then of row g + 8, then x row g
            ins[j][lane] = pair(Wb[g], 16 * q + 2 * j)
            ins[8 + j][lane] = pair(Wb[g + 8], 16 * q + 2 * j)
            ins[16 + j][lane] = pair(Xb[g], 16 * q + 2 * j)
    asm = mma.MMA_BF16.value if bf16 else mma.MMA_F16.value
    out = Warp().run(asm, 4, ins)
    ref = W.double() @ X.double().T                                    # (16 rows of W, 8 rows of x)
    conv = bf16_to_f32 if bf16 else f16_to_f32
    assert conv(int(Wb[0, 0])) == float(W[0, 0])
    for lane in range(32):
        g, q = lane // 4, lane % 4
        got = [out[k][lane] for k in range(4)]
        want = [ref[g, 2 * q], ref[g, 2 * q + 1], ref[g + 8, 2 * q], ref[g + 8, 2 * q + 1]]
        assert all(abs(a - float(b)) < 1e-9 * max(1.0, abs(float(b))) for a, b in zip(got, want)), (lane, got, want)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_word_lookup(quant_type):
    """The word GEMV's lookup (`WORD_LOOKUP`: a word's 8 codes -> their float16-rounded values as float32, columns
    0..7, from the register table in operands $9..$17)."""
    tw = [int(v) & 0xFFFFFFFF for v in C.word_table_on(quant_type, "cpu")[:9]]
    half = [float(v) for v in C.half_table_on(quant_type, "cpu")]
    for out, lane, w in _over_words(C.WORD_LOOKUP.value, 8, _words(60, 4), tw):
        codes = [(w >> 8 * (c // 2) + (0 if c % 2 else 4)) & 15 for c in range(8)]   # column c's code
        assert [out[c][lane] for c in range(8)] == [half[x] for x in codes], hex(w)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_byte_lookup(quant_type):
    """The v2 GEMV / swap kernel's lookup (`PRMT_NF4` / `PRMT_FP4`, table in immediates): 4 packed bytes -> the
    float16 values of their high nibbles ($0: bytes 0, 1; $1: bytes 2, 3) and low nibbles ($2, $3)."""
    asm = (C.PRMT_NF4 if quant_type == "nf4" else C.PRMT_FP4).value
    half = torch.tensor([float(v) for v in C.half_table_on(quant_type, "cpu")]).half().view(torch.int16)
    h = [int(v) & 0xFFFF for v in half]
    for out, lane, w in _over_words(asm, 4, _words(60, 5), []):
        b = [(w >> 8 * i) & 0xFF for i in range(4)]
        want = [h[b[0] >> 4] | h[b[1] >> 4] << 16, h[b[2] >> 4] | h[b[3] >> 4] << 16,
                h[b[0] & 15] | h[b[1] & 15] << 16, h[b[2] & 15] | h[b[3] & 15] << 16]
        assert [out[j][lane] for j in range(4)] == want, hex(w)
