"""TrainConfig: every knob of `python -m train.run`, with the tutorial's defaults.

The field names are the ones users know from transformers' TrainingArguments, peft's LoraConfig,
BitsAndBytesConfig and trl's SFTTrainer, so the tutorial's script maps onto this file line by line.

Precedence (lowest to highest): dataclass defaults < `--config FILE.yaml` < `--key value` flags.

    cfg = TrainConfig()                                   # the tutorial's values
    cfg = parse_args(["--config", "run.yaml", "--lora_r", "16", "--fp16"])
    build_arg_parser().print_help()                        # every field, its default and meaning
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_torch")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
COMPUTE_DTYPES = ("float16", "bfloat16", "float32")
QUANT_TYPES = ("nf4", "fp4")
REPORT_TO = ("tensorboard", "none")
DISTRIBUTED = ("auto", "ddp", "fsdp", "none")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the field, the value and what was expected."""


def _f(default: Any, help: str, **kw) -> Any:
    """A dataclass field carrying its --help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- model / data -----------------------------------------------------------------------------
    model_name: Optional[str] = _f(None, "local model directory, GGUF file or hub id; none = the embedded SmolLM2-135M-Instruct")
    dataset_name: Optional[str] = _f(None, "local file/directory, datasets save_to_disk dir or hub id; none = the embedded stdlib-docstring instruction set")
    new_model: str = _f("qlora-adapter", "name of the fine-tuned adapter (directory under output_dir)")
    output_dir: str = _f("./results", "where checkpoints, logs, the adapter and the loss curve go")
    dataset_text_field: str = _f("text", "column holding the formatted text (chat 'messages' column is used if this one is absent)")
    dataset_split: str = _f("train", "split to train on (hub / save_to_disk datasets)")
    eval_fraction: float = _f(0.05, "fraction of a dataset held out for eval loss when it has no eval split (0 = no eval)")
    max_seq_length: Optional[int] = _f(None, "truncate tokenized examples to this many tokens; none = 1024 (trl's default cap)")
    packing: bool = _f(False, "concatenate examples separated by EOS into max_seq_length blocks")
    train_on_responses_only: bool = _f(False, "compute the loss only on the assistant responses (labels -100 on prompts)")
    # --- QLoRA -----------------------------------------------------------------------------------
    lora_r: int = _f(64, "LoRA attention dimension (rank)")
    lora_alpha: int = _f(16, "LoRA scaling alpha (scale = alpha / r)")
    lora_dropout: float = _f(0.1, "dropout probability on the LoRA input")
    lora_target_modules: Optional[str] = _f(None, "comma-separated module names to adapt, or all-linear; none = peft's default for Llama (q_proj,v_proj), as in the tutorial")
    use_4bit: bool = _f(True, "quantize the base model's linear weights to 4 bits")
    bnb_4bit_compute_dtype: str = _f("float16", "compute dtype of 4-bit matmuls; bfloat16 is chosen automatically on GPUs with compute capability >= 8 when fp16/bf16 are not set")
    bnb_4bit_quant_type: str = _f("nf4", "4-bit code: nf4 or fp4")
    use_nested_quant: bool = _f(False, "double quantization of the absmax statistics")
    # --- training --------------------------------------------------------------------------------
    num_train_epochs: float = _f(1.0, "number of passes over the training set")
    fp16: bool = _f(False, "fp16 autocast + GradScaler (GPU)")
    bf16: bool = _f(False, "bf16 autocast (GPU with compute capability >= 8)")
    per_device_train_batch_size: int = _f(4, "examples per micro-batch")
    per_device_eval_batch_size: int = _f(4, "examples per eval batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = _f(True, "recompute activations in backward to save memory")
    fast_path: bool = _f(False, "fused training kernels (llama/fast_path.py): Triton RMSNorm, RoPE, SwiGLU + down projection, LoRA with fused dropout, chunked cross entropy, checkpointing that keeps only each layer's input; numerics equal to the plain path's up to rounding order (dropout masks come from another generator). Single process or DDP")
    offload_activations: bool = _f(False, "with --fast_path and gradient_checkpointing on CUDA: keep the checkpointed layer inputs (and the frozen input embedding) in pinned host memory")
    offload_saved_layers: int = _f(0, "with --fast_path, gradient_checkpointing off, on CUDA: the first N layers keep what their backward needs in pinned host memory instead of GPU memory (no recompute: copies on a side stream over the host link, whose bandwidth bounds how many layers pay; llama/offload.py)")
    cuda_graph: bool = _f(False, "with --fast_path on one CUDA GPU: capture each micro-batch's forward, loss and backward in a CUDA graph (per batch shape, after 2 eager warm-up calls) and replay it, so the host no longer launches every kernel; same masks and numerics as without. Micro-batches are right-padded to a multiple of 64 tokens (padding no loss counts); up to 8 lengths get a graph, others run eagerly. Pays where the host is slower than the GPU (short sequences, small batches)")
    max_grad_norm: float = _f(0.3, "clip the global gradient L2 norm to this (0 = no clipping)")
    learning_rate: float = _f(2e-4, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.001, "AdamW decoupled weight decay")
    adam_beta1: float = _f(0.9, "AdamW beta1")
    adam_beta2: float = _f(0.999, "AdamW beta2")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon")
    optim: str = _f("paged_adamw_32bit", "optimizer: paged_adamw_32bit, paged_adamw_8bit or adamw_torch")
    lr_scheduler_type: str = _f("constant", "learning-rate schedule: constant, constant_with_warmup, cosine, linear")
    max_steps: int = _f(-1, "total optimizer steps; -1 = num_train_epochs over the data")
    warmup_ratio: float = _f(0.03, "fraction of the steps spent warming up linearly (used when warmup_steps is 0)")
    warmup_steps: int = _f(0, "warmup steps; overrides warmup_ratio when > 0")
    group_by_length: bool = _f(True, "batch examples of similar length together (transformers' LengthGroupedSampler)")
    save_steps: int = _f(25, "write a checkpoint every this many optimizer steps (0 = only at the end)")
    save_total_limit: int = _f(3, "keep the last N checkpoints")
    logging_steps: int = _f(25, "log loss, lr, grad norm, tokens/s and peak memory every this many steps")
    eval_steps: int = _f(0, "also compute eval loss every this many steps (0 = only before and after)")
    report_to: str = _f("tensorboard", "tensorboard or none")
    seed: int = _f(42, "random seed (initialization, dropout, data order)")
    # --- run control -----------------------------------------------------------------------------
    device: str = _f("auto", "auto, cpu, cuda or cuda:N")
    distributed: str = _f("auto", "under torchrun (WORLD_SIZE > 1): ddp (data parallel, a full model copy per GPU), fsdp (FSDP2 fully_shard: NF4 codes, their scales and the LoRA weights sharded across ranks), auto (ddp when the model takes under half a GPU, else fsdp; ddp on a CPU) or none (ignore torchrun's variables: each process trains alone)")
    cpu_time_budget_minutes: float = _f(8.0, "on a CPU without --max_steps, cap the steps (and eval examples) so the whole run ends within about this many minutes")
    cpu_use_4bit: bool = _f(False, "on a CPU, also quantize the base to 4 bits (slow: pure-torch dequantization every matmul); by default a CPU keeps the base dense and says so")
    cpu_max_eval_examples: int = _f(32, "on a CPU, eval loss uses at most this many held-out examples")
    resume: Optional[str] = _f(None, "checkpoint directory to resume from, or 'latest' for the newest under output_dir")
    from_adapter: Optional[str] = _f(None, "start from this saved PEFT adapter directory (its r, alpha, targets) instead of a fresh LoRA init")
    eval_only: bool = _f(False, "compute the eval loss and the sample generations, print them and stop (no training, nothing written)")
    merge: bool = _f(False, "also write the base model with the adapter merged in (dense safetensors)")
    push_to_hub: bool = _f(False, "upload the adapter to the hub (needs a network and a token)")
    hub_model_id: Optional[str] = _f(None, "repository id for --push_to_hub; default = new_model")
    num_sample_prompts: int = _f(2, "sample generations printed before and after training")
    max_new_tokens: int = _f(64, "tokens generated per sample")

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------------------------------------
    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first bad field."""
        def bad(name: str, expected: str) -> None:
            raise ConfigError(f"config field {name!r} = {getattr(self, name)!r}: expected {expected}")

        choices = {"optim": OPTIMIZERS, "lr_scheduler_type": SCHEDULERS,
                   "bnb_4bit_compute_dtype": COMPUTE_DTYPES, "bnb_4bit_quant_type": QUANT_TYPES,
                   "report_to": REPORT_TO, "distributed": DISTRIBUTED}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(name, "one of " + ", ".join(allowed))
        for name in ("lora_r", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "logging_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        for name in ("save_steps", "eval_steps", "warmup_steps", "num_sample_prompts", "max_new_tokens",
                     "cpu_max_eval_examples"):
            if getattr(self, name) < 0:
                bad(name, "an integer >= 0")
        for name in ("lora_dropout", "warmup_ratio", "eval_fraction"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "a number in [0, 1)")
        for name in ("learning_rate", "weight_decay", "max_grad_norm", "adam_epsilon", "lora_alpha",
                     "cpu_time_budget_minutes"):
            if getattr(self, name) < 0:
                bad(name, "a number >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                bad(name, "a number in [0, 1)")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            bad("num_train_epochs", "> 0 (or set max_steps > 0)")
        if self.max_steps == 0 or self.max_steps < -1:
            bad("max_steps", "-1 (use num_train_epochs) or an integer >= 1")
        if self.max_seq_length is not None and self.max_seq_length < 2:
            bad("max_seq_length", "none or an integer >= 2")
        if self.fp16 and self.bf16:
            raise ConfigError("config fields 'fp16' and 'bf16' are both true: choose at most one")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            bad("device", "auto, cpu, cuda or cuda:N")
        if self.offload_activations and not (self.fast_path and self.gradient_checkpointing):
            raise ConfigError("config field 'offload_activations' needs fast_path and gradient_checkpointing (it "
                              "offloads the checkpointed layer inputs of the fast path)")
        if self.offload_saved_layers < 0:
            bad("offload_saved_layers", "an integer >= 0")
        if self.offload_saved_layers and not self.fast_path:
            raise ConfigError("config field 'offload_saved_layers' needs fast_path (it offloads what the fast "
                              "path's layers save for backward)")
        if self.offload_saved_layers and self.gradient_checkpointing:
            raise ConfigError("config field 'offload_saved_layers' needs gradient_checkpointing false: with it "
                              "every layer is recomputed and keeps nothing to offload")
        if self.cuda_graph and not self.fast_path:
            raise ConfigError("config field 'cuda_graph' needs fast_path (the plain path reads the label count on "
                              "the host and draws dropout masks from the CUDA generator)")
        if self.cuda_graph and self.fp16:
            raise ConfigError("config fields 'cuda_graph' and 'fp16': the fp16 GradScaler's inf checks read device "
                              "values on the host; use bf16")
        if self.from_adapter is not None and not os.path.isfile(os.path.join(self.from_adapter, "adapter_config.json")):
            raise ConfigError(f"config field 'from_adapter' = {self.from_adapter!r}: no adapter_config.json there "
                              "(expected a PEFT-format adapter directory)")
        if self.from_adapter is not None and self.resume:
            raise ConfigError("config fields 'from_adapter' and 'resume': a checkpoint already holds its adapter; "
                              "give one of them")
        if self.fast_path and self.distributed == "fsdp":
            raise ConfigError("config fields 'fast_path' and distributed='fsdp': the fast path's checkpointing is "
                              "not wired to FSDP2's gathers yet; use distributed='ddp' (or 'auto' for models that "
                              "fit one GPU) or the plain path")
        return self

    @property
    def target_modules(self) -> Optional[list[str] | str]:
        """None (peft's default for the model type), "all-linear", or a list of module names."""
        if not self.lora_target_modules:
            return None
        if self.lora_target_modules.strip().lower() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]

    @property
    def adapter_dir(self) -> str:
        return os.path.join(self.output_dir, self.new_model)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "dict") -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{source}: unknown config field(s) {unknown}; run with --help for the list")
        hints = typing.get_type_hints(cls)
        kw = {k: _coerce(k, v, hints[k], source) for k, v in d.items()}
        return cls(**kw)


# ------------------------------------------------------------------------------------------------------
def _base_type(tp: Any) -> tuple[type, bool]:
    """(int | float | str | bool, optional?) of an annotation like Optional[int]."""
    args = typing.get_args(tp)
    if args and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return tp, False


_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def _coerce(name: str, value: Any, tp: Any, source: str) -> Any:
    """Convert a YAML value or a command-line string to the field's type, or raise ConfigError."""
    base, optional = _base_type(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ConfigError(f"{source}: field {name!r} may not be none (expected {base.__name__})")
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            if isinstance(value, str):
                f = float(value)
                if not f.is_integer():
                    raise ValueError
                return int(f)
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: field {name!r} got {value!r}: expected {base.__name__}"
                          + (" or none" if optional else "")) from None


def _bool_flag(s: str) -> bool:
    t = s.lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def build_arg_parser() -> argparse.ArgumentParser:
    """argparse parser generated from TrainConfig's fields (help text, type and default of each)."""
    p = argparse.ArgumentParser(
        prog="python -m train.run",
        description="QLoRA fine-tuning. With no arguments: the embedded SmolLM2-135M-Instruct on the "
                    "embedded instruction set, offline. Precedence: defaults < --config FILE.yaml < flags.",
        allow_abbrev=False)
    p.add_argument("--config", metavar="FILE.yaml", default=None, help="YAML file of field: value overrides")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        base, optional = _base_type(hints[f.name])
        names = ["--" + f.name] + (["--" + f.name.replace("_", "-")] if "_" in f.name else [])
        kw: dict = dict(dest=f.name, default=argparse.SUPPRESS, help=f.metadata.get("help", "")
                        + f" (default: {f.default})")
        if base is bool:
            # `--fp16` alone means true; `--fp16 false` also works.
            kw.update(nargs="?", const=True, type=_bool_flag, metavar="BOOL")
        else:
            kw.update(type=str, metavar=base.__name__.upper())
        p.add_argument(*names, **kw)
    return p


def parse_args(argv: Optional[list[str]] = None) -> TrainConfig:
    """defaults < YAML (--config) < --key value flags; ConfigError on unknown or ill-typed values."""
    p = build_arg_parser()
    ns, unknown = p.parse_known_args(argv)
    if unknown:
        raise ConfigError(f"unknown argument(s) {unknown}; run with --help for the list of fields")
    values: dict = {}
    if ns.config:
        values.update(load_yaml(ns.config))
    flags = {k: v for k, v in vars(ns).items() if k != "config"}
    values.update(flags)
    return TrainConfig.from_dict(values, source="command line" if not ns.config else f"{ns.config} + command line")


def load_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--config {path}: no such file")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of field: value, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown config field(s) {unknown}; run with --help for the list")
    hints = typing.get_type_hints(TrainConfig)
    return {k: _coerce(k, v, hints[k], path) for k, v in data.items()}
