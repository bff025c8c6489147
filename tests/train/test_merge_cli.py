"""`python -m train.merge`: adapter + base -> a dense checkpoint whose logits are the in-process merge's; bad
arguments are named before anything loads or is written."""
import os
import subprocess
import sys

import pytest
import torch

from llama import checkpoint
from lora import LoraConfig, inject_lora, merge_and_unload, save_adapter
from train.merge import main

from ..lora.lora_testlib import randomize_lora, tiny_llama, tokens


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge_cli_base")
    tiny_llama(tie_word_embeddings=True).save_pretrained(str(d))
    return d


def test_merge_cli_writes_the_merged_model(base_dir, tmp_path, capsys):
    model = checkpoint.load_model(str(base_dir), dtype=torch.float32)
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize_lora(model)
    save_adapter(model, str(tmp_path / "adapter"))
    ids = tokens()
    with torch.no_grad():
        expected = merge_and_unload(model)(ids).logits
    assert main(["--adapter", str(tmp_path / "adapter"), "--base", str(base_dir), "--out", str(tmp_path / "merged"),
                 "--dtype", "float32"]) == 0
    assert "merged 6 LoRA layers" in capsys.readouterr().out              # 3 targets x 2 layers
    merged = checkpoint.load_model(str(tmp_path / "merged"), dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(merged(ids).logits, expected)
    assert not any(type(m).__name__ == "LoRALinear" for m in merged.modules())


def test_merge_cli_names_bad_arguments(base_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--adapter", str(tmp_path), "--base", str(base_dir), "--out", str(tmp_path / "m")])
    assert e.value.code == 2 and "no adapter_config.json" in capsys.readouterr().err
    model = checkpoint.load_model(str(base_dir), dtype=torch.float32)
    inject_lora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    save_adapter(model, str(tmp_path / "adapter"))
    before = sorted(os.listdir(base_dir))
    with pytest.raises(SystemExit) as e:
        main(["--adapter", str(tmp_path / "adapter"), "--base", str(base_dir), "--out", str(base_dir)])
    assert e.value.code == 2 and "is the base model directory" in capsys.readouterr().err
    assert sorted(os.listdir(base_dir)) == before


def test_merge_cli_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "train.merge", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--adapter" in r.stdout and "Warning" not in r.stderr
