"""`python -m llama.quantize`: the 4-bit copy holds exactly the codes quantize-on-load makes, loads here without
quantizing again and in transformers + bitsandbytes, carries the tokenizer; bad arguments are named."""
import os
import subprocess
import sys

import pytest
import torch
import transformers

from llama import ModelArgs, load_model
from llama.quantize import main

from .llama_helpers import assert_close, randomize_


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny_for_quantize")
    args = ModelArgs.from_name("tiny", vocab_size=100, tie_word_embeddings=False)
    randomize_(transformers.LlamaForCausalLM(transformers.LlamaConfig(**args.to_dict())), seed=5).save_pretrained(
        str(d), max_shard_size="40KB")
    (d / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')
    return d


@pytest.mark.parametrize("quant_type, double_quant", [("nf4", False), ("fp4", True)])
def test_quantize_cli_writes_what_quantize_on_load_makes(tiny_dir, tmp_path, capsys, quant_type, double_quant):
    out = tmp_path / "q4"
    argv = ["--model", str(tiny_dir), "--out", str(out), "--quant-type", quant_type, "--dtype", "float32",
            "--device", "cpu", "--max-shard-size", "30KB"] + (["--double-quant"] if double_quant else [])
    assert main(argv) == 0
    assert f"14 linears in {quant_type}" in capsys.readouterr().out          # 7 per layer, 2 layers; not lm_head
    assert (out / "tokenizer_config.json").read_text() == (tiny_dir / "tokenizer_config.json").read_text()
    on_load = load_model(str(tiny_dir), quantize=quant_type, double_quant=double_quant)
    copy = load_model(str(out))
    for (name, a), (_, b) in zip(on_load.named_modules(), copy.named_modules()):
        if hasattr(a, "qweight"):
            assert torch.equal(a.qweight.packed, b.qweight.packed), name
            assert b.qweight.double_quant == double_quant and b.qweight.quant_type == quant_type
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = on_load(ids).logits
        assert torch.equal(copy(ids).logits, ref)
        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu").eval()
        assert type(theirs.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
        assert_close(theirs(ids).logits, ref, 1e-5, "transformers + bitsandbytes loading the 4-bit copy")


def test_quantize_cli_names_bad_arguments(tiny_dir, tmp_path, capsys):
    before = sorted(os.listdir(tiny_dir))
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tiny_dir), "--out", str(tiny_dir), "--device", "cpu"])
    assert e.value.code == 2 and "is the model directory" in capsys.readouterr().err
    assert sorted(os.listdir(tiny_dir)) == before
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tiny_dir), "--out", str(tmp_path / "x"), "--blocksize", "48", "--device", "cpu"])
    assert e.value.code == 2 and "blocksize" in capsys.readouterr().err


def test_quantize_cli_runs_as_a_module():
    r = subprocess.run([sys.executable, "-m", "llama.quantize", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--double-quant" in r.stdout and "Warning" not in r.stderr
