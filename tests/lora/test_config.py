"""LoraConfig has peft's fields and defaults; adapter_config.json round-trips through peft's LoraConfig."""
import dataclasses
import json

import pytest

from lora import LoraConfig
from .lora_testlib import peft


def test_fields_and_defaults_are_peft_s():
    """Every field of ours is peft's with peft's default; a field peft has beyond ours (a newer peft's, e.g.
    0.22's astra_config) is off by default (None, False or empty), so peft's own files read here (below)."""
    ours = {f.name: f for f in dataclasses.fields(LoraConfig)}
    theirs = {f.name: f for f in dataclasses.fields(peft.LoraConfig) if f.name != "runtime_config"}
    assert set(ours) <= set(theirs), sorted(set(ours) - set(theirs))
    mine, ref = LoraConfig().to_dict(), peft.LoraConfig().to_dict()
    for k in ref:
        if k not in ours:
            assert ref[k] is None or ref[k] is False or ref[k] in ({}, [], ""), (k, ref[k])
        elif k not in ("inference_mode", "peft_version", "peft_type", "target_modules"):
            assert mine[k] == ref[k], k


def test_newer_null_fields_are_kept_and_set_ones_rejected(tmp_path):
    """A field this package does not know is read and written back when null / false / empty (a newer peft's
    default), and rejected, named with its value, when set."""
    d = LoraConfig(r=4, target_modules=["q_proj"]).to_dict()
    d.update(future_config=None, future_flag=False)
    cfg = LoraConfig.from_dict(d, source="x.json")
    back = cfg.to_dict()
    assert back["future_config"] is None and back["future_flag"] is False and back["r"] == 4
    cfg.save(str(tmp_path))
    assert LoraConfig.load(str(tmp_path)).to_dict() == back
    d["future_config"] = {"rank": 3}
    with pytest.raises(ValueError, match=r"x.json: unknown field\(s\) \['future_config'\] \(set to \[\{'rank': 3\}\]"):
        LoraConfig.from_dict(d, source="x.json")


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
