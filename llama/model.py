"""The Llama decoder: RMSNorm, rotary position embeddings, grouped-query attention, SwiGLU MLP, LM head.

Parameter names are the Hugging Face checkpoint keys, so a ``model.safetensors`` loads without a rename table:

    model.embed_tokens.weight                          (V, C)
    model.layers.{i}.input_layernorm.weight            (C,)
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   (H*D, C), (H_kv*D, C), (H_kv*D, C), (C, H*D)
    model.layers.{i}.post_attention_layernorm.weight   (C,)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    (F, C), (F, C), (C, F)
    model.norm.weight                                  (C,)
    lm_head.weight                                     (V, C)  (the embedding itself when tie_word_embeddings)

Notation: B batch, T new tokens, S key positions (past + new), C hidden_size, H query heads, H_kv key/value heads,
D head_dim, F intermediate_size, V vocab_size. The arithmetic follows transformers' ``LlamaForCausalLM`` operation
for operation (fp32 RMSNorm statistics, rotate-half RoPE), which is what the parity tests check.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ModelArgs
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    """``y = w * x / sqrt(mean(x^2, -1) + eps)``; statistics in fp32, the result cast back before the scale."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer, arXiv 2104.09864), "rotate half" layout as in Hugging Face checkpoints.

    ``inv_freq[j] = theta^(-2j/D)`` for j < D/2; angle ``a[p, j] = p * inv_freq[j]``, repeated to width D as
    ``[a, a]``; then ``rope(x) = x * cos(a) + rotate_half(x) * sin(a)`` with ``rotate_half([x1, x2]) = [-x2, x1]``.
    Position ids are per row, ``(B, T)``, so left-padded rows start at position 0 at their first real token.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self._inv_freq: dict[torch.device, torch.Tensor] = {}  # not a buffer: nothing to load, nothing on meta

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:  # computed on the CPU in fp32 like transformers, then moved
            j2 = torch.arange(0, self.head_dim, 2, dtype=torch.float)
            self._inv_freq[device] = (1.0 / (self.theta ** (j2 / self.head_dim))).to(device)
        return self._inv_freq[device]

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin (B, T, D) in ``dtype``."""
        freqs = position_ids[..., None].float() * self.inv_freq(position_ids.device)  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # (..., D/2) each
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), cos/sin (B, T, D) -> (B, H, T, D)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal grouped-query self-attention.

    ``q = x Wq^T (H heads), k = x Wk^T, v = x Wv^T (H_kv heads)``; RoPE on q and k; query head h reads key/value head
    ``h // n_rep``; ``o = softmax(q k^T / sqrt(D) + mask) v``; output ``o Wo^T``. The attention itself is
    ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels where available).
    """

    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        c, d, bias = args.hidden_size, args.head_dim, args.attention_bias
        self.q_proj = nn.Linear(c, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(c, self.n_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(c, self.n_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * d, c, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """x (B, T, C); mask (B, 1, T, S) bool (True = may attend) or None for plain causal; -> (B, T, C)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, H_kv, S, D)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
            enable_gqa=self.n_heads != self.n_kv_heads,
        )  # (B, H, T, D)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(o)


class MLP(nn.Module):
    """SwiGLU feed-forward (Shazeer, arXiv 2002.05202): ``down( silu(gate(x)) * up(x) )``, C -> F -> C."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        c, f, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(c, f, bias=bias)
        self.up_proj = nn.Linear(c, f, bias=bias)
        self.down_proj = nn.Linear(f, c, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: ``h = x + attn(norm1(x)); out = h + mlp(norm2(h))``."""

    def __init__(self, args: ModelArgs, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer_idx)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask, cache=None):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


def attention_mask_4d(attention_mask: torch.Tensor | None, past: int, T: int, device) -> torch.Tensor | None:
    """Boolean mask (B, 1, T, S), S = past + T: query i (at absolute position past+i) may see key j iff
    ``j <= past + i`` and key j is not padding. A query always sees itself, so a padding query's row is never
    empty (an all-masked row would make NaNs that then leak through 0 * NaN). None means "plain causal"."""
    S = past + T
    if attention_mask is None:
        if past == 0 or T == 1:  # plain causal (is_causal=True), or one query that sees every key
            return None
        keys = torch.arange(S, device=device)
        return (keys[None, :] <= past + torch.arange(T, device=device)[:, None])[None, None]  # (1, 1, T, S)
    if attention_mask.shape[-1] != S:
        raise ValueError(f"attention_mask covers {attention_mask.shape[-1]} positions, expected past + new = {S}")
    keys = torch.arange(S, device=device)
    queries = past + torch.arange(T, device=device)
    causal = keys[None, :] <= queries[:, None]  # (T, S)
    self_ = keys[None, :] == queries[:, None]  # (T, S)
    padding = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
    return (causal & padding) | self_  # (B, 1, T, S)


def position_ids_from_mask(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """Positions counted over real tokens only: ``cumsum(mask) - 1`` (pads clamp to 0); the last T columns."""
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
    return pos[:, -T:]  # (B, T)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor  # (B, T, V), or (B, logits_to_keep, V)
    loss: torch.Tensor | None = None


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm: input_ids (B, T) -> hidden states (B, T, C)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_hidden_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(args.head_dim, args.rope_theta)
        self.gradient_checkpointing = False

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache: KVCache | None = None):
        B, T = input_ids.shape
        static = cache is not None and cache.write_pos is not None
        if static and (position_ids is None or attention_mask is None or attention_mask.dim() != 4):
            raise ValueError("a static KV cache (CUDA-graph decoding) needs position_ids (B, T) and a 4-D bool "
                             "attention_mask (B, 1, T, max_len), e.g. from KVCache.static_mask")
        past = cache.length if cache is not None and not static else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask, T)
            else:
                position_ids = (past + torch.arange(T, device=input_ids.device)).expand(B, T)  # (B, T)
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rotary_emb(position_ids, x.dtype)  # (B, T, D) each
        mask = attention_mask if static else attention_mask_4d(attention_mask, past, T, x.device)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None and not static:  # a static cache's position is advanced by its caller (KVCache.step)
            cache.advance(T)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Decoder plus LM head. ``forward(input_ids, attention_mask, position_ids, cache, labels)`` returns a
    :class:`CausalLMOutput` with ``logits (B, T, V)`` and, when ``labels (B, T)`` are given, the mean next-token
    cross-entropy ``loss = mean_{t: labels[t+1] != -100} -log softmax(logits[t])[labels[t+1]]`` (fp32), as
    transformers computes it."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.model = LlamaModel(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.tie_weights()

    def tie_weights(self) -> None:
        """Share one (V, C) matrix between the embedding and the LM head."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def gradient_checkpointing_enable(self) -> None:
        """Recompute each decoder layer in backward instead of storing its activations (training only)."""
        self.model.gradient_checkpointing = True

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                labels: torch.Tensor | None = None, logits_to_keep: int = 0) -> CausalLMOutput:
        """input_ids (B, T); attention_mask (B, past+T) of 1 (token) / 0 (padding); position_ids (B, T), by
        default counted over real tokens; ``logits_to_keep=k > 0`` computes logits of the last k positions only."""
        h = self.model(input_ids, attention_mask, position_ids, cache)  # (B, T, C)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]  # (B, k, C)
        logits = self.lm_head(h)  # (B, T, V)
        loss = None
        if labels is not None:
            loss = causal_lm_loss(logits, labels)
        return CausalLMOutput(logits=logits, loss=loss)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts labels[t+1]; ``ignore_index`` labels do not count."""
    V = logits.shape[-1]
    shift_logits = logits[:, :-1].float().reshape(-1, V)  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)  # (B*(T-1),)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=ignore_index)
