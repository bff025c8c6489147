"""Multi-GPU QLoRA benchmark (issue 8): DDP scaling of a 7B model, a 70B-shaped model on 1 GPU and FSDP2 on 2/4.

    python benchmarks/distributed.py                                  # every row on up to 4 GPUs (the issue's table)
    python benchmarks/distributed.py --rows ddp7b --gpus 1,2          # a subset
    python benchmarks/distributed.py --size tiny --device cpu --gpus 1,2 --steps 3 --warmup 1 --seq 32 --out x.json
                                                                      # checks the harness on a CPU (gloo)

The driver (this script without torchrun's RANK) starts `torchrun --nproc-per-node N benchmarks/distributed.py
--worker ...` once per (row, N); each worker builds the model with random weights (std 0.02) quantized to NF4
one linear at a time on its GPU (benchmarks.e2e.build_ours: LoRA r=64 alpha=16 dropout 0.1 on all seven
linears), wraps it with train.distributed.wrap_model (DDP, or FSDP2 sharding the NF4 codes/scales and LoRA),
and times optimizer steps on random token batches (labels = inputs): bf16 autocast, gradient checkpointing,
clip 0.3, paged AdamW 32-bit (its states on each rank's shard under FSDP2), gradients reduced once per step.

Rows (issue 8):
    ddp7b    llama-2-7b, batch 4 x 2048 per GPU, DDP on 1/2/4 GPUs       efficiency(N) = tok/s(N) / (N tok/s(1))
    fsdp70b  llama-2-70b, batch 1 x 2048 per GPU, 1 GPU (no wrapper), FSDP2 on 2/4: efficiency as above,
             per-GPU peak memory (max over ranks of torch.cuda.max_memory_allocated)
    hf       the same rows with transformers + peft + bitsandbytes (benchmarks.e2e.build_hf) under torch DDP
             (what accelerate's DDP does). HF + accelerate FSDP of a bnb 4-bit model needs quant_storage
             bf16 + FSDP1 wrapping; it is not attempted here and the row says so.
Measurements: tokens/s = world * batch * seq / median step time over the timed steps (after --warmup steps),
each step ended by a device synchronize and a barrier. A row that fails (OOM, error) records the error.
Results: benchmarks/results/distributed-<gpu>.json (--out to override) with gpu, gpu_count, date, commit,
rows and targets [{name, measured, goal, met}].
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
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
}
GOALS = {"ddp7b": {2: 0.90, 4: 0.85}, "fsdp70b": {2: 0.85, 4: 0.85}}
GIB = 2**30


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------ worker
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
    try:
        args = e2e.model_args(a.size)
        t = time.time()
        if a.stack == "hf":
            model = e2e.build_hf(args, device, ALL7, checkpointing=True)
        else:
            model = e2e.build_ours(args, device, ALL7, double_quant=False)
            model.model.gradient_checkpointing = True
        out["build_s"] = time.time() - t
        if device.type == "cuda":
            out["weights_gib_before_wrap"] = torch.cuda.memory_allocated(device) / GIB
        if a.stack == "hf" and ctx.active:
            from torch.nn.parallel import DistributedDataParallel as DDP

            wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        else:
            wrapped = wrap_model(model, ctx, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        params = [p for p in model.parameters() if p.requires_grad]

        class _Cfg:  # build_optimizer reads these names
            learning_rate, adam_beta1, adam_beta2, adam_epsilon, weight_decay = 2e-4, 0.9, 0.999, 1e-8, 1e-3

        opt = build_optimizer("paged_adamw_32bit" if device.type == "cuda" or a.stack == "ours" else "adamw_torch",
                              params, _Cfg)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        gen = torch.Generator().manual_seed(1 + ctx.rank)
        times = []
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
                else:
                    logits = wrapped(ids).logits
                    loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                                             ids[:, 1:].flatten())
            loss.backward()
            clip_grad_norm_(params, 0.3)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ctx.barrier()
            if step >= a.warmup:
                times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
        peaks = ctx.all_reduce([peak], op="max") if device.type == "cuda" else [peak]  # the largest rank's
        out.update(step_s=med, step_times_s=times, tokens_per_s=ctx.world_size * a.batch * a.seq / med,
                   peak_gib_per_gpu=peaks[0], loss=float(loss))
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
def run_job(row: str, n: int, a) -> dict:
    size, batch, seq, mode, stack = ROWS[row]
    size = a.size or size
    batch, seq = a.batch or batch, a.seq or seq
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
               str(a.master_port), os.path.abspath(__file__), "--worker", "--result", result, "--size", size,
               "--batch", str(batch), "--seq", str(seq), "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--mode", mode if n > 1 else "single", "--stack", stack, "--device", a.device]
        log(f"== {row} on {n} {'GPU' if a.device == 'cuda' else 'process'}(es): {' '.join(cmd[3:])}")
        t = time.time()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, timeout=a.job_timeout, capture_output=True, text=True)
            tail = (proc.stdout + proc.stderr)[-2000:]
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            tail, rc = f"timed out after {a.job_timeout}s", -1
        res = json.load(open(result)) if os.path.isfile(result) else {"error": f"no result (rc {rc})", "log": tail}
    res.update(row=row, gpus=n, size=size, batch_per_gpu=batch, seq=seq, wall_s=time.time() - t)
    log("   -> " + (f"{res['tokens_per_s']:.0f} tok/s, peak {res.get('peak_gib_per_gpu') or float('nan'):.1f} GiB/GPU"
                     if "tokens_per_s" in res else f"error: {res.get('error')}"))
    return res


def targets(rows: list[dict]) -> list[dict]:
    by = {(r["row"], r["gpus"]): r for r in rows}
    out = []
    for row, goals in GOALS.items():
        one = by.get((row, 1), {}).get("tokens_per_s")
        for n, goal in goals.items():
            tps = by.get((row, n), {}).get("tokens_per_s")
            eff = tps / (n * one) if tps and one else None
            what = "DDP scaling efficiency" if row == "ddp7b" else "FSDP2 tokens/s vs linear scaling from 1 GPU"
            out.append({"name": f"{row}: {what} at {n} GPUs", "measured": None if eff is None else round(eff, 3),
                        "goal": f">= {goal}", "met": None if eff is None else eff >= goal})
    r1 = by.get(("fsdp70b", 1), {})
    out.append({"name": "fsdp70b: 70B-shaped QLoRA (batch 1 x 2048, all linears) trains on ONE GPU; peak GiB",
                "measured": r1.get("peak_gib_per_gpu") if "tokens_per_s" in r1 else r1.get("error"),
                "goal": "trains (no OOM)", "met": ("tokens_per_s" in r1) if r1 else None})
    for row in ("ddp7b",):
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
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        out = ""
    return out if len(out) == 40 else os.environ.get("E2E_COMMIT", "unknown")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="benchmarks/distributed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="ddp7b,fsdp70b,hf-ddp7b", help=f"comma list of {', '.join(ROWS)}")
    p.add_argument("--gpus", default="1,2,4", help="process counts to run each row on (at most the GPUs present)")
    p.add_argument("--size", default=None, help="override every row's model size (e.g. tiny for a CPU check)")
    p.add_argument("--batch", type=int, default=None, help="override the per-GPU batch")
    p.add_argument("--seq", type=int, default=None, help="override the sequence length")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/distributed-<gpu>.json)")
    p.add_argument("--job-timeout", type=int, default=1800, help="seconds per torchrun job")
    p.add_argument("--master-port", type=int, default=29517)
    # worker-only (set by the driver)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=("single", "ddp", "fsdp"), help=argparse.SUPPRESS)
    p.add_argument("--stack", choices=("ours", "hf"), default="ours", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not a.worker:
        bad = [r for r in a.rows.split(",") if r not in ROWS]
        if bad:
            p.error(f"--rows: unknown {bad}; expected some of {', '.join(ROWS)}")
        try:
            a.gpu_counts = sorted({int(x) for x in a.gpus.split(",")})
        except ValueError:
            p.error(f"--gpus {a.gpus!r}: expected a comma list of integers")
        if not a.gpu_counts or a.gpu_counts[0] < 1:
            p.error("--gpus: counts must be >= 1")
        if a.device == "cuda":
            have = torch.cuda.device_count()
            if a.gpu_counts[-1] > have:
                log(f"--gpus {a.gpus}: only {have} GPU(s) here; counts above {have} are skipped")
                a.gpu_counts = [n for n in a.gpu_counts if n <= have]
        if a.steps < 1 or a.warmup < 0:
            p.error("--steps must be >= 1 and --warmup >= 0")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    gpu = gpu_name(a.device)
    results = {"gpu": gpu, "gpu_count": torch.cuda.device_count() if a.device == "cuda" else 0,
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "commit": git_commit(), "device": a.device, "torch": torch.__version__,
               "settings": {k: v for k, v in vars(a).items() if k not in ("worker", "result", "mode", "stack")},
               "rows": []}
    out = a.out or os.path.join(ROOT, "benchmarks", "results",
                                f"distributed-{gpu.replace('NVIDIA ', '').replace(' ', '_')}.json")
    for row in a.rows.split(","):
        for n in a.gpu_counts:
            if row.startswith("hf") and a.device == "cpu":
                results["rows"].append({"row": row, "gpus": n, "error": "skipped: bitsandbytes 4-bit needs CUDA"})
                continue
            results["rows"].append(run_job(row, n, a))
            results["targets"] = targets(results["rows"])
            os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
            with open(out, "w") as fh:
                json.dump(results, fh, indent=1)
    results["targets"] = targets(results["rows"])
    with open(out, "w") as fh:
        json.dump(results, fh, indent=1)
    log(f"\n== {gpu} x{results['gpu_count']}  {results['date']}  commit {results['commit'][:10]}  -> {out}")
    for t in results["targets"]:
        log(f"  {'MET ' if t['met'] else 'MISS' if t['met'] is False else '    '} {t['name']}: {t['measured']} "
            f"(goal {t['goal']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
