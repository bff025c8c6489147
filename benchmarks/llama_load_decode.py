"""Llama load + decode benchmark (issue 4): ours vs transformers + bitsandbytes, in the same run on one GPU.

    python benchmarks/llama_load_decode.py                       # Llama-2-7B-shaped, 3 shards, on cuda
    python benchmarks/llama_load_decode.py --size tiny --device cpu --shards 3   # checks the harness on a CPU

A Llama-2-7B-shaped checkpoint with random fp16 weights (std 0.02; norms 1) is written once in 3 safetensors shards
with model.safetensors.index.json (--ckpt-dir, reused when present) and read through once to warm the page cache.
Each stack then runs in its own subprocess, so host peak memory (ru_maxrss) is its own:

    ours: llama.load_model(dir, quantize="nf4", device, dtype=bf16)   (quantize-on-load, one tensor at a time)
          llama.generate(model, prompt, max_new_tokens=128)           (KV cache; CUDA-graph decode steps on a GPU;
                                                                       --compare-dynamic adds the eager decode)
    HF:   AutoModelForCausalLM.from_pretrained(dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True,
          bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=bf16), device_map=device)
          model.generate(ids, max_new_tokens=128, min_new_tokens=128, do_sample=False)

Rows: load + quantize wall time (warm page cache); host peak RSS while loading; GPU memory allocated after loading;
batch-1 greedy decode of 128 new tokens after a 64-token prompt (tokens/s, one warm-up generation first; EOS
disabled so both produce exactly 128 tokens); --batch B decodes B prompts together (tokens/s counts all B x 128,
results file suffixed -batchB). The weight-bandwidth limit of decoding is measured device copy
bandwidth / bytes of weights read per token (all 4-bit linears with their scales, lm_head, norms).
Results: benchmarks/results/llama_load_decode-<gpu>.json with gpu, date, commit, rows and a targets list of
{"name", "measured", "goal", "met"}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# this folder also holds benchmarks/kernels.py, which must not shadow the `kernels` package
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.peers import shield_transformers  # noqa: E402
from llama import LlamaForCausalLM, ModelArgs  # noqa: E402

shield_transformers()      # (transformers >= 5.25 would import kernels/ as Hugging Face's hub kernels)
GIB = 2**30
PROMPT_LEN, NEW_TOKENS = 64, 128


# ------------------------------------------------------------------------------------------ the checkpoint
def make_checkpoint(size: str, out: str, shards: int, device: str, args: ModelArgs = None) -> None:
    """Random fp16 weights in ``shards`` safetensors files of about equal size, plus index and config.json
    (the shapes of ModelArgs ``size``, or of ``args``)."""
    from safetensors.torch import save_file

    if os.path.isfile(os.path.join(out, "model.safetensors.index.json")):
        return
    os.makedirs(out, exist_ok=True)
    args = ModelArgs.from_name(size, torch_dtype="float16") if args is None else args
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in LlamaForCausalLM(args).state_dict().items()}
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    g = torch.Generator(device=device).manual_seed(0)
    weight_map, shard, shard_bytes, idx = {}, {}, 0, 1
    names = [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    for k, shape in shapes.items():
        if k.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.float16)
        else:
            t = (torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02).half().cpu()
        shard[k] = t
        weight_map[k] = names[idx - 1]
        shard_bytes += t.numel() * 2
        if shard_bytes >= total / shards and idx < shards:
            save_file(shard, os.path.join(out, names[idx - 1]), metadata={"format": "pt"})
            shard, shard_bytes, idx = {}, 0, idx + 1
    save_file(shard, os.path.join(out, names[idx - 1]), metadata={"format": "pt"})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    args.save(os.path.join(out, "config.json"))


def warm_page_cache(ckpt: str) -> None:
    for name in sorted(os.listdir(ckpt)):
        with open(os.path.join(ckpt, name), "rb") as f:
            while f.read(64 << 20):
                pass


# ------------------------------------------------------------------------------------------ one stack
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), the ceiling of memory-bound decoding."""
    from triton.testing import do_bench

    a = torch.empty(256 * 2**20, device="cuda", dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=5, rep=30, return_mode="median")
    return 2 * a.numel() * 2 / (ms * 1e-3)


def bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter and buffer except the embedding table (one row)."""
    seen, n = set(), 0
    emb = model.model.embed_tokens.weight
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen and t is not emb:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    for m in model.modules():
        qw = getattr(m, "qweight", None)
        if qw is not None:  # 4-bit codes and scales live in the QuantizedWeight4bit, not as parameters
            n += qw.packed.numel() + (qw.absmax.numel() * 4 if qw.absmax is not None else 0)
            if qw.nested is not None:
                n += qw.nested.q.numel() + qw.nested.absmax2.numel() * 4
    if model.lm_head.weight is emb:
        n += emb.numel() * emb.element_size()
    return n


def worker(stack: str, ckpt: str, device: str, double_quant: bool, decode_mode: str = "auto", batch: int = 1) -> dict:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    args = ModelArgs.from_json(ckpt)
    if stack == "hf":
        import transformers

        if not device.startswith("cuda"):  # the CPU harness check on AVX512-BF16 hosts (tests/conftest.py says why):
            import bitsandbytes.nn.modules as bnb_modules  # bitsandbytes' fused CPU path there repacks the weight

            if hasattr(bnb_modules, "has_avx512bf16"):  # for row blocks, which these tiny shapes do not divide into
                bnb_modules.has_avx512bf16 = lambda: False

        cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                              bnb_4bit_compute_dtype=dtype,
                                              bnb_4bit_use_double_quant=double_quant)
    t0 = time.perf_counter()
    if stack == "ours":
        from llama import load_model

        model = load_model(ckpt, quantize="nf4", device=device, dtype=dtype, double_quant=double_quant)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            ckpt, quantization_config=cfg, device_map=device, dtype=dtype).eval()
    sync(device)
    load_s = time.perf_counter() - t0
    host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    gpu_bytes = torch.cuda.memory_allocated() if device.startswith("cuda") else 0

    # `batch` prompts of the same length (no padding): each step's matmuls see M = batch rows
    prompts = [torch.randint(3, args.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(b)).tolist()
               for b in range(batch)]

    def decode(n: int) -> list[list[int]]:
        if stack == "ours":
            from llama import generate

            out = generate(model, prompts if batch > 1 else prompts[0], max_new_tokens=n, eos_token_id=[],
                           decode=decode_mode)
            return out if batch > 1 else [out]
        ids = torch.tensor(prompts, device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
        return out[:, PROMPT_LEN:].tolist()

    decode(8)  # warm-up: kernel compilation / autotuning, allocator
    sync(device)
    t0 = time.perf_counter()
    new = decode(NEW_TOKENS)
    sync(device)
    decode_s = time.perf_counter() - t0
    assert len(new) == batch and all(len(seq) == NEW_TOKENS for seq in new), [len(seq) for seq in new]
    row = {"stack": stack, "decode_mode": decode_mode if stack == "ours" else "hf generate", "load_s": load_s,
           "host_peak_gib": host_peak / GIB, "gpu_gib": gpu_bytes / GIB, "batch": batch,
           "decode_tokens_per_s": batch * NEW_TOKENS / decode_s}
    if stack == "ours":
        row["weight_bytes_per_token"] = bytes_per_token(model)
        if device.startswith("cuda"):
            row["copy_bandwidth_tb_s"] = copy_bandwidth() / 1e12
            # the weights are read once per step for the whole batch
            row["bandwidth_limit_tokens_per_s"] = \
                batch * row["copy_bandwidth_tb_s"] * 1e12 / row["weight_bytes_per_token"]
    return row


# ------------------------------------------------------------------------------------------ the run
def run_stack(stack: str, a, decode_mode: str = "auto") -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", stack, "--ckpt-dir", a.ckpt_dir,
           "--device", a.device, "--decode", decode_mode, "--batch", str(a.batch)] + \
        (["--double-quant"] if a.double_quant else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{stack} worker failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="llama-2-7b")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--ckpt-dir", default=None, help="default: /tmp/qlora-bench-<size>-<shards>")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--double-quant", action="store_true")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--decode", default="auto", choices=["auto", "dynamic", "static", "graph"],
                    help="our decode mode (llama.generate's decode=; auto = CUDA graph on a GPU)")
    ap.add_argument("--compare-dynamic", action="store_true",
                    help="also run ours with the eager growing-cache decode (row ours_dynamic)")
    ap.add_argument("--batch", type=int, default=1,
                    help="prompts decoded together (each step's matmuls see M = batch rows; tokens/s counts all)")
    a = ap.parse_args()
    if a.batch < 1:
        ap.error(f"--batch must be >= 1, got {a.batch}")
    a.ckpt_dir = a.ckpt_dir or f"/tmp/qlora-bench-{a.size}-{a.shards}"
    if a.worker:
        print(json.dumps(worker(a.worker, a.ckpt_dir, a.device, a.double_quant, a.decode, a.batch)))
        return

    make_checkpoint(a.size, a.ckpt_dir, a.shards, a.device)
    warm_page_cache(a.ckpt_dir)
    ours, hf = run_stack("ours", a, a.decode), run_stack("hf", a)
    rows = {"ours": ours, "hf": hf}
    if a.compare_dynamic:
        rows["ours_dynamic"] = run_stack("ours", a, "dynamic")
    shard_gib = max(os.path.getsize(os.path.join(a.ckpt_dir, f)) for f in os.listdir(a.ckpt_dir)
                    if f.endswith(".safetensors")) / GIB
    targets = [
        {"name": "load + quantize wall time (s), <= 0.5x HF", "measured": ours["load_s"],
         "goal": 0.5 * hf["load_s"], "met": ours["load_s"] <= 0.5 * hf["load_s"]},
        {"name": "host peak memory while loading (GiB), <= one shard + 1 GiB", "measured": ours["host_peak_gib"],
         "goal": shard_gib + 1, "met": ours["host_peak_gib"] <= shard_gib + 1},
        {"name": "GPU memory after loading (GiB), <= HF", "measured": ours["gpu_gib"], "goal": hf["gpu_gib"],
         "met": ours["gpu_gib"] <= hf["gpu_gib"]},
        {"name": f"batch-{a.batch} greedy decode, 64-token prompt, 128 new (tokens/s), >= 10x HF",
         "measured": ours["decode_tokens_per_s"], "goal": 10 * hf["decode_tokens_per_s"],
         "met": ours["decode_tokens_per_s"] >= 10 * hf["decode_tokens_per_s"]},
    ]
    if "bandwidth_limit_tokens_per_s" in ours:
        ours["fraction_of_bandwidth_limit"] = ours["decode_tokens_per_s"] / ours["bandwidth_limit_tokens_per_s"]
    gpu = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    # BENCH_COMMIT first: the device's copy of the tree can carry a stale .git whose HEAD is not the code that ran
    commit = os.environ.get("BENCH_COMMIT") or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                              text=True, cwd=ROOT).stdout.strip() or "unknown"
    result = {"gpu": gpu, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "commit": commit,
              "size": a.size, "shards": a.shards, "largest_shard_gib": shard_gib, "double_quant": a.double_quant,
              "batch": a.batch,
              "rows": rows, "targets": targets}
    os.makedirs(a.out_dir, exist_ok=True)
    tag = (gpu.replace(" ", "_") if a.device.startswith("cuda") else f"cpu-{a.size}") + \
        (f"-batch{a.batch}" if a.batch > 1 else "")  # the batch-1 record is not overwritten
    path = os.path.join(a.out_dir, f"llama_load_decode-{tag}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    for t in targets:
        print(f"{t['name']:<75} {t['measured']:10.3f}  goal {t['goal']:10.3f}  {'met' if t['met'] else 'NOT met'}")
    if "fraction_of_bandwidth_limit" in ours:
        print(f"decode at {ours['fraction_of_bandwidth_limit']:.1%} of the weight-bandwidth limit "
              f"({ours['bandwidth_limit_tokens_per_s']:.0f} tokens/s)")
    for name, r in rows.items():
        print(f"{name:<14} decode {r['decode_mode']:<14} {r['decode_tokens_per_s']:9.1f} tokens/s")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
