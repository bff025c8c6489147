"""The Unsloth peer of benchmarks/e2e.py (issue #7), run in a process of its own: `import unsloth` patches
transformers and peft globally, so it cannot share a process with the Hugging Face stack it is compared with.

    python benchmarks/unsloth_peer.py --setting b --steps 8 --size llama-2-7b --model-dir /tmp/e2e-unsloth --out r.json

What it runs, as ANCHORS.md measured Unsloth 2026.10.9:
- **The checkpoint.** A random checkpoint of e2e's model shape (fp16, std 0.02, norms 1, 3 safetensors shards:
  `llama_load_decode.make_checkpoint`) and a word-level tokenizer of the model's vocabulary ("t3" is id 3),
  written to --model-dir once and reused.
- **The model.** Loaded with `FastLanguageModel.from_pretrained(load_in_4bit=True, dtype=bf16)` (NF4), then
  `get_peft_model` with r 64, alpha 16, dropout 0.1 and the setting's targets. Checkpointing is "unsloth"
  (Unsloth's offloaded checkpointing) in (b) and off in (a).
- **The loop.** e2e's own: bf16 autocast, clip 0.3, bitsandbytes PagedAdamW32bit (lr 2e-4, weight decay 1e-3),
  the same random batches, median of steps 4-8, peak memory over steps 4-8.

It writes one JSON object to --out: e2e's per-stack result fields (tokens_per_s, step_s, peak_gib, losses, ...),
or {"skipped": reason} when unsloth cannot be imported (e2e then records the reason), or {"error": ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def write_tokenizer(model_dir: str, vocab_size: int) -> None:
    """A fast word-level tokenizer over `vocab_size` tokens (<unk> 0, <s> 1, </s> 2, then "t3", "t4", ...):
    the peer loads a tokenizer from the model folder; the benchmark feeds it random ids, never text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(path):
        return
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "unk_token": "<unk>", "pad_token": "<unk>", "model_max_length": 1 << 20, "padding_side": "right"}
    with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(model_dir, "special_tokens_map.json"), "w") as f:
        json.dump({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, f, indent=1)
    tok.save(path + ".tmp")
    os.replace(path + ".tmp", path)  # written last: its presence means the folder is complete


def prepare(size: str, model_dir: str, device: str) -> None:
    """The checkpoint and tokenizer of e2e's model `size` in `model_dir` (kept when already there)."""
    from benchmarks.e2e import model_args
    from benchmarks.llama_load_decode import make_checkpoint

    args = model_args(size)
    args.torch_dtype = "float16"
    make_checkpoint(size, model_dir, 3, device, args=args)
    write_tokenizer(model_dir, args.vocab_size)


def run(setting: str, steps: int, size: str, model_dir: str, device: str) -> dict:
    try:
        import unsloth  # must come before transformers / peft: it patches them
        from unsloth import FastLanguageModel
    except Exception as e:  # noqa: BLE001  (not installed, or no GPU: unsloth refuses to import without one)
        return {"skipped": f"unsloth unavailable: {type(e).__name__}: {str(e)[:300]}"}
    import torch
    import bitsandbytes as bnb

    from benchmarks.e2e import ALPHA, DROPOUT, LR, R, SETTINGS, WD, Step, peak_gib, sync, time_steps, model_args

    s = SETTINGS[setting]
    args = model_args(size)
    dev = torch.device(device)
    t0 = time.perf_counter()
    prepare(size, model_dir, device)
    prep_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ckpt = "unsloth" if s["hf_checkpointing"] else False
    model, _ = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=s["seq"], dtype=torch.bfloat16,
                                                 load_in_4bit=True, use_gradient_checkpointing=ckpt,
                                                 fix_tokenizer=False,  # the placeholder tokenizer is never used
                                                 local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=R, lora_alpha=ALPHA, lora_dropout=DROPOUT,
                                             target_modules=list(s["targets"]), bias="none",
                                             use_gradient_checkpointing=ckpt, random_state=0,
                                             max_seq_length=s["seq"])
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW32bit(params, lr=LR, weight_decay=WD)
    build_s = time.perf_counter() - t0
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    step = Step(model, lambda m, ids: m(input_ids=ids, labels=ids).loss, opt, dev)
    res = time_steps(step, s["batch"], s["seq"], args.vocab_size, dev, steps)
    res.update(peak_gib=peak_gib(dev), build_s=round(build_s, 2), prepare_s=round(prep_s, 2), name="unsloth",
               unsloth=getattr(unsloth, "__version__", "?"), trainable_params=sum(p.numel() for p in params),
               memory_saving=f"use_gradient_checkpointing={ckpt!r}")
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--setting", required=True, choices=["a", "b"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", default="llama-2-7b")
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        res = run(a.setting, a.steps, a.size, a.model_dir, a.device)
    except Exception as e:  # noqa: BLE001  (reported to e2e, which goes on with the other stacks)
        res = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    with open(a.out + ".tmp", "w") as f:
        json.dump(res, f, indent=1, default=str)
    os.replace(a.out + ".tmp", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
