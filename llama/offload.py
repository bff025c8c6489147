"""What autograd saves for the backward of chosen decoder layers, kept in pinned host memory between the forward
and the backward (`enable_fast_path(..., offload_saved=k)`).

A layer that is not checkpointed keeps about a dozen (B, T, C)-sized tensors for its backward (q, k, v, the
attention output, the norms' inputs, gate and up...). Checkpointing frees them at the price of recomputing the
layer; this module frees them at the price of bandwidth on the host link instead, which the GPU's compute does
not use. Inside the layer's forward a `saved_tensors_hooks` pair sees every tensor autograd saves:

- pack: a tensor of the layer's activations (on the device, at least `min_bytes`, not a weight or a layer
  argument) is copied to a pinned host buffer on a side stream; autograd keeps a handle instead of the tensor.
  The device tensor is let go later, once the compute stream has waited for its copy: the copies of the
  offloaded layers are spread over the rest of the forward (layer i's at the start of layer
  n - k + (i - first)'s forward), so the compute stream does not wait for the host link while it still has
  work of its own, and by the end of the forward none of them is on the device.
- prefetch: when the backward reaches layer L (an identity node on each layer's output), the host-to-device
  copies of the offloaded layers L, L-1, ..., L-`ahead` are started on the side stream.
- unpack: the compute stream waits for the handle's copy and gets the saved tensor back, bit for bit.

Lifetimes are ordered by events, not `record_stream` (as `ActivationOffloader`'s): every device tensor here is
allocated on the compute stream and freed there after the compute stream has waited for the side stream's
copy, so a CUDA-graph capture can reuse the memory as the eager step does. Host buffers are reused across
steps (a CUDA graph replays into the same addresses); a buffer is taken only while no live handle of an
earlier forward still needs its contents (two forwards before one backward stay correct).

On CPU tensors (tests) the same bookkeeping runs with synchronous copies into ordinary host memory.
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Optional

import torch
from torch import nn


class _Buffer:
    """A host buffer (uint8) and whether a live handle still needs its contents."""

    __slots__ = ("host", "busy", "graphed")

    def __init__(self, host: torch.Tensor):
        self.host, self.busy, self.graphed = host, False, False    # graphed: a captured CUDA graph copies into it


class _Saved:
    """One offloaded storage: its host copy, and once fetched, its device copy (uint8, the storage's bytes)."""

    __slots__ = ("owner", "layer", "buf", "nbytes", "device_copy", "event", "waited", "__weakref__")

    def __init__(self, owner: "SavedActivationOffloader", layer: int, buf: _Buffer, nbytes: int):
        self.owner, self.layer, self.buf, self.nbytes = owner, layer, buf, nbytes
        self.device_copy: Optional[torch.Tensor] = None
        self.event = None
        self.waited = False

    def storage(self) -> torch.UntypedStorage:
        """The device copy's storage: fetched now if no prefetch started it, waited for once."""
        if self.device_copy is None:
            self.owner._fetch(self)
        if not self.waited:
            if self.event is not None:
                torch.cuda.current_stream(self.device_copy.device).wait_event(self.event)
            self.waited = True
        return self.device_copy.untyped_storage()

    def __del__(self):
        # A prefetched copy freed unread: the compute stream waits for the copy before the block can be reused.
        try:
            if self.device_copy is not None and not self.waited and self.event is not None:
                torch.cuda.current_stream(self.device_copy.device).wait_event(self.event)
            if self.device_copy is None:        # never fetched: the host buffer is free again
                self.buf.busy = False
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass


def _static_storages(module: nn.Module) -> set:
    """data_ptrs of the storages of every tensor that `module` holds (parameters, buffers, tensor attributes and
    the tensors of attribute objects such as quantized weights): never offloaded."""
    ptrs = set()

    def add(t):
        if isinstance(t, torch.Tensor) and t.numel():
            ptrs.add(t.untyped_storage().data_ptr())

    def walk(obj, depth, seen):
        for v in vars(obj).values():
            if isinstance(v, torch.Tensor):
                add(v)
            elif depth and hasattr(v, "__dict__") and not isinstance(v, (nn.Module, type)) and id(v) not in seen:
                seen.add(id(v))
                walk(v, depth - 1, seen)

    for m in module.modules():
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            add(t)
        walk(m, 2, set())
    return ptrs


class SavedActivationOffloader:
    """Offloads the saved activations of decoder layers `layers` (indices, ascending) of an `n_layers` model.

    ahead: how many layers ahead of the backward the host-to-device copies start (they take longer than a
    layer's backward: 16 MiB per (B, T, C) tensor at ~50 GB/s on an H100's host link). The price is memory:
    up to ahead + 1 offloaded layers' tensors are back on the device at once during the backward, which is
    below the peak when the offloaded layers are the first of many (they come back after the layers above
    them have freed theirs), but not when nearly every layer is offloaded.
    min_bytes: smaller saved tensors stay on the device (statistics, seeds, keep codes of small layers)."""

    def __init__(self, device: torch.device, layers, n_layers: int, ahead: int = 8, min_bytes: int = 1 << 20):
        layers = sorted(set(int(i) for i in layers))
        if not layers or layers[0] < 0 or layers[-1] >= n_layers:
            raise ValueError(f"SavedActivationOffloader: layers must be a non-empty subset of 0..{n_layers - 1}, "
                             f"got {layers}")
        if ahead < 0:
            raise ValueError(f"SavedActivationOffloader: ahead must be >= 0, got {ahead}")
        self.device, self.layers, self.n_layers = torch.device(device), layers, n_layers
        self.ahead, self.min_bytes = ahead, min_bytes
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        k = len(layers)
        # layer i's device tensors are let go at the start of layer release_at[i]'s forward (n: after the last)
        self.release_at = {i: min(n_layers, max(i + 1, n_layers - k + r)) for r, i in enumerate(layers)}
        self.pool: dict[tuple[int, int], list[_Buffer]] = {}      # (layer, slot) -> host buffers
        self.pending: dict[int, list] = {}                         # layer -> [(device tensor, event)]
        self.handles: dict[int, list] = {}                         # layer -> weakrefs to its handles, for prefetch
        self.static: dict[int, tuple] = {}                         # id(layer module) -> (first ptr, ptrs)
        self.stats = dict(offloaded_bytes=0, tensors=0, kept_on_device=0)

    def __deepcopy__(self, memo):
        """A copied model gets its own offloader: no buffers, nothing in flight (events cannot be copied)."""
        new = memo[id(self)] = type(self)(self.device, self.layers, self.n_layers, self.ahead, self.min_bytes)
        return new

    # ------------------------------------------------------------------------------------------- forward
    def _static_of(self, layer: nn.Module) -> set:
        first = next(layer.parameters(), None)
        key = first.data_ptr() if first is not None else None
        got = self.static.get(id(layer))
        if got is None or got[0] != key:                # built once (again after the weights moved)
            got = self.static[id(layer)] = (key, _static_storages(layer))
        return got[1]

    def before_layer(self, j: int) -> None:
        """Start of layer j's forward (j = n_layers: after the last): let go of the device tensors whose release
        point has come (the compute stream waits for their copies first)."""
        for i in [i for i, at in self.release_at.items() if at <= j and self.pending.get(i)]:
            self._release(i)

    def _release(self, i: int) -> None:
        for _, ev in self.pending.pop(i, ()):
            if ev is not None:
                torch.cuda.current_stream(self.device).wait_event(ev)

    def _host_empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.cuda)

    def _buffer(self, i: int, slot: int, nbytes: int) -> _Buffer:
        """A free host buffer of at least nbytes for (layer i, slot). A smaller free one is replaced (sequence
        lengths vary from batch to batch), unless a captured CUDA graph copies into it: that one stays."""
        bufs = self.pool.setdefault((i, slot), [])
        for b in bufs:
            if not b.busy and b.host.numel() >= nbytes:
                return b
        for k, b in enumerate(bufs):
            if not b.busy and not b.graphed:
                bufs[k] = _Buffer(self._host_empty(nbytes))
                return bufs[k]
        b = _Buffer(self._host_empty(nbytes))
        bufs.append(b)
        return b

    @contextlib.contextmanager
    def layer(self, i: int, layer: nn.Module, args=()):
        """Within the block (layer i's training forward), autograd's saved tensors are offloaded."""
        if i not in self.release_at:
            yield
            return
        static = self._static_of(layer)
        arg_ptrs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        seen: dict[int, _Saved] = {}
        slot = [0]
        self._release(i)                 # left over from a forward that stopped early
        self.pending[i] = []
        self.handles[i] = []
        dev = self.device

        def pack(t):
            if t.device != dev or not (t.layout == torch.strided):
                return t
            st = t.untyped_storage()
            ptr, nbytes = st.data_ptr(), st.nbytes()
            if ptr in static or ptr in arg_ptrs or nbytes < self.min_bytes or nbytes > 2 * t.numel() * t.element_size() + (1 << 20):
                self.stats["kept_on_device"] += 1
                return t
            h = seen.get(ptr)
            if h is None:
                h = seen[ptr] = self._offload(i, slot[0], t, st, nbytes)
                slot[0] += 1
            return h, t.dtype, tuple(t.shape), t.stride(), t.storage_offset()

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack_saved):
            _ACTIVE[0] = (pack, unpack_saved)
            try:
                yield
            finally:
                _ACTIVE[0] = None

    def _offload(self, i: int, slot: int, t: torch.Tensor, st: torch.UntypedStorage, nbytes: int) -> _Saved:
        buf = self._buffer(i, slot, nbytes)
        buf.busy = True
        if self.cuda and torch.cuda.is_current_stream_capturing():
            buf.graphed = True
        src = torch.empty(0, dtype=torch.uint8, device=t.device).set_(st)
        dst = buf.host[:nbytes]
        if self.cuda:
            cur = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(cur)                 # t has been written
            with torch.cuda.stream(self.stream):
                dst.copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        else:
            dst.copy_(src)
            ev = None
        self.pending[i].append((src, ev))               # the device storage lives until its release point
        h = _Saved(self, i, buf, nbytes)
        self.handles[i].append(weakref.ref(h))
        self.stats["offloaded_bytes"] += nbytes
        self.stats["tensors"] += 1
        return h

    # ------------------------------------------------------------------------------------------- backward
    def _fetch(self, h: _Saved) -> None:
        t = torch.empty(h.nbytes, dtype=torch.uint8, device=self.device)     # on the compute stream
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # t's earlier users are done
            with torch.cuda.stream(self.stream):
                t.copy_(h.buf.host[:h.nbytes], non_blocking=True)
            h.event = torch.cuda.Event()
            h.event.record(self.stream)
        else:
            t.copy_(h.buf.host[:h.nbytes])
        h.device_copy = t
        h.buf.busy = False          # the next device-to-host copy into it runs after this one (one side stream)

    def prefetch(self, L: int) -> None:
        """The backward reached layer L: start the copies back of the offloaded layers L-ahead..L, nearest
        first."""
        for i in range(min(L, self.n_layers - 1), max(-1, L - self.ahead - 1), -1):
            refs = self.handles.pop(i, None)
            if not refs:
                continue
            for r in refs:
                h = r()
                if h is not None and h.device_copy is None:
                    self._fetch(h)

    def free(self) -> None:
        """Drop every host buffer and pending tensor (nothing may be in flight)."""
        for i in list(self.pending):
            self._release(i)
        self.pool.clear()
        self.handles.clear()


_ACTIVE: list = [None]       # the (pack, unpack) of the offloading layer block being run, for nested hooks


def unpack_saved(saved):
    """unpack for what `SavedActivationOffloader.layer`'s pack returned."""
    if isinstance(saved, tuple):
        h, dtype, shape, stride, offset = saved
        return torch.empty(0, dtype=dtype, device=h.owner.device).set_(h.storage(), offset, shape, stride)
    return saved


def active_hooks():
    """(pack, unpack) of the offloading block being run, or None: nested saved_tensors_hooks delegate to it."""
    return _ACTIVE[0]


class PrefetchOnBackward(torch.autograd.Function):
    """Identity whose backward calls offloader.prefetch(L): on layer L's output, the start of layer L's backward
    starts the copies back of the offloaded layers L-ahead..L (SavedActivationOffloader); on a recomputed layer's
    residual h, the copy of the layer input below (fast_path.ActivationOffloader)."""

    @staticmethod
    def forward(ctx, x, offloader, L):
        ctx.offloader, ctx.L = offloader, L
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dx):
        ctx.offloader.prefetch(ctx.L)
        return dx, None, None
