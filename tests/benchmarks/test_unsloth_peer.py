"""The Unsloth peer's plumbing on the CPU (Unsloth itself needs a GPU): the model folder it loads is a valid
Hugging Face checkpoint of e2e's model with a tokenizer of its vocabulary; without unsloth the worker and e2e
record why it was skipped; e2e scores our variants against it where it ran."""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import e2e, unsloth_peer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_model_folder_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    unsloth_peer.prepare("tiny", str(tmp_path), "cpu")
    args = e2e.model_args("tiny")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == \
        (args.vocab_size, args.hidden_size, args.num_hidden_layers, args.intermediate_size)
    w = model.model.layers[0].self_attn.q_proj.weight
    assert 0.015 < w.std().item() < 0.025 and torch.all(model.model.norm.weight == 1)   # std 0.02, norms 1
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == args.vocab_size and tok("t5 t7 t511", add_special_tokens=False)["input_ids"] == [5, 7, 511]
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2
    files = set(os.listdir(tmp_path))
    unsloth_peer.prepare("tiny", str(tmp_path), "cpu")                     # a second call reuses the folder
    assert set(os.listdir(tmp_path)) == files


def test_worker_without_unsloth_says_why(tmp_path):
    if any(p for p in sys.path if os.path.isdir(os.path.join(p, "unsloth"))):
        pytest.skip("unsloth is installed here: this test is for the machines without it")
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "unsloth_peer.py"), "--setting", "a",
                        "--size", "tiny", "--model-dir", str(tmp_path / "m"), "--device", "cpu", "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert "unsloth unavailable" in res["skipped"]
    assert e2e.run_unsloth("tiny", "a", 8, torch.device("cpu"))["skipped"] == "Unsloth needs a CUDA GPU"


def test_summary_scores_ours_against_unsloth():
    entry = {"hf": {"tokens_per_s": 1000.0, "peak_gib": 10.0},
             "unsloth": {"tokens_per_s": 1500.0, "peak_gib": 7.0},
             "ours+ckpt-offload": {"name": "ours+ckpt-offload", "tokens_per_s": 2250.0, "peak_gib": 5.5},
             "ours": {"name": "ours", "tokens_per_s": 3000.0, "peak_gib": 12.0}}
    e2e.summarize_setting(entry)
    assert entry["unsloth"]["speed_ratio_vs_hf"] == 1.5 and entry["unsloth"]["memory_ratio_vs_hf"] == 0.7
    p = entry["primary"]
    assert p["name"] == "ours+ckpt-offload" and p["speed_ratio"] == 2.25            # the fastest within 0.6x memory
    assert p["speed_ratio_vs_unsloth"] == 1.5 and p["memory_ratio_vs_unsloth"] == round(5.5 / 7.0, 3)
    skipped = {"hf": entry["hf"], "unsloth": {"skipped": "not installed"}, "ours": dict(entry["ours"])}
    e2e.summarize_setting(skipped)
    assert "speed_ratio_vs_unsloth" not in skipped["primary"]
