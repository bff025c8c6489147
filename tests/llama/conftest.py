"""Shared fixtures for tests/llama: the embedded SmolLM2 imported once per session, transformers' own load of the
same GGUF (the parity oracle), and a sentencepiece model trained on the spot."""
from __future__ import annotations

import random

import pytest
import torch

from .llama_helpers import WORDS


@pytest.fixture(scope="package", autouse=True)
def one_intra_op_thread():
    """Run these tests with one torch thread, restored afterwards. On the 2-core test machine two intra-op threads
    stall whenever another process holds a core (a 32-token SmolLM2 decode went from 2 s to 10 s under load);
    one thread is steady and about as fast for a 135M model at batch <= 3."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smollm_dir():
    from llama import embedded_model_dir

    return embedded_model_dir()


@pytest.fixture(scope="session")
def smollm(smollm_dir):
    from llama import load_model

    return load_model(smollm_dir)


@pytest.fixture(scope="session")
def gguf_path():
    from llama.gguf_import import embedded_gguf_path

    return embedded_gguf_path()


@pytest.fixture(scope="session")
def hf_gguf_model(gguf_path):
    """transformers' LlamaForCausalLM loading the GGUF itself (its own dequantization and Q/K un-permutation)."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(gguf_path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory):
    """A Llama-2-style sentencepiece BPE model (byte fallback, split digits, identity normalization, dummy prefix)
    trained in well under a second on a generated corpus."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("spm")
    rng = random.Random(1)
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 20))) for _ in range(4000)))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=600, model_type="bpe",
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", add_dummy_prefix=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )
    return d / "tokenizer.model"
