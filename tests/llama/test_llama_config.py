"""ModelArgs from config.json, the table of named sizes, and refusals of what is not implemented."""
import dataclasses
import json

import pytest
import transformers

from llama import NAMED_SIZES, ModelArgs

LLAMA2_7B_CONFIG = {  # NousResearch/Llama-2-7b-chat-hf config.json
    "_name_or_path": "meta-llama/Llama-2-7b-chat-hf", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": 0, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.32.0.dev0", "use_cache": True, "vocab_size": 32000,
}


def test_llama2_7b_config_json():
    a = ModelArgs.from_dict(LLAMA2_7B_CONFIG)
    assert (a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.n_rep) == (4096, 32, 32, 128, 1)
    assert a.rope_theta == 10000.0 and a.rms_norm_eps == 1e-5 and not a.tie_word_embeddings
    assert a.torch_dtype == "float16" and a.extra["initializer_range"] == 0.02


@pytest.mark.parametrize("name", ["llama-2-7b", "llama-2-13b", "llama-2-70b", "tinyllama-1.1b", "smollm2-135m",
                                  "tiny", "tiny-mha"])
def test_named_sizes_round_trip_through_transformers(name):
    a = ModelArgs.from_name(name)
    cfg = transformers.LlamaConfig(**a.to_dict())
    assert cfg.num_key_value_heads == a.num_key_value_heads and cfg.head_dim == a.head_dim
    assert dataclasses.replace(ModelArgs.from_dict(cfg.to_dict()), extra={}) == a


def test_named_sizes_facts():
    assert ModelArgs.from_name("llama-2-70b").n_rep == 8  # grouped-query attention
    assert ModelArgs.from_name("tinyllama-1.1b").num_key_value_heads == 4
    s = ModelArgs.from_name("smollm2-135m")
    assert (s.num_hidden_layers, s.hidden_size, s.num_attention_heads, s.num_key_value_heads, s.vocab_size,
            s.tie_word_embeddings, s.rope_theta) == (30, 576, 9, 3, 49152, True, 100000.0)
    assert ModelArgs.from_name("NousResearch/Llama-2-7b-chat").hidden_size == 4096
    assert len(NAMED_SIZES) >= 7


def test_transformers5_rope_parameters_are_read():
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=12345.0).to_dict()
    assert ModelArgs.from_dict(cfg).rope_theta == 12345.0


@pytest.mark.parametrize("change, words", [
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, ["rope scaling", "llama3"]),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, ["rope scaling", "linear"]),
    ({"architectures": ["MistralForCausalLM"]}, ["MistralForCausalLM", "not supported"]),
    ({"architectures": None, "model_type": "gpt2"}, ["gpt2"]),
    ({"hidden_act": "gelu"}, ["gelu"]),
    ({"pretraining_tp": 2}, ["pretraining_tp"]),
    ({"num_key_value_heads": 5}, ["num_key_value_heads"]),
])
def test_unsupported_configs_are_refused(tmp_path, change, words):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA2_7B_CONFIG, **change}))
    with pytest.raises(ValueError) as e:
        ModelArgs.from_json(tmp_path)
    for w in words:
        assert w in str(e.value)
    if "rope" in words[0]:
        assert str(tmp_path / "config.json") in str(e.value)


def test_missing_and_invalid_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelArgs.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelArgs.from_json(tmp_path)
    with pytest.raises(ValueError, match="unknown model name"):
        ModelArgs.from_name("gpt-5")
