"""torch.distributed on the CPU (gloo, 2 processes): DDP and FSDP2 give the single-process losses.

One process with per_device_train_batch_size = 2 * 2 and two processes with 2 each see the same global batches
(train.distributed.rank_slice); their step losses must agree within LOSS_RTOL (float32: only the order of
the gradient sums differs), for a dense and an NF4 base, plus the saved adapter and a resume under DDP.
FSDP2's layout is checked too: the units wrap_model makes (one for a layer's NF4 linears, one for its LoRA
and norms), the all-gathers per forward/backward, and the order explicit prefetch issues them in.
All scenarios run in one spawn of 2 processes (process start-up is most of the cost on 2 cores).
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from llama import LlamaForCausalLM, ModelArgs
from lora import LoraConfig, inject_lora
from train.config import TrainConfig
from train.data import tokenize_texts
from train.dataset_builtin import builtin_dataset
from train.distributed import DistContext, empty_example, rank_slice, wrap_model

from .conftest import ByteTokenizer

ARGS = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False)
LOSS_RTOL = 1e-5      # float32 step losses, 2 processes vs 1 (measured differences ~1e-7)
WEIGHT_ATOL = 1e-6    # adapter tensors after the steps
STEPS = 3
PER_DEVICE, ACCUM, WORLD = 2, 2, 2


def tiny_model(nf4: bool):
    torch.manual_seed(0)
    model = LlamaForCausalLM(ModelArgs(**ARGS))
    if nf4:
        from kernels import NF4Linear

        for name, m in list(model.named_modules()):
            if isinstance(m, torch.nn.Linear) and name.endswith("_proj"):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, NF4Linear.from_linear(m))
    model.model.gradient_checkpointing = True  # FSDP2 re-gathers inside the recompute
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    with torch.no_grad():  # B = 0 at init would make the first steps' LoRA gradients trivial: randomize
        torch.manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model


def tiny_data(n=40):
    train, _ = builtin_dataset()
    return tokenize_texts([r["text"] for r in train[:n]], ByteTokenizer(), max_seq_length=40)


def make_cfg(out, per_device, **kw):
    base = dict(output_dir=out, per_device_train_batch_size=per_device, gradient_accumulation_steps=ACCUM,
                learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1, max_steps=STEPS, logging_steps=1,
                save_steps=0, report_to="none", optim="adamw_torch", lora_dropout=0.0, seed=3,
                gradient_checkpointing=False, max_grad_norm=0.3)
    base.update(kw)
    return TrainConfig(**base)


def train_once(out, nf4, mode="none", ctx=None, per_device=PER_DEVICE * WORLD, resume=None, fast=False, **kw):
    from train.distributed import wrap_model
    from train.loop import Trainer

    model = tiny_model(nf4)
    if fast:  # train.run --fast_path: the fused modules, their checkpointing, the chunked loss's sum
        from llama.fast_path import enable_fast_path

        enable_fast_path(model, checkpointing=True)
    if ctx is not None:
        ctx.mode = mode
        model = wrap_model(model, ctx, torch.device("cpu"))
    trainer = Trainer(model, make_cfg(out, per_device, **kw), tiny_data(), pad_id=2, dist=ctx)
    res = trainer.train(resume_from=resume)
    return res, trainer


UNIT_LAYOUTS = (("layer", True), ("layer", False), ("linear", False))  # wrap_model(nf4_units=, prefetch=)


def fsdp_units(model) -> list[list[str]]:
    """The parameter names of each FSDP2 parameter group (one all-gather per unshard), in module order."""
    from torch.distributed.fsdp import FSDPModule

    names = {id(p): n for n, p in model.named_parameters()}
    states, units = [], []
    for m in model.modules():
        if isinstance(m, FSDPModule) and (st := m._get_fsdp_state()) not in states:
            states.append(st)
    for st in states:
        groups = getattr(st, "_fsdp_param_groups", None)  # torch >= 2.12; 2.11 has one _fsdp_param_group
        if groups is None:
            groups = [st._fsdp_param_group] if st._fsdp_param_group is not None else []
        units += [sorted(names[id(fp.sharded_param)] for fp in g.fsdp_params) for g in groups]
    return units


def unit_name(params: list[str]) -> str:
    """"G<i>" (layer i's NF4 codes/scales), "L<i>" (layer i's LoRA and norms) or "root"."""
    p = params[0]
    if not p.startswith("model.layers."):
        return "root"
    i = p.split(".")[2]
    return ("G" if ".base_layer.weight_" in p else "L") + i


def fsdp_layout_trace(ctx, nf4_units: str, prefetch: bool) -> dict:
    """Wrap the tiny NF4 model with FSDP2 and run one forward/backward (gradient checkpointing on), logging
    every all-gather (by unit), the start of each layer's compute (its input_layernorm, in forward and in the
    backward recompute) and each NF4 linear's backward (checked to find its unit's codes still gathered)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    from kernels.nf4_linear import NF4LinearFunction

    model = tiny_model(True)
    ctx.mode = "fsdp"
    wrap_model(model, ctx, torch.device("cpu"), nf4_units=nf4_units, prefetch=prefetch)
    units = fsdp_units(model)
    unit_of = {n: unit_name(u) for u in units for n in u}
    names = {id(p): n for n, p in model.named_parameters()}
    events = []
    original = _fsdp_param_group.foreach_all_gather

    def logged(fsdp_params, *args, **kwargs):
        events.append(unit_of[names[id(fsdp_params[0].sharded_param)]])
        return original(fsdp_params, *args, **kwargs)

    def checked_backward(fn_ctx, grad_y):  # FSDP2 must not have resharded (freed) the codes this reads
        if fn_ctx.qweight.packed.untyped_storage().nbytes() == 0:
            events.append("nf4-backward-on-freed-codes")
            raise RuntimeError("NF4 backward after its FSDP2 unit was resharded")
        events.append("nf4-backward")
        return nf4_backward(fn_ctx, grad_y)

    for i, layer in enumerate(model.model.layers):
        layer.input_layernorm.register_forward_pre_hook(lambda *_, i=i: events.append(f"norm{i}"))
    nf4_backward = NF4LinearFunction.backward
    _fsdp_param_group.foreach_all_gather = logged
    NF4LinearFunction.backward = staticmethod(checked_backward)
    try:
        model.train()
        ids = torch.randint(0, ARGS["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(ctx.rank))
        loss = model(ids).logits.float().square().mean()
        events.append("backward")
        loss.backward()
    finally:
        _fsdp_param_group.foreach_all_gather = original
        NF4LinearFunction.backward = staticmethod(nf4_backward)
    dtypes = {n: str(p.dtype) for n, p in model.named_parameters()}
    return dict(units=units, events=events, dtypes=dtypes)


def _worker(rank, world, port, out_root, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from train.distributed import init_distributed, write_adapter

    try:
        ctx = init_distributed("ddp", "cpu")
        results = {}
        for mode in ("ddp", "fsdp"):
            for nf4 in (False, True):
                out = os.path.join(out_root, f"{mode}-{int(nf4)}")
                res, tr = train_once(out, nf4, mode, ctx, per_device=PER_DEVICE)
                write_adapter(tr.model, os.path.join(out, "adapter"), ctx)
                results[(mode, nf4)] = res.losses
        # --fast_path under DDP (the model kwargs labels / loss_reduction pass through the DDP wrapper)
        for nf4 in (False, True):
            res, _ = train_once(os.path.join(out_root, f"ddp-fast-{int(nf4)}"), nf4, "ddp", ctx,
                                per_device=PER_DEVICE, fast=True)
            results[("ddp-fast", nf4)] = res.losses
        # resume under DDP: 2 steps, checkpoint, a fresh model resumed to STEPS
        out = os.path.join(out_root, "resume")
        # 4 steps: the 4th depends on the optimizer state restored at step 2, not only on the weights
        res, _ = train_once(out, False, "ddp", ctx, per_device=PER_DEVICE, max_steps=4, save_steps=2)
        results["ddp-whole"] = res.losses
        res, _ = train_once(out + "-b", False, "ddp", ctx, per_device=PER_DEVICE, max_steps=4,
                            resume=os.path.join(out, "checkpoint-2"))
        results["resume"] = res.losses
        # resume under FSDP2 with the paged optimizer (states on each rank's shard, gathered into the checkpoint)
        out = os.path.join(out_root, "resume-fsdp")
        kw = dict(per_device=PER_DEVICE, optim="paged_adamw_32bit", max_steps=4)
        res, _ = train_once(out, True, "fsdp", ctx, save_steps=2, **kw)
        results["fsdp-paged"] = res.losses
        res, _ = train_once(out + "-b", True, "fsdp", ctx, resume=os.path.join(out, "checkpoint-2"), **kw)
        results["resume-fsdp"] = res.losses
        # each rank reads only its rows of the checkpoint: the same shards as loading whole, then sharding
        from llama import load_model
        from train.distributed import load_model_sharded

        lc = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
        for sub in ("rows", "whole"):  # hidden 128: NF4 rows read per rank; hidden 64: whole weight, then cut
            d = os.path.join(out_root, "ckpt-" + sub)
            for quant in ("nf4", None):
                m1 = load_model(d, quantize=quant)
                torch.manual_seed(5)
                inject_lora(m1, lc)
                ctx.mode = "fsdp"
                wrap_model(m1, ctx, torch.device("cpu"))
                m2 = load_model_sharded(d, ctx, torch.device("cpu"), torch.float32, quant, lc, seed=5)
                p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
                same = list(p1) == list(p2) and all(torch.equal(p1[n].to_local(), p2[n].to_local()) for n in p1)
                ids = torch.randint(0, ARGS["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
                with torch.no_grad():
                    same = same and torch.equal(m1(ids).logits, m2(ids).logits)
                results[("sharded-load", sub, quant)] = same
        # FSDP2 units and the order of their all-gathers in one forward/backward (grouping, prefetch)
        for layout in UNIT_LAYOUTS:
            results[("units",) + layout] = fsdp_layout_trace(ctx, *layout)
        queue.put((rank, results, None))
    except Exception:  # report instead of hanging the parent
        import traceback

        queue.put((rank, None, traceback.format_exc()))
        raise
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("dist"))
    from llama import save_model

    for sub, hidden in (("rows", 128), ("whole", 64)):
        torch.manual_seed(0)
        save_model(LlamaForCausalLM(ModelArgs(**dict(ARGS, hidden_size=hidden, tie_word_embeddings=True))),
                   os.path.join(root, "ckpt-" + sub))
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, WORLD, port, root, queue)) for r in range(WORLD)]
    for p in procs:
        p.start()
    got = {}
    try:
        for _ in range(WORLD):
            rank, results, err = queue.get(timeout=240)
            assert err is None, f"rank {rank} failed:\n{err}"
            got[rank] = results
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    return root, got


# ---------------------------------------------------------------------------------------------------------
def test_rank_slices_partition_the_global_batch():
    idx = list(range(7))
    parts = [rank_slice(idx, r, 3) for r in range(3)]
    assert parts == [[0, 1, 2], [3, 4], [5, 6]]
    assert rank_slice([5], 1, 2) == [] and empty_example(2)["labels"] == [-100, -100]
    assert not DistContext().active and DistContext().all_reduce([1.0]) == [1.0]


@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_fast_path_under_ddp(two_process_run, tmp_path, nf4):
    """--fast_path with DDP: 2 processes give the single-process fast path's losses, which (dropout 0) are
    the plain path's up to float32 rounding order."""
    _, got = two_process_run
    fast, _ = train_once(str(tmp_path / "fast"), nf4, fast=True)
    plain, _ = train_once(str(tmp_path / "plain"), nf4)
    torch.testing.assert_close(torch.tensor(fast.losses), torch.tensor(plain.losses), rtol=LOSS_RTOL, atol=0)
    for rank in range(WORLD):
        dist = got[rank][("ddp-fast", nf4)]
        assert len(dist) == STEPS
        torch.testing.assert_close(torch.tensor(dist), torch.tensor(fast.losses), rtol=LOSS_RTOL, atol=0)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("nf4", [False, True], ids=["dense", "nf4"])
def test_same_losses_as_one_process(two_process_run, tmp_path, mode, nf4):
    root, got = two_process_run
    single, tr = train_once(str(tmp_path / "single"), nf4)
    for rank in range(WORLD):
        dist = got[rank][(mode, nf4)]
        assert len(dist) == STEPS
        torch.testing.assert_close(torch.tensor(dist), torch.tensor(single.losses), rtol=LOSS_RTOL, atol=0)
    # the adapter, gathered and written once by rank 0, equals the single process's after the same steps
    from lora import save_adapter
    from lora.adapter_io import read_adapter_weights

    save_adapter(tr.model, str(tmp_path / "adapter"))
    ours, theirs = read_adapter_weights(str(tmp_path / "adapter")), read_adapter_weights(
        os.path.join(root, f"{mode}-{int(nf4)}", "adapter"))
    assert sorted(ours) == sorted(theirs) and len(ours) == 2 * 7 * 2
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], atol=WEIGHT_ATOL, rtol=0, msg=k)


def test_checkpoint_written_once_and_resume_under_ddp(two_process_run, tmp_path):
    root, got = two_process_run
    out = os.path.join(root, "resume")
    assert sorted(os.listdir(out)) == ["checkpoint-2"]  # rank 0 only; no temporary or per-rank leftovers
    assert sorted(os.listdir(os.path.join(out, "checkpoint-2"))) == [
        "adapter", "optimizer.pt", "rng_state.pt", "scheduler.pt", "trainable.safetensors", "trainer_state.json"]
    single, _ = train_once(str(tmp_path / "single"), False, max_steps=4)
    whole, resumed = got[0]["ddp-whole"], got[0]["resume"]
    assert len(resumed) == 4  # the 2 restored losses + 2 new steps
    torch.testing.assert_close(torch.tensor(whole), torch.tensor(single.losses), rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(whole), rtol=LOSS_RTOL, atol=0)
    assert got[1]["resume"] == resumed


def test_config_field_and_help():
    from train.config import ConfigError, build_arg_parser, parse_args

    assert parse_args(["--distributed", "fsdp"]).distributed == "fsdp"
    with pytest.raises(ConfigError, match="distributed"):
        parse_args(["--distributed", "zero3"])
    assert "FSDP2" in build_arg_parser().format_help()


def test_benchmark_arguments_and_targets():
    """benchmarks/distributed.py: argument checks and the targets table (its runs are GPU jobs, not tests)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "distributed.py")
    spec = importlib.util.spec_from_file_location("bench_distributed", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    a = bench.parse_args(["--device", "cpu", "--gpus", "2,1", "--size", "tiny", "--rows", "ddp7b"])
    assert a.gpu_counts == [1, 2] and a.size == "tiny"
    for bad in (["--rows", "ddp8b"], ["--gpus", "a"], ["--gpus", "0"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cpu", *bad])
    rows = [{"row": "ddp7b", "gpus": 1, "tokens_per_s": 100.0}, {"row": "ddp7b", "gpus": 2, "tokens_per_s": 190.0},
            {"row": "ddp7b", "gpus": 4, "tokens_per_s": 320.0}, {"row": "fsdp70b", "gpus": 1, "error": "OOM"}]
    t = {x["name"]: x for x in bench.targets(rows)}
    eff2 = t["ddp7b: DDP scaling efficiency at 2 GPUs"]
    assert eff2["measured"] == 0.95 and eff2["met"] is True
    assert t["ddp7b: DDP scaling efficiency at 4 GPUs"]["met"] is False  # 0.8 < 0.85
    one = [x for x in t.values() if "ONE GPU" in x["name"]][0]
    assert one["met"] is False and one["measured"] == "OOM"
    # GPU counts absent from the machine: not measured, not met, and the reason kept with the target
    t = {x["name"]: x for x in bench.targets(rows[:2], {4: "not run: 2 GPUs here"})}
    four = t["ddp7b: DDP scaling efficiency at 4 GPUs"]
    assert four["measured"] is None and four["met"] is False and four["note"] == "not run: 2 GPUs here"
    assert bench.parse_args(["--device", "cpu", "--rows", "hf-fsdp70b"]).rows == "hf-fsdp70b"
    # a row may name its own GPU counts; the machine's counts are the union
    a = bench.parse_args(["--device", "cpu", "--gpus", "1,2", "--rows", "ddp7b,hf-fsdp70b@4+1,fsdp70b-linear@2"])
    assert a.plan == [("ddp7b", [1, 2]), ("hf-fsdp70b", [1, 4]), ("fsdp70b-linear", [2])]
    assert a.gpu_counts == [1, 2, 4]
    for bad in ("ddp7b@", "ddp7b@x", "ddp7b@0", "nope@2"):
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cpu", "--rows", bad])
    # the A/B row (previous FSDP2 layout) is scored against fsdp70b's one-GPU row
    assert bench.ROW_ENV["fsdp70b-linear"] == {"QLORA_FSDP_NF4_UNITS": "linear", "QLORA_FSDP_PREFETCH": "0"}
    ab = [{"row": "fsdp70b", "gpus": 1, "tokens_per_s": 100.0}, {"row": "fsdp70b-linear", "gpus": 2,
                                                                  "tokens_per_s": 150.0}]
    t = {x["name"]: x for x in bench.targets(ab)}
    assert t["fsdp70b-linear (previous FSDP2 layout, A/B): tokens/s vs linear scaling at 2 GPUs"]["measured"] == 0.75
    # the --fast_path row: its own scaling and its ratio to the HF stack at the same GPU count
    assert "ddp7b-fast" in bench.FAST_ROWS and bench.ROWS["ddp7b-fast"][:3] == bench.ROWS["ddp7b"][:3]
    fr = [{"row": "ddp7b-fast", "gpus": 1, "tokens_per_s": 100.0}, {"row": "ddp7b-fast", "gpus": 2, "tokens_per_s": 196.0},
          {"row": "hf-ddp7b", "gpus": 2, "tokens_per_s": 98.0}]
    t = {x["name"]: x for x in bench.targets(fr)}
    assert t["ddp7b-fast (train.run --fast_path): DDP scaling efficiency at 2 GPUs"]["measured"] == 0.98
    assert t["ddp7b-fast: ours (--fast_path) / HF+peft+bnb tokens/s at 2 GPUs"]["measured"] == 2.0


def test_resume_under_fsdp_with_paged_optimizer(two_process_run):
    """FSDP2 + PagedAdamW32bit: a run resumed from the gathered checkpoint-2 repeats the uninterrupted losses."""
    _, got = two_process_run
    whole, resumed = got[0]["fsdp-paged"], got[0]["resume-fsdp"]
    assert len(whole) == len(resumed) == 4
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(whole), rtol=LOSS_RTOL, atol=0)
    assert got[1]["resume-fsdp"] == resumed


@pytest.mark.parametrize("sub", ["rows", "whole"])
@pytest.mark.parametrize("quant", ["nf4", None], ids=["nf4", "dense"])
def test_each_rank_reads_only_its_shard(two_process_run, sub, quant):
    """load_model_sharded (rows read with safetensors get_slice, NF4 quantized per rank) gives every rank the
    same shards and logits as loading the whole model and then sharding it."""
    _, got = two_process_run
    assert got[0][("sharded-load", sub, quant)] and got[1][("sharded-load", sub, quant)]


def test_fsdp2_one_nf4_unit_per_layer(two_process_run):
    """wrap_model's FSDP2 layout: per decoder layer one unit for the seven NF4 linears (uint8 codes + fp32
    scales, nothing else) and one for the layer's LoRA A/B and norms, plus the root; nf4_units="linear" gives
    the former layout (one unit per NF4 linear) over the same parameters."""
    _, got = two_process_run
    n_layers = ARGS["num_hidden_layers"]
    for rank in range(WORLD):
        grouped = got[rank][("units", "layer", True)]
        names = [unit_name(u) for u in grouped["units"]]
        assert sorted(names) == sorted(["root"] + [f"{k}{i}" for i in range(n_layers) for k in "GL"])
        for u in grouped["units"]:
            name = unit_name(u)
            if name.startswith("G"):
                assert len(u) == 2 * 7 and all(n.startswith(f"model.layers.{name[1:]}.") for n in u)
                assert {n.rsplit(".", 1)[1] for n in u} == {"weight_packed", "weight_scales"}
                assert {grouped["dtypes"][n] for n in u} == {"torch.uint8", "torch.float32"}
            elif name.startswith("L"):
                assert len(u) == 2 * 7 + 2 and sum(".lora_" in n for n in u) == 2 * 7
            else:
                assert len(u) == 3  # embeddings, final norm, lm_head
        linear = got[rank][("units", "linear", False)]
        nf4 = [u for u in linear["units"] if unit_name(u).startswith("G")]
        assert len(nf4) == 7 * n_layers and all(len(u) == 2 for u in nf4)
        assert sorted(n for u in linear["units"] for n in u) == sorted(n for u in grouped["units"] for n in u)


def test_fsdp2_all_gathers_per_micro_batch(two_process_run):
    """With gradient checkpointing each non-root unit is all-gathered twice per forward/backward (forward,
    backward recompute) and the root once: 2 * (n + n) + 1 with NF4 units per layer, 2 * (7n + n) + 1 per
    linear (n layers). Every NF4 backward runs before its unit's reshard (a grouped unit reshards after the
    gradient of its first linear's input, q_proj's)."""
    from collections import Counter

    _, got = two_process_run
    n = ARGS["num_hidden_layers"]
    for rank in range(WORLD):
        for layout, n_units in ((("layer", True), 2 * n), (("layer", False), 2 * n), (("linear", False), 8 * n)):
            events = got[rank][("units",) + layout]["events"]
            # each on gathered codes; layer 0's q/k/v have none (their input, from the frozen embedding and
            # norm, needs no gradient: that unit reshards in FSDP2's end-of-backward callback instead)
            assert events.count("nf4-backward") == 7 * n - 3, (layout, events)
            gathers = Counter(e for e in events if e == "root" or (e[0] in "GL" and e[1:].isdigit()))
            assert gathers.pop("root") == 1, layout
            assert sum(gathers.values()) == 2 * n_units and set(gathers.values()) == {2} | (
                {14} if layout[0] == "linear" else set()), (layout, gathers)


def test_fsdp2_explicit_prefetch(two_process_run):
    """set_layer_prefetch: layer i+1's NF4 unit is all-gathered before layer i computes (forward), and layer
    i-1's before layer i's recompute (backward); without it, each only when its own layer starts."""
    _, got = two_process_run
    for rank in range(WORLD):
        for prefetch in (True, False):
            ev = got[rank][("units", "layer", prefetch)]["events"]
            b = ev.index("backward")
            fwd, bwd = ev[:b], ev[b + 1:]
            assert ("norm0" in fwd and "norm1" in fwd and "norm0" in bwd and "norm1" in bwd), ev
            if prefetch:
                assert fwd.index("G0") < fwd.index("norm0") and fwd.index("G1") < fwd.index("norm0"), ev
                assert bwd.index("G0") < bwd.index("norm1") and bwd.index("L0") < bwd.index("norm1"), ev
            else:
                assert fwd.index("norm0") < fwd.index("G0") < fwd.index("norm1") < fwd.index("G1"), ev
                assert bwd.index("norm1") < bwd.index("G0"), ev


def _fsdp_param_as_in_torch_2_11():
    """FSDPParam._init_sharded_param as torch 2.11 has it (`nn.Parameter(dtensor)`, then `requires_grad_`),
    rebuilt from this torch's source; None when the source no longer has the form this rewrites."""
    import inspect
    import re
    import textwrap

    from torch.distributed.fsdp._fully_shard import _fsdp_param

    src = textwrap.dedent(inspect.getsource(_fsdp_param.FSDPParam._init_sharded_param))
    m = re.search(r"\n( +)self\.sharded_param = nn\.Parameter\(\s*self\.to_sharded_dtensor\(sharded_param\),\s*"
                  r"requires_grad=param\.requires_grad,?\s*\)", src)
    if m is None:
        return None
    indent = m.group(1)
    old = (f"\n{indent}self.sharded_param = nn.Parameter(self.to_sharded_dtensor(sharded_param))"
           f"\n{indent}self.sharded_param.requires_grad_(param.requires_grad)")
    ns = {}
    exec(compile(src[:m.start()] + old + src[m.end():], _fsdp_param.__file__, "exec"), _fsdp_param.__dict__, ns)
    return ns["_init_sharded_param"]


def test_nf4_codes_shard_under_torch_2_11_fsdp2(tmp_path, monkeypatch):
    """torch 2.11's FSDP2 cannot wrap a uint8 parameter (the H200 run of benchmarks/distributed.py failed there);
    shard_nf4_linear can, and the sharded linear computes what the unsharded one does; so can shard_nf4_group
    (several linears as one unit, as wrap_model groups a decoder layer's)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.fsdp._fully_shard import _fsdp_param

    from kernels import NF4Linear
    from train.distributed import integer_parameters_without_grad, make_shardable, shard_nf4_group, \
        shard_nf4_linear

    old = _fsdp_param_as_in_torch_2_11()
    if old is None:
        pytest.skip("this torch's FSDPParam._init_sharded_param has another form")
    monkeypatch.setattr(_fsdp_param.FSDPParam, "_init_sharded_param", old)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        x = torch.randn(3, 128)
        with pytest.raises(RuntimeError, match="floating point"):  # what the H200 run hit
            fully_shard(make_shardable(NF4Linear.from_linear(torch.nn.Linear(128, 64, bias=False))), mesh=mesh)
        lin = NF4Linear.from_linear(torch.nn.Linear(128, 64, bias=False))
        want = lin(x)
        shard_nf4_linear(lin, mesh, MixedPrecisionPolicy())
        packed = lin._parameters["weight_packed"]
        assert packed.dtype == torch.uint8 and not packed.requires_grad and hasattr(packed, "device_mesh")
        torch.testing.assert_close(lin(x), want, rtol=0, atol=0)
        # several NF4 linears as one FSDP2 unit (wrap_model's per-layer group), under the same torch 2.11 code
        lins = [NF4Linear.from_linear(torch.nn.Linear(128, 64, bias=False)) for _ in range(3)]
        wants = [m(x) for m in lins]

        class Root(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.lins = torch.nn.ModuleList(lins)

            def forward(self, x):
                return [m(x) for m in self.lins]

        root = Root()
        shard_nf4_group(lins, mesh, MixedPrecisionPolicy())
        fully_shard(root, mesh=mesh)
        assert fsdp_units(root) == [sorted(f"lins.{i}.weight_{k}" for i in range(3) for k in ("packed", "scales"))]
        for got, want in zip(root(x), wants):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        with integer_parameters_without_grad():
            assert not torch.nn.Parameter(torch.zeros(2, dtype=torch.uint8)).requires_grad
            assert torch.nn.Parameter(torch.zeros(2)).requires_grad
        with pytest.raises(RuntimeError):  # restored afterwards
            torch.nn.Parameter(torch.zeros(2, dtype=torch.uint8))
    finally:
        dist.destroy_process_group()
