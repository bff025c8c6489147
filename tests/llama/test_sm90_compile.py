"""Every shipped config of the fast path's LoRA dropout kernels compiles for sm_90 (H100/H200) with the Triton
installed here, ahead of time and without a GPU (benchmarks/diag/sm90_compile.py --check, in a subprocess without
TRITON_INTERPRET). The interpreter tests check what the kernels compute; this checks that the GPU compiler takes
them: c0db202's POST_SCALE passed every interpreter test and failed to compile on the H200 (and fails here)."""
import os
import subprocess
import sys

import pytest
import triton

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@pytest.mark.skipif(not (os.path.exists(os.path.join(BIN, "ptxas")) and os.path.exists(os.path.join(BIN, "cuobjdump"))),
                    reason="this Triton build bundles no ptxas / cuobjdump (the NVIDIA backend's tools)")
def test_lora_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")              # compile for real, not from a warm cache
    out = tmp_path / "sm90.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "diag", "sm90_compile.py"), "--check",
                        "--out", str(out)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    import json
    cases = json.loads(out.read_text())["cases"]
    assert len(cases) == 2 * 2 * len(__import__("llama.fast_path", fromlist=["x"])._XA_CONFIGS) + 4 + 4 + 3 + 2 + 4
    assert all(c["ok"] and c["registers"] > 0 for c in cases.values())
