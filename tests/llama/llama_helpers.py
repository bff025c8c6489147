"""Helpers shared by the tests of llama/: string generators, random parameters, a one-element-mismatch assert."""
from __future__ import annotations

import random

import torch

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "<|im_start|>user\nGive me three tips for staying healthy.<|im_end|>\n<|im_start|>assistant\n",
]


WORDS = ("the quick brown fox jumps over a lazy dog while language models learn to quantize adapters and weights "
         "Llama tokens 2023 3.14159 42 1e-5 café naïve über résumé façade Ångström "
         "東京 日本語 中文 한국어 привет мир Ελληνικά שלום مرحبا हिन्दी 🙂 🚀 👩‍💻 ∑ √ ∞ → ½ ‰ "
         "don't it's we'll they've I'm (parens) [brackets] {braces} <tags> \"quotes\" 'single' #hash @at $5 %p "
         "snake_case camelCase kebab-case path/to/file.py http://example.com a.b.c").split()


def random_strings(n: int, specials: list[str], seed: int = 0) -> list[str]:
    """Strings with unicode, digits, punctuation, odd whitespace and special tokens written as text."""
    rng = random.Random(seed)
    seps = [" ", " ", " ", "  ", "\n", "\n\n", "\t", " \n ", ""]
    out = ["", " ", "  ", "\n", "a", " a", "a ", "  leading", "trailing  ", "x" * 50] + specials
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            parts.append(rng.choice(specials) if r < 0.1 else rng.choice(WORDS))
            parts.append(rng.choice(seps))
        s = "".join(parts)
        if rng.random() < 0.2:
            s = " " + s
        out.append(s)
    return out


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Every parameter random (norm weights around 1), so parity tests see no structure-hiding zeros or ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return model


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    """Fails on a single element off by more than ``atol``; the message names the worst element."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    worst = diff.max().item() if diff.numel() else 0.0
    if not worst <= atol:  # also catches NaN
        idx = tuple(int(t) for t in torch.nonzero(diff == diff.max())[0]) if diff.numel() else ()
        raise AssertionError(f"{what}: max abs diff {worst:.3g} > {atol:g} at {idx}")
