"""The training loop: micro-batches -> loss -> backward -> clip -> optimizer -> schedule -> log -> checkpoint.

    trainer = Trainer(model, cfg, train_ds, eval_ds, pad_id=tok.pad_id, device=device)
    result = trainer.train(resume_from=None)      # TrainResult(losses, global_step, interrupted, ...)
    eval_loss = trainer.evaluate()

One optimizer step consumes `gradient_accumulation_steps` micro-batches of `per_device_train_batch_size`
examples. The loss is normalised as transformers' Trainer does (num_items_in_batch): the summed token
cross-entropy of each micro-batch divided by the number of label tokens in the WHOLE step, so the gradient is
that of the mean over the step's tokens however they are split into micro-batches.

    loss_step = sum_{micro-batches} sum_{t: labels[t+1] != -100} CE(logits[t], labels[t+1]) / n_items(step)

Order of data: an epoch is a permutation from (seed, epoch) - transformers' LengthGroupedSampler with batch size
per_device_train_batch_size * gradient_accumulation_steps when group_by_length, else a random permutation.
Steps per epoch = ceil(micro-batches / accumulation); total = max_steps, or ceil(epochs * steps per epoch).
"""
from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .checkpoint import check_writable, latest_checkpoint, load_checkpoint, save_checkpoint
from .data import IGNORE_INDEX, TokenizedDataset, collate
from .optim import build_optimizer
from .sampler import LengthGroupedSampler, RandomSampler
from .schedule import build_scheduler


class TrainingError(RuntimeError):
    """Training cannot continue (NaN loss, ...); the message says what happened and where the checkpoint is."""


@dataclass
class TrainResult:
    global_step: int
    losses: list[float] = field(default_factory=list)        # loss of every optimizer step
    learning_rates: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    log_history: list[dict] = field(default_factory=list)
    interrupted: bool = False
    stopped_by_deadline: bool = False
    last_checkpoint: Optional[str] = None
    train_seconds: float = 0.0


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token CE over labelled positions, their count). logits (B, T, V), labels (B, T)."""
    V = logits.shape[-1]
    shift_logits = logits[:, :-1].float().reshape(-1, V)        # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1).to(logits.device)  # (B*(T-1),)
    n = int((shift_labels != IGNORE_INDEX).sum())
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE_INDEX, reduction="sum"), n


GRAPH_LENGTH_MULTIPLE = 64   # --cuda_graph pads micro-batches to a multiple of this length: few shapes, few graphs


def _pad_to_multiple(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, multiple: int, pad_id: int):
    """Right-pad (B, T) ids / mask / labels to a length that is a multiple of `multiple` with pad_id / 0 / -100:
    padding that no attention reaches and no loss counts (positions come from the mask)."""
    extra = -ids.shape[1] % multiple
    if not extra:
        return ids, mask, labels
    pad = (0, extra)
    return (F.pad(ids, pad, value=pad_id), F.pad(mask, pad, value=0), F.pad(labels, pad, value=IGNORE_INDEX))


def _right_padded(mask: torch.Tensor) -> bool:
    """Every row of the (B, T) 0/1 mask is ones then zeros, with a real first token."""
    return bool((mask[:, 0] == 1).all()) and bool((mask[:, 1:] <= mask[:, :-1]).all())


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process RSS peak)


class Trainer:
    """Runs cfg (a train.config.TrainConfig) on a model whose forward(input_ids, attention_mask) has `.logits`."""

    def __init__(self, model: torch.nn.Module, cfg, train_dataset: TokenizedDataset,
                 eval_dataset: Optional[TokenizedDataset] = None, pad_id: int = 0,
                 device: torch.device | str = "cpu", max_steps: Optional[int] = None,
                 logger=None, on_step: Optional[Callable[[int, float], None]] = None, dist=None):
        from .distributed import DistContext, unwrap

        self.model, self.cfg = model, cfg            # model: the module to call (DDP / FSDP2-wrapped under torchrun)
        self.raw_model = unwrap(model)               # the same parameters under their checkpoint names
        from llama.fast_path import fast_path_memory_note

        self.fast_path = fast_path_memory_note(self.raw_model) is not None  # llama/fast_path.py swapped in
        self.dist = dist if dist is not None else DistContext()
        self.world = self.dist.world_size if self.dist.active else 1
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.pad_id, self.device = pad_id, torch.device(device)
        self.logger = logger
        self.on_step = on_step  # test hook: called after each optimizer step (step, loss)
        bs, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
        # a (global) micro-batch is bs * world examples, rank r computing its r-th slice (train.distributed)
        self.micro_per_epoch = math.ceil(len(train_dataset) / (bs * self.world))
        self.steps_per_epoch = max(1, math.ceil(self.micro_per_epoch / accum))
        if max_steps is not None and max_steps > 0:
            self.max_steps = max_steps
        elif cfg.max_steps > 0:
            self.max_steps = cfg.max_steps
        else:
            self.max_steps = max(1, math.ceil(cfg.num_train_epochs * self.steps_per_epoch))
        if cfg.group_by_length:
            self.sampler = LengthGroupedSampler(train_dataset.lengths, bs * accum * self.world, seed=cfg.seed)
        else:
            self.sampler = RandomSampler(len(train_dataset), seed=cfg.seed)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(cfg.optim, self.params, cfg)
        self.scheduler = build_scheduler(cfg.lr_scheduler_type, self.optimizer, self.max_steps,
                                         cfg.warmup_steps, cfg.warmup_ratio)
        self.autocast_dtype = torch.float16 if cfg.fp16 else torch.bfloat16 if cfg.bf16 else None
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=bool(cfg.fp16 and self.device.type == "cuda"))
        self.graph = None
        if getattr(cfg, "cuda_graph", False):
            from .cuda_graph import GraphedStep

            if self.device.type != "cuda" or self.world > 1:
                raise ValueError(f"cuda_graph: CUDA graphs run on one CUDA device in one process; this run has "
                                 f"device {self.device} and {self.world} process(es)")
            self.graph = GraphedStep(self.raw_model, self.params, max_graphs=8)
        self.global_step = 0
        self.epoch = 0
        self.micro_in_epoch = 0  # micro-batches of the current epoch already consumed (at a step boundary)
        self.result = TrainResult(global_step=0)

    # -----------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if getattr(self, "_batches_epoch", None) == epoch:
            return self._batches
        self.sampler.set_epoch(epoch)
        order = self.sampler.order()
        bs = self.cfg.per_device_train_batch_size * self.world
        self._batches_epoch, self._batches = epoch, [order[i: i + bs] for i in range(0, len(order), bs)]
        return self._batches

    def _next_step_batches(self) -> list[dict]:
        """This rank's micro-batches of the next optimizer step (collated), advancing epoch/micro position.
        Sets self._step_items: label tokens of the whole (global) step, the loss normaliser."""
        accum = self.cfg.gradient_accumulation_steps
        if self.micro_in_epoch >= self.micro_per_epoch:
            self.epoch += 1
            self.micro_in_epoch = 0
        batches = self._epoch_batches(self.epoch)
        chunk = batches[self.micro_in_epoch: self.micro_in_epoch + accum]
        self.micro_in_epoch += len(chunk)
        ds = self.train_dataset
        self._step_items = sum(sum(1 for x in ds[i]["labels"][1:] if x != IGNORE_INDEX) for idx in chunk for i in idx)
        if self.world > 1:
            from .distributed import empty_example, rank_slice

            mine = [rank_slice(idx, self.dist.rank, self.world) for idx in chunk]
            return [collate([ds[i] for i in idx] if idx else [empty_example(self.pad_id)], self.pad_id)
                    for idx in mine]
        return [collate([ds[i] for i in idx], self.pad_id) for idx in chunk]

    def _sync(self, last: bool):
        """DDP / FSDP2: reduce gradients only on the step's last micro-batch."""
        if self.world == 1:
            return contextlib.nullcontext()
        from .distributed import no_sync

        return no_sync(self.model, last)

    def trainer_state(self) -> dict:
        return {"global_step": self.global_step, "epoch": self.epoch, "micro_in_epoch": self.micro_in_epoch,
                "max_steps": self.max_steps, "losses": self.result.losses,
                "learning_rates": self.result.learning_rates, "grad_norms": self.result.grad_norms,
                "log_history": self.result.log_history,
                "config": self.cfg.to_dict() if hasattr(self.cfg, "to_dict") else {}}

    def save(self) -> str:
        if self.world > 1:  # gather on every rank (collectives), write once
            import os

            from .checkpoint import _lora_layers
            from .distributed import gather_adapter, gather_optimizer_state, gather_trainable, save_adapter_tensors

            adapter = gather_adapter(self.model) if any(True for _ in _lora_layers(self.raw_model)) else None
            trainable, optim = gather_trainable(self.model), gather_optimizer_state(self.optimizer)
            path = os.path.join(self.cfg.output_dir, f"checkpoint-{self.global_step}")
            if self.dist.is_main:
                path = save_checkpoint(self.cfg.output_dir, self.global_step, self.raw_model, self.optimizer,
                                       self.scheduler, self.scaler, self.trainer_state(), self.cfg.save_total_limit,
                                       trainable=trainable, optimizer_state=optim,
                                       adapter_writer=None if adapter is None else
                                       (lambda d: save_adapter_tensors(adapter[0], adapter[1], d)))
            self.dist.barrier()
        else:
            path = save_checkpoint(self.cfg.output_dir, self.global_step, self.model, self.optimizer,
                                   self.scheduler, self.scaler, self.trainer_state(), self.cfg.save_total_limit)
        self.result.last_checkpoint = path
        return path

    def resume(self, path: str) -> None:
        if path == "latest":
            found = latest_checkpoint(self.cfg.output_dir)
            if found is None:
                raise TrainingError(f"--resume latest: no checkpoint-N directory under {self.cfg.output_dir}")
            path = found
        st = load_checkpoint(path, self.raw_model, self.optimizer, self.scheduler, self.scaler,
                             distributed=self.world > 1)
        self.global_step, self.epoch, self.micro_in_epoch = st["global_step"], st["epoch"], st["micro_in_epoch"]
        self.result.losses, self.result.learning_rates = list(st["losses"]), list(st["learning_rates"])
        self.result.grad_norms, self.result.log_history = list(st["grad_norms"]), list(st["log_history"])
        self.result.last_checkpoint = path
        if self.logger:
            self.logger.info(f"resumed from {path} at step {self.global_step} (epoch {self.epoch}, "
                             f"micro-batch {self.micro_in_epoch})")

    # -----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset: Optional[TokenizedDataset] = None, max_examples: Optional[int] = None) -> float:
        """Mean next-token CE over all labelled tokens of the dataset (in order, eval batch size)."""
        ds = dataset if dataset is not None else self.eval_dataset
        if ds is None or len(ds) == 0:
            return float("nan")
        was_training = self.model.training
        self.model.eval()
        n_ex = len(ds) if max_examples is None else min(len(ds), max_examples)
        total, count, bs = 0.0, 0, self.cfg.per_device_eval_batch_size
        for i in range(0, n_ex, bs):
            b = collate([ds[j] for j in range(i, min(i + bs, n_ex))], self.pad_id)
            with self._autocast():
                logits = self.model(b["input_ids"].to(self.device),
                                    attention_mask=b["attention_mask"].to(self.device)).logits
            s, n = token_loss_sum(logits, b["labels"])
            total, count = total + float(s), count + n
        self.model.train(was_training)
        return total / max(count, 1)

    def _loss_sum(self, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sum of the next-token CE over one micro-batch's labelled tokens (the step divides by their count)."""
        with self._autocast():
            if self.fast_path:  # the chunked loss on the hidden states: no (B, T, V) logits
                return self.model(ids, attention_mask=mask, labels=labels.to(self.device),
                                  loss_reduction="sum").loss
            logits = self.model(ids, attention_mask=mask).logits  # (B, T, V)
        return token_loss_sum(logits, labels)[0]

    def _graph_loss(self, model, input_ids, labels, attention_mask=None) -> torch.Tensor:
        """_loss_sum for GraphedStep (its tensors are the graph's static inputs; no autocast weight cache, which a
        captured graph would freeze). Right-padded batches come without their mask: causal attention alone gives
        every real position what the mask would (it never reaches the padding after it), through flash SDPA, faster
        than the masked kernel (which captures too)."""
        ctx = torch.autocast(self.device.type, enabled=False) if self.autocast_dtype is None else \
            torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)
        with ctx:
            return model(input_ids, attention_mask=attention_mask, labels=labels, loss_reduction="sum").loss

    def _one_step(self) -> tuple[float, float, int]:
        """Forward/backward over the step's micro-batches, clip, update. Returns (loss, grad_norm, tokens)."""
        batches = self._next_step_batches()
        n_items = self._step_items  # label tokens of the whole step, all ranks (see the module docstring)
        loss_sum, tokens = 0.0, 0
        for k, b in enumerate(batches):
            ids, mask = b["input_ids"].to(self.device), b["attention_mask"].to(self.device)
            if self.graph is not None:  # forward + loss + backward replayed from a CUDA graph (train/cuda_graph.py)
                ids_g, mask_g, labels_g = _pad_to_multiple(ids, mask, b["labels"], GRAPH_LENGTH_MULTIPLE, self.pad_id)
                inputs = {"input_ids": ids_g, "labels": labels_g}
                if not _right_padded(b["attention_mask"]):
                    inputs["attention_mask"] = mask_g
                s = self.graph(self._graph_loss, inputs, scale=1.0 / max(n_items, 1))
                if not bool(torch.isfinite(s)):
                    return float("nan"), float("nan"), tokens
                loss_sum += float(s)
                tokens += int(mask.sum())
                continue
            with self._sync(last=k == len(batches) - 1):
                s = self._loss_sum(ids, mask, b["labels"])
                # DDP / FSDP2 average gradients over ranks: * world makes the result the single-process gradient
                loss = s / max(n_items, 1) * self.world
                bad = not bool(torch.isfinite(loss))
                if self.world > 1:
                    bad = self.dist.any(bad)
                if bad:
                    return float("nan"), float("nan"), tokens
                self.scaler.scale(loss).backward()
            loss_sum += float(s.detach())
            tokens += int(mask.sum())
        if self.world > 1:
            loss_sum, tokens = self.dist.all_reduce([loss_sum, float(tokens)])
            tokens = int(tokens)
        self.scaler.unscale_(self.optimizer)
        if self.world > 1:
            from .distributed import clip_grad_norm_

            gn = clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        elif self.cfg.max_grad_norm > 0:
            gn = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        else:
            gn = torch.linalg.vector_norm(torch.stack([p.grad.detach().float().norm() for p in self.params
                                                       if p.grad is not None]))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum / max(n_items, 1), float(gn), tokens

    def train(self, resume_from: Optional[str] = None, deadline: Optional[float] = None) -> TrainResult:
        """Run to max_steps (or until `deadline`, a time.time() value, would be passed by one more step)."""
        cfg = self.cfg
        check_writable(cfg.output_dir)
        if resume_from:
            self.resume(resume_from)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        t0 = time.time()
        win_loss, win_steps, win_tokens, win_t = 0.0, 0, 0, time.time()
        if self.logger:
            self.logger.start(self.max_steps, self.global_step)
        try:
            run_start, run_step0 = time.time(), self.global_step
            while self.global_step < self.max_steps:
                done = self.global_step - run_step0
                late = deadline is not None and done > 0 and time.time() + (time.time() - run_start) / done > deadline
                if self.world > 1 and deadline is not None:
                    late = self.dist.any(late)  # every rank stops at the same step
                if late:
                    self.result.stopped_by_deadline = True
                    if self.logger:
                        self.logger.info(f"time budget reached: stopping at step {self.global_step} of {self.max_steps}")
                    break
                lr = self.optimizer.param_groups[0]["lr"]
                snapshot = (self.epoch, self.micro_in_epoch)
                loss, gn, tokens = self._one_step()
                if not math.isfinite(loss):
                    self.optimizer.zero_grad(set_to_none=True)
                    self.epoch, self.micro_in_epoch = snapshot  # the checkpoint points at the failing step
                    path = self.save()
                    raise TrainingError(
                        f"loss is {loss} at step {self.global_step + 1} (epoch {self.epoch}); training stopped. "
                        f"The last good state is saved in {path}. Try a lower --learning_rate, --bf16 instead "
                        f"of --fp16, or check the data for empty/broken examples.")
                self.global_step += 1
                self.result.losses.append(loss)
                self.result.learning_rates.append(lr)
                self.result.grad_norms.append(gn)
                win_loss, win_steps, win_tokens = win_loss + loss, win_steps + 1, win_tokens + tokens
                if self.on_step:
                    self.on_step(self.global_step, loss)
                if self.logger:
                    self.logger.progress(self.global_step, loss, lr)
                if self.global_step % cfg.logging_steps == 0 or self.global_step == self.max_steps:
                    dt = max(time.time() - win_t, 1e-9)
                    rec = {"step": self.global_step, "epoch": round(self.epoch + self.micro_in_epoch /
                                                                     max(self.micro_per_epoch, 1), 3),
                           "loss": win_loss / win_steps, "learning_rate": lr, "grad_norm": gn,
                           "tokens_per_second": win_tokens / dt, "peak_memory_mb": peak_memory_mb(self.device)}
                    if cfg.eval_steps and self.global_step % cfg.eval_steps == 0 and self.eval_dataset is not None:
                        rec["eval_loss"] = self.evaluate()
                    self.result.log_history.append(rec)
                    if self.logger:
                        self.logger.log(rec)
                    win_loss, win_steps, win_tokens, win_t = 0.0, 0, 0, time.time()
                if cfg.save_steps and self.global_step % cfg.save_steps == 0 and self.global_step < self.max_steps:
                    self.save()
            if win_steps and self.result.stopped_by_deadline:  # the partial logging window
                rec = {"step": self.global_step, "loss": win_loss / win_steps,
                       "learning_rate": self.result.learning_rates[-1], "grad_norm": self.result.grad_norms[-1],
                       "tokens_per_second": win_tokens / max(time.time() - win_t, 1e-9),
                       "peak_memory_mb": peak_memory_mb(self.device)}
                self.result.log_history.append(rec)
                if self.logger:
                    self.logger.log(rec)
        except KeyboardInterrupt:
            self.optimizer.zero_grad(set_to_none=True)
            # the position may have advanced for a step that did not finish; the checkpoint must point at it
            self._rewind_unfinished_step()
            path = self.save()
            self.result.interrupted = True
            if self.logger:
                self.logger.info(f"interrupted at step {self.global_step}: checkpoint saved to {path}; "
                                 f"continue with --resume {path}")
        finally:
            if self.logger:
                self.logger.close_progress()
        self.result.global_step = self.global_step
        self.result.train_seconds = time.time() - t0
        if self.graph is not None and self.logger:
            self.logger.info(f"CUDA graphs: {self.graph.captures} batch shape(s) captured; "
                             f"{self.graph.eager_calls} micro-batch(es) of further lengths ran eagerly")
        return self.result

    def _rewind_unfinished_step(self) -> None:
        """Set the data position to just after the last completed step (replaying _next_step_batches' rules)."""
        accum, epoch, micro = self.cfg.gradient_accumulation_steps, 0, 0
        for _ in range(self.global_step):
            if micro >= self.micro_per_epoch:
                epoch, micro = epoch + 1, 0
            micro += min(accum, self.micro_per_epoch - micro)
        self.epoch, self.micro_in_epoch = epoch, micro
