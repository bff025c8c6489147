"""Bad input gives errors that name what is wrong: unmatched targets, r <= 0, misfit adapters, bad configs."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora import LoraConfig, inject_lora, load_adapter, save_adapter
from .lora_testlib import randomize_lora, tiny_llama


def test_target_modules_matching_nothing_lists_module_names():
    with pytest.raises(ValueError) as e:
        inject_lora(tiny_llama(), LoraConfig(target_modules=["query_key_value"]))
    msg = str(e.value)
    assert "query_key_value" in msg and "q_proj" in msg and "down_proj" in msg and "lm_head" in msg
    with pytest.raises(ValueError, match="matched no module"):
        inject_lora(tiny_llama(), LoraConfig(target_modules=r"layers\.9\..*"))


def test_target_that_is_not_linear():
    with pytest.raises(ValueError, match="not linear"):
        inject_lora(tiny_llama(), LoraConfig(target_modules=["input_layernorm"]))


def test_rank_must_be_positive():
    for r in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="r must be a positive integer"):
            LoraConfig(r=r)
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\]"):
        LoraConfig(rank_pattern={"q_proj": 0})


def test_other_bad_config_values():
    with pytest.raises(ValueError, match="bias"):
        LoraConfig(bias="some")
    with pytest.raises(ValueError, match="lora_dropout"):
        LoraConfig(lora_dropout=1.5)
    with pytest.raises(ValueError, match="use_dora"):
        LoraConfig(use_dora=True)


def _saved(tmp_path, **kw):
    model = inject_lora(tiny_llama(), LoraConfig(**{"r": 4, "lora_alpha": 8, **kw}))
    randomize_lora(model)
    save_adapter(model, str(tmp_path))
    return tmp_path


def test_adapter_shapes_not_fitting_the_base_name_the_tensor(tmp_path):
    d = _saved(tmp_path)
    path = os.path.join(d, "adapter_model.safetensors")
    sd = load_file(path)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    save_file(sd, path)
    with pytest.raises(ValueError) as e:
        load_adapter(tiny_llama(), str(d))
    assert key in str(e.value) and "(17, 4)" in str(e.value) and "(16, 4)" in str(e.value)


def test_adapter_for_a_bigger_model_names_the_tensor(tmp_path):
    d = _saved(tmp_path)
    with pytest.raises(ValueError, match=r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight"):
        load_adapter(tiny_llama(hidden_size=48, num_attention_heads=4), str(d))
    with pytest.raises(ValueError, match=r"layers\.1\..*match no parameter"):
        load_adapter(tiny_llama(num_hidden_layers=1), str(d))


def test_adapter_file_lacking_tensors(tmp_path):
    d = _saved(tmp_path)
    path = os.path.join(d, "adapter_model.safetensors")
    sd = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    del sd[key]
    save_file(sd, path)
    with pytest.raises(ValueError, match=r"lacks LoRA tensors.*layers\.0\.self_attn\.q_proj\.lora_A"):
        load_adapter(tiny_llama(), str(d))


def _edit_config(d, edit):
    path = os.path.join(d, "adapter_config.json")
    cfg = json.load(open(path))
    edit(cfg)
    json.dump(cfg, open(path, "w"))
    return path


def test_adapter_config_missing_fields(tmp_path):
    d = _saved(tmp_path)
    _edit_config(d, lambda c: (c.pop("r"), c.pop("target_modules")))
    with pytest.raises(ValueError) as e:
        load_adapter(tiny_llama(), str(d))
    assert "missing required field(s) ['r', 'target_modules']" in str(e.value) and "adapter_config.json" in str(e.value)


def test_adapter_config_unknown_fields(tmp_path):
    d = _saved(tmp_path)
    _edit_config(d, lambda c: c.update(lora_rank=4, dropout=0.1))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['dropout', 'lora_rank'\]"):
        load_adapter(tiny_llama(), str(d))


def test_adapter_config_bad_values(tmp_path):
    d = _saved(tmp_path)
    _edit_config(d, lambda c: c.update(r=0))
    with pytest.raises(ValueError, match="adapter_config.json: LoraConfig.r must be a positive integer"):
        load_adapter(tiny_llama(), str(d))
    _edit_config(d, lambda c: c.update(r=4, peft_type="IA3"))
    with pytest.raises(ValueError, match="peft_type"):
        LoraConfig.load(str(d))
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LoraConfig.load(str(d))


def test_old_peft_config_without_newer_fields_loads(tmp_path):
    """Files of older peft versions lack newer optional fields; they load with peft's defaults."""
    d = _saved(tmp_path)
    keep = {"peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "bias", "task_type",
            "base_model_name_or_path", "fan_in_fan_out", "inference_mode", "modules_to_save", "init_lora_weights"}
    _edit_config(d, lambda c: [c.pop(k) for k in list(c) if k not in keep])
    cfg = LoraConfig.load(str(d))
    assert cfg.r == 4 and cfg.use_rslora is False and cfg.rank_pattern == {}


def test_inject_twice_and_save_without_lora():
    model = inject_lora(tiny_llama(), LoraConfig())
    with pytest.raises(ValueError, match="already has LoRA layers"):
        inject_lora(model, LoraConfig())
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(tiny_llama(), "/nonexistent", LoraConfig())
