"""The embedded SmolLM2-135M-Instruct, imported from its GGUF by llama.gguf_import, against transformers loading the
same GGUF file: logits within 1e-4 and the same 32-token greedy continuation for three prompts."""
import json

import pytest
import torch
import transformers

from llama import ModelArgs, generate, load_tokenizer
from llama.gguf_import import hf_name, unpermute_qk

from .llama_helpers import PROMPTS, assert_close


@pytest.fixture(scope="module")
def prompt_ids(smollm_dir):
    tok = load_tokenizer(smollm_dir)
    return [tok.encode(p) for p in PROMPTS]


def test_imported_layout(smollm_dir):
    names = sorted(p.name for p in smollm_dir.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    a = ModelArgs.from_json(smollm_dir)
    assert (a.num_hidden_layers, a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.vocab_size,
            a.tie_word_embeddings, a.rope_theta, a.head_dim) == (30, 576, 9, 3, 49152, True, 100000.0, 64)
    cfg = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert "<|im_start|>assistant" in cfg["chat_template"]


def test_unpermute_inverts_llama_cpp_permute():
    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(3 * 8, 5)
    assert torch.equal(unpermute_qk(permute(w, 3), 3), w)
    assert hf_name("blk.7.ffn_gate.weight") == "model.layers.7.mlp.gate_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(ValueError, match="no Llama counterpart"):
        hf_name("blk.0.attn_qkv.weight")


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_logits_match_transformers_gguf(smollm, hf_gguf_model, prompt_ids, i):
    ids = torch.tensor([prompt_ids[i]])
    with torch.no_grad():
        assert_close(smollm(ids).logits, hf_gguf_model(ids).logits, 1e-4, f"logits of prompt {i}")


def test_transformers_loads_the_imported_directory(smollm, smollm_dir, prompt_ids):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(smollm_dir)).eval()
    ids = torch.tensor([prompt_ids[0]])
    with torch.no_grad():
        assert_close(hf(ids).logits, smollm(ids).logits, 1e-4, "transformers on the imported safetensors")


@pytest.fixture(scope="module")
def greedy_32(smollm, prompt_ids):
    """Our greedy continuation of each prompt alone, 32 new tokens (or up to EOS)."""
    return [generate(smollm, p, max_new_tokens=32) for p in prompt_ids]


@pytest.mark.parametrize("i", range(len(PROMPTS)))
def test_greedy_continuation_matches_transformers(hf_gguf_model, prompt_ids, greedy_32, i):
    ids = torch.tensor([prompt_ids[i]])
    out = hf_gguf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                 pad_token_id=2, eos_token_id=2)
    theirs = out[0, ids.shape[1]:].tolist()
    assert greedy_32[i] == theirs
    assert len(theirs) == 32 or theirs[-1] == 2


def test_batched_left_padded_equals_one_by_one(smollm, prompt_ids, greedy_32):
    assert len({len(p) for p in prompt_ids}) == len(prompt_ids)  # really different lengths: padding is exercised
    assert generate(smollm, prompt_ids, max_new_tokens=32) == greedy_32


def test_kv_cache_equals_recomputation(smollm, prompt_ids, greedy_32):
    assert generate(smollm, prompt_ids, max_new_tokens=12, use_cache=False) == [g[:12] for g in greedy_32]


def test_embedded_import_is_atomic_and_announced_once(tmp_path, monkeypatch, capsys):
    """The conversion writes into a temporary directory renamed into place; a partial directory is replaced; the
    progress message appears only when converting. (gguf_to_hf is stubbed: the real one ran for the fixtures.)"""
    from llama import gguf_import

    calls = []

    def fake_gguf_to_hf(src, out):
        calls.append(out)
        assert out.parent == tmp_path and out.name.startswith(".smollm2-135m-instruct-")  # a temporary directory
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (out / name).write_text("{}")

    monkeypatch.setenv("QLORA_CACHE", str(tmp_path))
    monkeypatch.setattr(gguf_import, "gguf_to_hf", fake_gguf_to_hf)
    (tmp_path / "smollm2-135m-instruct").mkdir()
    (tmp_path / "smollm2-135m-instruct" / "config.json").write_text("partial")  # an interrupted copy
    d = gguf_import.embedded_model_dir()
    assert d == tmp_path / "smollm2-135m-instruct" and (d / "model.safetensors").is_file()
    assert gguf_import.embedded_model_dir() == d and len(calls) == 1
    assert capsys.readouterr().err.count("importing SmolLM2-135M-Instruct.Q4_1.gguf") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct"]  # no temporary left behind
