"""Paged AdamW, 32-bit and 8-bit, with bitsandbytes' math; and build_optimizer for the config's `optim`.

    opt = PagedAdamW32bit(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-3)
    opt = PagedAdamW8bit(params, ...)                 # blockwise 8-bit states for params >= 4096 elements
    opt = build_optimizer("paged_adamw_32bit", params, cfg)

State per parameter (names as in bitsandbytes): "step" (int), "state1" (m), "state2" (v); float32 like the
parameter, or for 8-bit uint8 codes plus "absmax1"/"absmax2" float32 (ceil(numel/256),) and the shared maps
(`self.code1` signed, `self.code2` unsigned). On CUDA, state1/state2 of parameters with >= 1e5 elements live in
managed memory (train.paged) and are prefetched to the GPU before each update; on the CPU they are plain tensors.

The per-tensor update is a swappable function (train.adamw.adamw_update_ by default; on CUDA a Triton kernel
`kernels.adamw_update_` with the same signature is used when the kernels package provides one).
decay_after=None picks bitsandbytes' behaviour for the device: after the update on CUDA, before on the CPU.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from .adamw import BLOCKSIZE_8BIT, adamw8bit_update_, adamw_update_, create_dynamic_map
from .paged import PAGE_THRESHOLD, paged_zeros, prefetch

PREFETCH_FREE_MARGIN = 1 << 30   # bytes of free GPU memory under which every step prefetches the paged states

UpdateFn = Callable[..., None]


def _kernels_attr(name: str):
    """kernels.<name> or kernels.adamw.<name> (the Triton AdamW, owned by kernels/), or None."""
    try:
        import kernels

        if hasattr(kernels, name):
            return getattr(kernels, name)
        from kernels import adamw as kadamw

        return getattr(kadamw, name, None)
    except ImportError:
        return None


def _device_update_fn(device: torch.device) -> UpdateFn:
    """The Triton AdamW kernel on CUDA when the kernels package provides one, else the torch reference."""
    if device.type == "cuda":
        fn = _kernels_attr("adamw_update_")
        if fn is not None:
            return fn
    return adamw_update_


class PagedAdamW(torch.optim.Optimizer):
    """AdamW with bitsandbytes' update (see train.adamw), optim_bits 32 or 8, optional paging.

    Args mirror bnb.optim.PagedAdamW: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2,
    min_8bit_size 4096 (smaller params keep 32-bit state), is_paged True.
    decay_after: None = the device's bitsandbytes semantics (CUDA after, CPU before); True/False forces it.
    update_fn: replaces the per-tensor update (same signature as train.adamw.adamw_update_).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, optim_bits: int = 32, is_paged: bool = True,
                 min_8bit_size: int = 4096, page_threshold: int = PAGE_THRESHOLD,
                 decay_after: Optional[bool] = None, update_fn: Optional[UpdateFn] = None):
        if lr < 0:
            raise ValueError(f"invalid learning rate {lr}: expected >= 0")
        if eps < 0:
            raise ValueError(f"invalid eps {eps}: expected >= 0")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"invalid beta at index {i}: {b}: expected in [0, 1)")
        if weight_decay < 0:
            raise ValueError(f"invalid weight_decay {weight_decay}: expected >= 0")
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.optim_bits = optim_bits
        self.is_paged = is_paged
        self.min_8bit_size = min_8bit_size
        self.page_threshold = page_threshold
        self.decay_after = decay_after
        self.update_fn = update_fn
        self.code1 = create_dynamic_map(signed=True)
        self.code2 = create_dynamic_map(signed=False)
        self._stepped_on: set = set()      # devices whose paged states were prefetched by an earlier step

    def _prefetch_needed(self, device: torch.device, cache: dict) -> bool:
        """Whether this step prefetches the paged states on `device` (once per step and device).

        Managed pages leave the GPU only when its memory runs out, and the caching allocator keeps its peak
        reservation between steps, so free device memory above a margin now means the states were not evicted
        since the last step's prefetch. The prefetch is then skipped: each cudaMemPrefetchAsync holds the stream
        for tens of microseconds even when the pages are resident, which for a few hundred LoRA tensors is
        milliseconds per step. Only speed depends on this: an evicted page that is not prefetched faults in."""
        if device not in cache:
            need = True
            if device.type == "cuda" and device in self._stepped_on:
                free, total = torch.cuda.mem_get_info(device)
                need = free < max(PREFETCH_FREE_MARGIN, total // 20)
            cache[device] = need
        return cache[device]

    # ---------------------------------------------------------------------------------------------------
    def _buffer(self, p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.is_paged and p.device.type == "cuda" and p.numel() >= self.page_threshold:
            return paged_zeros(p.shape, dtype, p.device)
        return torch.zeros(p.shape, dtype=dtype, device=p.device)

    def _init_state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        p = _local(p)  # FSDP2: states are shaped like this rank's shard
        state["step"] = 0
        if self.optim_bits == 8 and p.numel() >= self.min_8bit_size:
            state["state1"] = self._buffer(p, torch.uint8)
            state["state2"] = self._buffer(p, torch.uint8)
            nb = -(-p.numel() // BLOCKSIZE_8BIT)
            state["absmax1"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
            state["absmax2"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
        else:
            state["state1"] = self._buffer(p, torch.float32)
            state["state2"] = self._buffer(p, torch.float32)
        return state

    def is_8bit(self, p: torch.Tensor) -> bool:
        return self.state[p].get("state1", torch.empty(0)).dtype == torch.uint8

    def dequantized_state(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, v) as float32 tensors shaped like p (a copy for 8-bit states)."""
        from .adamw import dequantize_blockwise_8bit

        s = self.state[p]
        if s["state1"].dtype != torch.uint8:
            return s["state1"], s["state2"]
        return (dequantize_blockwise_8bit(s["state1"], s["absmax1"], self.code1.to(p.device)),
                dequantize_blockwise_8bit(s["state2"], s["absmax2"], self.code2.to(p.device)))

    # ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        need_prefetch: dict = {}
        stepped: set = set()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            multi: dict[tuple, list] = {}  # CUDA 32-bit states: one Triton launch over all of them
            multi_fn = _kernels_attr("adamw_step_multi_") if self.update_fn is None else None
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("PagedAdamW does not support sparse gradients")
                state = self.state[p]
                if "state1" not in state:
                    state = self._init_state(p)
                p, grad = _local(p), _local(p.grad)  # FSDP2 DTensors: update this rank's shard in place
                if self._prefetch_needed(p.device, need_prefetch):
                    for key in ("state1", "state2"):
                        prefetch(state[key], p.device)
                stepped.add(p.device)
                state["step"] += 1
                decay_after = self.decay_after if self.decay_after is not None else p.device.type == "cuda"
                fn = self.update_fn or _device_update_fn(p.device)
                if not p.is_contiguous():
                    raise RuntimeError(f"PagedAdamW needs contiguous parameters; got shape {tuple(p.shape)} "
                                       f"with strides {p.stride()}")
                g = grad.contiguous()
                if state["state1"].dtype == torch.uint8:
                    if self.code1.device != p.device:
                        self.code1, self.code2 = self.code1.to(p.device), self.code2.to(p.device)
                    adamw8bit_update_(p, g, state["state1"], state["state2"], state["absmax1"], state["absmax2"],
                                      self.code1, self.code2, state["step"], group["lr"], b1, b2, group["eps"],
                                      group["weight_decay"], decay_after=decay_after, update_fn=fn)
                elif p.device.type == "cuda" and multi_fn is not None:
                    multi.setdefault((p.device, state["step"], decay_after), []).append(
                        (p, g, state["state1"], state["state2"]))
                else:
                    fn(p, g, state["state1"], state["state2"], state["step"], group["lr"], b1, b2, group["eps"],
                       group["weight_decay"], decay_after=decay_after)
            for (_, step, decay_after), items in multi.items():
                ps, gs, ms, vs = (list(x) for x in zip(*items))
                multi_fn(ps, gs, ms, vs, step, group["lr"], b1, b2, group["eps"], group["weight_decay"],
                         decay_after=decay_after)
        self._stepped_on |= stepped
        return loss

    # ---------------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load, keeping the saved dtypes (torch would cast uint8 codes to the parameter's float dtype) and
        moving paged states back into managed memory (torch.load gives plain tensors)."""
        saved = state_dict["state"]
        super().load_state_dict(state_dict)
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for idx, p in zip(saved_ids, params):
            if idx not in saved:
                continue
            state = self.state[p]
            p = _local(p)
            state["step"] = int(saved[idx]["step"])
            for key in ("state1", "state2", "absmax1", "absmax2"):
                if key not in saved[idx]:
                    continue
                src = saved[idx][key]
                buf = self._buffer(p, src.dtype) if key.startswith("state") else torch.empty_like(src, device=p.device)
                buf.copy_(src.reshape(buf.shape))
                state[key] = buf


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a plain tensor sharing its storage); any other tensor as is."""
    return t._local_tensor if hasattr(t, "_local_tensor") else t


class PagedAdamW32bit(PagedAdamW):
    """bitsandbytes.optim.PagedAdamW32bit: 32-bit states, paged on CUDA."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **kw):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=32, **kw)


class PagedAdamW8bit(PagedAdamW):
    """bitsandbytes.optim.PagedAdamW8bit: blockwise 8-bit states (params >= 4096 elements), paged on CUDA."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, **kw):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=8, **kw)


def build_optimizer(name: str, params: Iterable, cfg) -> torch.optim.Optimizer:
    """The optimizer the config names: paged_adamw_32bit, paged_adamw_8bit or adamw_torch (torch.optim.AdamW).

    Hyper-parameters from cfg: learning_rate, adam_beta1, adam_beta2, adam_epsilon, weight_decay
    (the names of transformers' TrainingArguments).
    """
    kw = dict(lr=cfg.learning_rate, betas=(getattr(cfg, "adam_beta1", 0.9), getattr(cfg, "adam_beta2", 0.999)),
              eps=getattr(cfg, "adam_epsilon", 1e-8), weight_decay=cfg.weight_decay)
    params = list(params)
    if params and isinstance(params[0], torch.Tensor):
        params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("build_optimizer: no trainable parameters (did LoRA injection match any module?)")
    if name == "paged_adamw_32bit":
        return PagedAdamW32bit(params, **kw)
    if name == "paged_adamw_8bit":
        return PagedAdamW8bit(params, **kw)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, **kw)
    raise ValueError(f"unknown optimizer {name!r}: expected paged_adamw_32bit, paged_adamw_8bit or adamw_torch")
