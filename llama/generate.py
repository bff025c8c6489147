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


GRAPH_LEN_BUCKET = 256  # graph decoding rounds the cache length up to this: one graph serves many lengths


def _graph_fingerprint(model: torch.nn.Module) -> tuple[tuple, tuple]:
    """What a captured decode graph depends on besides the batch size and cache length: every module (a merged or
    swapped layer is a new module), every parameter's and buffer's storage (a reloaded weight is a new tensor;
    in-place updates, as an optimizer makes, are seen by the replay) and train/eval mode. Returns (key, refs):
    the held graph keeps `refs` alive, so no id or address in its key can be reused by a new object while it is
    held (`release_decode_graph` drops both)."""
    modules = list(model.modules())
    params, buffers = list(model.parameters()), list(model.buffers())
    quantized = [m.qweight for m in modules if getattr(m, "qweight", None) is not None]  # NF4 linears
    key = (model.training, tuple(id(m) for m in modules), tuple(t.data_ptr() for t in params),
           tuple(t.data_ptr() for t in buffers), tuple((id(q), q.packed.data_ptr()) for q in quantized))
    return key, (modules, params, buffers, quantized)


def release_decode_graph(model: torch.nn.Module) -> None:
    """Free the CUDA graph, KV cache and references that graph decoding keeps with `model` for later calls."""
    model._decode_graph = None


class StaticDecodeStep:
    """One decode step (B new tokens, one each) against a KV cache in static mode, in fixed buffers.

    ``graph=False`` runs it eagerly. ``graph=True`` (CUDA) runs ``warmup`` steps eagerly on a side stream (the NF4
    dispatcher times its candidates, Triton compiles, cuBLAS sets up on first use), then captures the next step in
    a CUDA graph and replays it from then on: the whole model forward, the cache writes and the position updates
    are one launch from the host, where an eager step pays Python and launch overhead for every op (hundreds per
    layer stack). The returned logits live in the graph's output buffer: read them before the next call."""

    def __init__(self, model: LlamaForCausalLM, cache: KVCache, key_mask: torch.Tensor, next_pos: torch.Tensor,
                 graph: bool, warmup: int = 2) -> None:
        if graph and not cache.k[0].is_cuda:
            raise ValueError("StaticDecodeStep: CUDA-graph decoding needs the model and cache on a CUDA device")
        self.model, self.cache, self.graph_mode, self.warmup = model, cache, graph, warmup
        self.ids = torch.zeros((key_mask.shape[0], 1), dtype=torch.long, device=key_mask.device)  # (B, 1)
        self.pos_ids = next_pos.clone()  # (B, 1) position of the token fed next
        self.key_mask = key_mask  # (B, max_len)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.calls = 0

    def reset(self, key_mask: torch.Tensor, next_pos: torch.Tensor) -> None:
        """Reuse this step (and its captured graph) for a new sequence of the same batch size and cache length:
        the new values go into the same buffers."""
        self.key_mask.copy_(key_mask)
        self.pos_ids.copy_(next_pos)

    def _body(self) -> torch.Tensor:
        mask = self.cache.static_mask(self.key_mask)  # (B, 1, 1, max_len)
        logits = self.model(self.ids, attention_mask=mask, position_ids=self.pos_ids, cache=self.cache,
                            logits_to_keep=1).logits[:, -1]  # (B, V)
        self.cache.step()
        self.pos_ids.add_(1)
        return logits

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, 1) -> logits (B, V) of the next token."""
        self.ids.copy_(ids)
        if not self.graph_mode:
            return self._body()
        if self.graph is None:
            if self.calls < self.warmup:
                self.calls += 1
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = self._body()
                torch.cuda.current_stream().wait_stream(side)
                return out
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # recorded, not run: the replay below computes this step
                self.logits = self._body()
        self.graph.replay()
        return self.logits


@torch.inference_mode()
def generate(model: LlamaForCausalLM, prompts: Sequence[Sequence[int]] | Sequence[int], max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             use_cache: bool = True, generator: torch.Generator | None = None,
             decode: str = "auto") -> list[list[int]]:
    """Continue each prompt (a list of token ids, or a list of such lists); returns the new tokens of each, up to and
    including its first EOS. ``eos_token_id`` defaults to the model config's; ``pad_token_id`` to EOS.

    ``decode`` picks how the steps after the prompt run: "dynamic" (the cache grows by one position a step),
    "static" (fixed-shape steps against the whole preallocated cache, see :class:`StaticDecodeStep`), "graph"
    (static steps captured once in a CUDA graph and replayed) or "auto" (graph on CUDA with a cache, else dynamic).
    All three compute the same tokens; the prompt itself always runs as one dynamic forward. With "graph" the
    cache length is rounded up to a multiple of 256 and the cache and captured graph stay with the model
    (``model._decode_graph``, one at a time; `release_decode_graph` frees them), so later calls with the same batch
    size and length bucket replay it at once; a changed model (modules, weight storage, train/eval mode:
    `_graph_fingerprint`) captures anew."""
    if decode not in ("auto", "dynamic", "static", "graph"):
        raise ValueError(f"generate: decode must be auto, dynamic, static or graph, got {decode!r}")
    if decode == "auto":
        decode = "graph" if use_cache and model.device.type == "cuda" else "dynamic"
    if decode != "dynamic" and not use_cache:
        raise ValueError(f"generate: decode={decode!r} needs the KV cache (use_cache=True)")
    if decode == "graph" and model.device.type != "cuda":
        raise ValueError(f"generate: decode='graph' needs a CUDA model, got one on {model.device}")
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
    stepper = None
    if decode == "graph":
        max_len = -(-(P + max_new_tokens) // GRAPH_LEN_BUCKET) * GRAPH_LEN_BUCKET
        fingerprint, refs = _graph_fingerprint(model)
        key = (B, max_len, fingerprint)
        held = getattr(model, "_decode_graph", None)
        if held is not None and held[0] == key:
            _, cache, stepper, _ = held
            cache.reset()
        else:
            model._decode_graph = None  # free the previous graph and cache before making new ones
            cache = KVCache.for_model(model, B, max_len)
    else:
        cache = KVCache.for_model(model, B, P + max_new_tokens) if use_cache else None
    done = torch.zeros(B, dtype=torch.bool, device=model.device)
    out = torch.empty((B, 0), dtype=torch.long, device=model.device)
    step_ids = ids
    padded = not bool(mask.all())  # without padding the model needs no mask: causal SDPA, positions 0, 1, ...
    started = False
    for t in range(max_new_tokens):
        step_mask = mask if padded else None
        if t > 0 and decode != "dynamic":
            if not started:  # after the prompt: positions P.. are all real tokens (rows already done emit pads)
                started = True
                cache.start_static()
                prompt_mask = mask[:, :P]  # (B, P)
                key_mask = torch.cat([prompt_mask, torch.ones((B, cache.max_len - P), dtype=mask.dtype,
                                                              device=mask.device)], dim=1)  # (B, max_len)
                next_pos = prompt_mask.sum(-1, keepdim=True)  # (B, 1): real prompt tokens = next position
                if stepper is None:
                    stepper = StaticDecodeStep(model, cache, key_mask, next_pos, decode == "graph")
                    if decode == "graph":
                        model._decode_graph = (key, cache, stepper, refs)
                else:
                    stepper.reset(key_mask, next_pos)
            logits = stepper(step_ids)  # (B, V)
        elif cache is not None:
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
    p.add_argument("--prompt", required=True, action="append",
                   help="repeat for several prompts: they are generated as one left-padded batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--chat", choices=["auto", "yes", "no"], default="auto",
                   help="wrap the prompt in the model's chat template (auto: when the tokenizer has one)")
    p.add_argument("--quantize", choices=["nf4", "fp4"], default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode", choices=["auto", "dynamic", "static", "graph"], default="auto",
                   help="decode steps: auto = one CUDA graph per step on a GPU, the growing KV cache on a CPU")
    a = p.parse_args(argv)
    model_dir = resolve_model_dir(a.model)
    tok = load_tokenizer(model_dir)
    chat = tok.chat_template is not None if a.chat == "auto" else a.chat == "yes"
    for i, prompt in enumerate(a.prompt, 1):  # before the model loads: a bad prompt fails in a second, not a minute
        if not chat and not tok.encode(prompt):
            p.error(f"--prompt number {i} ({prompt!r}) has no tokens (without the chat template there is nothing "
                    "to continue)")
    dtype = torch.bfloat16 if a.device.startswith("cuda") else torch.float32
    model = load_model(model_dir, quantize=a.quantize, device=a.device, dtype=dtype)
    gen = torch.Generator(device=a.device).manual_seed(a.seed)
    texts = complete(model, tok, a.prompt, chat=chat, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                     top_k=a.top_k, top_p=a.top_p, generator=gen, decode=a.decode)
    for i, (prompt, text) in enumerate(zip(a.prompt, texts), 1):  # one prompt: its text alone
        print(text if len(texts) == 1 else f"=== {i}: {prompt}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
