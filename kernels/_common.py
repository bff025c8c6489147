"""Pieces shared by the NF4 kernels: when to use inline PTX, the small tables every kernel reads, and
the @triton.jit helpers that turn packed bytes and (double-quantized) scales into values.

Exactness notes (see ../shared/NUMERICS.md and nf4/blockwise.py):
- bitsandbytes computes 1/absmax with the approximate `rcp.approx.ftz.f32` (it is built with fast math).
  On a GPU we emit that instruction; the interpreter (TRITON_INTERPRET=1) cannot run inline PTX, so its
  launchers pass the reciprocal precomputed by `nf4.blockwise.reciprocal_f32` (same bits).
- The double-quant restore `map[q] * absmax2 + offset` must round twice. `mul.rn.f32` in PTX is never
  contracted into an FMA; in the interpreter numpy rounds every operation anyway.
"""
import functools
import os
import weakref

import torch
import triton
import triton.language as tl

from nf4.tables import code_table, fp4_thresholds, nf4_thresholds

FLT_MIN = 1.1754943508222875e-38
FLT_MAX = 3.4028234663852886e38


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_ptx(t: torch.Tensor) -> bool:
    """Inline PTX is available: a CUDA tensor and a real compiler (not the interpreter)."""
    return t.is_cuda and not interpreting()


def check_triton_device(t: torch.Tensor, what: str) -> None:
    if not (t.is_cuda or interpreting()):
        raise ValueError(f"{what}: Triton kernels need a CUDA tensor (or TRITON_INTERPRET=1), got device {t.device}")


def check_word_path(path: str, x: torch.Tensor, qw, unit: int, word_bits: int) -> torch.Tensor:
    """The checks of the kernels that read the packed weight as words (gemv3: 32-bit, mma: 64-bit): bf16 / fp16 x,
    in_features and blocksize multiples of `unit`, the storage aligned to a word. Returns the packed codes, flat."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"nf4_matmul_fused: the {path} path takes bfloat16 or float16 input, got {x.dtype}")
    K = x.shape[1]
    if K % unit or qw.blocksize % unit:
        raise ValueError(f"nf4_matmul_fused: the {path} path needs in_features and blocksize divisible by {unit}, "
                         f"got {K} and {qw.blocksize}")
    packed = qw.packed.reshape(-1)
    if packed.data_ptr() % (word_bits // 8):
        raise ValueError(f"nf4_matmul_fused: the {path} path reads the packed weight as {word_bits}-bit words; its "
                         f"storage is not {word_bits // 8}-byte aligned")
    return packed


@functools.lru_cache(maxsize=None)
def _tables(quant_type: str, device: str):
    dev = torch.device(device)
    table = code_table(quant_type, dev).contiguous()  # (16,) float32
    thresholds = (nf4_thresholds(dev) if quant_type == "nf4" else fp4_thresholds(dev)).contiguous()
    return table, thresholds


def code_table_on(quant_type: str, device: torch.device) -> torch.Tensor:
    """The 16-entry float32 code table on `device` (cached)."""
    return _tables(quant_type, str(device))[0]


@functools.lru_cache(maxsize=None)
def _pair_tables(quant_type: str, device: str):
    table = code_table(quant_type, torch.device("cpu")).float()
    b = torch.arange(256)
    pairs = torch.stack([table[b >> 4], table[b & 15]], dim=1).contiguous()   # (256, 2): byte -> (even, odd)
    f32 = pairs.view(torch.int64).reshape(256).to(device)                     # low word = even element
    f16 = pairs.half().contiguous().view(torch.int32).reshape(256).to(device)  # low half = even element
    return f32, f16


@functools.lru_cache(maxsize=None)
def _mma_pair_tables(quant_type: str, device: str, bf16: bool):
    table = code_table(quant_type, torch.device("cpu")).to(torch.bfloat16 if bf16 else torch.float16)
    b = torch.arange(256)
    pairs = torch.stack([table[b >> 4], table[b & 15]], dim=1).contiguous()   # (256, 2): byte -> (even, odd)
    return pairs.view(torch.int32).reshape(256).to(device)                     # low half = even element


def mma_pair_table_on(quant_type: str, device: torch.device, bf16: bool = False) -> torch.Tensor:
    """The 256-entry byte -> (value of the high nibble, value of the low nibble) table as packed 16-bit pairs in
    int32 (float16, or bfloat16 with bf16; the even column in the low half): the mma kernel's shared-memory
    lookup table (cached)."""
    return _mma_pair_tables(quant_type, str(device), bf16)


def pair_table_on(quant_type: str, device: torch.device, half: bool = False) -> torch.Tensor:
    """The 256-entry byte -> (value of the high nibble, value of the low nibble) table: int64 words holding
    two float32 values (exact), or with half=True int32 words holding two float16 values (cached)."""
    return _pair_tables(quant_type, str(device))[1 if half else 0]


def thresholds_on(quant_type: str, device: torch.device) -> torch.Tensor:
    """The NF4 (15) or FP4 magnitude (7) float32 thresholds on `device` (cached)."""
    return _tables(quant_type, str(device))[1]


def scale_args(qw_absmax, nested, device):
    """Kernel arguments for the scales: (absmax, q, absmax2, code8, offset, DOUBLE_QUANT).
    Unused pointers get a dummy tensor so every launch has the same signature."""
    if nested is None:
        dummy = qw_absmax
        return qw_absmax, dummy, dummy, dummy, dummy, False
    offset = nested.offset.reshape(1).to(device=device, dtype=torch.float32)
    return (nested.absmax2, nested.q, nested.absmax2, nested.code.to(device, torch.float32).contiguous(),
            offset, True)


def fast_launch_enabled() -> bool:
    """Launches through the compiled kernel's runner (see `Launch`); QLORA_FAST_LAUNCH=0 turns them off."""
    return os.environ.get("QLORA_FAST_LAUNCH", "1") not in ("", "0") and not interpreting()


def _spec(a):
    """What Triton specializes a runtime argument on: a tensor's dtype and 16-byte alignment; an int's being 1,
    a multiple of 16 and its type (i32, i64 or u64); a bool is u1 (triton/runtime/jit.py: specialize_impl)."""
    if isinstance(a, bool):
        return "u1"
    if isinstance(a, int):
        return a == 1, a % 16 == 0, -2**31 <= a < 2**31, a >= 2**63
    if isinstance(a, float) or a is None:
        return a is None
    return a.dtype, a.data_ptr() % 16 == 0


class Launch:
    """One @triton.jit kernel with a fixed grid and fixed constexprs / options, launched many times with the
    same runtime arguments except those at positions `varying` (x, y, ...).

    `kernel[grid](*args, **kw)` costs 25-30 us of host time on a busy host (benchmarks/diag/host_launch.py):
    Triton binds the arguments, computes their specialization and looks the compiled kernel up on every call.
    Here the first call goes through Triton and keeps the compiled kernel's runner (`CompiledKernel[grid]`, the
    object Triton's own launch ends in); a later call whose varying arguments specialize the same way
    (`_spec`) calls that runner directly with every parameter in signature order, as Triton does. Any other
    call takes Triton's path again, so a new alignment or dtype compiles and launches exactly as before.
    The other runtime arguments must stay the same objects (the launch plans bind them to one weight)."""
    __slots__ = ("kernel", "grid", "kw", "varying", "tail", "runners", "compiled")

    def __init__(self, kernel, grid, kw, varying):
        self.kernel, self.kw, self.varying = kernel, dict(kw), tuple(varying)
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.tail = None        # the constexprs' values in signature order, after the positional arguments
        self.runners = {}       # specialization of the varying arguments -> runner
        self.compiled = None    # the last CompiledKernel (benchmarks/diag inspect its IR)

    def __call__(self, *args):
        if self.tail is not None:
            runner = self.runners.get(tuple(_spec(args[i]) for i in self.varying))
            if runner is not None:
                runner(*args, *self.tail)
                return self.compiled
        compiled = self.kernel[self.grid](*args, **self.kw)
        self.compiled = compiled
        if fast_launch_enabled() and compiled is not None and hasattr(compiled, "__getitem__"):
            tail = _tail(self.kernel, len(args), self.kw)
            if tail is not None:
                self.tail = tail
                self.runners[tuple(_spec(args[i]) for i in self.varying)] = compiled[self.grid]
        return compiled


def _tail(kernel, n_args: int, kw: dict):
    """The constexprs' values in signature order after `n_args` positional arguments, or None when some are
    not in kw (a default value: the runner would not know it)."""
    names = list(getattr(kernel, "arg_names", ()))
    params = names[n_args:]
    if not names or n_args > len(names) or not set(params) <= set(kw):
        return None
    return tuple(kw[n] for n in params)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the properties lookup costs host time per call)."""
    device = torch.device(device)
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


# ---------------------------------------------------------------------------------------------------
# @triton.jit helpers
# ---------------------------------------------------------------------------------------------------
class WeightPlan:
    """Base of the cached launch plans (`nf4_matmul._V2Plan`, `nf4_mma.MmaPlan`, `dequantize._DequantPlan`): what
    a launch needs besides x and y, bound to one weight; a plan is reused only while that weight object and its
    tensors are the same. A plan holds the weight's tensors, so the caches it is stored in (`store`) drop it
    when the weight object is garbage collected: freeing a model frees its GPU memory."""
    __slots__ = ("qw_ref", "parts", "split_k", "n", "k", "homes")

    def bind(self, qw) -> None:
        self.qw_ref = weakref.ref(qw, self._drop)
        self.parts = (qw.packed, qw.absmax, qw.nested)
        self.homes = []

    def store(self, cache: dict, key) -> "WeightPlan":
        """cache[key] = self, until the weight dies."""
        cache[key] = self
        self.homes.append((cache, key))
        return self

    def _drop(self, _ref) -> None:
        for cache, key in self.homes:
            if cache.get(key) is self:
                del cache[key]
        self.homes = []

    def valid_for(self, qw) -> bool:
        p = self.parts
        return self.qw_ref() is qw and p[0] is qw.packed and p[1] is qw.absmax and p[2] is qw.nested

    def output(self, M: int, x: torch.Tensor) -> torch.Tensor:
        """y (M, N): a zeroed float32 buffer where split-K programs add into it, else uninitialized in x's dtype."""
        if self.split_k > 1:
            return torch.zeros((M, self.n), dtype=torch.float32, device=x.device)
        return torch.empty((M, self.n), dtype=x.dtype, device=x.device)


@triton.jit
def rcp_approx(x, USE_PTX: tl.constexpr):
    """1/x as CUDA's rcp.approx.ftz.f32 (only valid with USE_PTX; the interpreter path never calls it)."""
    if USE_PTX:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return 1.0 / x


@triton.jit
def mul_rn(a, b, USE_PTX: tl.constexpr):
    """a * b rounded on its own (never fused into a following add)."""
    if USE_PTX:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [a, b],
                                         dtype=tl.float32, is_pure=True, pack=1)
    else:
        return a * b


@triton.jit
def load_scales(block_idx, mask, absmax_ptr, q_ptr, absmax2_ptr, code8_ptr, offset_ptr,
                DOUBLE_QUANT: tl.constexpr, USE_PTX: tl.constexpr):
    """float32 absmax of 4-bit block `block_idx` (any shape):
    absmax[b], or with double quantization map[q[b]] * absmax2[b // 256] + offset (two roundings)."""
    if DOUBLE_QUANT:
        q = tl.load(q_ptr + block_idx, mask=mask, other=0).to(tl.int32)
        c = tl.load(code8_ptr + q)
        a2 = tl.load(absmax2_ptr + block_idx // 256, mask=mask, other=0.0)
        return mul_rn(c, a2, USE_PTX) + tl.load(offset_ptr)
    else:
        return tl.load(absmax_ptr + block_idx, mask=mask, other=0.0)


def _half_table_words(quant_type: str, bf16: bool = False) -> tuple[list[int], list[int]]:
    """The 16-entry table rounded to float16 (or bfloat16), as register words: (low bytes of entries 0-3, 4-7,
    8-11, 12-15; high bytes likewise), entry 4i + j in byte j of word i (unsigned 32-bit values)."""
    table = code_table(quant_type, torch.device("cpu"))
    half = table.to(torch.bfloat16 if bf16 else torch.float16).view(torch.int16).to(torch.int32) & 0xFFFF
    lo = [int(v) & 0xFF for v in half]
    hi = [int(v) >> 8 for v in half]
    word = lambda b, i: b[4 * i] | b[4 * i + 1] << 8 | b[4 * i + 2] << 16 | b[4 * i + 3] << 24  # noqa: E731
    return [word(lo, i) for i in range(4)], [word(hi, i) for i in range(4)]


def _prmt_lookup_asm(quant_type: str) -> str:
    """PTX that looks up the 16-entry table, rounded to float16, for 4 packed bytes (8 codes) in registers
    with byte permutes instead of memory gathers. The table's low bytes L[0..15] and high bytes H[0..15] sit
    in 4 + 4 registers; for 4 codes (a 16-bit selector of nibbles) `prmt` picks L[c & 7] from entries 0-7
    and 8-15, a third `prmt` keeps the half that bit 3 asks for, the same for H, and two more interleave
    (L, H) into float16 pairs. Outputs $0,$1: high-nibble values of bytes 0..3 (float16 x 4); $2,$3:
    low-nibble values; input $4: the 4 bytes."""
    lo, hi = _half_table_words(quant_type)
    movs = "".join(f"mov.b32 l{i}, {lo[i]};\n mov.b32 h{i}, {hi[i]};\n" for i in range(4))

    def lookup(sel, r0, r1):
        return (f"and.b32 c, {sel}, 0x7777;\n shr.b32 t, {sel}, 1;\n and.b32 t, t, 0x4444;\n or.b32 t, t, 0x3210;\n"
                "prmt.b32 a0, l0, l1, c;\n prmt.b32 a1, l2, l3, c;\n prmt.b32 lb, a0, a1, t;\n"
                "prmt.b32 a0, h0, h1, c;\n prmt.b32 a1, h2, h3, c;\n prmt.b32 hb, a0, a1, t;\n"
                f"prmt.b32 {r0}, lb, hb, 0x5140;\n prmt.b32 {r1}, lb, hb, 0x7362;\n")

    return ("{\n .reg .b32 l0, l1, l2, l3, h0, h1, h2, h3, v, s, t, c, a0, a1, lb, hb;\n" + movs +
            # low nibbles of bytes 0..3 -> selector nibbles 0..3
            "and.b32 v, $4, 0x0F0F0F0F;\n shr.b32 t, v, 4;\n or.b32 v, v, t;\n prmt.b32 s, v, 0, 0x0020;\n" +
            lookup("s", "$2", "$3") +
            # high nibbles
            "shr.b32 v, $4, 4;\n and.b32 v, v, 0x0F0F0F0F;\n shr.b32 t, v, 4;\n or.b32 v, v, t;\n"
            "prmt.b32 s, v, 0, 0x0020;\n" + lookup("s", "$0", "$1") + "}")


def _word_lookup_asm() -> str:
    """PTX for the word GEMV: the 8 codes of one 32-bit word of packed weights ($8; byte i holds columns 2i
    (high nibble) and 2i+1) -> their table values as float32 ($0..$7, columns 0..7), through the float16
    table held in registers: operands $9..$12 are its low bytes L[0..15], $13..$16 its high bytes H[0..15]
    (4 entries per register, `word_table_on`), $17 the constant 0x44444444.
    prmt reads only a selector's low 16 bits (4 nibbles), so one mask of the whole word selects the codes of
    bytes 0-1 (nibble order: column 1, 0, 3, 2) and the same shifted by 16 those of bytes 2-3: c = the low
    3 bits of every code, t = per code "byte i of the first or the second candidate" from bit 3. Per 4 codes:
    2 prmt look up L[c] among entries 0-7 and 8-15, a third keeps the one bit 3 asks for, the same for H,
    one prmt more pairs (L, H) into two float16 values, and cvt widens each to float32 (an FP-pipe HADD2).
    The table comes in as operands rather than immediates so that it stays in 9 per-thread registers for
    the whole kernel (immediates were re-materialized on every use; a uniform register cannot feed prmt)."""
    def lookup(c, t, cols):
        a, b, cc, d = cols
        return (f"prmt.b32 a0, $9, $10, {c};\n prmt.b32 a1, $11, $12, {c};\n prmt.b32 lb, a0, a1, {t};\n"
                f"prmt.b32 a0, $13, $14, {c};\n prmt.b32 a1, $15, $16, {c};\n prmt.b32 hb, a0, a1, {t};\n"
                "prmt.b32 p, lb, hb, 0x5140;\n mov.b32 {e0, e1}, p;\n"
                f"cvt.f32.f16 ${a}, e0;\n cvt.f32.f16 ${b}, e1;\n"
                "prmt.b32 p, lb, hb, 0x7362;\n mov.b32 {e0, e1}, p;\n"
                f"cvt.f32.f16 ${cc}, e0;\n cvt.f32.f16 ${d}, e1;\n")

    return ("{\n .reg .b32 c, t, c2, t2, a0, a1, lb, hb, p;\n .reg .b16 e0, e1;\n"
            "and.b32 c, $8, 0x77777777;\n shr.b32 t, $8, 1;\n and.b32 t, t, $17;\n or.b32 t, t, 0x32103210;\n"
            "shr.b32 c2, c, 16;\n shr.b32 t2, t, 16;\n" +
            lookup("c", "t", (1, 0, 3, 2)) + lookup("c2", "t2", (5, 4, 7, 6)) + "}")


WORD_LOOKUP: tl.constexpr = tl.constexpr(_word_lookup_asm())


@functools.lru_cache(maxsize=None)
def _word_tables(quant_type: str, device: str, bf16: bool = False):
    lo, hi = _half_table_words(quant_type, bf16)
    row = torch.tensor(lo + hi + [0x44444444] + [0] * 7, dtype=torch.int64)
    row = torch.where(row >= 2**31, row - 2**32, row).to(torch.int32)  # as int32 bits
    half = code_table(quant_type, torch.device("cpu")).to(torch.bfloat16 if bf16 else torch.float16)
    return row.repeat(32).to(device), half.float().contiguous().to(device)


def word_table_on(quant_type: str, device: torch.device, bf16: bool = False) -> torch.Tensor:
    """The word GEMV's register table (int32 [32 x 16]: per lane the 4 + 4 words of float16 (bf16: bfloat16)
    low / high bytes and 0x44444444; one copy per lane so that the kernel loads it into per-thread registers)
    (cached)."""
    return _word_tables(quant_type, str(device), bf16)[0]


def half_table_on(quant_type: str, device: torch.device, bf16: bool = False) -> torch.Tensor:
    """The 16-entry code table rounded to float16 (bf16: bfloat16), as float32 (the word GEMV's values off the
    GPU) (cached)."""
    return _word_tables(quant_type, str(device), bf16)[1]


@triton.jit
def word_table(tw_ptr, lane):
    """The 9 register-table words (`word_table_on`: one copy per lane, lane in 0..31), in plain registers."""
    o = lane * 16
    return (tl.load(tw_ptr + o), tl.load(tw_ptr + o + 1), tl.load(tw_ptr + o + 2), tl.load(tw_ptr + o + 3),
            tl.load(tw_ptr + o + 4), tl.load(tw_ptr + o + 5), tl.load(tw_ptr + o + 6), tl.load(tw_ptr + o + 7),
            tl.load(tw_ptr + o + 8))


@triton.jit
def xpair(xw, XF16: tl.constexpr):
    """int32 words of x viewed as pairs of bf16 (or fp16) -> (even column, odd column) as float32."""
    if XF16:
        e = (xw & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        o = (xw >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    else:  # bf16 -> float32 is the upper half of the float32 bits
        e = (xw << 16).to(tl.float32, bitcast=True)
        o = (xw & -65536).to(tl.float32, bitcast=True)
    return e, o


@triton.jit
def word_values(word, tw, table_ptr, USE_PTX: tl.constexpr):
    """int32 words of 8 packed codes -> the 8 table values (float16-rounded) as float32, columns 0..7.
    tw: the 9 register-table words (GPU); table_ptr: the float16-rounded float32 table (interpreter)."""
    if USE_PTX:
        return tl.inline_asm_elementwise(WORD_LOOKUP, "=r,=r,=r,=r,=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r",
                                         [word, tw[0], tw[1], tw[2], tw[3], tw[4], tw[5], tw[6], tw[7], tw[8]],
                                         dtype=(tl.float32,) * 8, is_pure=True, pack=1)
    else:
        b0 = word & 0xFF
        b1 = (word >> 8) & 0xFF
        b2 = (word >> 16) & 0xFF
        b3 = (word >> 24) & 0xFF
        return (tl.load(table_ptr + (b0 >> 4)), tl.load(table_ptr + (b0 & 15)),
                tl.load(table_ptr + (b1 >> 4)), tl.load(table_ptr + (b1 & 15)),
                tl.load(table_ptr + (b2 >> 4)), tl.load(table_ptr + (b2 & 15)),
                tl.load(table_ptr + (b3 >> 4)), tl.load(table_ptr + (b3 & 15)))


PRMT_NF4: tl.constexpr = tl.constexpr(_prmt_lookup_asm("nf4"))
PRMT_FP4: tl.constexpr = tl.constexpr(_prmt_lookup_asm("fp4"))


@triton.jit
def unpack_values_lut(byte, table_ptr, LUT: tl.constexpr, USE_PTX: tl.constexpr):
    """uint8 bytes -> (high-nibble value, low-nibble value) as float32, by LUT mode:
    0: two gathers from the 16-entry float32 table; 1: one gather from the 256-entry float32-pair table
    (exact); 2: one gather from the 256-entry float16-pair table (values rounded to float16);
    3 (NF4) / 4 (FP4): the float16 table in registers through byte permutes (GPU; the interpreter reads
    the float16-pair table instead, same values)."""
    if LUT == 0:
        hi, lo = unpack_values(byte, table_ptr)
    elif LUT >= 3 and USE_PTX:
        if LUT == 3:
            hi, lo = tl.inline_asm_elementwise(PRMT_NF4, "=r,=r,=r,=r,r", [byte], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
        else:
            hi, lo = tl.inline_asm_elementwise(PRMT_FP4, "=r,=r,=r,=r,r", [byte], dtype=(tl.float16, tl.float16),
                                               is_pure=True, pack=4)
        hi = hi.to(tl.float32)
        lo = lo.to(tl.float32)
    elif LUT == 1:
        v = tl.load(table_ptr + byte.to(tl.int32))
        hi = (v & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        lo = (v >> 32).to(tl.int32).to(tl.float32, bitcast=True)
    else:
        v = tl.load(table_ptr + byte.to(tl.int32))
        hi = (v & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        lo = ((v >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return hi, lo


@triton.jit
def unpack_values(byte, table_ptr):
    """uint8 bytes -> (value of the high nibble, value of the low nibble), float32 table entries."""
    b = byte.to(tl.int32)
    hi = tl.load(table_ptr + (b >> 4))
    lo = tl.load(table_ptr + (b & 15))
    return hi, lo
