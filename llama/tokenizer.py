"""Tokenizers of Llama-family checkpoints: ``tokenizer.json`` (Hugging Face `tokenizers`) or ``tokenizer.model``
(sentencepiece), behind one small interface.

    tok = load_tokenizer(model_dir)
    ids = tok.encode("Hello")                # list[int]; BOS first where the model's convention adds it
    text = tok.decode(ids)                   # special tokens skipped by default
    tok.bos_id, tok.eos_id, tok.pad_id       # pad = eos when the checkpoint names no pad token (Llama 2)
    tok.apply_chat_template(messages, add_generation_prompt=True)   # the model's own chat_template (llama/chat.py)

``load_tokenizer`` prefers ``tokenizer.json`` over ``tokenizer.model``, as transformers does. Special tokens written
in the text (``"<s>"``, ``"<|im_end|>"``) become their ids in both implementations; for sentencepiece the text
between them is encoded piece by piece with sentencepiece's dummy prefix, which is what Llama 2's
``tokenizer.json`` (normalizer ``Prepend("▁")`` + ``Replace(" ", "▁")``) computes.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .chat import render_chat_template


class Tokenizer:
    """Common interface; subclasses implement ``_encode``, ``decode``, ``id_to_token`` and ``token_to_id``."""

    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    vocab_size: int = 0

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id(self.pad_token) if self.pad_token is not None else self.eos_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the model's BOS/EOS convention is applied."""
        ids = self._encode(text)
        if add_special_tokens:
            if self.add_bos and self.bos_id is not None:
                ids = [self.bos_id] + ids
            if self.add_eos and self.eos_id is not None:
                ids = ids + [self.eos_id]
        return ids

    def __call__(self, texts: list[str] | str, add_special_tokens: bool = True) -> list[list[int]] | list[int]:
        if isinstance(texts, str):
            return self.encode(texts, add_special_tokens)
        return [self.encode(t, add_special_tokens) for t in texts]

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = False,
                            tokenize: bool = False, chat_template: str | None = None, **kwargs: Any):
        """Render ``messages`` with the model's ``chat_template`` (jinja2, as transformers renders it); with
        ``tokenize=True`` return ids (the template writes BOS itself, so none is added)."""
        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat_template (tokenizer_config.json); pass chat_template=, "
                             "or use llama.chat.llama2_chat_prompt for Llama 2 [INST] prompts")
        text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                    pad_token=self.pad_token, unk_token=self.unk_token, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` through the `tokenizers` library (byte-level BPE of SmolLM2, Llama 2's converted one).

    BOS/EOS are added by the file's own post-processor (Llama 2: ``<s> $A``), exactly as transformers does."""

    def __init__(self, path: str | os.PathLike, config: dict[str, Any] | None = None) -> None:
        from tokenizers import Tokenizer as _Tokenizer

        self.path = Path(path)
        try:
            self.tok = _Tokenizer.from_file(str(self.path))
        except Exception as e:
            raise ValueError(f"{self.path}: not a valid tokenizer.json ({e})") from e
        config = config or {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            setattr(self, name, _token_str(config.get(name)))
        self.chat_template = config.get("chat_template")
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece ``tokenizer.model`` (Llama 2): ``encode(text) = [BOS] + sp.encode(text)``, pad = EOS.

    Control tokens written in the text (``<s>``, ``</s>``; also ``<unk>``) are matched first and become their ids;
    each stretch of text between them is encoded by sentencepiece on its own."""

    def __init__(self, path: str | os.PathLike, config: dict[str, Any] | None = None) -> None:
        import sentencepiece as spm

        self.path = Path(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except Exception as e:
            raise ValueError(f"{self.path}: not a valid sentencepiece model ({e})") from e
        config = config or {}
        sp = self.sp
        piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
        self.bos_token = _token_str(config.get("bos_token")) or piece(sp.bos_id())
        self.eos_token = _token_str(config.get("eos_token")) or piece(sp.eos_id())
        self.unk_token = _token_str(config.get("unk_token")) or piece(sp.unk_id())
        self.pad_token = _token_str(config.get("pad_token")) or (piece(sp.pad_id()) if sp.pad_id() >= 0 else None)
        self.add_bos = config.get("add_bos_token", True)
        self.add_eos = config.get("add_eos_token", False)
        self.chat_template = config.get("chat_template")
        self.vocab_size = sp.get_piece_size()
        specials = [t for t in (self.unk_token, self.bos_token, self.eos_token) if t]
        specials = sorted(set(specials), key=len, reverse=True)  # longest first
        self._special_re = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def _encode(self, text: str) -> list[int]:
        if self._special_re is None:
            return self.sp.encode(text)
        ids: list[int] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:  # odd parts are the matched special tokens
                ids.append(self.sp.piece_to_id(part))
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if not self.sp.is_control(i)])
        out, run = [], []
        for i in ids:  # sentencepiece drops control pieces in decode; write them back as text
            if self.sp.is_control(i):
                out.append(self.sp.decode(run) + self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if (i == self.sp.unk_id() and token != self.unk_token) else i

    def id_to_token(self, i: int) -> str | None:
        return self.sp.id_to_piece(i)


def _token_str(tok: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as {"content": ...} AddedToken dicts."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer of a model directory (``None`` -> the embedded SmolLM2): ``tokenizer.json`` if present, else
    ``tokenizer.model``; special tokens and ``chat_template`` from ``tokenizer_config.json``."""
    from .checkpoint import resolve_model_dir

    d = resolve_model_dir(path)
    config: dict[str, Any] = {}
    cfg_path = d / "tokenizer_config.json"
    if cfg_path.is_file():
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
    template_file = d / "chat_template.jinja"  # transformers 5 may write the template beside the config
    if "chat_template" not in config and template_file.is_file():
        config["chat_template"] = template_file.read_text()
    if (d / "tokenizer.json").is_file():
        return HFTokenizer(d / "tokenizer.json", config)
    if (d / "tokenizer.model").is_file():
        return SentencePieceTokenizer(d / "tokenizer.model", config)
    raise FileNotFoundError(f"no tokenizer in {d}: expected tokenizer.json or tokenizer.model")
