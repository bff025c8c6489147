"""Dequantize the next NF4 weight on a side stream while the current GEMM runs.

Where a frozen NF4 linear sees many rows (a training step's forward and backward), `nf4_matmul` and
`nf4_matmul_t` run "dequantize W into the compute dtype, then cuBLAS": a memory-bound pass, then a compute-bound
GEMM, one after the other on one stream. The weights come in the same order every step (the forward, then the
backward with the recomputes of checkpointed layers in between), so the order can be learned:
`DequantPrefetcher` remembers, for each pair (previous weight, this weight), which weight was asked for next,
and when the pair recurs it launches that weight's dequantize on a side stream at once, so that it runs beside
this weight's GEMM (in the SMs that the GEMM's last wave leaves idle) instead of after it. The GEMM that needs it
waits on its event.

- Values: the same kernel on the same inputs, so bit-identical to dequantizing in place.
- A wrong guess costs one dequantize, which is dropped.
- Memory: at most one dequantized weight more is alive at a time (the one waiting for its GEMM).
- CUDA graphs: the side stream is forked from the capturing stream and joined back through events. `join()`
  joins a prefetch still pending; call it before a capture ends (train.cuda_graph.GraphedStep does).

The switch is `ENABLED` (off by default until measured on a GPU: benchmarks/diag/dequant_overlap.py times the
overlap, `benchmarks/e2e.py --ab-prefetch` the steps). CPU tensors never prefetch.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch

ENABLED = False
_MAX_PAIRS = 16384


class DequantPrefetcher:
    """One device's learned weight order and its pending prefetch.

    dequant(qw, dtype, out) -> tensor is the dequantize to run (on whatever stream is current; out None or a
    buffer of qw's shape and dtype). On a CUDA device the
    prefetch runs on a high-priority side stream; `streams=False` runs everything on the current stream (the
    bookkeeping alone: CPU tests)."""

    def __init__(self, device, dequant: Callable, streams: bool = True):
        self.device = torch.device(device)
        self.dequant = dequant
        self.side = None
        if streams and self.device.type == "cuda":
            lo, hi = torch.cuda.Stream.priority_range()
            self.side = torch.cuda.Stream(device=self.device, priority=min(lo, hi))
        self.next_of: dict = {}       # (id(prev), id(cur)) -> (weakref prev, weakref cur, weakref next)
        self.prev = self.prev2 = None  # weakrefs of the last two weights taken
        # (weakref qw, dtype, tensor, event or None, (recorded in a graph capture?, the consuming stream))
        self.pending = None
        self.stats = dict(hits=0, misses=0, dropped=0, launched=0)

    # ---- the public call
    def take(self, qw, dtype: torch.dtype) -> torch.Tensor:
        """qw dequantized to dtype: the pending prefetch if it is this weight's, else dequantized now. Then learn
        the order and prefetch the weight expected next."""
        w = self._claim(qw, dtype)
        if w is None:
            self.stats["misses"] += 1
            w = self.dequant(qw, dtype, None)
        else:
            self.stats["hits"] += 1
        prev = self.prev() if self.prev is not None else None
        prev2 = self.prev2() if self.prev2 is not None else None
        if prev2 is not None and prev is not None:          # (prev2, prev) was followed by qw
            if len(self.next_of) >= _MAX_PAIRS:
                self.next_of.clear()
            self.next_of[(id(prev2), id(prev))] = (weakref.ref(prev2), weakref.ref(prev), weakref.ref(qw))
        self.prev2 = self.prev
        self.prev = weakref.ref(qw)
        nxt = self._expected(prev, qw)
        if nxt is not None:
            self._launch(nxt, dtype)
        return w

    def join(self) -> None:
        """Drop a pending prefetch, making the current stream wait for it first (a capture must not end with work
        of the side stream unjoined)."""
        if self.pending is not None:
            _, _, t, ev, where = self.pending
            self.pending = None
            if ev is not None and where[0] == _capturing(self.device):
                # the buffer is its allocating stream's: the block's next use there must follow the write
                where[2].wait_event(ev)
            # (a prefetch from outside a capture that has begun since cannot be waited on inside it; its block is
            # not the capture's pool's, and the capture's own work lies between its write and any reuse)
            del t
            self.stats["dropped"] += 1

    def forget(self) -> None:
        """Join what is pending and forget the learned order (a different model or schedule follows)."""
        self.join()
        self.next_of.clear()
        self.prev = self.prev2 = None

    # ---- internals
    def _claim(self, qw, dtype):
        p = self.pending
        if p is None:
            return None
        ref, pdtype, t, ev, where = p
        if ref() is not qw or pdtype != dtype or where[:2] != self._where()[:2]:
            self.join()                              # a wrong guess: dropped (after its work is joined)
            return None
        self.pending = None
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
        return t

    def _where(self):
        """(capturing?, current stream): a prefetch is handed only to the stream it was allocated on (the caching
        allocator orders a block's reuse on that stream), and never across the start or end of a capture."""
        if self.device.type != "cuda":
            return (False, None, None)
        cur = torch.cuda.current_stream(self.device)
        return (_capturing(self.device), cur.cuda_stream, cur)

    def _expected(self, prev, cur):
        """The weight that followed (prev, cur) last time (None when unknown or gone)."""
        if prev is None:
            return None
        e = self.next_of.get((id(prev), id(cur)))
        if not e:
            return None
        a, b, n = e[0](), e[1](), e[2]()
        if a is not prev or b is not cur or n is None:   # ids reused by other objects: stale
            return None
        return n

    def _launch(self, nxt, dtype) -> None:
        self.join()
        self.stats["launched"] += 1
        # The buffer is allocated on the current stream, so no record_stream is needed (which would keep the
        # block out of reuse until a CUDA-graph capture ends): the side stream writes it after the fork, and the
        # current stream waits for that write before it reads the buffer or drops it.
        t = torch.empty(tuple(nxt.shape), dtype=dtype, device=self.device)
        if self.side is None:
            self.pending = (weakref.ref(nxt), dtype, self.dequant(nxt, dtype, t), None, self._where())
            return
        cur = torch.cuda.current_stream(self.device)
        fork = torch.cuda.Event()
        fork.record(cur)
        self.side.wait_event(fork)
        with torch.cuda.stream(self.side):
            self.dequant(nxt, dtype, t)
            done = torch.cuda.Event()
            done.record(self.side)
        self.pending = (weakref.ref(nxt), dtype, t, done, self._where())


def _capturing(device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_PREFETCHERS: dict = {}


def prefetcher(device, dequant: Callable) -> DequantPrefetcher:
    """The device's prefetcher (created on first use)."""
    key = torch.device(device)
    p = _PREFETCHERS.get(key)
    if p is None:
        p = _PREFETCHERS[key] = DequantPrefetcher(key, dequant)
    return p


def join(device: Optional[torch.device] = None) -> None:
    """Join the pending prefetch of `device` (every device when None) into its current stream."""
    for key, p in list(_PREFETCHERS.items()):
        if device is None or key == torch.device(device):
            p.join()


def reset() -> None:
    """Join and forget every device's learned order (tests; a new model)."""
    for p in _PREFETCHERS.values():
        p.forget()
