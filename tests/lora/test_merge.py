"""Merging: logits vs peft's merge_and_unload (fp32, <= 1e-5); the merged checkpoint loads in transformers."""
import json
import os

import torch

from lora import (LoraConfig, inject_lora, lora_layers, merge_and_unload, merge_layer, save_merged_checkpoint,
                  unmerge_layer)
from .lora_testlib import assert_close, make_pair, randomize_lora, tiny_llama, tokens, transformers

KW = dict(r=4, lora_alpha=8, target_modules="all-linear")


def test_merged_logits_match_peft_merge_and_unload():
    ours, theirs = make_pair(dict(attention_bias=True, mlp_bias=True), lora_bias=True, **KW)
    ids = tokens()
    with torch.no_grad():
        before = ours(ids).logits
        merged_ours = merge_and_unload(ours)
        merged_theirs = theirs.merge_and_unload()
        assert not any(True for _ in lora_layers(merged_ours))
        assert sorted(merged_ours.state_dict()) == sorted(merged_theirs.state_dict())
        assert_close(merged_ours(ids).logits, merged_theirs(ids).logits, 1e-5, "merged logits vs peft")
        assert_close(merged_ours(ids).logits, before, 1e-5, "merged vs unmerged logits")
    assert all(type(m) is torch.nn.Linear for n, m in merged_ours.named_modules() if n.endswith("proj"))


def test_merge_computes_in_fp32_then_casts():
    base = torch.nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    w0 = base.weight.detach().clone()
    layer = inject_lora(torch.nn.Sequential(base), LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))[0]
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    expected = (w0.float() + 2.0 * layer.lora_B.weight @ layer.lora_A.weight).to(torch.bfloat16)
    merge_layer(layer)
    assert layer.merged and torch.equal(layer.base_layer.weight, expected)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    assert torch.equal(layer(x), layer.base_layer(x))  # merged: the LoRA branch is off
    unmerge_layer(layer)
    assert_close(layer.base_layer.weight, w0, 0.02, "unmerged bf16 weight")


def test_merged_checkpoint_loads_in_transformers(tmp_path):
    base_dir = tmp_path / "base"
    tiny_llama(tie_word_embeddings=True).save_pretrained(str(base_dir))
    (base_dir / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    model = transformers.LlamaForCausalLM.from_pretrained(str(base_dir)).eval()
    inject_lora(model, LoraConfig(**KW))
    randomize_lora(model)
    ids = tokens()
    with torch.no_grad():
        expected = model(ids).logits
    merge_and_unload(model)
    out = tmp_path / "merged"
    save_merged_checkpoint(model, str(out), base_dir=str(base_dir))
    assert "tokenizer_config.json" in os.listdir(out) and "model.safetensors" in os.listdir(out)
    assert not [f for f in os.listdir(out) if "tmp" in f]
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()
    with torch.no_grad():
        assert_close(reloaded(ids).logits, expected, 1e-5, "reloaded merged logits")


def test_merged_checkpoint_sharded_and_fp16(tmp_path):
    model = tiny_llama()
    inject_lora(model, LoraConfig(**KW))
    randomize_lora(model)
    merge_and_unload(model)
    save_merged_checkpoint(model, str(tmp_path), dtype=torch.float16, max_shard_bytes=20_000)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    assert json.load(open(tmp_path / "config.json"))["dtype"] == "float16"
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v.half().float()), k
