"""Multi-GPU QLoRA benchmark (issue 8): DDP scaling of a 7B model, a 70B-shaped model on 1 GPU and FSDP2 on 2/4.

    python benchmarks/distributed.py                                  # every row on up to 4 GPUs (the issue's table)
    python benchmarks/distributed.py --rows ddp7b --gpus 1,2          # a subset
    python benchmarks/distributed.py --size tiny --device cpu --gpus 1,2 --steps 3 --warmup 1 --seq 32 --out x.json
                                                                      # checks the harness on a CPU (gloo)

The driver (this script without torchrun's RANK) starts `torchrun --nproc-per-node N benchmarks/distributed.py
--worker ...` once per (row, N); each worker builds the model with random weights (std 0.02) quantized to NF4
one linear at a time on its GPU (benchmarks.e2e.build_ours: LoRA r=64 alpha=16 dropout 0.1 on all seven
linears), wraps it with train.distributed.wrap_model (DDP, or FSDP2 sharding the NF4 codes/scales and LoRA:
per decoder layer one unit for its seven NF4 linears and one for its LoRA A/B and norms, with explicit
prefetch one layer ahead; QLORA_FSDP_NF4_UNITS=linear QLORA_FSDP_PREFETCH=0 in the environment, or the
fsdp70b-linear row, give the earlier one-unit-per-NF4-linear layout), and times optimizer steps on random
token batches (labels = inputs): bf16 autocast, gradient checkpointing, clip 0.3, paged AdamW 32-bit (its
states on each rank's shard under FSDP2), gradients reduced once per step.

A row may name its own GPU counts: --rows ddp7b,hf-fsdp70b@1+4 runs hf-fsdp70b on 1 and 4 GPUs only.

Rows (issue 8), in the order they run:
    ddp7b       llama-2-7b, batch 4 x 2048 per GPU, DDP on 1/2/4 GPUs    efficiency(N) = tok/s(N) / (N tok/s(1))
    fsdp70b     llama-2-70b, batch 1 x 2048 per GPU, 1 GPU (no wrapper), FSDP2 on 2/4: efficiency as above,
                per-GPU peak memory (max over ranks of torch.cuda.max_memory_allocated)
    ddp7b-fast  ddp7b with train.run --fast_path (llama/fast_path.py: fused modules, every layer checkpointed,
                the chunked cross entropy; no offload), for the ratio against hf-ddp7b
    fsdp70b-linear  fsdp70b with the previous FSDP2 layout (one unit per NF4 linear, no explicit prefetch),
                for an A/B against fsdp70b; its efficiency is taken against fsdp70b's 1-GPU row
    hf-ddp7b    ddp7b with transformers + peft + bitsandbytes (benchmarks.e2e.build_hf, bnb PagedAdamW32bit)
                under torch DDP (what accelerate's DDP does)
    hf-fsdp70b  fsdp70b with transformers + peft + bitsandbytes: Linear4bit NF4 with quant_storage bfloat16
                (so FSDP can flatten the 4-bit weights with the bf16 tensors), on 1 GPU without a wrapper and
                on 2/4 under torch FSDP1 configured as accelerate's FSDP plugin does for QLoRA (FULL_SHARD,
                use_orig_params False, peft's fsdp_auto_wrap_policy, bf16 params, fp32 gradient reduction and
                buffers), clip through FSDP's clip_grad_norm_, bnb PagedAdamW32bit on the flat shards
Our stack runs the plain path (what `torchrun -m train.run` runs: torch checkpointing, no llama.fast_path).
Our NF4 matmuls are pinned to dequantize + cuBLAS for M > 16 (--nf4-path dequant, the default): the path
the timed dispatch picks there on an H200 (README "Kernel benchmarks"); timing the fused candidates (and
autotuning them) in the first step of every process would cost minutes of device time per job.
Measurements: tokens/s = world * batch * seq / median step time over the timed steps (after the warmup
steps; per row by default 2 + 5 for 7B, 1 + 3 for 70B), each step ended by a device synchronize and a
barrier. A row that fails (OOM, error) records the error; --deadline-s skips the jobs that no longer fit
the run's time budget (and says so), and a job past its timeout is killed with its process group.
Results: benchmarks/results/distributed-<gpu>.json (--out to override), rewritten after every job, with gpu,
gpu_count, date, commit (BENCH_COMMIT overrides git), rows and targets [{name, measured, goal, met}]; GPU
counts asked for but absent here are recorded as not run (--missing-note says why).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# this folder also holds benchmarks/kernels.py, which must not shadow the `kernels` package
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROWS = {  # row -> (model size, per-GPU batch, sequence, mode for N > 1, stack)
    "ddp7b": ("llama-2-7b", 4, 2048, "ddp", "ours"),
    "fsdp70b": ("llama-2-70b", 1, 2048, "fsdp", "ours"),
    "hf-ddp7b": ("llama-2-7b", 4, 2048, "ddp", "hf"),
    "hf-fsdp70b": ("llama-2-70b", 1, 2048, "fsdp", "hf"),
    "fsdp70b-linear": ("llama-2-70b", 1, 2048, "fsdp", "ours"),  # A/B: the previous FSDP2 layout (see ROW_ENV)
    "ddp7b-fast": ("llama-2-7b", 4, 2048, "ddp", "ours"),          # ddp7b with train.run --fast_path
}
FAST_ROWS = {"ddp7b-fast"}  # rows that run llama/fast_path.py (checkpointing of every layer, chunked loss)
ROW_ENV = {  # row -> environment for its torchrun job
    "fsdp70b-linear": {"QLORA_FSDP_NF4_UNITS": "linear", "QLORA_FSDP_PREFETCH": "0"},
}
STEPS = {"llama-2-7b": (2, 5), "llama-2-70b": (1, 3)}  # model size -> (warmup, timed) steps unless given
MIN_JOB_S = {"llama-2-7b": 45, "llama-2-70b": 75}      # a job is not started with less time left than this
GOALS = {"ddp7b": {2: 0.90, 4: 0.85}, "fsdp70b": {2: 0.85, 4: 0.85}}
GIB = 2**30


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------ worker
def pin_nf4_dequant_path() -> None:
    """Our NF4 matmuls: dequantize + cuBLAS for M > 16 without timing the fused candidates (see the docstring)."""
    import importlib

    nm = importlib.import_module("kernels.nf4_matmul")
    timed = nm._pick

    def pick(key, candidates):
        if "dequant" in candidates and isinstance(key[1], int) and key[1] > nm.DECODE_MAX_M:
            return "dequant"
        return timed(key, candidates)

    nm._pick = pick


def build_hf_bf16_storage(args, device, targets, seed: int = 0):
    """benchmarks.e2e.build_hf with the NF4 codes stored as bfloat16 (bnb quant_storage; the QLoRA + FSDP recipe
    of transformers/accelerate), so that FSDP1 flattens each decoder layer's tensors as one bf16 FlatParameter.
    Gradient checkpointing (non-reentrant) on; LoRA r=64 alpha=16 dropout 0.1 via peft."""
    from benchmarks.e2e import build_hf

    # bf16 also on the CPU check: FSDP1 needs one dtype per flattened unit
    return build_hf(args, device, targets, checkpointing=True, seed=seed, dtype=torch.bfloat16,
                    quant_storage=torch.bfloat16, checkpointing_kwargs={"use_reentrant": False})


def wrap_hf_fsdp1(model, device):
    """torch FSDP1 as accelerate's FSDP plugin sets it up for a peft QLoRA model."""
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import BackwardPrefetch, MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if device.type == "cuda" else None
    return FSDP(model, sharding_strategy=ShardingStrategy.FULL_SHARD, auto_wrap_policy=fsdp_auto_wrap_policy(model),
                mixed_precision=mp, use_orig_params=False, device_id=device, limit_all_gathers=True,
                backward_prefetch=BackwardPrefetch.BACKWARD_PRE, sync_module_states=False)


def worker(a) -> None:
    """One process of a torchrun job: build, wrap, time; rank 0 writes {tokens_per_s, peak_gib, ...} to a.result."""
    from benchmarks import e2e
    from train.distributed import clip_grad_norm_, init_distributed, no_sync, wrap_model
    from train.optim import build_optimizer

    device_type = a.device
    ctx = init_distributed(a.mode if a.mode != "single" else "none", device_type)
    device = torch.device("cuda", ctx.local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cpu":
        torch.set_num_threads(1)
    out = {"rank_count": ctx.world_size, "mode": a.mode if ctx.active else "single", "stack": a.stack}
    if device.type == "cuda" and a.stack == "ours" and a.nf4_path == "dequant":
        pin_nf4_dequant_path()
    hf_fsdp = a.stack == "hf" and a.row_mode == "fsdp"
    try:
        args = e2e.model_args(a.size)
        t = time.time()
        if hf_fsdp:
            model = build_hf_bf16_storage(args, device, ALL7)
        elif a.stack == "hf":
            model = e2e.build_hf(args, device, ALL7, checkpointing=True)
            # non-reentrant checkpointing under DDP (transformers 5 defaults to it; said explicitly here)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model = e2e.build_ours(args, device, ALL7, double_quant=False)
            model.model.gradient_checkpointing = True
            if a.fast_path:  # what train.run --fast_path does: fused modules, their checkpointing, chunked loss
                from llama.fast_path import enable_fast_path

                enable_fast_path(model, checkpointing=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            out["weights_gib_before_wrap"] = torch.cuda.memory_allocated(device) / GIB
        out["build_s"] = time.time() - t
        t = time.time()
        fsdp1 = False
        if a.stack == "hf" and ctx.active:
            if hf_fsdp:
                wrapped, fsdp1 = wrap_hf_fsdp1(model, device), True
            else:
                from torch.nn.parallel import DistributedDataParallel as DDP

                wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            wrapped = wrap_model(model, ctx, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        opt_model = wrapped if fsdp1 else model  # FSDP1 (use_orig_params False): its flat shards are the params
        params = [p for p in opt_model.parameters() if p.requires_grad]
        out["trainable_params_local"] = sum(p.numel() for p in params)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            out["alloc_gib_after_wrap"] = torch.cuda.memory_allocated(device) / GIB
        out["wrap_s"] = time.time() - t

        if a.stack == "hf":
            opt = e2e.hf_optimizer(params, device)  # bnb PagedAdamW32bit on CUDA, torch AdamW on the CPU
        else:
            class _Cfg:  # build_optimizer reads these names
                learning_rate, adam_beta1, adam_beta2, adam_epsilon, weight_decay = 2e-4, 0.9, 0.999, 1e-8, 1e-3

            opt = build_optimizer("paged_adamw_32bit", params, _Cfg)
        out["optimizer"] = type(opt).__module__ + "." + type(opt).__name__
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        gen = torch.Generator().manual_seed(1 + ctx.rank)
        times, warm, losses = [], [], []
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        for step in range(a.warmup + a.steps):
            ids = torch.randint(0, args.vocab_size, (a.batch, a.seq), generator=gen).to(device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ctx.barrier()
            t0 = time.perf_counter()
            with no_sync(wrapped, True), autocast:
                if a.stack == "hf":
                    loss = wrapped(input_ids=ids, labels=ids).loss
                elif a.fast_path:   # the chunked cross entropy of the same shifted tokens (no logits)
                    loss = wrapped(ids, labels=ids).loss
                else:
                    logits = wrapped(ids).logits
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                                             ids[:, 1:].flatten())
            loss.backward()
            if fsdp1:
                wrapped.clip_grad_norm_(0.3)
            else:
                clip_grad_norm_(params, 0.3)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ctx.barrier()
            (times if step >= a.warmup else warm).append(time.perf_counter() - t0)
            losses.append(round(float(loss), 4))
            if ctx.is_main:
                log(f"   step {step + 1}/{a.warmup + a.steps}: {(times or warm)[-1]:.3f} s, loss {losses[-1]}")
        med = statistics.median(times)
        if device.type == "cuda":
            mine = torch.cuda.max_memory_allocated(device) / GIB
            reserved = torch.cuda.max_memory_reserved(device) / GIB
            per_rank = [0.0] * ctx.world_size
            per_rank[ctx.rank] = mine
            per_rank = ctx.all_reduce(per_rank)  # one slot per rank: the sum is the list
            out.update(peak_gib_per_gpu=max(per_rank), peak_gib_per_rank=per_rank,
                       peak_reserved_gib_rank0=reserved)
        else:
            out["peak_gib_per_gpu"] = None
        out.update(step_s=med, step_times_s=times, warmup_times_s=warm, losses=losses,
                   tokens_per_s=ctx.world_size * a.batch * a.seq / med, loss=float(loss))
    except Exception as e:  # noqa: BLE001 - the row records what failed (OOM on one GPU is a result)
        out.update(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                   traceback=traceback.format_exc()[-3000:])
        log(out["traceback"])
    if ctx.is_main:
        with open(a.result, "w") as fh:
            json.dump(out, fh, indent=1)
    if ctx.active and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ------------------------------------------------------------------------------------------------ driver
def _kill_group(proc: subprocess.Popen) -> None:
    """End a timed-out torchrun and its workers (they share the process group the driver started it in)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            continue


def run_job(row: str, n: int, a, timeout: float | None = None) -> dict:
    size, batch, seq, mode, stack = ROWS[row]
    size = a.size or size
    batch, seq = a.batch or batch, a.seq or seq
    warmup, steps = STEPS.get(size, (2, 5))
    warmup = warmup if a.warmup is None else a.warmup
    steps = steps if a.steps is None else a.steps
    timeout = a.job_timeout if timeout is None else min(timeout, a.job_timeout)
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
               str(a.master_port), os.path.abspath(__file__), "--worker", "--result", result, "--size", size,
               "--batch", str(batch), "--seq", str(seq), "--steps", str(steps), "--warmup", str(warmup),
               "--mode", mode if n > 1 else "single", "--row-mode", mode, "--stack", stack, "--device", a.device,
               "--nf4-path", a.nf4_path] + (["--fast-path"] if row in FAST_ROWS else [])
        log(f"== {row} on {n} {'GPU' if a.device == 'cuda' else 'process'}(es), timeout {timeout:.0f} s: "
            f"{' '.join(cmd[3:])}")
        t = time.time()
        env = {**os.environ, **ROW_ENV.get(row, {})}
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, env=env)
        try:
            text, _ = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            text = (proc.communicate()[0] or "") + f"\ntimed out after {timeout:.0f} s"
            rc = -1
        if a.log:
            with open(a.log, "a") as fh:
                fh.write(f"\n===== {row} on {n}: rc {rc}, {time.time() - t:.1f} s\n{text}")
        res = json.load(open(result)) if os.path.isfile(result) else \
            {"error": f"no result (rc {rc}{', timed out' if rc == -1 else ''})", "log": text[-2000:]}
    res.update(row=row, gpus=n, **({"env": ROW_ENV[row]} if row in ROW_ENV else {}), size=size, batch_per_gpu=batch, seq=seq, warmup=warmup, steps=steps,
               wall_s=time.time() - t)
    log("   -> " + (f"{res['tokens_per_s']:.0f} tok/s, peak {res.get('peak_gib_per_gpu') or float('nan'):.1f} GiB/GPU,"
                     f" {res['wall_s']:.0f} s" if "tokens_per_s" in res else f"error: {res.get('error')}"))
    return res


def targets(rows: list[dict], missing: dict | None = None) -> list[dict]:
    """One entry per issue-8 target. missing: {gpu count: why it was not run} -> measured None, met False."""
    missing = missing or {}
    by = {(r["row"], r["gpus"]): r for r in rows}
    out = []
    for row, goals in GOALS.items():
        one = by.get((row, 1), {}).get("tokens_per_s")
        for n, goal in goals.items():
            tps = by.get((row, n), {}).get("tokens_per_s")
            eff = tps / (n * one) if tps and one else None
            what = "DDP scaling efficiency" if row == "ddp7b" else "FSDP2 tokens/s vs linear scaling from 1 GPU"
            entry = {"name": f"{row}: {what} at {n} GPUs", "measured": None if eff is None else round(eff, 3),
                     "goal": f">= {goal}", "met": None if eff is None else eff >= goal}
            if eff is None and n in missing:
                entry.update(met=False, note=missing[n])
            elif eff is None and (row, n) in by:
                entry.update(met=False, note=by[(row, n)].get("error") or by.get((row, 1), {}).get("error"))
            if row == "fsdp70b" and "peak_gib_per_gpu" in by.get((row, n), {}):
                entry["peak_gib_per_gpu"] = by[(row, n)]["peak_gib_per_gpu"]
            out.append(entry)
    fast1 = by.get(("ddp7b-fast", 1), {}).get("tokens_per_s")
    for n in (1, 2, 4):
        tps, hf = by.get(("ddp7b-fast", n), {}).get("tokens_per_s"), by.get(("hf-ddp7b", n), {}).get("tokens_per_s")
        if tps and fast1 and n > 1:
            out.append({"name": f"ddp7b-fast (train.run --fast_path): DDP scaling efficiency at {n} GPUs",
                        "measured": round(tps / (n * fast1), 3), "goal": "report", "met": None})
        if tps and hf:
            out.append({"name": f"ddp7b-fast: ours (--fast_path) / HF+peft+bnb tokens/s at {n} GPUs",
                        "measured": round(tps / hf, 3), "goal": "report", "met": None})
    one = by.get(("fsdp70b", 1), {}).get("tokens_per_s")
    for n in (2, 4):
        tps = by.get(("fsdp70b-linear", n), {}).get("tokens_per_s")
        if tps and one:
            out.append({"name": f"fsdp70b-linear (previous FSDP2 layout, A/B): tokens/s vs linear scaling at {n} GPUs",
                        "measured": round(tps / (n * one), 3), "goal": "report", "met": None})
    r1 = by.get(("fsdp70b", 1), {})
    out.append({"name": "fsdp70b: 70B-shaped QLoRA (batch 1 x 2048, all linears) trains on ONE GPU; peak GiB",
                "measured": r1.get("peak_gib_per_gpu") if "tokens_per_s" in r1 else r1.get("error"),
                "goal": "trains (no OOM)", "met": ("tokens_per_s" in r1) if r1 else None,
                **({"tokens_per_s": r1["tokens_per_s"]} if "tokens_per_s" in r1 else {})})
    for row in ("ddp7b", "fsdp70b"):
        for n in (1, 2, 4):
            ours, hf = by.get((row, n), {}).get("tokens_per_s"), by.get(("hf-" + row, n), {}).get("tokens_per_s")
            if ours and hf:
                out.append({"name": f"{row}: ours / HF+peft+bnb tokens/s at {n} GPUs", "measured": round(ours / hf, 3),
                            "goal": "report", "met": None})
    return out


def gpu_name(device: str) -> str:
    if device != "cuda" or not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(0)


def git_commit() -> str:
    """BENCH_COMMIT or E2E_COMMIT when set (the device copy of the tree has no usable .git), else HEAD, else
    'unknown'."""
    from benchmarks.e2e import git_commit as commit_of

    return commit_of("BENCH_COMMIT", "E2E_COMMIT")


def machine_info(device: str) -> dict:
    info = {"torch": torch.__version__}
    for mod in ("triton", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
        info["cuda"] = torch.version.cuda
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001
            pass
        for key, cmd in (("driver", ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
                         ("topology", ["nvidia-smi", "topo", "-m"])):
            try:
                info[key] = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
            except Exception:  # noqa: BLE001
                pass
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="benchmarks/distributed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)} (run in this order)")
    p.add_argument("--gpus", default="1,2,4", help="process counts to run each row on (at most the GPUs present)")
    p.add_argument("--size", default=None, help="override every row's model size (e.g. tiny for a CPU check)")
    p.add_argument("--batch", type=int, default=None, help="override the per-GPU batch")
    p.add_argument("--seq", type=int, default=None, help="override the sequence length")
    p.add_argument("--steps", type=int, default=None, help="timed steps (median reported); default per row")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first; default per row")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/distributed-<gpu>.json)")
    p.add_argument("--log", default=None, help="append every job's full output to this file")
    p.add_argument("--job-timeout", type=int, default=1800, help="seconds per torchrun job")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="time budget of the whole run: jobs that no longer fit are skipped (and recorded)")
    p.add_argument("--nf4-path", choices=("dequant", "timed"), default="dequant",
                   help="our NF4 matmul path for M > 16: pinned dequantize + cuBLAS, or the timed dispatch")
    p.add_argument("--missing-note", default="",
                   help="why GPU counts asked for are absent here (recorded with those targets)")
    p.add_argument("--master-port", type=int, default=29517)
    # worker-only (set by the driver)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("single", "ddp", "fsdp"), help=argparse.SUPPRESS)
    p.add_argument("--row-mode", choices=("ddp", "fsdp"), default="ddp", help=argparse.SUPPRESS)
    p.add_argument("--stack", choices=("ours", "hf"), default="ours", help=argparse.SUPPRESS)
    p.add_argument("--fast-path", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.missing = {}
    if not a.worker:
        try:
            a.gpu_counts = sorted({int(x) for x in a.gpus.split(",")})
        except ValueError:
            p.error(f"--gpus {a.gpus!r}: expected a comma list of integers")
        if not a.gpu_counts or a.gpu_counts[0] < 1:
            p.error("--gpus: counts must be >= 1")
        a.plan = []  # [(row, [gpu counts])] in run order
        for item in a.rows.split(","):
            row, at, counts = item.partition("@")
            if row not in ROWS:
                p.error(f"--rows: unknown row {row!r}; expected some of {', '.join(ROWS)}")
            try:
                ns = sorted({int(x) for x in counts.split("+")}) if at else list(a.gpu_counts)
            except ValueError:
                p.error(f"--rows {item!r}: expected ROW or ROW@N[+N...] (e.g. hf-fsdp70b@1+4)")
            if not ns or ns[0] < 1:
                p.error(f"--rows {item!r}: GPU counts must be >= 1")
            a.plan.append((row, ns))
        a.gpu_counts = sorted({n for _, ns in a.plan for n in ns})
        if a.device == "cuda":
            have = torch.cuda.device_count()
            if a.gpu_counts[-1] > have:
                log(f"--gpus {a.gpus}: only {have} GPU(s) here; counts above {have} are skipped")
                why = f"not run: this machine has {have} GPU(s)" + (f"; {a.missing_note}" if a.missing_note else "")
                a.missing = {n: why for n in a.gpu_counts if n > have}
                a.gpu_counts = [n for n in a.gpu_counts if n <= have]
        if (a.steps is not None and a.steps < 1) or (a.warmup is not None and a.warmup < 0):
            p.error("--steps must be >= 1 and --warmup >= 0")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    start = time.time()
    gpu = gpu_name(a.device)
    info = machine_info(a.device)
    results = {"gpu": gpu, "gpu_count": torch.cuda.device_count() if a.device == "cuda" else 0,
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "commit": git_commit(), "device": a.device, **info,
               "settings": {k: v for k, v in vars(a).items()
                            if k not in ("worker", "result", "mode", "stack", "row_mode", "missing")},
               "rows": []}
    if a.missing:
        results["not_run"] = {str(n): why for n, why in a.missing.items()}
    out = a.out or os.path.join(ROOT, "benchmarks", "results",
                                f"distributed-{gpu.replace('NVIDIA ', '').replace(' ', '_')}.json")

    def save():
        results["targets"] = targets(results["rows"], a.missing)
        results["elapsed_s"] = round(time.time() - start, 1)
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            json.dump(results, fh, indent=1)

    save()
    for row, counts in a.plan:
        for n in [n for n in counts if n not in a.missing]:
            left = None if a.deadline_s is None else a.deadline_s - (time.time() - start)
            need = MIN_JOB_S.get(a.size or ROWS[row][0], 30)
            if left is not None and left < need:
                results["rows"].append({"row": row, "gpus": n, "error": f"skipped: {left:.0f} s left of the run's "
                                        f"--deadline-s {a.deadline_s:.0f} s, fewer than the {need} s a job needs"})
                log(f"== {row} on {n}: {results['rows'][-1]['error']}")
            else:
                results["rows"].append(run_job(row, n, a, timeout=None if left is None else left - 5))
            save()
        for n in [n for n in counts if n in a.missing]:
            results["rows"].append({"row": row, "gpus": n, "error": a.missing[n]})
    save()
    log(f"\n== {gpu} x{results['gpu_count']}  {results['date']}  commit {results['commit'][:10]}  -> {out}")
    for t in results["targets"]:
        log(f"  {'MET ' if t['met'] else 'MISS' if t['met'] is False else '    '} {t['name']}: {t['measured']} "
            f"(goal {t['goal']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
