"""Learning-rate schedules equal to transformers' `get_scheduler`, step by step.

Each is a torch LambdaLR whose factor at optimizer step s (0-based, before the step's update) is:

    constant               1                                 (warmup ignored, as transformers does)
    constant_with_warmup   s/W for s < W, else 1
    linear                 s/W for s < W, else max(0, (N - s) / (N - W))
    cosine                 s/W for s < W, else max(0, 0.5 * (1 + cos(pi * (s - W) / (N - W))))

N = total optimizer steps, W = warmup_steps if > 0 else ceil(N * warmup_ratio) (TrainingArguments.get_warmup_steps).
"""
from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")


def warmup_steps_for(num_training_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0) -> int:
    """transformers' TrainingArguments.get_warmup_steps."""
    return warmup_steps if warmup_steps > 0 else math.ceil(num_training_steps * warmup_ratio)


def _constant(step: int) -> float:
    return 1.0


def _constant_with_warmup(step: int, *, W: int) -> float:
    if step < W:
        return float(step) / float(max(1.0, W))
    return 1.0


def _linear(step: int, *, W: int, N: int) -> float:
    if step < W:
        return float(step) / float(max(1, W))
    return max(0.0, float(N - step) / float(max(1, N - W)))


def _cosine(step: int, *, W: int, N: int, num_cycles: float = 0.5) -> float:
    if step < W:
        return float(step) / float(max(1, W))
    progress = float(step - W) / float(max(1, N - W))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(num_cycles) * 2.0 * progress)))


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, num_training_steps: int,
                    warmup_steps: int = 0, warmup_ratio: float = 0.0) -> LambdaLR:
    """LambdaLR equal to transformers.get_scheduler(name, optimizer, W, N)."""
    W = warmup_steps_for(num_training_steps, warmup_steps, warmup_ratio)
    N = num_training_steps
    if name == "constant":
        fn = _constant
    elif name == "constant_with_warmup":
        fn = partial(_constant_with_warmup, W=W)
    elif name == "linear":
        fn = partial(_linear, W=W, N=N)
    elif name == "cosine":
        fn = partial(_cosine, W=W, N=N)
    else:
        raise ValueError(f"unknown lr_scheduler_type {name!r}: expected one of {', '.join(SCHEDULES)}")
    return LambdaLR(optimizer, fn)
