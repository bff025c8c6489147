"""Where training reports go: the console, a tqdm progress bar, TensorBoard event files, a loss-curve PNG."""
from __future__ import annotations

import math
import os
import sys
from typing import Optional


class RunLogger:
    """info(msg) / log(record) / progress(step, loss, lr); TensorBoard under output_dir/runs when asked."""

    def __init__(self, output_dir: Optional[str] = None, report_to: str = "none", use_tqdm: bool = True,
                 stream=None):
        self.stream = stream or sys.stdout
        self.use_tqdm = use_tqdm
        self.bar = None
        self.tb = None
        self.tb_dir = None
        if report_to == "tensorboard" and output_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb_dir = os.path.join(output_dir, "runs")
                self.tb = SummaryWriter(self.tb_dir)
            except ImportError:
                self.info("report_to=tensorboard but tensorboard is not installed (pip install tensorboard); "
                          "logging to the console only")

    def info(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def start(self, total: int, initial: int = 0) -> None:
        if self.use_tqdm:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", file=sys.stderr,
                                dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def progress(self, step: int, loss: float, lr: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def log(self, rec: dict) -> None:
        parts = []
        for k, v in rec.items():
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        self.info(" | ".join(parts))
        if self.tb is not None:
            step = rec.get("step", 0)
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("eval") else k.replace("_", "/", 1), v, step)
            self.tb.flush()

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.tb is not None and math.isfinite(value):
            self.tb.add_scalar(tag, value, step)
            self.tb.flush()

    def close_progress(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def close(self) -> None:
        self.close_progress()
        if self.tb is not None:
            self.tb.close()


def save_loss_curve(losses: list[float], path: str, eval_points: Optional[list[tuple[int, float]]] = None,
                    title: str = "training loss") -> Optional[str]:
    """A PNG of the per-step loss (and a running mean); None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = list(range(1, len(losses) + 1))
    ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss per step")
    if len(losses) >= 5:
        k = max(2, len(losses) // 20)
        run = [sum(losses[max(0, i - k + 1): i + 1]) / len(losses[max(0, i - k + 1): i + 1]) for i in range(len(losses))]
        ax.plot(steps, run, lw=1.6, label=f"running mean ({k})")
    for s, v in eval_points or []:
        ax.scatter([s], [v], color="C3", zorder=3)
    if eval_points:
        ax.scatter([], [], color="C3", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
