"""Key/value cache for incremental decoding.

During generation the keys and values of every past position are computed once and kept: step t only projects
the new token(s) and attends over the cached ones, so a decode step costs O(T) instead of O(T^2).

Storage is preallocated per layer, ``k[l], v[l]: (B, H_kv, max_len, D)``; ``length`` is the number of positions
filled. A forward pass over T new tokens writes positions ``[length, length + T)`` of every layer through
:meth:`KVCache.update` and then calls :meth:`KVCache.advance` (the model does both).

Static mode (``start_static``, for CUDA-graph decoding): the write position lives in a device tensor instead of
``length``, ``update`` writes with ``index_copy_`` and returns the whole ``max_len`` buffers, so every decode step
has the same shapes and the same kernels; the caller masks the positions not written yet (``static_mask``) and
advances the position on the device (``step``). Nothing in a static step reads a Python-side counter, so the
step can be captured once and replayed.
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
        self.write_pos: torch.Tensor | None = None  # static mode: (1,) long, the next position to write
        self._pos: torch.Tensor | None = None       # write_pos's storage, kept across reset() (a graph holds it)

    @classmethod
    def for_model(cls, model: torch.nn.Module, batch_size: int, max_len: int) -> "KVCache":
        """A cache on the model's device and in the dtype of its token embedding."""
        emb = model.model.embed_tokens.weight
        return cls(model.args, batch_size, max_len, device=emb.device, dtype=emb.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v: (B, H_kv, T, D)`` at positions ``[length, length+T)``; return all ``(B, H_kv, length+T, D)``."""
        if self.write_pos is not None:  # static mode: same shapes every step, position on the device
            idx = self.write_pos + self._ar[: k.shape[2]]  # (T,)
            self.k[layer].index_copy_(2, idx, k.to(self.k[layer].dtype))
            self.v[layer].index_copy_(2, idx, v.to(self.v[layer].dtype))
            return self.k[layer], self.v[layer]
        t0, t1 = self.length, self.length + k.shape[2]
        if t1 > self.max_len:
            raise ValueError(f"KV cache overflow: {t1} positions, cache holds {self.max_len}")
        self.k[layer][:, :, t0:t1] = k
        self.v[layer][:, :, t0:t1] = v
        return self.k[layer][:, :, :t1], self.v[layer][:, :, :t1]

    def advance(self, n: int) -> None:
        """Mark ``n`` more positions as filled (called once per forward pass, after the last layer)."""
        self.length += n

    def start_static(self) -> None:
        """Switch to static mode at the current length (after the prompt's prefill). The position tensor is the
        same object every time, so a graph captured on this cache stays valid across `reset`."""
        if self._pos is None:
            dev = self.k[0].device
            self._pos = torch.zeros((1,), dtype=torch.long, device=dev)
            self._ar = torch.arange(self.max_len, device=dev)
        self._pos.fill_(self.length)
        self.write_pos = self._pos

    def reset(self) -> None:
        """Empty the cache for a new sequence (dynamic mode, length 0); the storage is kept and reused."""
        self.length = 0
        self.write_pos = None

    def static_mask(self, key_mask: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, max_len) bool for one new token at write_pos: the positions written so far and this one,
        where ``key_mask (B, max_len)`` is 1 (a real token; prompt pads are 0)."""
        return ((self._ar <= self.write_pos) & key_mask.bool())[:, None, None, :]

    def step(self) -> None:
        """Static mode: advance the write position by one on the device (inside a captured graph too)."""
        self.write_pos.add_(1)
