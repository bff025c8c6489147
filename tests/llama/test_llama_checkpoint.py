"""Checkpoints: single and sharded safetensors both ways with transformers, and every kind of bad input raising a
clear error (never a half-loaded model)."""
import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from llama import CheckpointError, LlamaForCausalLM, ModelArgs, load_model, load_tokenizer, save_model

from .llama_helpers import assert_close, randomize_


def tiny_hf(tie=False, seed=0):
    args = ModelArgs.from_name("tiny", vocab_size=120, tie_word_embeddings=tie)
    return randomize_(transformers.LlamaForCausalLM(transformers.LlamaConfig(**args.to_dict())), seed).eval()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_single")
    tiny_hf().save_pretrained(str(d))
    return d


@pytest.fixture
def broken(hf_dir, tmp_path):
    """A fresh copy of a good checkpoint to damage."""
    d = tmp_path / "ckpt"
    shutil.copytree(hf_dir, d)
    return d


IDS = torch.randint(0, 120, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_load_what_transformers_saved(tmp_path, tie, shard):
    hf = tiny_hf(tie)
    kw = {"max_shard_size": shard} if shard else {}
    hf.save_pretrained(str(tmp_path), **kw)
    assert (tmp_path / "model.safetensors.index.json").is_file() == bool(shard)
    ours = load_model(tmp_path)
    assert not any(p.is_meta for p in ours.parameters())
    with torch.no_grad():
        assert_close(ours(IDS).logits, hf(IDS).logits, 1e-5, "logits after loading")


def test_failed_save_keeps_the_checkpoint_already_there(tmp_path, monkeypatch):
    """A save that fails on its second shard (a full disk) leaves the earlier checkpoint loadable and no temp files;
    a later save into the same directory from a sharded to a single file removes the old shards and index."""
    import llama.checkpoint as ck

    first = LlamaForCausalLM(ModelArgs.from_name("tiny", vocab_size=100))
    save_model(first, tmp_path, max_shard_size="30KB")
    before = sorted(p.name for p in tmp_path.iterdir())
    real, calls = ck.save_file, []

    def failing(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "save_file", failing)
    torch.manual_seed(1)
    with pytest.raises(OSError, match="No space left"):
        save_model(LlamaForCausalLM(ModelArgs.from_name("tiny", vocab_size=100)), tmp_path, max_shard_size="30KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path)(IDS[:, :5] % 100).logits, first(IDS[:, :5] % 100).logits)
    monkeypatch.setattr(ck, "save_file", real)
    save_model(first, tmp_path)                                            # one file now: old shards and index go
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("shard", ["5GB", "30KB"])
def test_save_loads_in_transformers_and_back(tmp_path, shard):
    hf = tiny_hf(tie=True, seed=3)
    ours = LlamaForCausalLM(ModelArgs.from_dict(hf.config.to_dict()))
    ours.load_state_dict(hf.state_dict(), strict=False)
    save_model(ours, tmp_path, max_shard_size=shard)
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    if shard == "5GB":
        assert files == ["model.safetensors"]
    else:
        assert len(files) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(hf.state_dict()) - {"lm_head.weight"}
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    again = load_model(tmp_path)
    with torch.no_grad():
        ref = hf(IDS).logits
        assert_close(back(IDS).logits, ref, 1e-5, "transformers loading our save")
        assert_close(again(IDS).logits, ref, 1e-5, "our load of our save")


def test_load_casts_dtype(hf_dir):
    m = load_model(hf_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def test_missing_config(broken):
    (broken / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(broken)


def test_missing_weights(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        load_model(broken)


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")


def test_missing_tokenizer(broken):
    with pytest.raises(FileNotFoundError, match="no tokenizer in .*tokenizer.json or tokenizer.model"):
        load_tokenizer(broken)


def test_wrong_shape_names_tensor_and_both_shapes(broken):
    sd = load_file(str(broken / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(159, 64)
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_model(broken)
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "[159, 64]" in msg and "[160, 64]" in msg
    assert "model.safetensors" in msg


def test_missing_and_unexpected_keys(broken):
    sd = load_file(str(broken / "model.safetensors"))
    del sd["model.layers.0.self_attn.k_proj.weight"]
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as e:
        load_model(broken)
    assert "missing 1 tensors: model.layers.0.self_attn.k_proj.weight" in str(e.value)
    assert "unexpected 1 tensors: model.layers.0.self_attn.extra.weight" in str(e.value)


def test_untied_model_needs_lm_head(broken):
    sd = load_file(str(broken / "model.safetensors"))
    del sd["lm_head.weight"]
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing 1 tensors: lm_head.weight"):
        load_model(broken)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_corrupt_safetensors_names_the_file(broken, damage):
    path = broken / "model.safetensors"
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) - 1000]
    elif damage == "garbage":
        data = b"\x00" * 64 + data[64:200]
    else:
        data = data[:8] + b"{" * 20 + data[28:]
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        load_model(broken)


def test_sharded_index_problems(tmp_path):
    tiny_hf().save_pretrained(str(tmp_path), max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).rename(tmp_path / "moved.bin")
    with pytest.raises(FileNotFoundError, match=f"{shard}: listed in model.safetensors.index.json but missing"):
        load_model(tmp_path)
    (tmp_path / "moved.bin").rename(tmp_path / shard)
    (tmp_path / "model.safetensors.index.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match="not a safetensors index"):
        load_model(tmp_path)


def test_unsupported_architecture_in_checkpoint(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["Qwen2ForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
        load_model(broken)


def test_bad_quantize_argument(hf_dir):
    with pytest.raises(ValueError, match="quantize='int3'"):
        load_model(hf_dir, quantize="int3")
