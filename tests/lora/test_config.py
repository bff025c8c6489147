"""LoraConfig has peft's fields and defaults; adapter_config.json round-trips through peft's LoraConfig."""
import dataclasses
import json

from lora import LoraConfig
from .lora_testlib import peft


def test_fields_and_defaults_are_peft_s():
    ours = {f.name: f for f in dataclasses.fields(LoraConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.LoraConfig) if f.name != "runtime_config"}
    assert sorted(ours) == sorted(theirs)
    mine, ref = LoraConfig().to_dict(), peft.LoraConfig().to_dict()
    for k in ref:
        if k not in ("inference_mode", "peft_version", "peft_type", "target_modules"):
            assert mine[k] == ref[k], k


def test_written_config_reads_in_peft_and_back(tmp_path):
    cfg = LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM",
                     target_modules=["q_proj", "v_proj"], use_rslora=True, rank_pattern={"v_proj": 8})
    cfg.save(str(tmp_path))
    text = (tmp_path / "adapter_config.json").read_text()
    assert list(json.loads(text)) == sorted(json.loads(text))  # sorted keys, as peft writes
    theirs = peft.LoraConfig.from_pretrained(str(tmp_path))
    for k in ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "rank_pattern", "inference_mode"):
        assert getattr(theirs, k) == cfg.to_dict()[k], k
    assert str(theirs.task_type) in ("CAUSAL_LM", "TaskType.CAUSAL_LM") and set(theirs.target_modules) == {"q_proj", "v_proj"}
    back = LoraConfig.load(str(tmp_path))
    assert back.to_dict() == cfg.to_dict()
    assert back.rank_for("model.layers.0.self_attn.v_proj") == 8 and back.rank_for("model.layers.0.self_attn.q_proj") == 64


def test_peft_written_config_reads_here(tmp_path):
    peft.LoraConfig(r=16, lora_alpha=32, target_modules=["o_proj"], modules_to_save=["lm_head"],
                    task_type="CAUSAL_LM").save_pretrained(str(tmp_path))
    cfg = LoraConfig.load(str(tmp_path / "adapter_config.json"))
    assert (cfg.r, cfg.lora_alpha, cfg.target_modules, cfg.modules_to_save) == (16, 32, ["o_proj"], ["lm_head"])
