"""Compile the fast path's LoRA dropout kernels for an H100/H200 (sm_90) on any machine, no GPU needed (diagnostic
and a CI check): every shipped block config of xa, dA, dx and the dropout pass, with and without keep codes, and
the RMSNorm kernels with and without their residual add (at hidden 4096), with
the divisibility that the runtime specializes at Llama widths (16-byte aligned pointers, K, Q and row strides
multiples of 16). Reports shared memory, registers and spilled bytes (cuobjdump, bundled with Triton) or the
compiler's failure.

Why: a kernel that the CPU interpreter runs correctly can still fail to compile for the GPU. POST_SCALE (c0db202)
did: under Triton 3.6 and 3.9 alike the xa and dA kernels hit an assertion in the layout conversion, which was
found only on the H200, and the launches fell back to the split path. This reproduces that failure on a CPU.

    python benchmarks/diag/sm90_compile.py [--check] [--out sm90.json]

--check exits 1 if any config fails to compile. Pin a Triton version with PYTHONPATH (the device has 3.6:
pip install --no-deps --target /tmp/tri36 triton==3.6.0). Must run with TRITON_INTERPRET unset (the script
refuses otherwise: the interpreter replaces the compiled kernels).
"""
import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("sm90_compile: TRITON_INTERPRET is set; unset it (this compiles for the GPU, not the interpreter)")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import llama.fast_path as fp  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTERS = {"x_ptr": "*bf16", "a_ptr": "*bf16", "dxa_ptr": "*bf16", "dx_ptr": "*bf16", "out_ptr": "*bf16",
            "part_ptr": "*fp32", "kc_ptr": "*u8",
            # RMSNorm (kernels/rms_norm.py)
            "w_ptr": "*bf16", "y_ptr": "*bf16", "rstd_ptr": "*fp32", "res_ptr": "*bf16", "h_ptr": "*bf16",
            "dy_ptr": "*bf16", "dw_partial_ptr": "*fp32", "dres_ptr": "*bf16"}
FLOATS = {"scale", "eps"}
DIVISIBLE = {"x_ptr", "a_ptr", "dxa_ptr", "dx_ptr", "out_ptr", "part_ptr", "xa_ptr", "kc_ptr", "K", "Q",
             "stride_xm", "stride_om", "stride_gm", "stride_am", "j_per_split", "rows_per_split",
             "w_ptr", "y_ptr", "res_ptr", "h_ptr", "dy_ptr", "dres_ptr", "H", "stride_x", "stride_y", "stride_dy",
             "stride_dx"}


def signature(kernel, consts):
    """The kernel's signature as the launcher would specialize it, and its divisibility attributes."""
    sig = {}
    for p in kernel.params:
        n = p.name
        if p.is_constexpr:
            sig[n] = "constexpr"
        elif n in POINTERS:
            sig[n] = POINTERS[n]
        elif n == "xa_ptr":
            sig[n] = "*fp32" if consts.get("PARTIAL") else "*bf16"
        elif n == "seed":
            sig[n] = "*i64" if consts.get("SEED_PTR") else "i32"
        elif n in FLOATS:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    names = list(sig)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if n in DIVISIBLE}
    return sig, attrs


def resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    finally:
        os.unlink(f.name)
    line = next((ln for ln in out.splitlines() if "REG:" in ln), "")
    vals = dict(kv.split(":") for kv in line.split() if ":" in kv)
    return dict(registers=int(vals.get("REG", -1)), spill_bytes=int(vals.get("STACK", -1)))


def cases():
    """(name, kernel, constexprs, num_warps, num_stages) of every shipped config."""
    common = dict(PREC="tf32", SEED_PTR=False, ROUNDS=fp.PHILOX_ROUNDS)
    for i, cfg in enumerate(fp._XA_CONFIGS):
        for kc in (0, 1):
            for partial in (True, False):
                yield (f"xa fused{i} KC={kc} PARTIAL={partial}", fp._lora_xa_kernel,
                       dict(common, BM=cfg["BM"], BQ=cfg["BQ"], BR=64, KC=kc, PARTIAL=partial),
                       cfg["num_warps"], cfg["num_stages"])
    for op, kernel, configs in (("da", fp._lora_da_kernel, fp._DA_CONFIGS), ("dx", fp._lora_dx_kernel, fp._DX_CONFIGS)):
        for i, cfg in enumerate(configs):
            for kc in (0, 2):
                yield (f"{op} fused{i} KC={kc}", kernel, dict(common, BM=cfg["BM"], BQ=cfg["BQ"], BR=64, KC=kc),
                       cfg["num_warps"], cfg["num_stages"])
    for kc in (0, 1, 2):
        yield (f"dropout KC={kc}", fp._dropout4_kernel, dict(SEED_PTR=False, ROUNDS=fp.PHILOX_ROUNDS, BM=16, BQ=128,
                                                           KC=kc, ACCUMULATE=False), 4, 3)
    rn = importlib.import_module("kernels.rms_norm")     # the residual norm's forward (HAS_RES) and backward (HAS_DRES), Llama width
    for res in (False, True):
        yield (f"rmsnorm fwd HAS_RES={int(res)}", rn._rms_norm_fwd_kernel, dict(BLOCK_H=4096, HAS_RES=res),
               rn._num_warps(4096), 3)
    for dres in (False, True):
        for dw in (False, True):
            yield (f"rmsnorm bwd HAS_DRES={int(dres)} DW={int(dw)}", rn._rms_norm_bwd_kernel,
                   dict(BLOCK_H=4096, COMPUTE_DW=dw, HAS_DRES=dres), rn._num_warps(4096), 3)


def with_defaults(kernel, consts) -> dict:
    """consts plus the kernel's constexpr defaults that consts leaves out (as a launch would use them)."""
    import inspect

    out = dict(consts)
    for name, p in inspect.signature(kernel.fn).parameters.items():
        if name not in out and p.default is not inspect.Parameter.empty and \
                any(q.name == name and q.is_constexpr for q in kernel.params):
            out[name] = p.default
    return out


def compile_one(kernel, consts, num_warps, num_stages) -> dict:
    consts = with_defaults(kernel, consts)
    sig, attrs = signature(kernel, consts)
    t = time.perf_counter()
    try:
        c = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs), target=TARGET,
                           options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()
        return dict(ok=False, error=f"{type(e).__name__}: {msg[0][:200] if msg else ''}",
                    seconds=round(time.perf_counter() - t, 2))
    return dict(ok=True, shared_bytes=c.metadata.shared, **resources(c.asm["cubin"]),
                seconds=round(time.perf_counter() - t, 2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if any config fails to compile")
    ap.add_argument("--only", default=None, help="only cases whose name starts with this (e.g. 'xa')")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    res = dict(triton=triton.__version__, target="cuda sm_90", date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               cases={})
    for name, kernel, consts, w, st in cases():
        if a.only and not name.startswith(a.only):
            continue
        r = res["cases"][name] = compile_one(kernel, consts, w, st)
        if r["ok"]:
            print(f"{name:32s} ok   shared {r['shared_bytes']:6d} B  registers {r['registers']:3d}  spilled "
                  f"{r['spill_bytes']:4d} B  ({r['seconds']} s)", flush=True)
        else:
            print(f"{name:32s} FAILED {r['error']}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    failed = [n for n, r in res["cases"].items() if not r["ok"]]
    if a.check and failed:
        sys.exit(f"sm90_compile: {len(failed)} of {len(res['cases'])} configs failed to compile for sm_90: "
                 f"{', '.join(failed)}")


if __name__ == "__main__":
    main()
