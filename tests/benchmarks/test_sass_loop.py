"""benchmarks/diag/sass_loop.py compiles the decode kernels for sm_90 on this CPU (Triton's bundled ptxas) and reads
their loops from the SASS. Checked here: the tool finds each kernel's main loop, and the loop is what the kernels'
docstrings say it is: the register-table lookup costs 2 PRMT per code (16 per 32-bit word) in the word GEMV and the
mma kernel, the mma kernel issues one m16n8k16 per word a
thread, and the shared-table variant trades the
PRMT lookups for one LDS per byte."""
import json
import os
import subprocess
import sys

import pytest
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def run(kind, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / f"{kind}.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "diag", "sass_loop.py"), "--kernel", kind,
                        "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rep = json.loads(out.read_text())
    main = max(rep["loops"], key=lambda lp: lp["length"])
    return rep, main


@pytest.mark.skipif(not (os.path.exists(os.path.join(BIN, "ptxas")) and os.path.exists(os.path.join(BIN, "cuobjdump"))),
                    reason="this Triton build bundles no ptxas / cuobjdump (the NVIDIA backend's tools)")
def test_decode_loops(tmp_path):
    rep, loop = run("gemv3", tmp_path)
    words = rep["constexprs"]["R"] * rep["constexprs"]["WT"] // (32 * rep["num_warps"])   # a thread's, per step
    ops = loop["opcodes"]
    assert ops.get("PRMT") == 16 * words and ops.get("FFMA", 0) >= 8 * words, ops
    assert rep["registers"] > 0 and loop["per_word"] < 80, (rep["registers"], loop["per_word"])
    rep, loop = run("mma", tmp_path)
    ops = loop["opcodes"]
    hmma = sum(v for k, v in ops.items() if k.startswith("HMMA"))
    assert hmma and ops.get("PRMT") == 16 * hmma, ops          # an m16n8k16's A: 256 codes, one word a lane
    rep, loop = run("mma-smem", tmp_path)
    ops = loop["opcodes"]
    assert ops.get("LDS", 0) >= 8 and ops.get("PRMT", 0) < ops.get("LDS", 0), ops
    assert rep["static_shared_bytes"] >= 32 * 1024, rep["static_shared_bytes"]
