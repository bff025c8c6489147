"""Autoregressive generation with a KV cache: greedy, temperature, top-k, top-p; batched prompts with left padding.

    new_ids = generate(model, [ids_1, ids_2], max_new_tokens=64, temperature=0.7, top_p=0.9)

Prompts of different lengths are left-padded to a common length P, so every row's next token sits in the same
column; the attention mask hides the pads and positions are counted over real tokens only, so a padded row computes
what it would compute alone. Step 0 runs the whole prompt (B, P) and fills the cache; each later step feeds the B
newest tokens (B, 1) and attends over the cache. A row stops at an EOS token; generation stops when every row has or
after ``max_new_tokens``.

Sampling of the next token from the last logits ``l (B, V)``: greedy ``argmax l`` when ``temperature == 0``; else
``l / temperature``, then top-k (keep the k largest), then top-p (keep the smallest set of most likely tokens whose
probability sums to >= p), then one draw from ``softmax``. This is the order transformers applies them in.

Command line: ``python -m llama.generate [--model DIR_OR_ID] --prompt "..."`` prints the completion; without
``--model`` it uses the embedded SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from .kv_cache import KVCache
from .model import LlamaForCausalLM


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) -> fp32 logits / temperature with the tokens outside top-k and top-p set to -inf."""
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)  # ascending, (B, V)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
        drop = cum <= 1.0 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,): argmax when temperature is 0, else a draw from the filtered softmax."""
    if not temperature:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> input_ids (B, P) left-padded with ``pad_id`` and attention_mask (B, P) of 1/0."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def generate(model: LlamaForCausalLM, prompts: Sequence[Sequence[int]] | Sequence[int], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None) -> list[list[int]]:
    """Continue each prompt (a list of token ids, or a list of such lists); returns the new tokens of each, up to and
    including its first EOS. ``eos_token_id`` defaults to the model config's; ``pad_token_id`` to EOS."""
    single = len(prompts) > 0 and isinstance(prompts[0], int)
    batch = [list(prompts)] if single else [list(p) for p in prompts]
    if eos_token_id is None:
        eos_token_id = model.args.eos_token_id
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                       dtype=torch.long, device=model.device)
    if pad_token_id is None:
        pad_token_id = model.args.pad_token_id if model.args.pad_token_id is not None else (
            int(eos[0]) if len(eos) else 0)
    ids, mask = left_pad(batch, pad_token_id, model.device)  # (B, P) each
    B, P = ids.shape
    cache = KVCache.for_model(model, B, P + max_new_tokens) if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    out = torch.empty((B, 0), dtype=torch.long, device=model.device)
    step_ids = ids
    padded = not bool(mask.all())  # without padding the model needs no mask: causal SDPA, positions 0, 1, ...
    for _ in range(max_new_tokens):
        step_mask = mask if padded else None
        if cache is not None:
            logits = model(step_ids, attention_mask=step_mask, cache=cache, logits_to_keep=1).logits[:, -1]  # (B, V)
        else:
            full = torch.cat([ids, out], dim=1)  # (B, P + t)
            logits = model(full, attention_mask=step_mask, logits_to_keep=1).logits[:, -1]  # (B, V)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)  # (B, t+1)
        done |= torch.isin(nxt, eos)
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=mask.device)], dim=1)  # (B, P+t+1)
        step_ids = nxt[:, None]  # (B, 1)
        if bool(done.all()):
            break
    result = []
    for row, finished in zip(out.tolist(), done.tolist()):
        if finished:
            first_eos = next(i for i, t in enumerate(row) if t in set(eos.tolist()))
            row = row[: first_eos + 1]
        result.append(row)
    return result[0] if single else result


def complete(model: LlamaForCausalLM, tokenizer, prompts: Sequence[str] | str, chat: bool = False,
             **kwargs) -> list[str] | str:
    """Text in, text out: encode each prompt (as one user message of the chat template when ``chat``), generate,
    decode the new tokens without special tokens."""
    single = isinstance(prompts, str)
    texts = [prompts] if single else list(prompts)
    if chat:
        ids = [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                             tokenize=True) for t in texts]
    else:
        ids = [tokenizer.encode(t) for t in texts]
    kwargs.setdefault("eos_token_id", tokenizer.eos_id)
    kwargs.setdefault("pad_token_id", tokenizer.pad_id)
    new = generate(model, ids, **kwargs)
    outs = [tokenizer.decode(n, skip_special_tokens=True) for n in new]
    return outs[0] if single else outs


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import load_model, resolve_model_dir
    from .tokenizer import load_tokenizer

    p = argparse.ArgumentParser(prog="python -m llama.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model directory or hub id (default: the embedded SmolLM2)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--chat", choices=["auto", "yes", "no"], default="auto",
                   help="wrap the prompt in the model's chat template (auto: when the tokenizer has one)")
    p.add_argument("--quantize", choices=["nf4", "fp4"], default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    model_dir = resolve_model_dir(a.model)
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    model = load_model(model_dir, quantize=a.quantize, device=a.device, dtype=dtype)
    tok = load_tokenizer(model_dir)
    chat = tok.chat_template is not None if a.chat == "auto" else a.chat == "yes"
    gen = torch.Generator(device=a.device).manual_seed(a.seed)
    text = complete(model, tok, a.prompt, chat=chat, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                    top_k=a.top_k, top_p=a.top_p, generator=gen)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
