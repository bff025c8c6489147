"""train: config, data pipeline, paged AdamW and schedules, the loop, checkpoints, `python -m train.run`.

    from train import TrainConfig, parse_args, Trainer, build_optimizer, build_scheduler
    cfg = parse_args(["--max_steps", "10"])              # the tutorial's defaults + overrides
    ds = tokenize_texts(texts, tokenizer, max_seq_length=512)
    result = Trainer(model, cfg, ds, eval_ds, pad_id=tokenizer.pad_id).train()

Files: config.py (TrainConfig, CLI), data.py (loading, tokenization, packing, collation), sampler.py
(LengthGroupedSampler), dataset_builtin.py (embedded instruction set), adamw.py (bitsandbytes' AdamW math,
8-bit blockwise states), paged.py (CUDA managed memory via ctypes), optim.py (PagedAdamW32bit/8bit,
build_optimizer), schedule.py (get_scheduler equivalents), loop.py (Trainer), checkpoint.py (atomic
checkpoints, resume), logging_utils.py (console, tqdm, TensorBoard, loss curve), run.py (the entry point),
cuda_graph.py (GraphedStep: forward, loss and backward replayed from CUDA graphs; --cuda_graph),
distributed.py (DDP and FSDP2 under torchrun).
"""
from nf4.claim import claim_kernels as _claim_kernels

_claim_kernels()    # `kernels` is this project's package, wherever Python starts (nf4/claim.py)
from .adamw import adamw8bit_update_, adamw_update_, create_dynamic_map
from .checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, build_arg_parser, parse_args
from .cuda_graph import GraphedStep
from .data import (DataError, TokenizedDataset, chatml, collate, llama2_chat, load_records, pack, records_to_texts,
                   split_train_eval, tokenize_texts)
from .dataset_builtin import builtin_dataset
from .loop import Trainer, TrainingError, TrainResult
from .optim import PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, build_optimizer
from .sampler import LengthGroupedSampler, RandomSampler, get_length_grouped_indices
from .schedule import build_scheduler

__all__ = [
    "TrainConfig", "parse_args", "build_arg_parser", "ConfigError",
    "load_records", "records_to_texts", "tokenize_texts", "pack", "collate", "split_train_eval", "chatml",
    "llama2_chat", "TokenizedDataset", "DataError", "builtin_dataset",
    "LengthGroupedSampler", "RandomSampler", "get_length_grouped_indices",
    "adamw_update_", "adamw8bit_update_", "create_dynamic_map", "PagedAdamW", "PagedAdamW32bit", "PagedAdamW8bit",
    "build_optimizer", "build_scheduler",
    "Trainer", "TrainResult", "TrainingError", "GraphedStep",
    "save_checkpoint", "load_checkpoint", "list_checkpoints", "latest_checkpoint", "CheckpointError",
]
