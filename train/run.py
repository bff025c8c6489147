"""`python -m train.run`: the whole QLoRA fine-tuning job (the tutorial's script, offline by default).

    python -m train.run                                   # embedded SmolLM2-135M-Instruct + embedded dataset
    python -m train.run --model_name NousResearch/Llama-2-7b-chat-hf --dataset_name mlabonne/guanaco-llama2-1k
    python -m train.run --config run.yaml --max_steps 100 --resume latest

Steps: config -> device and compute dtype -> data -> model (NF4 base on a GPU) -> LoRA -> eval loss and sample
generations before -> train (checkpoints, logs) -> eval loss and samples after -> adapter (PEFT format),
loss-curve PNG, optional merged model and hub upload.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from typing import Optional

import torch

from .config import ConfigError, TrainConfig, parse_args
from .data import (RESPONSE_MARKERS, DataError, TokenizedDataset, llama2_chat, load_records, pack,
                   records_to_texts, split_train_eval, tokenize_texts)
from .logging_utils import RunLogger, save_loss_curve
from .loop import Trainer, TrainingError

DEFAULT_MAX_SEQ_LENGTH = 1024  # trl SFTConfig's max_length when max_seq_length is none
CPU_MAX_SEQ_LENGTH = 256


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


class TokenizerAdapter:
    """llama's Tokenizer -> the interface train.data codes against: encode(text, add_bos, add_eos).

    BOS is added only where the model's convention adds one (tokenizer_config add_bos_token) and the text does
    not already start with it; EOS is appended unless the text already ends with the EOS token (chat formats do).
    """

    def __init__(self, tok):
        self.tok = tok
        self.bos_id, self.eos_id = tok.bos_id, tok.eos_id
        self.pad_id = tok.pad_id if tok.pad_id is not None else tok.eos_id  # pad = eos, as the tutorial sets
        # the model's convention, as its tokenizer applies it with special tokens on (Llama 2: BOS; SmolLM2: none)
        with_special, plain = tok.encode("a", add_special_tokens=True), tok.encode("a", add_special_tokens=False)
        self.model_adds_bos = bool(with_special) and with_special[0] == self.bos_id and plain[:1] != [self.bos_id]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False)
        if add_bos and self.model_adds_bos and self.bos_id is not None and not (ids and ids[0] == self.bos_id):
            ids = [self.bos_id] + ids
        eos_tok = self.tok.eos_token
        if add_eos and self.eos_id is not None and not (eos_tok and text.rstrip().endswith(eos_tok)):
            ids = ids + [self.eos_id]
        return ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


# ------------------------------------------------------------------------------------------------------------
def resolve_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(cfg.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"config field 'device' = {cfg.device!r} but no CUDA device is available")
    return dev


def resolve_precision(cfg: TrainConfig, device: torch.device, log) -> torch.dtype:
    """Compute dtype; on a GPU with compute capability >= 8, bf16 replaces fp16 (the tutorial's check)."""
    if device.type != "cuda":
        if cfg.fp16 or cfg.bf16:
            log("CPU: fp16/bf16 autocast is not used on the CPU; training in float32")
            cfg.fp16 = cfg.bf16 = False
        return torch.float32
    major, _ = torch.cuda.get_device_capability(device)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.bnb_4bit_compute_dtype]
    if major >= 8 and not cfg.fp16 and dtype != torch.float32:
        if dtype == torch.float16:
            log(f"GPU compute capability {major}.x supports bfloat16: using bf16 compute and autocast")
        dtype, cfg.bf16 = torch.bfloat16, True
    elif dtype == torch.bfloat16 and major < 8:
        raise ConfigError(f"bnb_4bit_compute_dtype bfloat16 needs compute capability >= 8 (this GPU: {major}.x)")
    elif dtype == torch.float16 and not cfg.bf16:
        cfg.fp16 = True
    return dtype


def chat_style(tok) -> str:
    tmpl = getattr(tok, "chat_template", None) or ""
    return "chatml" if "<|im_start|>" in tmpl or tok.bos_token == "<|im_start|>" else "llama2"


def render_messages(tok, messages, add_generation_prompt=False) -> str:
    """The model's own chat template when it has one, else the Llama 2 [INST] format."""
    if getattr(tok, "chat_template", None):
        return tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    text = llama2_chat(messages)
    return text


def build_data(cfg: TrainConfig, tok, adapter: TokenizerAdapter, device: torch.device, log):
    """(train TokenizedDataset, eval TokenizedDataset or None, sample prompts [(messages, reference answer)])."""
    style = chat_style(tok)
    fmt = (lambda msgs: render_messages(tok, msgs))
    if cfg.dataset_name is None:
        from .dataset_builtin import builtin_dataset

        train_recs, eval_recs = builtin_dataset(fmt)
        log(f"dataset: embedded standard-library docstring Q&A, {len(train_recs)} train / {len(eval_recs)} held out, "
            f"rendered with the model's chat template ({style})")
    else:
        train_recs = load_records(cfg.dataset_name, cfg.dataset_split)
        eval_recs = []
        for split in ("test", "validation"):
            try:
                eval_recs = load_records(cfg.dataset_name, split) if os.path.isdir(cfg.dataset_name) else []
            except DataError:
                eval_recs = []
            if eval_recs and eval_recs != train_recs:
                break
            eval_recs = []
        if not eval_recs:
            train_recs, eval_recs = split_train_eval(train_recs, cfg.eval_fraction, cfg.seed)
        log(f"dataset: {cfg.dataset_name}: {len(train_recs)} train / {len(eval_recs)} eval records")
    train_texts = records_to_texts(train_recs, cfg.dataset_text_field, fmt, source=str(cfg.dataset_name or "builtin"))
    eval_texts = records_to_texts(eval_recs, cfg.dataset_text_field, fmt, source=str(cfg.dataset_name or "builtin"))
    max_len = cfg.max_seq_length or (CPU_MAX_SEQ_LENGTH if device.type == "cpu" else DEFAULT_MAX_SEQ_LENGTH)
    if cfg.max_seq_length is None:
        log(f"max_seq_length: none given, using {max_len}" + (" (CPU)" if device.type == "cpu" else " (trl's default)"))
    markers = RESPONSE_MARKERS[style]
    train_ds = tokenize_texts(train_texts, adapter, max_len, cfg.train_on_responses_only, markers)
    eval_ds = tokenize_texts(eval_texts, adapter, max_len, cfg.train_on_responses_only, markers) if eval_texts else None
    st = train_ds.stats
    log(f"tokenized: {st['examples']} examples, {train_ds.num_tokens} tokens; {st['truncated']} truncated to "
        f"{max_len} tokens" + (f", {st['dropped']} dropped (no trainable tokens)" if st["dropped"] else ""))
    if cfg.packing:
        train_ds = pack(train_ds, max_len)
        log(f"packing: {train_ds.stats['packed_from']} examples -> {len(train_ds)} blocks of {max_len} tokens")
    samples = []
    for rec in (eval_recs or train_recs)[: cfg.num_sample_prompts]:
        if isinstance(rec.get("messages"), list) and rec["messages"] and rec["messages"][-1]["role"] == "assistant":
            prompt = render_messages(tok, rec["messages"][:-1], add_generation_prompt=True)
            samples.append((prompt, rec["messages"][:-1][-1]["content"], rec["messages"][-1]["content"]))
        else:
            text = rec.get(cfg.dataset_text_field, "")
            cut = text.find(markers[0])
            if cut >= 0:
                samples.append((text[: cut + len(markers[0])], text[:cut], text[cut + len(markers[0]):]))
    return train_ds, eval_ds, samples


def generate_samples(model, tok, adapter, samples, max_new_tokens: int) -> list[str]:
    from llama import generate

    outs = []
    was = model.training
    model.eval()
    for prompt, _, _ in samples:
        ids = adapter.encode(prompt, add_bos=True, add_eos=False)
        new = generate(model, ids, max_new_tokens=max_new_tokens, eos_token_id=adapter.eos_id,
                       pad_token_id=adapter.pad_id)
        outs.append(adapter.decode(new).strip())
    model.train(was)
    return outs


def load_base_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, log):
    from llama import load_model

    quantize = None
    if cfg.use_4bit and (device.type == "cuda" or cfg.cpu_use_4bit):
        quantize = cfg.bnb_4bit_quant_type
    elif cfg.use_4bit:
        log("CPU: the base stays dense (4-bit dequantization runs in pure torch here and is several times slower); "
            "pass --cpu_use_4bit true to quantize anyway")
    name = cfg.model_name or "embedded SmolLM2-135M-Instruct"
    t = time.time()
    model = load_model(cfg.model_name, quantize=quantize, device=device, dtype=dtype,
                       double_quant=cfg.use_nested_quant)
    n = sum(p.numel() for p in model.parameters())
    log(f"model: {name}, {n / 1e6:.1f}M parameters" + (f" + NF4 linears ({quantize}, double quant "
        f"{cfg.use_nested_quant})" if quantize else "") + f", {dtype}, loaded in {time.time() - t:.1f}s")
    return model


def speed_hint(cfg: TrainConfig, device: torch.device, distributed: bool) -> Optional[str]:
    """A one-line tip for a single-GPU run that leaves the fastest step off (the defaults are the plain path,
    the numerics of transformers + peft); None where there is nothing to suggest."""
    if device.type != "cuda" or distributed or cfg.fp16 or cfg.eval_only or (cfg.fast_path and cfg.cuda_graph):
        return None
    missing = [flag for flag, on in (("--fast_path", cfg.fast_path), ("--cuda_graph", cfg.cuda_graph)) if not on]
    return (f"tip: {' '.join(missing)} would run this step from fused kernels replayed from a CUDA graph (7B, batch "
            f"4 x 512, LoRA on q,v: 1.7x the tokens/s of transformers + bitsandbytes + peft, 1.1x Unsloth's on an "
            f"H200; README, end-to-end benchmark)")


def estimate_cpu_steps(cfg: TrainConfig, eval_seconds: float, eval_tokens: int, train_ds: TokenizedDataset,
                       budget_left: float) -> int:
    """Steps that fit budget_left: a training step costs ~3x a forward of its tokens (x4/3 with checkpointing)."""
    per_token_fwd = eval_seconds / max(eval_tokens, 1)
    tokens_per_step = (train_ds.num_tokens / max(len(train_ds), 1)) * cfg.per_device_train_batch_size \
        * cfg.gradient_accumulation_steps
    factor = 3.0 * (4.0 / 3.0 if cfg.gradient_checkpointing else 1.0)
    sec = per_token_fwd * tokens_per_step * factor * 1.15
    return max(1, int(budget_left / max(sec, 1e-6)))


# ------------------------------------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> int:
    t_start = time.time()
    try:
        cfg = parse_args(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from .distributed import init_distributed, shutdown

    try:  # under torchrun (WORLD_SIZE > 1): one process per GPU; rank 0 alone logs and writes
        ctx = init_distributed(cfg.distributed, resolve_device(cfg).type)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ctx.is_main:  # --eval_only writes nothing: no TensorBoard events either
        logger = RunLogger(cfg.output_dir, cfg.report_to) if _writable_parent(cfg.output_dir) and not cfg.eval_only \
            else RunLogger(None, "none")
    else:
        logger = RunLogger(None, "none", use_tqdm=False, stream=open(os.devnull, "w"))

    def log(msg: str) -> None:
        el = int(time.time() - t_start)
        logger.info(f"[{el // 60:02d}:{el % 60:02d}] {msg}" if msg else "")

    try:
        return _run(cfg, logger, log, t_start, ctx)
    except KeyboardInterrupt:
        log("interrupted outside the training loop (loading, eval or sampling); nothing to save")
        return 130
    except (ConfigError, DataError, TrainingError) as e:
        log(f"error: {e}")
        return 1
    except Exception as e:  # CheckpointError and loader errors carry their own message
        from .checkpoint import CheckpointError

        if isinstance(e, CheckpointError) or type(e).__name__ == "CheckpointError":
            log(f"error: {e}")
            return 1
        raise
    finally:
        logger.close()
        shutdown(ctx)


def _writable_parent(path: str) -> bool:
    try:
        os.makedirs(path, exist_ok=True)
        return os.access(path, os.W_OK)
    except OSError:
        return False


def _run(cfg: TrainConfig, logger: RunLogger, log, t_start: float, ctx=None) -> int:
    from .checkpoint import check_writable
    from .distributed import DistContext, choose_mode, wrap_model, write_adapter

    ctx = ctx or DistContext()
    check_writable(cfg.output_dir)
    device = resolve_device(cfg)
    if ctx.active and device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    if cfg.cuda_graph and (device.type != "cuda" or ctx.active):   # before anything loads
        raise ConfigError(f"--cuda_graph: CUDA graphs need one CUDA GPU in one process; this run has device "
                          f"{device}" + (f" and {ctx.world_size} processes" if ctx.active else ""))
    seed_everything(cfg.seed)
    dtype = resolve_precision(cfg, device, log)
    from llama import load_tokenizer
    from lora import LoraConfig, inject_lora, save_adapter, trainable_parameters_report

    # --distributed fsdp: each rank reads only its rows of the checkpoint (after the data, with the LoRA config)
    sharded = ctx.active and ctx.mode == "fsdp"
    if sharded and cfg.from_adapter:
        raise ConfigError("--from_adapter with --distributed fsdp: the sharded load draws its own LoRA weights; use "
                          "--distributed ddp")
    # the data first: a missing or malformed dataset fails in seconds, not after a 7B model has loaded
    tok = load_tokenizer(cfg.model_name)
    adapter = TokenizerAdapter(tok)
    train_ds, eval_ds, samples = build_data(cfg, tok, adapter, device, log)
    model = None if sharded else load_base_model(cfg, device, dtype, log)

    seed_everything(cfg.seed)  # LoRA init from the seed, whatever loading consumed
    lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=cfg.model_name or "HuggingFaceTB/SmolLM2-135M-Instruct")
    if sharded:
        from .distributed import load_model_sharded

        t = time.time()
        quantize = cfg.bnb_4bit_quant_type if cfg.use_4bit and (device.type == "cuda" or cfg.cpu_use_4bit) else None
        model = load_model_sharded(cfg.model_name, ctx, device, dtype, quantize, lcfg, cfg.seed,
                                   double_quant=cfg.use_nested_quant)
        if model is None:
            log("FSDP: this checkpoint (pre-quantized or biased linears, or double quant) loads whole on every rank, "
                "then is sharded")
            sharded = False
            model = load_base_model(cfg, device, dtype, log)
            seed_everything(cfg.seed)
        else:
            log(f"model: {cfg.model_name or 'embedded SmolLM2-135M-Instruct'}, FSDP2-sharded while loading (each "
                f"rank read and quantized only its rows), {'NF4 ' if quantize else ''}{dtype}, "
                f"{time.time() - t:.1f}s")
    if not sharded and cfg.from_adapter:  # the saved adapter's own r, alpha and targets, trainable from its values
        from lora import load_adapter

        lcfg = load_adapter(model, cfg.from_adapter, is_trainable=True)
        log(f"adapter: {cfg.from_adapter} (r {lcfg.r}, alpha {lcfg.lora_alpha}, targets {lcfg.target_modules})")
    elif not sharded:
        inject_lora(model, lcfg)
    log(trainable_parameters_report(model))
    if hasattr(model, "model") and hasattr(model.model, "gradient_checkpointing"):
        model.model.gradient_checkpointing = cfg.gradient_checkpointing
    if ctx.active:
        ctx = choose_mode(ctx, model, device, log)
        if ctx.mode == "fsdp" and cfg.optim == "paged_adamw_8bit" and cfg.save_steps:
            raise ConfigError("--optim paged_adamw_8bit with --distributed fsdp: its blockwise 8-bit states of "
                              "parameter shards cannot be gathered into a checkpoint; use paged_adamw_32bit or "
                              "adamw_torch, or --save_steps 0")
        log(f"data: each optimizer step = {cfg.gradient_accumulation_steps} micro-batch(es) of "
            f"{cfg.per_device_train_batch_size} x {ctx.world_size} examples, rank r training on its r-th slice")
    if cfg.fast_path:
        if ctx.active and ctx.mode == "fsdp":
            raise ConfigError("--fast_path: this run chose FSDP2 (--distributed auto, a model over half a GPU), "
                              "which the fast path does not support yet; use --distributed ddp or the plain path")
        from llama.fast_path import enable_fast_path, fast_path_memory_note

        off = cfg.offload_activations and device.type == "cuda"
        saved = cfg.offload_saved_layers if device.type == "cuda" else 0
        enable_fast_path(model, checkpointing=cfg.gradient_checkpointing, offload=off, offload_embeddings=off,
                         offload_saved=saved)
        log(f"fast path (llama/fast_path.py): {fast_path_memory_note(model)}"
            + ("; --offload_activations needs CUDA: not offloading" if cfg.offload_activations and not off else "")
            + ("; --offload_saved_layers needs CUDA: not offloading" if cfg.offload_saved_layers and not saved
               else ""))
    hint = speed_hint(cfg, device, ctx.active)
    if hint and ctx.is_main:
        log(hint)
    # DDP / FSDP2 under torchrun (a sharded load is wrapped already), else the model itself
    wrapped = model if sharded else wrap_model(model, ctx, device, dtype)
    if ctx.active:
        torch.manual_seed(cfg.seed + ctx.rank)  # same LoRA init everywhere (above), own dropout masks per rank
    sample_here = ctx.is_main and ctx.mode != "fsdp"  # FSDP2: generation would need every rank in lockstep
    if ctx.active and ctx.mode == "fsdp" and samples:
        log("FSDP: sample generations are skipped (the sharded model generates only with every rank in lockstep)")

    on_cpu = device.type == "cpu"
    eval_cap = cfg.cpu_max_eval_examples if on_cpu else None
    resumed_steps = None
    if cfg.resume and cfg.max_steps <= 0:  # continue to the step count the interrupted run was going for
        from .checkpoint import latest_checkpoint

        cp = latest_checkpoint(cfg.output_dir) if cfg.resume == "latest" else cfg.resume
        state_file = os.path.join(cp or "", "trainer_state.json")
        if cp and os.path.isfile(state_file):
            with open(state_file) as fh:
                resumed_steps = json.load(fh).get("max_steps")
    trainer = Trainer(wrapped, cfg, train_ds, eval_ds, pad_id=adapter.pad_id, device=device, logger=logger,
                      max_steps=resumed_steps, dist=ctx)
    full_steps = trainer.max_steps

    t = time.time()
    eval_before = trainer.evaluate(max_examples=eval_cap) if eval_ds is not None else float("nan")
    eval_seconds = time.time() - t
    n_eval = min(len(eval_ds), eval_cap or len(eval_ds)) if eval_ds is not None else 0
    eval_tokens = sum(eval_ds.lengths[:n_eval]) if eval_ds is not None else 0
    when = "" if cfg.eval_only else " before training"
    log(f"eval loss{when}: {eval_before:.4f}" + (f" ({n_eval} held-out examples, {eval_seconds:.0f}s)"
                                                  if n_eval else ""))
    t = time.time()
    before = generate_samples(model, tok, adapter, samples, cfg.max_new_tokens) if sample_here else []
    gen_seconds = time.time() - t
    log(f"sample generations{when}: {len(samples)} in {gen_seconds:.0f}s")
    if cfg.eval_only:
        log("")
        for i, ((_, question, reference), answer) in enumerate(zip(samples, before), start=1):
            log(f"--- sample {i}: {question.strip()[-300:]}")
            log(f"    reference: {reference.strip()[:300]}")
            log(f"    answer:    {answer[:300]}")
        log(f"eval only: nothing trained or written; done in {time.time() - t_start:.0f}s")
        return 0

    deadline = None
    if on_cpu and cfg.max_steps <= 0 and not cfg.resume:
        budget = cfg.cpu_time_budget_minutes * 60
        reserve = 1.5 * (eval_seconds + gen_seconds) + 30.0  # after-training eval, samples, saving (+ slack)
        left = budget - (time.time() - t_start) - reserve
        if cfg.lr_scheduler_type == "constant":
            # a constant schedule does not depend on the step count: train until the measured step time says
            # the next step would overrun the budget (robust to a busy machine)
            log(f"CPU: training stops when the time budget is reached (the whole run in about "
                f"{cfg.cpu_time_budget_minutes:g} minutes); on a GPU, or with --max_steps, all {full_steps} steps run")
        else:
            cap = estimate_cpu_steps(cfg, eval_seconds, eval_tokens, train_ds, left) if eval_tokens else full_steps
            cap = int(-ctx.all_reduce([-cap], op="max")[0])  # the smallest over ranks: all stop together
            if cap < full_steps:
                trainer = Trainer(wrapped, cfg, train_ds, eval_ds, pad_id=adapter.pad_id, device=device,
                                  logger=logger, max_steps=cap, dist=ctx)
                log(f"CPU: capping training at {cap} of {full_steps} steps ({cfg.num_train_epochs:g} epoch(s)) so the "
                    f"{cfg.lr_scheduler_type} schedule ends within about {cfg.cpu_time_budget_minutes:g} minutes; on "
                    f"a GPU, or with --max_steps, the whole run is done")
        deadline = t_start + budget - reserve
    log(f"training: {trainer.max_steps} steps x {cfg.per_device_train_batch_size}" + (f" x {ctx.world_size} ranks" if ctx.active else "") + f" x {cfg.gradient_accumulation_steps} "
        f"examples, optim {cfg.optim}, lr {cfg.learning_rate:g} ({cfg.lr_scheduler_type}), device {device}")
    result = trainer.train(resume_from=cfg.resume, deadline=deadline)
    if result.stopped_by_deadline:
        log(f"CPU: time budget reached after {result.global_step} of {full_steps} steps"
            + ("; the model will barely change in so few steps: pass --max_steps 50 (or --cpu_time_budget_minutes 20)"
               if result.global_step < 10 else ""))

    log(f"trained {result.global_step} steps in {result.train_seconds:.0f}s")
    eval_after = trainer.evaluate(max_examples=eval_cap) if eval_ds is not None else float("nan")
    after = generate_samples(model, tok, adapter, samples, cfg.max_new_tokens) if sample_here else []
    log("eval and sample generations after training done")
    if ctx.active:  # gathered on every rank, written once by rank 0
        out_adapter = write_adapter(wrapped, cfg.adapter_dir, ctx, lcfg)
        if not ctx.is_main:
            return 130 if result.interrupted else 0
    else:
        out_adapter = save_adapter(model, cfg.adapter_dir, lcfg)
    curve = save_loss_curve(result.losses, os.path.join(cfg.output_dir, "loss_curve.png"),
                            eval_points=[(0, eval_before), (result.global_step, eval_after)]
                            if math.isfinite(eval_before) else None)
    logger.scalar("eval/loss", eval_after, result.global_step)
    with open(os.path.join(cfg.output_dir, "run_summary.json"), "w") as fh:
        json.dump({"eval_loss_before": eval_before, "eval_loss_after": eval_after, "steps": result.global_step,
                   "interrupted": result.interrupted, "losses": result.losses,
                   "samples": [{"prompt": q, "reference": ref, "before": b, "after": a}
                               for (_, q, ref), b, a in zip(samples, before, after)],
                   "config": cfg.to_dict(), "seconds": time.time() - t_start}, fh, indent=1)

    log("")
    log(f"eval loss: before {eval_before:.4f} -> after {eval_after:.4f}")
    for i, ((_, question, reference), b, a) in enumerate(zip(samples, before, after), start=1):
        log(f"--- sample {i}: {question.strip()[-300:]}")
        log(f"    reference: {reference.strip()[:300]}")
        log(f"    before:    {b[:300]}")
        log(f"    after:     {a[:300]}")
    log(f"adapter (PEFT format): {out_adapter}" + (f"; loss curve: {curve}" if curve else ""))
    if result.interrupted:
        log(f"interrupted: resume with --resume {result.last_checkpoint}")
        return 130
    if cfg.merge:
        merged_dir = merge_adapter_into_base(cfg, device, out_adapter, log)
        log(f"merged model: {merged_dir}")
    if cfg.push_to_hub:
        push_adapter(cfg, out_adapter, log)
    log(f"done in {time.time() - t_start:.0f}s")
    return 0


def merge_adapter_into_base(cfg: TrainConfig, device: torch.device, adapter_dir: str, log) -> str:
    """Reload the base in full precision (fp16 on a GPU, as the tutorial does), apply the adapter, merge, save."""
    from llama import resolve_model_dir

    from .merge import merge_into_base

    out = os.path.join(cfg.output_dir, cfg.new_model + "-merged")
    merge_into_base(resolve_model_dir(cfg.model_name), adapter_dir, out,
                    torch.float16 if device.type == "cuda" else torch.float32, device)
    return out


def push_adapter(cfg: TrainConfig, adapter_dir: str, log) -> None:
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        repo = cfg.hub_model_id or cfg.new_model
        api.create_repo(repo, exist_ok=True)
        api.upload_folder(folder_path=adapter_dir, repo_id=repo)
        log(f"pushed the adapter to https://huggingface.co/{repo}")
    except Exception as e:  # no network, no token
        log(f"--push_to_hub failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"the adapter is saved locally in {adapter_dir}")


if __name__ == "__main__":
    sys.exit(main())
