"""Training checkpoints: written atomically, rotated, resumed exactly.

    output_dir/checkpoint-{step}/
        adapter/                 adapter_model.safetensors + adapter_config.json (PEFT format), when LoRA is in
        trainable.safetensors    every trainable parameter by name (what resume loads)
        optimizer.pt  scheduler.pt  scaler.pt (fp16)  rng_state.pt
        trainer_state.json       global_step, epoch, micro-batch position in the epoch, log history, config

Atomicity: everything goes to `output_dir/.tmp-checkpoint-{step}-{pid}`, files are fsync'ed, then the directory
is renamed into place (a rename within one file system is atomic). A failure while writing (a full disk, an
injected error) deletes the temporary directory and leaves earlier checkpoints untouched. Only after a
successful rename are checkpoints beyond `save_total_limit` deleted, oldest first.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Optional

import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """Saving or loading a checkpoint failed; the message names the directory."""


def list_checkpoints(output_dir: str) -> list[str]:
    """checkpoint-N directories under output_dir, oldest (smallest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), d) for d in os.listdir(output_dir)
             if (m := CHECKPOINT_RE.match(d)) and os.path.isdir(os.path.join(output_dir, d))]
    return [os.path.join(output_dir, d) for _, d in sorted(found)]


def latest_checkpoint(output_dir: str) -> Optional[str]:
    cps = list_checkpoints(output_dir)
    return cps[-1] if cps else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(path: str) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(output_dir: str, step: int, model: torch.nn.Module, optimizer, scheduler, scaler,
                    trainer_state: dict, save_total_limit: int = 3, trainable: Optional[dict] = None,
                    optimizer_state: Optional[dict] = None, adapter_writer=None) -> str:
    """Write checkpoint-{step} atomically and rotate; returns its path. Raises CheckpointError on failure.

    Distributed runs (train.distributed) pass what rank 0 writes, gathered from every rank: `trainable`
    (full tensors by name), `optimizer_state` (a full state dict) and `adapter_writer(directory)`."""
    from safetensors.torch import save_file

    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}-{os.getpid()}")
    try:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        if adapter_writer is not None:
            adapter_writer(os.path.join(tmp, "adapter"))
        elif any(True for _ in _lora_layers(model)):
            from lora import save_adapter

            save_adapter(model, os.path.join(tmp, "adapter"))
        save_file(trainable if trainable is not None else trainable_state_dict(model),
                  os.path.join(tmp, "trainable.safetensors"))
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(),
                   os.path.join(tmp, "optimizer.pt"))
        torch.save(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
        if scaler is not None and scaler.is_enabled():
            torch.save(scaler.state_dict(), os.path.join(tmp, "scaler.pt"))
        torch.save(rng_state(), os.path.join(tmp, "rng_state.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as fh:
            json.dump(trainer_state, fh, indent=1, default=str)
        _fsync_tree(tmp)
        if os.path.exists(final):  # re-saving the same step (e.g. Ctrl-C right after a save): replace it
            old = final + f".old-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        prev = latest_checkpoint(output_dir)
        if isinstance(e, KeyboardInterrupt):
            raise
        raise CheckpointError(f"saving {final} failed ({type(e).__name__}: {e}); nothing partial was left behind"
                              + (f"; the previous checkpoint {prev} is intact" if prev else "")) from e
    for old in list_checkpoints(output_dir)[:-save_total_limit]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _lora_layers(model):
    try:
        from lora import lora_layers
    except ImportError:
        return iter(())
    return lora_layers(model)


def load_checkpoint(path: str, model: torch.nn.Module, optimizer, scheduler, scaler,
                    restore_rng: bool = True, distributed: bool = False) -> dict:
    """Load a checkpoint written by save_checkpoint into the given objects; returns trainer_state.

    distributed: every rank reads the (full, gathered) files and keeps its shard of FSDP2 parameters and
    optimizer states (train.distributed.load_param_ / optimizer_state_for_load)."""
    from safetensors.torch import load_file

    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise CheckpointError(f"{path}: not a checkpoint directory (no trainer_state.json)")
    try:
        params = dict(model.named_parameters())
        sd = load_file(os.path.join(path, "trainable.safetensors"))
        missing = [n for n, p in params.items() if p.requires_grad and n not in sd]
        unknown = [n for n in sd if n not in params]
        if missing or unknown:
            raise CheckpointError(f"{path}: trainable parameters differ from the model's: missing {missing[:5]}, "
                                  f"unknown {unknown[:5]} (was it written with other LoRA settings?)")
        osd = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=False)
        if distributed:
            from .distributed import load_param_, optimizer_state_for_load

            for n, t in sd.items():
                load_param_(params[n], t)
            osd = optimizer_state_for_load(optimizer, osd)
        else:
            with torch.no_grad():
                for n, t in sd.items():
                    params[n].copy_(t.to(params[n].device))
        optimizer.load_state_dict(osd)
        scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt"), weights_only=False))
        if scaler is not None and scaler.is_enabled() and os.path.isfile(os.path.join(path, "scaler.pt")):
            scaler.load_state_dict(torch.load(os.path.join(path, "scaler.pt"), weights_only=False))
        if restore_rng:
            set_rng_state(torch.load(os.path.join(path, "rng_state.pt"), weights_only=False))
        with open(os.path.join(path, "trainer_state.json")) as fh:
            return json.load(fh)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path}: failed to load ({type(e).__name__}: {e})") from e


def check_writable(output_dir: str) -> None:
    """Create output_dir and write a probe file, or raise CheckpointError naming the directory."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
        with open(probe, "w") as fh:
            fh.write("ok")
        os.remove(probe)
    except OSError as e:
        raise CheckpointError(f"output_dir {output_dir!r} is not writable ({e.strerror or e}); "
                              "choose another with --output_dir") from None
