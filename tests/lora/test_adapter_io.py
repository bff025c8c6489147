"""PEFT adapter files both ways: saved here -> peft loads it; saved by peft -> loaded here. Same logits."""
import json
import os

import torch

from lora import LoraConfig, inject_lora, load_adapter, lora_layers, save_adapter
from lora.config import PEFT_FORMAT_VERSION
from .lora_testlib import assert_close, make_pair, peft, randomize_lora, tiny_llama, tokens

KW = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")


def test_saved_here_loads_in_peft(tmp_path):
    ours = inject_lora(tiny_llama(), LoraConfig(**KW)).eval()
    randomize_lora(ours)
    save_adapter(ours, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]  # no temp files
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    ids = tokens()
    with torch.no_grad():
        assert_close(ours(ids).logits, theirs(ids).logits, 1e-5, "logits, peft loading our adapter")
        base_logits = tiny_llama()(ids).logits
    assert (ours(ids).logits - base_logits).abs().max() > 1e-3  # the adapter does something


def test_saved_by_peft_loads_here(tmp_path):
    _, theirs = make_pair(**KW)
    theirs.save_pretrained(str(tmp_path))
    model = tiny_llama()
    cfg = load_adapter(model, str(tmp_path))
    assert cfg.r == 4 and cfg.task_type == "CAUSAL_LM" and set(cfg.target_modules) == set(KW["target_modules"])
    assert not any(p.requires_grad for p in model.parameters())  # frozen, like peft's default
    ids = tokens()
    with torch.no_grad():
        assert_close(model(ids).logits, theirs(ids).logits, 1e-5, "logits, our loading of peft's adapter")


def test_bias_and_lora_bias_round_trip(tmp_path):
    kw = dict(r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], bias="lora_only", lora_bias=True)
    ours, theirs = make_pair(dict(attention_bias=True), **kw)
    save_adapter(ours, str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    from safetensors.torch import load_file
    k_ours = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    k_theirs = load_file(str(tmp_path / "theirs" / "adapter_model.safetensors"))
    assert sorted(k_ours) == sorted(k_theirs)
    for k in k_ours:
        assert torch.equal(k_ours[k], k_theirs[k]), k
    model = tiny_llama(attention_bias=True)
    load_adapter(model, str(tmp_path / "theirs"), is_trainable=True)
    ids = tokens()
    assert_close(model(ids).logits, theirs(ids).logits, 1e-5, "logits after loading biases")
    assert {k for k, p in model.named_parameters() if p.requires_grad} == {k for k, p in ours.named_parameters()
                                                                          if p.requires_grad}


def test_config_file_has_peft_fields_and_values(tmp_path):
    ours, theirs = make_pair(**KW)
    save_adapter(ours, str(tmp_path / "ours"))
    theirs.save_pretrained(str(tmp_path / "theirs"))
    mine = json.load(open(tmp_path / "ours" / "adapter_config.json"))
    ref = json.load(open(tmp_path / "theirs" / "adapter_config.json"))
    assert set(mine) <= set(ref), sorted(set(mine) - set(ref))
    for k in ref:
        if k not in mine:                  # a newer peft's field (0.22: astra_config), off by default
            assert ref[k] is None or ref[k] is False or ref[k] in ({}, [], ""), (k, ref[k])
        elif k == "target_modules":
            assert sorted(mine[k]) == sorted(ref[k])
        elif k == "peft_version":          # ours names the format it writes
            assert mine[k] == PEFT_FORMAT_VERSION
        elif k != "base_model_name_or_path":
            assert mine[k] == ref[k], k


def test_load_then_save_is_identical(tmp_path):
    _, theirs = make_pair(**KW)
    theirs.save_pretrained(str(tmp_path / "a"))
    model = tiny_llama()
    load_adapter(model, str(tmp_path / "a"))
    save_adapter(model, str(tmp_path / "b"))
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_modules_to_save_round_trip(tmp_path):
    kw = dict(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    ours = inject_lora(tiny_llama(), LoraConfig(**kw)).eval()
    randomize_lora(ours)
    with torch.no_grad():
        ours.lm_head.weight.add_(0.05)
    assert ours.lm_head.weight.requires_grad
    save_adapter(ours, str(tmp_path))
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    ids = tokens()
    with torch.no_grad():
        assert_close(ours(ids).logits, theirs(ids).logits, 1e-5, "logits with a trained lm_head")
    back = tiny_llama()
    load_adapter(back, str(tmp_path))
    with torch.no_grad():
        assert_close(back(ids).logits, ours(ids).logits, 0.0, "logits after our round trip")


def test_loading_into_already_injected_model_takes_the_file_scaling(tmp_path):
    _, theirs = make_pair(**{**KW, "lora_alpha": 32, "use_rslora": True})
    theirs.save_pretrained(str(tmp_path))
    model = inject_lora(tiny_llama(), LoraConfig(**KW))  # alpha 8, no rslora
    load_adapter(model, str(tmp_path), is_trainable=True)
    assert all(layer.scaling == 32 / 2 for _, layer in lora_layers(model))
    ids = tokens()
    assert_close(model(ids).logits, theirs(ids).logits, 1e-5, "logits")
    assert all(p.requires_grad == ("lora_" in k) for k, p in model.named_parameters())
