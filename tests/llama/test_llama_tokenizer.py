"""Tokenizers against Hugging Face's on a few hundred strings (unicode, odd whitespace, special tokens as text):
SmolLM2's tokenizer.json built from the GGUF vs transformers' tokenizer of the same GGUF, and a sentencepiece model
trained here vs the `tokenizers` form Llama 2 ships (and vs sentencepiece itself on plain text)."""
import json

import pytest
import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from transformers.convert_slow_tokenizer import SentencePieceExtractor

from llama import HFTokenizer, SentencePieceTokenizer, load_tokenizer

from .llama_helpers import random_strings

SMOL_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"]
LLAMA_SPECIALS = ["<s>", "</s>", "<unk>"]


def first_difference(ours, theirs, strings):
    for s, a, b in zip(strings, ours, theirs):
        if a != b:
            return f"{s!r}: ours {a} vs theirs {b}"
    return None


def smollm2_original_pre_tokenizer(hf_tokenizer) -> Tokenizer:
    """transformers' GGUF tokenizer with SmolLM2's own pre-tokenizer: Digits(individual_digits) then ByteLevel.

    transformers' GGUF converter ignores ``tokenizer.ggml.pre = "smollm"`` and uses plain ByteLevel; SmolLM2's
    tokenizer.json and llama.cpp's "smollm" pre-tokenizer both split every numeric character off first. They can differ
    only next to numeric characters (" ½": ["Ġ", "Â½"] vs ["ĠÂ", "½"]; "a  42": [.., "ĠĠ", "4", "2"] vs
    [.., "Ġ", "Ġ", "4", "2"]), since the vocabulary holds no multi-digit tokens and no merges of digits."""
    tok = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    return tok


def has_numeral(s: str) -> bool:
    return any(c.isnumeric() for c in s)


def test_smollm2_ids_match_transformers(smollm_dir, hf_gguf_tokenizer):
    tok = load_tokenizer(smollm_dir)
    assert isinstance(tok, HFTokenizer)
    strings = random_strings(400, SMOL_SPECIALS, seed=0)
    ours = [tok.encode(s) for s in strings]
    oracle = smollm2_original_pre_tokenizer(hf_gguf_tokenizer)
    theirs = [oracle.encode(s).ids for s in strings]
    assert first_difference(ours, theirs, strings) is None
    assert sum(len(x) for x in ours) > 5000
    assert any(1 in x for x in ours) and any(2 in x for x in ours)  # <|im_start|>, <|im_end|> matched as tokens
    # transformers' own GGUF tokenizer, unmodified: equal wherever the pre-tokenizers cannot disagree
    plain = [hf_gguf_tokenizer(s)["input_ids"] for s in strings]
    differ = [s for s, a, b in zip(strings, ours, plain) if a != b]
    assert all(has_numeral(s) for s in differ), differ[:3]
    assert len(differ) < len(strings) // 4


def test_smollm2_special_ids_and_decode(smollm_dir, hf_gguf_tokenizer):
    tok = load_tokenizer(smollm_dir)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 2, 49152)
    assert (tok.bos_id, tok.eos_id) == (hf_gguf_tokenizer.bos_token_id, hf_gguf_tokenizer.eos_token_id)
    for s in random_strings(60, SMOL_SPECIALS, seed=1):
        ids = tok.encode(s)
        assert tok.decode(ids, skip_special_tokens=False) == s  # byte-level BPE is lossless
        assert tok.decode(ids) == hf_gguf_tokenizer.decode(ids, skip_special_tokens=True)


def llama2_style_tokenizer_json(model_file) -> Tokenizer:
    """The `tokenizers` pipeline of Llama 2's tokenizer.json on the Hub: BPE with byte fallback over the
    sentencepiece vocabulary and merges, normalizer Prepend("▁") + Replace(" ", "▁"), "<s> $A" post-processor."""
    kw = SentencePieceExtractor(str(model_file)).extract(BPE)
    tok = Tokenizer(BPE(kw["vocab"], kw["merges"], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in LLAMA_SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def test_sentencepiece_ids_match_hf_tokenizers(sp_model_path):
    tok = SentencePieceTokenizer(sp_model_path)
    hf = llama2_style_tokenizer_json(sp_model_path)
    strings = random_strings(400, LLAMA_SPECIALS, seed=2)
    ours = [tok.encode(s) for s in strings]
    theirs = [hf.encode(s).ids for s in strings]
    assert first_difference(ours, theirs, strings) is None
    assert all(x[0] == 1 for x in ours)
    assert any(3 <= i < 3 + 256 for x in ours for i in x)  # byte-fallback pieces were exercised


def test_sentencepiece_plain_text_matches_sentencepiece(sp_model_path):
    tok = SentencePieceTokenizer(sp_model_path)
    sp = spm.SentencePieceProcessor(model_file=str(sp_model_path))
    strings = random_strings(300, ["§"], seed=3)
    assert [tok.encode(s) for s in strings] == [[1] + sp.encode(s) for s in strings]
    for s in strings[:50]:
        assert tok.decode(tok.encode(s)) == sp.decode(sp.encode(s))


def test_sentencepiece_conventions(sp_model_path, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sp_model_path.read_bytes())
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)  # pad = eos
    assert tok.encode("hi", add_special_tokens=False) == tok.encode("hi")[1:]
    assert tok.encode("a</s>") [-1] == 2 and tok.decode(tok.encode("a</s>"), skip_special_tokens=False) == "<s>a</s>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False, "add_eos_token": True}))
    tok = load_tokenizer(tmp_path)
    assert tok.encode("hi")[0] != 1 and tok.encode("hi")[-1] == 2


def test_tokenizer_json_preferred_over_tokenizer_model(sp_model_path, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sp_model_path.read_bytes())
    llama2_style_tokenizer_json(sp_model_path).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.encode("hello world")[0] == 1 and tok.pad_id == 2


def test_bad_tokenizer_files(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="tokenizer.model: not a valid sentencepiece model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
