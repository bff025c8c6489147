"""llama/offload.py: the saved activations of chosen layers kept in host memory between forward and backward
(enable_fast_path offload_saved). On CPU tensors the offloader runs its bookkeeping with synchronous copies into
ordinary host memory, which is what these tests check: the same loss and gradients bit for bit, the device
tensors let go by the end of the forward, host buffers reused from step to step and never while an earlier
forward still needs them. The CUDA side (side stream, events, CUDA graphs, the memory it saves) is checked in
tests/llama/test_offload_cuda.py."""
import copy
import gc

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from llama.fast_path import disable_fast_path, enable_fast_path
from llama.offload import SavedActivationOffloader
from tests.llama.test_fast_path import batch, loss_and_grads, tiny_lora_model


def _offloading(model, k, min_bytes=0):
    m = enable_fast_path(copy.deepcopy(model), offload_saved=k)
    off = m.model.layers[0]._saved_offloader
    off.min_bytes = min_bytes            # the tiny model's activations are far below the default 1 MiB
    return m, off


@pytest.mark.parametrize("k", [1, 2])
def test_offload_saved_same_loss_and_grads(k):
    """Two steps with the first k layers offloaded: loss and every LoRA gradient equal the fast path's without
    offloading, bit for bit; the second step reuses the first step's host buffers."""
    base = tiny_lora_model()
    ref = enable_fast_path(copy.deepcopy(base))
    m, off = _offloading(base, k)
    assert m.model.layers[0]._saved_offloader is off and off.layers == list(range(k))
    assert m._fast_path["offloaded_saved_layers"] == f"{k} of 2"
    ids, labels = batch()
    buffers = None
    for step in range(2):
        loss0, g0 = loss_and_grads(ref, ids, labels)
        loss1, g1 = loss_and_grads(m, ids, labels)
        assert torch.equal(loss0, loss1), f"step {step}: loss {loss1} vs {loss0}"
        assert g0.keys() == g1.keys()
        for name in g0:
            assert torch.equal(g0[name], g1[name]), f"step {step}: grad {name} differs"
        assert off.stats["tensors"] > 0
        now = {key: [id(b) for b in bufs] for key, bufs in off.pool.items()}
        if buffers is not None:
            assert now == buffers, "the second step allocated new host buffers"
        buffers = now
    assert not any(b.busy for bufs in off.pool.values() for b in bufs), "a buffer stayed busy after backward"


def test_offload_saved_with_checkpointing_offloads_the_layers_after():
    """checkpointing=1 with offload_saved=5 on 2 layers: layer 0 is checkpointed, layer 1 offloaded (the count is
    capped at the layers that keep their activations); same loss and gradients as without offloading."""
    base = tiny_lora_model()
    ref = enable_fast_path(copy.deepcopy(base), checkpointing=1)
    m = enable_fast_path(copy.deepcopy(base), checkpointing=1, offload_saved=5)
    off = m.model.layers[1]._saved_offloader
    off.min_bytes = 0
    assert off.layers == [1]
    ids, labels = batch()
    loss0, g0 = loss_and_grads(ref, ids, labels)
    loss1, g1 = loss_and_grads(m, ids, labels)
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(g0[n], g1[n]) for n in g0)
    assert off.stats["tensors"] > 0


def _record_offloaded(off):
    """Wrap off._offload to keep a weak reference to every storage it copies."""
    refs = []
    orig = off._offload

    def spy(i, slot, t, st, nbytes):
        refs.append(StorageWeakRef(st))
        return orig(i, slot, t, st, nbytes)

    off._offload = spy
    return refs


def test_offloaded_storages_are_freed_by_the_end_of_the_forward():
    """After the forward (before backward) no storage that was offloaded is alive any more: autograd holds only
    the handles. With the release points disabled (the positive control) they are still alive then."""
    base = tiny_lora_model()
    ids, labels = batch()
    for release in (True, False):
        m, off = _offloading(base, 2)
        refs = _record_offloaded(off)
        if not release:
            off.before_layer = lambda j: None
        loss = m(ids, labels=labels).loss
        gc.collect()
        alive = sum(not r.expired() for r in refs)
        assert refs, "nothing was offloaded"
        if release:
            assert alive == 0, f"{alive} of {len(refs)} offloaded storages still alive after the forward"
        else:
            assert alive > len(refs) // 2, "the positive control freed its storages anyway"
        loss.backward()


def test_two_forwards_then_backward_keep_their_own_buffers():
    """Two forwards of the same layers before their backwards (gradient accumulation with retained graphs): the
    second forward takes new host buffers instead of overwriting those the first one's backward still needs."""
    base = tiny_lora_model()
    ref = enable_fast_path(copy.deepcopy(base))
    m, off = _offloading(base, 2)
    ids, labels = batch()
    ids2 = ids.flip(1)
    torch.manual_seed(3)
    ref.zero_grad(set_to_none=True)
    (ref(ids, labels=labels).loss + ref(ids2, labels=labels).loss).backward()
    want = {n: p.grad.clone() for n, p in ref.named_parameters() if p.requires_grad}
    torch.manual_seed(3)
    m.zero_grad(set_to_none=True)
    la = m(ids, labels=labels).loss
    n_first = sum(len(b) for b in off.pool.values())
    lb = m(ids2, labels=labels).loss
    assert sum(len(b) for b in off.pool.values()) == 2 * n_first, "the second forward reused busy buffers"
    (la + lb).backward()
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, want[n]), f"grad {n} differs"


def test_offload_saved_bad_values_and_disable():
    base = tiny_lora_model()
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="offload_saved"):
            enable_fast_path(copy.deepcopy(base), offload_saved=bad)
    with pytest.raises(ValueError, match="layers must be"):
        SavedActivationOffloader(torch.device("cpu"), [], 2)
    with pytest.raises(ValueError, match="layers must be"):
        SavedActivationOffloader(torch.device("cpu"), [2], 2)
    m = enable_fast_path(copy.deepcopy(base), offload_saved=2)
    disable_fast_path(m)
    assert not any("_saved_offloader" in layer.__dict__ for layer in m.model.layers)


def test_release_points_spread_over_the_forward():
    """Layer i of k offloaded ones is let go at the start of layer n - k + rank's forward (never before i + 1,
    and n = after the last layer): the copies get the rest of the forward, and none outlives it."""
    off = SavedActivationOffloader(torch.device("cpu"), range(0, 10), 32)
    assert off.release_at == {i: 22 + i for i in range(10)}
    off = SavedActivationOffloader(torch.device("cpu"), range(4, 8), 8)
    assert off.release_at == {4: 5, 5: 6, 6: 7, 7: 8}


def test_prefetch_order_and_reach():
    """prefetch(L) fetches the handles of the offloaded layers L-ahead..L, once."""
    off = SavedActivationOffloader(torch.device("cpu"), range(0, 6), 8, ahead=2, min_bytes=0)
    fetched = []
    off._fetch = lambda h: fetched.append(h.layer) or setattr(h, "device_copy", torch.empty(0))

    class H:
        def __init__(self, layer):
            self.layer, self.device_copy = layer, None

    keep = {i: H(i) for i in range(6)}
    import weakref
    for i, h in keep.items():
        off.handles[i] = [weakref.ref(h)]
    off.prefetch(7)
    assert fetched == [5]
    off.prefetch(5)
    assert fetched == [5, 4, 3]
    off.prefetch(5)
    assert fetched == [5, 4, 3]
    off.prefetch(2)
    assert fetched == [5, 4, 3, 2, 1, 0]


class _FakeCuda:
    """Stand-ins for torch.cuda's streams and events that keep the order of what the offloader enqueues: a side
    stream position per event, and how far the compute stream has waited. (The copies themselves run at once on
    CPU tensors.) Lets the CUDA branch of the offloader run on a CPU and its event discipline be checked."""

    def __init__(self):
        self.side_pos = 0            # operations enqueued on the side stream
        self.compute_waited = 0      # the side stream position the compute stream has waited for
        fake = self

        class Stream:
            def __init__(self, name):
                self.name = name

            def wait_stream(self, other):
                pass

            def wait_event(self, ev):
                assert ev.pos is not None, "waited for an event never recorded"
                if self.name == "compute":
                    fake.compute_waited = max(fake.compute_waited, ev.pos)

        class Event:
            def __init__(self, *a, **k):
                self.pos = None

            def record(self, stream=None):
                assert stream is not None and stream.name == "side", "copy events belong to the side stream"
                self.pos = fake.side_pos

        self.Stream, self.Event = Stream, Event
        self.compute, self.side = Stream("compute"), Stream("side")
        self.in_side = False

    def stream_ctx(self, s):
        fake = self

        class Ctx:
            def __enter__(self):
                assert s is fake.side
                fake.in_side = True
                fake.side_pos += 1            # the copy enqueued inside

            def __exit__(self, *exc):
                fake.in_side = False

        return Ctx()


def test_cuda_branch_event_discipline(monkeypatch):
    """The offloader's CUDA branch on CPU tensors with recording stand-ins for streams and events: the same
    gradients bit for bit, every device tensor let go only after the compute stream waited for its copy to the
    host, every fetched copy waited for before autograd reads it, and pinned buffers asked for once per slot."""
    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: fake.compute)
    monkeypatch.setattr(torch.cuda, "stream", fake.stream_ctx)
    monkeypatch.setattr(torch.cuda, "Event", fake.Event)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    base = tiny_lora_model()
    ref = enable_fast_path(copy.deepcopy(base))
    m, off = _offloading(base, 2)
    off.cuda, off.stream = True, fake.side
    asked = []
    off._host_empty = lambda n: asked.append(n) or torch.empty(n, dtype=torch.uint8)
    release, fetch_storage = off._release, None

    def checked_release(i):
        evs = [ev for _, ev in off.pending.get(i, ())]
        release(i)
        for ev in evs:
            assert fake.compute_waited >= ev.pos, f"layer {i}: a device tensor let go before its copy was waited for"

    off._release = checked_release
    import llama.offload as lo
    orig_storage = lo._Saved.storage

    def checked_storage(h):
        st = orig_storage(h)
        assert h.event is not None and fake.compute_waited >= h.event.pos, "read before its fetch was waited for"
        return st

    monkeypatch.setattr(lo._Saved, "storage", checked_storage)
    ids, labels = batch()
    for step in range(2):
        loss0, g0 = loss_and_grads(ref, ids, labels)
        loss1, g1 = loss_and_grads(m, ids, labels)
        assert torch.equal(loss0, loss1) and all(torch.equal(g0[n], g1[n]) for n in g0), f"step {step}"
        assert not off.pending or not any(off.pending.values()), "device tensors still pending after the step"
    assert len(asked) == sum(len(b) for b in off.pool.values()) == off.stats["tensors"] // 2


def test_host_buffers_follow_the_sequence_length():
    """A longer batch replaces a slot's smaller free buffer instead of adding one beside it (varying lengths do not
    pile up pinned memory); a buffer a CUDA graph copies into is never replaced."""
    base = tiny_lora_model()
    m, off = _offloading(base, 2)
    ids, labels = batch()
    for T in (8, 16, 12):
        loss_and_grads(m, ids[:, :T], labels[:, :T])
    n = {key: len(bufs) for key, bufs in off.pool.items()}
    assert set(n.values()) == {1}, n
    big = {key: bufs[0].host.numel() for key, bufs in off.pool.items()}
    for bufs in off.pool.values():
        bufs[0].graphed = True
    loss_and_grads(m, ids[:, :20], labels[:, :20])                     # longer again: graphed buffers stay
    for key, bufs in off.pool.items():
        assert bufs[0].host.numel() == big[key] and bufs[0].graphed
        assert len(bufs) == 2 and bufs[1].host.numel() > big[key]


@pytest.mark.parametrize("nf4,dropout,targets,ckpt,k,left_pad", [
    (False, 0.1, ["q_proj", "v_proj"], 0, 2, False),
    (True, 0.1, None, 1, 1, False),
    (True, 0.0, ["q_proj", "v_proj"], 0, 1, True),
    (False, 0.1, None, 0, 2, True),
])
def test_offload_saved_matches_across_configs(nf4, dropout, targets, ckpt, k, left_pad):
    """NF4 or dense bases, dropout on or off, LoRA on q,v or on all seven linears, a checkpointed layer first or
    not, a left-padded attention mask (the masked attention path) or none: with k layers offloaded the loss and
    every LoRA gradient equal the fast path's without offloading, bit for bit."""
    kw = dict(nf4=nf4, dropout=dropout) | ({"targets": targets} if targets else {})
    base = tiny_lora_model(**kw)
    ref = enable_fast_path(copy.deepcopy(base), checkpointing=ckpt)
    m = enable_fast_path(copy.deepcopy(base), checkpointing=ckpt, offload_saved=k)
    off = m.model.layers[0]._saved_offloader
    off.min_bytes = 0
    assert off.layers == list(range(ckpt, ckpt + k))
    ids, labels = batch()
    mask = torch.ones_like(ids)
    if left_pad:
        mask[1, :6] = 0
        labels = labels.masked_fill(mask == 0, -100)

    def run(model):
        torch.manual_seed(5)
        model.zero_grad(set_to_none=True)
        loss = model(ids, attention_mask=mask if left_pad else None, labels=labels).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    for step in range(2):
        l0, g0 = run(ref)
        l1, g1 = run(m)
        assert torch.equal(l0, l1), f"step {step}: loss {l1} vs {l0}"
        for n in g0:
            assert torch.equal(g0[n], g1[n]), f"step {step}: grad {n} differs"
    assert off.stats["tensors"] > 0
