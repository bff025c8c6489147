"""Keep codes on and off in one process (diagnostic): benchmarks.e2e's training step of a setting's variant, run
alternately with llama.fast_path.KEEP_CODES --mode (xa stores the dropout mask, dA and dx read it) and "never"
(both regenerate it with Philox), so machine-to-machine variance does not hide a few percent.

    python benchmarks/diag/keep_codes_ab.py [--setting b] [--variant ours+ckpt-offload] [--rounds 2] [--out F]
"""
import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path = [p for p in sys.path if not os.path.abspath(p or ".").startswith(os.path.join(ROOT, "benchmarks"))]
sys.path.insert(0, ROOT)
import benchmarks.e2e as e2e  # noqa: E402
import llama.fast_path as fp  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--setting", default="b", choices=["a", "b"])
    ap.add_argument("--variant", default="ours+ckpt-offload")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mode", default="recompute", choices=["recompute", "always"], help="KEEP_CODES when on")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", default="llama-2-7b", choices=["llama-2-7b", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device(a.device)
    variant = next(v for v in e2e.OUR_VARIANTS[a.setting] if v["name"] == a.variant)
    args = e2e.model_args(a.size)
    runs = []
    for r in range(a.rounds):
        for on in (True, False):
            fp.KEEP_CODES = a.mode if on else "never"
            res, _ = e2e.run_stack("ours", args, dev, a.setting, variant, a.steps, True)
            runs.append(dict(keep_codes=on, round=r, step_ms=round(res["step_s"] * 1e3, 2),
                             peak_gib=round(res["peak_gib"], 3), losses=res["losses"]))
    fp.KEEP_CODES = "recompute"
    best = {on: min(x["step_ms"] for x in runs if x["keep_codes"] == on) for on in (True, False)}
    out = dict(gpu=e2e.gpu_name(dev), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               commit=e2e.git_commit("E2E_COMMIT"), setting=a.setting, variant=a.variant, runs=runs,
               best_step_ms=dict(keep_codes=best[True], regenerate=best[False]),
               speedup=round(best[False] / best[True], 4), lora_kernel_paths=fp.lora_kernel_paths())
    print(json.dumps({k: v for k, v in out.items() if k != "lora_kernel_paths"}, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
