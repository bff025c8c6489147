"""Key/value cache for incremental decoding.

During generation the keys and values of every past position are computed once and kept: step t only projects
the new token(s) and attends over the cached ones, so a decode step costs O(T) instead of O(T^2).

Storage is preallocated per layer, ``k[l], v[l]: (B, H_kv, max_len, D)``; ``length`` is the number of positions
filled. A forward pass over T new tokens writes positions ``[length, length + T)`` of every layer through
:meth:`KVCache.update` and then calls :meth:`KVCache.advance` (the model does both).
"""
from __future__ import annotations

import torch

from .config import ModelArgs


class KVCache:
    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        shape = (batch_size, args.num_key_value_heads, max_len, args.head_dim)  # (B, H_kv, S_max, D)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.num_hidden_layers)]
        self.max_len = max_len
        self.length = 0

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> "KVCache":
        """A cache on the model's device and in the dtype of its token embedding."""
        emb = model.model.embed_tokens.weight
        return cls(model.args, batch_size, max_len, device=emb.device, dtype=emb.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v: (B, H_kv, T, D)`` at positions ``[length, length+T)``; return all ``(B, H_kv, length+T, D)``."""
        t0, t1 = self.length, self.length + k.shape[2]
        if t1 > self.max_len:
            raise ValueError(f"KV cache overflow: {t1} positions, cache holds {self.max_len}")
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as filled (called once per forward pass, after the last layer)."""
        self.length += n
