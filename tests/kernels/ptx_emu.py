"""A small PTX interpreter for the inline-PTX blocks of the kernels (test helper): runs the very strings the kernels
emit, for the 32 lanes of a warp in lockstep, so that their selectors, byte orders and register orders are
checked on the CPU. It knows the instructions those blocks use and nothing else: an unknown one raises.

Values are Python ints (32/64-bit register bits) or floats for .f32 registers given as floats. Memory: `shared`
(byte address -> 32-bit word) and `glob` (byte address -> 32-bit word), both dicts; `symbols` maps a .shared
variable's name to its address (a declaration allocates it)."""
import re
import struct

M32 = 0xFFFFFFFF


def f32_bits(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0]


def bits_f32(b: int) -> float:
    return struct.unpack("<f", struct.pack("<I", b & M32))[0]


def bf16_to_f32(h: int) -> float:
    return bits_f32((h & 0xFFFF) << 16)


def f16_to_f32(h: int) -> float:
    return struct.unpack("<e", struct.pack("<H", h & 0xFFFF))[0]


def prmt(a: int, b: int, c: int) -> int:
    """prmt.b32 (default mode): output byte i = byte (c >> 4i) & 7 of {b, a} (a = bytes 0-3), or its sign
    replicated where bit 3 of the selector is set."""
    src = (a & M32) | (b & M32) << 32
    out = 0
    for i in range(4):
        s = (c >> 4 * i) & 0xF
        byte = (src >> 8 * (s & 7)) & 0xFF
        if s & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * i
    return out


class Warp:
    """32 lanes running one asm block in lockstep (`run`), sharing `shared`, `glob` and `symbols`."""

    def __init__(self, lanes: int = 32):
        self.lanes = lanes
        self.shared: dict[int, int] = {}
        self.glob: dict[int, int] = {}
        self.symbols: dict[str, int] = {}
        self._next_shared = 0x100

    # -- parsing ------------------------------------------------------------------------------------
    @staticmethod
    def _statements(asm: str):
        """Statements and labels in order; braces that open or close a block (alone on their line) dropped,
        those of operand lists (mma's) kept."""
        out = []
        for line in asm.split("\n"):
            for raw in line.split(";"):
                s = raw.strip()
                if s in ("", "{", "}"):
                    continue
                m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*):\s*(.*)$", s)
                if m:
                    out.append(("label", m.group(1)))
                    if m.group(2).strip():
                        out.append(("op", m.group(2).strip()))
                    continue
                out.append(("op", s))
        return out

    def _declare(self, s: str):
        m = re.match(r"^\.shared\s+(?:\.align\s+\d+\s+)?\.b32\s+([A-Za-z_][A-Za-z0-9_]*)\[(\d+)\]$", s)
        if m:
            if m.group(1) in self.symbols:  # every warp of a program runs the same (static) declaration
                return True
            self.symbols[m.group(1)] = self._next_shared
            self._next_shared += 4 * int(m.group(2))
            return True
        return s.startswith(".reg") or s.startswith(".pragma")

    # -- running ------------------------------------------------------------------------------------
    def run(self, asm: str, outputs: int, inputs: list, max_steps: int = 10**6):
        """Run `asm` with $0..$(outputs-1) as outputs and the following $ as `inputs` (each an int/float, the same
        for every lane, or a list of 32 per-lane values). Returns a list per output of 32 lane values."""
        stmts = self._statements(asm)
        labels = {name: i for i, (kind, name) in enumerate(stmts) if kind == "label"}
        regs = [dict() for _ in range(self.lanes)]
        for k, v in enumerate(inputs):
            for lane in range(self.lanes):
                regs[lane][f"${outputs + k}"] = v[lane] if isinstance(v, (list, tuple)) else v
        pcs = [0] * self.lanes
        active = list(range(self.lanes))
        steps = 0
        # lockstep: every lane executes the same statement; branches must be uniform except loop exits, which
        # are handled per lane (a lane that leaves waits at the next statement for the others)
        while active:
            steps += 1
            if steps > max_steps:
                raise RuntimeError("ptx_emu: too many steps")
            pc = min(pcs[lane] for lane in active)
            group = [lane for lane in active if pcs[lane] == pc]
            if pc >= len(stmts):
                break
            kind, s = stmts[pc]
            if kind == "label" or self._declare(s):
                for lane in group:
                    pcs[lane] += 1
                continue
            if s.startswith("mma.sync"):
                if len(group) != self.lanes:
                    raise RuntimeError("ptx_emu: mma.sync with a divergent warp")
                self._mma(s, regs)
                for lane in group:
                    pcs[lane] += 1
                continue
            for lane in group:
                target = self._exec(s, regs[lane])
                pcs[lane] = labels[target] if target is not None else pcs[lane] + 1
        return [[regs[lane][f"${o}"] for lane in range(self.lanes)] for o in range(outputs)]

    def _val(self, tok: str, r: dict):
        tok = tok.strip()
        if tok in r:
            return r[tok]
        if tok in self.symbols:
            return self.symbols[tok]
        if tok.startswith("0f"):
            return bits_f32(int(tok[2:], 16))
        if re.match(r"^-?(0x[0-9a-fA-F]+|\d+)$", tok):
            return int(tok, 0)
        raise KeyError(f"ptx_emu: unknown operand {tok!r}")

    def _addr(self, tok: str, r: dict) -> int:
        m = re.match(r"^\[\s*([^\]+]+?)\s*(?:\+\s*(-?\w+))?\s*\]$", tok.strip())
        if not m:
            raise ValueError(f"ptx_emu: bad address {tok!r}")
        base = self._val(m.group(1), r)
        return base + (int(m.group(2), 0) if m.group(2) else 0)

    def _exec(self, s: str, r: dict):
        pred = None
        m = re.match(r"^@(!?)(\w+)\s+(.*)$", s)
        if m:
            pred = (m.group(1) == "", m.group(2))
            s = m.group(3)
        op, _, rest = s.partition(" ")
        args = [a.strip() for a in rest.split(",")] if rest.strip() else []
        if pred is not None and bool(r[pred[1]]) != pred[0]:
            return None
        v = lambda i: self._val(args[i], r)  # noqa: E731
        base = op.split(".")[0]
        if op == "bra" or op == "bra.uni":
            return args[0]
        if base == "bar":
            return None  # the lanes of one warp are in step already; several warps: the caller runs them in turn
        if base == "mov" and args[0].startswith("{"):  # mov.b32 {lo, hi}, r: split into 16-bit halves
            lo, hi = (t.strip(" {}") for t in rest.split("}")[0].split(","))
            w = self._val(rest.split("}")[1].strip(" ,"), r)
            r[lo], r[hi] = w & 0xFFFF, (w >> 16) & 0xFFFF
        elif op == "cvt.f32.f16":
            r[args[0]] = f16_to_f32(v(1))
        elif base == "mov":
            r[args[0]] = v(1) if not isinstance(v(1), int) else v(1) & (M32 if ".b64" not in op else (1 << 64) - 1)
        elif base == "and":
            r[args[0]] = v(1) & v(2) & M32
        elif base == "or":
            r[args[0]] = (v(1) | v(2)) & M32
        elif base == "shr":
            r[args[0]] = (v(1) & M32) >> v(2)
        elif base == "shl":
            r[args[0]] = (v(1) << v(2)) & M32
        elif op == "mul.hi.u32":
            r[args[0]] = ((v(1) & M32) * (v(2) & M32)) >> 32
        elif op == "mul.wide.u32":
            r[args[0]] = (v(1) & M32) * (v(2) & M32)
        elif op == "mad.lo.u32":
            r[args[0]] = ((v(1) & M32) * (v(2) & M32) + (v(3) & M32)) & M32
        elif op in ("add.u32", "add.s32"):
            r[args[0]] = (v(1) + v(2)) & M32
        elif op == "add.s64":
            r[args[0]] = (v(1) + v(2)) & ((1 << 64) - 1)
        elif op == "bfe.u32":
            r[args[0]] = ((v(1) & M32) >> v(2)) & ((1 << v(3)) - 1)
        elif op == "prmt.b32":
            r[args[0]] = prmt(v(1), v(2), v(3))
        elif op == "setp.lt.u32":
            r[args[0]] = (v(1) & M32) < (v(2) & M32)
        elif op == "st.shared.b32":
            self.shared[self._addr(args[0], r)] = v(1) & M32
        elif op == "ld.shared.b32":
            r[args[0]] = self.shared[self._addr(args[1], r)]
        elif op in ("ld.global.nc.b32", "ld.global.b32"):
            r[args[0]] = self.glob[self._addr(args[1], r)]
        else:
            raise NotImplementedError(f"ptx_emu: {op}")
        return None

    def _mma(self, s: str, regs: list):
        """mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 {d}, {a}, {b}, {c} for the warp."""
        m = re.match(r"^mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.(bf16|f16)\.(bf16|f16)\.f32\s+"
                     r"\{([^}]*)\},\s*\{([^}]*)\},\s*\{([^}]*)\},\s*\{([^}]*)\}$", s)
        if not m:
            raise NotImplementedError(f"ptx_emu: {s}")
        conv = bf16_to_f32 if m.group(1) == "bf16" else f16_to_f32
        d, a, b, c = ([t.strip() for t in m.group(k).split(",")] for k in (3, 4, 5, 6))
        A = [[0.0] * 16 for _ in range(16)]
        B = [[0.0] * 8 for _ in range(16)]
        C = [[0.0] * 8 for _ in range(16)]
        for lane in range(32):
            r = regs[lane]
            g, q = lane // 4, lane % 4
            val = lambda t: self._val(t, r)  # noqa: E731
            for k, (row, col) in enumerate([(g, 2 * q), (g + 8, 2 * q), (g, 2 * q + 8), (g + 8, 2 * q + 8)]):
                w = val(a[k])
                A[row][col], A[row][col + 1] = conv(w), conv(w >> 16)
            for k, row in enumerate([2 * q, 2 * q + 8]):
                w = val(b[k])
                B[row][g], B[row + 1][g] = conv(w), conv(w >> 16)
            for k, (row, col) in enumerate([(g, 2 * q), (g, 2 * q + 1), (g + 8, 2 * q), (g + 8, 2 * q + 1)]):
                cv = val(c[k])
                C[row][col] = cv if isinstance(cv, float) else bits_f32(cv)
        D = [[C[i][n] + sum(A[i][k] * B[k][n] for k in range(16)) for n in range(8)] for i in range(16)]
        for lane in range(32):
            g, q = lane // 4, lane % 4
            for k, (row, col) in enumerate([(g, 2 * q), (g, 2 * q + 1), (g + 8, 2 * q), (g + 8, 2 * q + 1)]):
                regs[lane][d[k]] = D[row][col]
