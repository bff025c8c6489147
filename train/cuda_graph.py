"""CUDA graphs for the training step: forward, loss and backward of a fast-path model, captured once per input
shape and replayed.

At 4 x 512 tokens a 7B model's step launches a few thousand kernels from Python and the GPU waits for the host:
benchmarks/e2e.py's breakdown-a found it busy for 99 ms of a 188 ms step (H200). A replayed graph launches them
all with one call: busy for 106 ms of a 117 ms step in the same run (breakdown-a-graph).

    gs = GraphedStep(model, params)          # enable_fast_path(model) applied; one process, CUDA
    optimizer.zero_grad(set_to_none=True)    # the params' .grad become static buffers, zeroed in place
    for batch in micro_batches:
        s = gs(loss_fn, dict(input_ids=ids, labels=labels), scale=1 / n_tokens)
    clip + optimizer.step()                  # eager, on the same .grad tensors

loss_fn(model, **inputs) returns the loss tensor; gs backpropagates `loss * scale` and returns the loss value.
Per input signature (names, shapes, dtypes): `warmup` eager calls, then one capture, then replays. What the
graph needs, and how it gets it:
- static inputs: every call copies its tensors into buffers that the graph reads. An embedding on the device
  runs inside the graph. One in host memory (llama.fast_path.CPUEmbedding, a frozen pinned table) also runs
  inside it where its kernel reads the rows over the host link (kernels.gather, checked on the first call);
  otherwise it gathers this call's rows on the CPU into a static pinned buffer, and the graph holds their
  host-to-device copy, into a tensor of the graph's pool that is freed after the first layer (no device copy of
  the embedding output persists);
- new dropout masks per replay: the LoRA dropout seeds live in device memory (llama.fast_path.SeedSlots), drawn
  from the CPU generator as the eager step draws them; the warm-up calls already run this way, so graphed,
  warm-up and eager steps draw the same masks from the same generator state;
- gradients: backward accumulates in place into the static `.grad` buffers, so micro-batches accumulate as
  they do eagerly; a None .grad (zero_grad(set_to_none=True)) is zeroed in place when the next step begins;
- the loss scale (1 / label tokens of the step, different every step) is a device scalar;
- nothing in the step reads a device value on the host (the fast path's loss skips its token count), and
  warm-up compiles every Triton kernel and runs the one-time timing of the NF4 and LoRA kernel choices;
- memory: the graphs share one pool; before a capture the warm-up's cached blocks go back to the driver.
- streams: every call runs on one side stream of the GraphedStep, which waits for the caller's stream first; the
  caller's stream waits for it after (the optimizer then sees the gradients).
An input signature beyond `max_graphs` runs eagerly (pad batches to a few lengths to stay graphed). Attention
masks capture (tests/train/test_cuda_graph_cuda.py, a left-padded batch); a right-padded batch needs no mask
under causal attention, so the Trainer passes none for those and they take flash SDPA, faster than the masked
kernel. (Before the side stream, masked batches seemed not to capture on an H100: the same failure.)
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from kernels import prefetch


def _find_embedding(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    inner = getattr(model, "model", None)
    return getattr(inner, "embed_tokens", None)


def _host_resident(emb: Optional[torch.nn.Module]) -> bool:
    """An embedding whose table lives in host memory (llama.fast_path.CPUEmbedding): it gathers on the CPU."""
    w = getattr(emb, "weight", None)
    return isinstance(w, torch.Tensor) and w.device.type == "cpu"


@contextlib.contextmanager
def _rows_from_host(emb: Optional[torch.nn.Module], rows: Optional[torch.Tensor], device: torch.device):
    """Within the block, emb(ids) copies `rows` (the pinned (B*T, C) rows gathered for the static ids) to the
    device: a host-to-device copy that the graph captures, into a tensor of the graph's pool freed after use."""
    if emb is None or rows is None:
        yield
        return
    had = "forward" in emb.__dict__
    prev = emb.__dict__.get("forward")
    emb.forward = lambda ids: rows.to(device, non_blocking=True).view(*ids.shape, rows.shape[-1])
    try:
        yield
    finally:
        if had:
            emb.forward = prev
        else:
            del emb.forward


class _Entry:
    """One input signature: its static inputs, seed slots, graph and output."""

    def __init__(self, inputs: dict, device: torch.device, slots):
        self.static = {k: torch.empty(v.shape, dtype=v.dtype, device=device) for k, v in inputs.items()}
        self.scale = torch.zeros((), dtype=torch.float32, device=device)
        self.rows: Optional[torch.Tensor] = None      # pinned embedding rows (a host-resident embedding)
        self.done: Optional[torch.cuda.Event] = None   # the last call's work (before `rows` is written again)
        self.slots = slots
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.out: Optional[torch.Tensor] = None


class GraphedStep:
    """Forward + loss + backward of `model` as CUDA graphs (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, params, warmup: int = 2, max_graphs: int = 4):
        from llama.fast_path import fast_path_memory_note

        if fast_path_memory_note(model) is None:
            raise ValueError("GraphedStep: the model must run llama.fast_path (enable_fast_path): the plain path "
                             "reads the label count on the host and draws dropout masks from the CUDA generator")
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("GraphedStep: no trainable parameters")
        devs = {p.device for p in self.params}
        if len(devs) != 1 or next(iter(devs)).type != "cuda":
            raise ValueError(f"GraphedStep: CUDA graphs need every trainable parameter on one CUDA device, got "
                             f"{sorted(str(d) for d in devs)}")
        if type(model).__module__.startswith("torch.nn.parallel") or hasattr(model, "reshard"):
            raise ValueError("GraphedStep: DDP / FSDP-wrapped models are not supported (their gradient hooks "
                             "communicate during backward); use one process")
        if warmup < 1:
            raise ValueError(f"GraphedStep warmup: expected >= 1 eager call before the capture, got {warmup}")
        self.model, self.device = model, next(iter(devs))
        emb = _find_embedding(model)
        self.host_emb = emb if _host_resident(emb) else None
        if self.host_emb is not None and any(p.requires_grad for p in self.host_emb.parameters()):
            raise ValueError("GraphedStep: a trainable input embedding in host memory cannot be graphed (its rows "
                             "are gathered on the CPU before the graph)")
        self.warmup, self.max_graphs = warmup, max_graphs
        self.grads = [torch.zeros_like(p) for p in self.params]      # the static .grad of every parameter
        self.entries: dict = {}
        self.pool = torch.cuda.graph_pool_handle()
        # Warm-up, capture, replays and eager calls all run on this one side stream (the recipe of PyTorch's CUDA
        # graph notes), so that every autograd node of the captured step, AccumulateGrad included, is on the
        # capture stream. With warm-up on the default (legacy) stream, the Trainer's capture failed on an H100
        # inside backward (cudaErrorStreamCaptureImplicit: "operation would make the legacy stream depend on a
        # capturing blocking stream", after torch's warning of an AccumulateGrad node on another stream).
        self.stream = torch.cuda.Stream(self.device)
        self.captures = 0
        self.eager_calls = 0       # calls past max_graphs (run without a graph)

    # ---------------------------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        """Start a step: zero the gradient buffers in place and attach them as the parameters' .grad."""
        torch._foreach_zero_(self.grads)
        for p, g in zip(self.params, self.grads):
            p.grad = g

    def _attach(self) -> None:
        """Make every .grad its static buffer: a None .grad (optimizer.zero_grad(set_to_none=True)) is a zero one;
        a gradient held elsewhere is copied in."""
        fresh = [g for p, g in zip(self.params, self.grads) if p.grad is None]
        if fresh:
            torch._foreach_zero_(fresh)
        for p, g in zip(self.params, self.grads):
            if p.grad is not g:
                if p.grad is not None:
                    g.copy_(p.grad)
                p.grad = g

    def _device_gather(self, e: _Entry) -> bool:
        """The host-resident embedding reads its rows from the static ids on the GPU (kernels.gather): then it runs
        inside the graph like a device embedding, and no rows are gathered on the CPU."""
        ok = getattr(self.host_emb, "device_gather_ok", None)
        return bool(ok is not None and ok(e.static["input_ids"]))

    def _body(self, e: _Entry, loss_fn: Callable) -> torch.Tensor:
        from llama.fast_path import seed_slots

        with _rows_from_host(self.host_emb, e.rows, self.device), seed_slots(e.slots):
            loss = loss_fn(self.model, **e.static)
            (loss * e.scale).backward()
        prefetch.join(self.device)      # no dequantize prefetch left on its side stream (a capture must join it)
        return loss.detach()

    def __call__(self, loss_fn: Callable, inputs: dict, scale: float = 1.0) -> torch.Tensor:
        """Backpropagate loss_fn(model, **inputs) * scale into the .grad buffers; returns the loss (a new tensor)."""
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)             # the caller's inputs, optimizer update and zeroing come first
        with torch.cuda.stream(self.stream):
            out = self._call(loss_fn, inputs, scale)
        caller.wait_stream(self.stream)             # the caller sees the gradients and the loss
        out.record_stream(caller)
        return out

    def _call(self, loss_fn: Callable, inputs: dict, scale: float) -> torch.Tensor:
        from llama.fast_path import SeedSlots

        self._attach()
        key = tuple((k, tuple(v.shape), v.dtype) for k, v in sorted(inputs.items()))
        e = self.entries.get(key)
        if e is None:
            if len(self.entries) >= self.max_graphs:
                self.eager_calls += 1
                loss = loss_fn(self.model, **{k: v.to(self.device, non_blocking=True) for k, v in inputs.items()})
                (loss * scale).backward()
                return loss.detach()
            e = self.entries[key] = _Entry(inputs, self.device, SeedSlots(self.device))
        for k, v in inputs.items():
            e.static[k].copy_(v, non_blocking=True)
        e.scale.fill_(scale)
        if self.host_emb is not None and "input_ids" in inputs and not self._device_gather(e):
            ids = inputs["input_ids"].reshape(-1).cpu()
            w = self.host_emb.weight
            if e.rows is None:
                e.rows = torch.empty((ids.numel(), w.shape[1]), dtype=w.dtype, pin_memory=True)
            if e.done is not None:
                e.done.synchronize()                # the previous call's copy of these rows has run
            torch.index_select(w, 0, ids, out=e.rows)
        if e.graph is None and e.calls < self.warmup:            # eager, exactly as the graph will run
            e.calls += 1
            e.slots.begin_step()
            out = self._body(e, loss_fn)
            e.done = torch.cuda.Event()
            e.done.record()
            return out
        if e.graph is None:
            prefetch.join(self.device)              # nothing of an eager call pending into the capture
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            g = torch.cuda.CUDAGraph()
            e.slots.begin_step(capturing=True)
            try:
                with torch.cuda.graph(g, pool=self.pool, stream=self.stream):
                    e.out = self._body(e, loss_fn)
            except Exception as err:
                raise RuntimeError(f"GraphedStep: capturing forward + backward for inputs "
                                   f"{[(k, shape) for k, shape, _ in key]} failed ({type(err).__name__}: {err}); "
                                   f"an op in the step cannot be captured: run without CUDA graphs "
                                   f"(--cuda_graph off)") from err
            e.graph = g
            self.captures += 1
        e.slots.refill()
        e.graph.replay()
        e.done = e.done or torch.cuda.Event()
        e.done.record()
        return e.out.clone()
