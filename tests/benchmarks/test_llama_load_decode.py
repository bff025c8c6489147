"""benchmarks/llama_load_decode.py's harness on the CPU (tiny model): both stacks load the same sharded checkpoint
and decode the same prompts, batched with --batch, and the results file records what ran."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


def test_batched_decode_harness(tmp_path):
    out = tmp_path / "results"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "llama_load_decode.py"), "--size", "tiny",
                        "--device", "cpu", "--shards", "2", "--batch", "2", "--ckpt-dir", str(tmp_path / "ckpt"),
                        "--out-dir", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "llama_load_decode-cpu-tiny-batch2.json").read_text())
    assert res["batch"] == 2 and res["rows"]["ours"]["batch"] == 2 and res["rows"]["hf"]["batch"] == 2
    assert all(res["rows"][s]["decode_tokens_per_s"] > 0 for s in ("ours", "hf"))
    assert any(t["name"].startswith("batch-2 greedy decode") for t in res["targets"])
    assert {"gpu", "date", "commit", "targets"} <= set(res)


def test_bad_batch():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "llama_load_decode.py"), "--batch", "0",
                        "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--batch must be >= 1" in r.stderr
