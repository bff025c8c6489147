"""The inner loop of the decode kernels as an H100/H200 runs it, without a GPU: compile for sm_90 (Triton's own
ptxas, as sm90_compile.py), disassemble (cuobjdump -sass, bundled with Triton) and count the instructions of each
loop body by opcode, with the registers and shared memory of the kernel.

Why: at M = 1 the word GEMV and the mma kernel are meant to be bound by the weight stream, and whether a change
moves them toward it (fewer integer instructions per 32-bit word of codes, wider loads, fewer registers for more
warps in flight) can be read off the machine code before any device time is spent on timing it.

    python benchmarks/diag/sass_loop.py [--kernel gemv3|gemv3-prefetch|mma|mma-smem|gemv2] [--dq] [--out f.json]
    PYTHONPATH=/tmp/tri36 python benchmarks/diag/sass_loop.py ...   # the device's Triton 3.6 (pip --target)

Prints, per loop (a backward branch), its length, the words of codes it consumes (from the kernel's
constexprs), instructions per word, and the opcode counts; --sass FILE writes the whole disassembly.
Must run with TRITON_INTERPRET unset.
"""
import argparse
import collections
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("sass_loop: TRITON_INTERPRET is set; unset it (this compiles for the GPU, not the interpreter)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
mm = importlib.import_module("kernels.nf4_matmul")
mma = importlib.import_module("kernels.nf4_mma")

TARGET = GPUTarget("cuda", 90, 32)
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SIZES_DIVISIBLE = {"KW", "KU", "K"}           # Llama widths: multiples of 16 (what the launcher specializes)


def _pointers(kind):
    word = "*i64" if kind.startswith("mma") else "*i32"
    return {"x_ptr": "*bf16" if kind == "gemv2" else word, "packed_ptr": "*u8" if kind == "gemv2" else word,
            "absmax_ptr": "*fp32", "q_ptr": "*u8", "absmax2_ptr": "*fp32", "code8_ptr": "*fp32",
            "offset_ptr": "*fp32", "table_ptr": "*fp32", "tw_ptr": "*i32", "pair_ptr": "*i32", "bias_ptr": "*bf16",
            "y_ptr": "*bf16"}


def kernel_and_consts(kind, dq):
    """(jit function, constexprs, num_warps, words of 8 codes one loop iteration consumes per program)."""
    common = dict(BLOCKSIZE=64, DOUBLE_QUANT=dq, HAS_BIAS=False, USE_PTX=True, ATOMIC=False, XF16=False)
    if kind.startswith("gemv3"):
        c = dict(common, R=4, WT=256, PREFETCH=kind.endswith("prefetch"))
        return mm._nf4_gemv_w_kernel, c, 4, c["R"] * c["WT"]
    if kind.startswith("mma"):
        cand = dict(mma.MMA_CANDIDATES["mma-smem" if kind == "mma-smem" else "mma"])
        c = dict(common, NW=cand["NW"], RT=cand["RT"], MX=8, PREFETCH=cand.get("PREFETCH", False),
                 LUT=cand.get("LUT", 0), PERSIST=False)
        # each warp takes its own unit (64 codes = 8 words) of 16 * RT rows per iteration
        return mma._nf4_mma_kernel, c, cand["NW"], cand["NW"] * 16 * c["RT"] * (mma.UNIT // 8)
    if kind == "gemv2":
        c = dict(common, BN=4, NB=8, LUT=3, XSPLIT=1)
        c.pop("XF16")
        return mm._nf4_gemv_v2_kernel, c, 4, c["BN"] * c["NB"] * 64 // 8
    raise SystemExit(f"sass_loop: unknown --kernel {kind!r}")


def compile_sass(kernel, consts, num_warps, kind):
    ptrs = _pointers(kind)
    sig = {p.name: "constexpr" if p.is_constexpr else ptrs.get(p.name, "i32") for p in kernel.params}
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names
             if n in SIZES_DIVISIBLE or (n.endswith("_ptr") and sig[n] != "constexpr")}
    c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs), target=TARGET,
                       options=dict(num_warps=num_warps, num_stages=3))
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(c.asm["cubin"])
    try:
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              timeout=120).stdout
        res = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True,
                             text=True, timeout=120).stdout
    finally:
        os.unlink(f.name)
    regs, static = re.search(r"REG:(\d+)", res), re.search(r"SHARED:(\d+)", res)
    return sass, dict(registers=int(regs.group(1)) if regs else -1, shared_bytes=c.metadata.shared,
                      static_shared_bytes=int(static.group(1)) if static else -1)


def loops(sass):
    """[(start, end, [opcode, ...])] for every backward branch (a loop body), from the SASS listing."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s*(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    out = []
    for addr, text in ins:
        tgt = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if tgt and int(tgt.group(1), 16) < addr:
            start = int(tgt.group(1), 16)
            ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for a, t in ins if start <= a <= addr]
            out.append((start, addr, ops))
    return out, len(ins)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", default="gemv3", choices=["gemv3", "gemv3-prefetch", "mma", "mma-smem", "gemv2"])
    ap.add_argument("--dq", action="store_true", help="double-quantized scales")
    ap.add_argument("--sass", default=None, help="write the disassembly here")
    ap.add_argument("--out", default=None, help="write the counts as JSON")
    a = ap.parse_args(argv)
    kernel, consts, nw, words = kernel_and_consts(a.kernel, a.dq)
    sass, res = compile_sass(kernel, consts, nw, a.kernel)
    found, total = loops(sass)
    report = dict(triton=triton.__version__, target="cuda sm_90", kernel=a.kernel, double_quant=a.dq,
                  constexprs=consts, num_warps=nw, total_instructions=total, **res, loops=[])
    threads = 32 * nw
    print(f"{a.kernel}{' DQ' if a.dq else ''}: {res['registers']} registers, {res['shared_bytes']} B shared "
          f"(+ {res['static_shared_bytes']} B declared in the kernel's PTX), "
          f"{total} instructions; {words} words of codes a program-iteration ({words / threads:g} a thread)")
    for start, end, ops in found:
        counts = collections.Counter(ops)
        per_word = len(ops) / (words / threads)
        report["loops"].append(dict(start=start, end=end, length=len(ops), per_word=round(per_word, 2),
                                    opcodes=dict(counts.most_common())))
        top = ", ".join(f"{k} {v}" for k, v in counts.most_common(8))
        print(f"  loop 0x{start:x}-0x{end:x}: {len(ops)} instructions, {per_word:.1f} a word if it is the main "
              f"loop; {top}")
    if a.sass:
        with open(a.sass, "w") as f:
            f.write(sass)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
