"""Draw the tour's figures from code and measured results, so they stay true.

    python docs/figures/make_figures.py [--only NAME ...]

nf4_levels.png        the 16 NF4 levels over the standard normal density
quant_error.png       |error| histograms of NF4, FP4 and int4 (blocksize 64) on the embedded model's weights
roofline.png          the NF4 matmul's measured points against the H100 roofline (benchmarks/results/kernels-*.json)
memory_breakdown.png  where a 7B QLoRA step's GPU memory goes (benchmarks/results/e2e-*.json)
loss_curve.png        train/eval loss of the default `python -m train.run` (docs/figures/data/default_run_summary.json)
A figure whose input does not exist yet is skipped with a message.
"""
import argparse
import glob
import json
import math
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def nf4_levels(path):
    from nf4.tables import NF4_TABLE, nf4_thresholds
    plt = _plt()
    # scale the table so that its levels sit where they came from: the quantiles of N(0, 1)
    scale = float(torch.special.ndtri(torch.tensor(0.9677083, dtype=torch.float64)))
    xs = torch.linspace(-3.2, 3.2, 400)
    fig, ax = plt.subplots(figsize=(8, 3.2))
    ax.plot(xs, torch.exp(-xs ** 2 / 2) / math.sqrt(2 * math.pi), color="0.3", label="N(0, 1) density")
    for i, v in enumerate(NF4_TABLE):
        ax.axvline(v * scale, color="tab:blue", lw=1.2, label="NF4 level x Phi^-1(0.9677)" if i == 0 else None)
    for i, t in enumerate(nf4_thresholds().tolist()):
        ax.axvline(t * scale, color="tab:orange", lw=0.6, ls="--", label="decision threshold" if i == 0 else None)
    ax.set_xlabel("weight / absmax, in units of the normal quantile")
    ax.set_yticks([])
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("NF4: 16 levels, dense where normally distributed weights are dense")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def int4_absmax(w, blocksize=64):
    """Symmetric int4 with one absmax per block: levels k/7, k = -7..7 (round to nearest)."""
    flat = w.reshape(-1, blocksize)
    absmax = flat.abs().amax(1, keepdim=True).clamp(min=1e-12)
    return (torch.round(flat / absmax * 7).clamp(-7, 7) / 7 * absmax).reshape(w.shape)


def quant_error(path):
    from safetensors import safe_open

    from llama import embedded_model_dir
    from nf4 import dequantize_4bit, quantize_4bit
    plt = _plt()
    model_dir = embedded_model_dir()
    errs = {"NF4": [], "FP4": [], "int4": []}
    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        names = [k for k in f.keys() if k.endswith("proj.weight") and ".layers." in k]
        for name in names[::7]:  # a sample of layers and projection types
            w = f.get_tensor(name).float()
            w = w[:, : (w.shape[1] // 64) * 64]
            for label, qt in (("NF4", "nf4"), ("FP4", "fp4")):
                p, a = quantize_4bit(w, 64, qt)
                errs[label].append(((dequantize_4bit(p, a, w.shape, 64, qt) - w) / w.std()).reshape(-1))
            errs["int4"].append(((int4_absmax(w) - w) / w.std()).reshape(-1))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for label, parts in errs.items():
        e = torch.cat(parts).abs()
        ax.hist(e.numpy(), bins=200, range=(0, 0.6), histtype="step", lw=1.4,
                label=f"{label}: mean |err| = {e.mean():.4f} sigma")
    ax.set_yscale("log")
    ax.set_xlabel("|dequantized - original| / std(weight), blocksize 64")
    ax.set_ylabel("weights")
    ax.set_title(f"4-bit error on SmolLM2-135M-Instruct ({len(errs['NF4'])} projection matrices)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return {k: float(torch.cat(v).abs().mean()) for k, v in errs.items()}


def _latest(pattern):
    files = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", pattern)))
    return files[-1] if files else None


def roofline_points(data):
    """(impl, M, FLOP/byte, TFLOP/s) for every forward matmul row of a kernels-*.json results file."""
    pts = []
    for r in data.get("rows", []):
        if r.get("op") != "matmul" or r.get("dq"):
            continue
        n, k = (int(v) for v in r["shape"].split("x"))
        m = r["M"]
        flops = 2.0 * m * n * k
        act_bytes = 2.0 * m * (n + k)  # bf16 x in, y out
        for impl, key, w_bytes in (("ours", "fwd ours", r["weight_bytes"]), ("bitsandbytes", "fwd bnb", r["weight_bytes"]),
                                   ("bf16 cuBLAS", "fwd bf16", 2.0 * n * k)):
            if r.get(key):
                pts.append((impl, m, flops / (w_bytes + act_bytes), flops / (r[key] * 1e-6) / 1e12))
    return pts


def roofline(path):
    runs = []
    for f in glob.glob(os.path.join(ROOT, "benchmarks", "results", "kernels-*.json")):
        with open(f) as fh:
            runs.append((json.load(fh).get("date", ""), f))
    src = max(runs)[1] if runs else None  # the newest run by its recorded date
    if src is None:
        print("roofline: no benchmarks/results/kernels-*.json yet, skipped")
        return
    data = json.load(open(src))
    pts = roofline_points(data)
    if not pts:
        print(f"roofline: {src} has no matmul rows, skipped")
        return
    plt = _plt()
    gpu = data.get("gpu", "GPU")
    peak_tflops = 790.0  # dense bf16 cuBLAS, 8192^3 on random data: 769-798 on an H200, 798 on an H100 here
    bw_tbs = data.get("copy_tb_s", 3.0)
    xs = [2.0 ** i for i in range(-1, 14)]
    fig, ax = plt.subplots(figsize=(6.8, 4.2))
    ax.plot(xs, [min(peak_tflops, bw_tbs * x) for x in xs], color="0.3",
            label=f"roof: copy {bw_tbs:.2f} TB/s, bf16 {peak_tflops:.0f} TFLOP/s")
    for impl, marker in (("ours", "o"), ("bitsandbytes", "x"), ("bf16 cuBLAS", "s")):
        sel = [p for p in pts if p[0] == impl]
        ax.scatter([p[2] for p in sel], [p[3] for p in sel], marker=marker, s=18, label=impl, alpha=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=10)
    ax.set_xlabel("FLOP per byte moved (weights + activations)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"y = x @ W.T, Llama shapes, M = 1..8192 ({gpu}, no DQ)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def memory_breakdown(path):
    src = _latest("e2e-*.json")
    if src is None:
        print("memory_breakdown: no benchmarks/results/e2e-*.json yet, skipped")
        return
    data = json.load(open(src))
    parts = data.get("memory_breakdown_gib")
    if not parts:
        print(f"memory_breakdown: {src} has no 'memory_breakdown_gib', skipped")
        return
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.0))
    left = 0.0
    parts = {k: v for k, v in parts.items() if isinstance(v, (int, float))}
    for name, gib in parts.items():
        ax.barh([0], [gib], left=left, label=f"{name} {gib:.2f} GiB")
        left += gib
    ax.set_yticks([])
    ax.set_xlabel("GiB")
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.5))
    ax.set_title(f"7B QLoRA step (batch 4 x 2048, all linears), memory by owner ({data.get('gpu', 'GPU')})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def loss_curve(path):
    """Train losses per step and eval loss before/after, from the default run's run_summary.json
    (`python -m train.run` writes it to results/; a copy of one CPU run is kept in docs/figures/data/)."""
    src = os.path.join(HERE, "data", "default_run_summary.json")
    if not os.path.exists(src):
        print(f"loss_curve: no {src} yet (copy results/run_summary.json of a default run there), skipped")
        return
    run = json.load(open(src))
    losses = run["losses"]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.5, label="train loss (per step)")
    k = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
    ax.plot(range(1, len(losses) + 1), smooth, lw=1.8, label=f"train loss ({k}-step mean)")
    ax.plot([0, run["steps"]], [run["eval_loss_before"], run["eval_loss_after"]], "o--", color="tab:red",
            label=f"held-out eval: {run['eval_loss_before']:.2f} -> {run['eval_loss_after']:.2f}")
    ax.set_xlabel("step (batch 4)")
    ax.set_ylabel("loss")
    ax.set_title(f"python -m train.run (SmolLM2-135M, embedded data, {run['steps']} steps, CPU)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


FIGURES = {"nf4_levels": nf4_levels, "quant_error": quant_error, "roofline": roofline,
           "memory_breakdown": memory_breakdown, "loss_curve": loss_curve}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(FIGURES), help="draw only these figures")
    parser.add_argument("--out", default=HERE, help="output directory (default: docs/figures)")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in args.only or FIGURES:
        result = FIGURES[name](os.path.join(args.out, f"{name}.png"))
        print(f"{name}: done" + (f" {result}" if result else ""))


if __name__ == "__main__":
    main()
