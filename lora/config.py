"""`LoraConfig`: the LoRA hyper-parameters, with peft's field names, and `adapter_config.json` I/O.

The field names and defaults are those of `peft.LoraConfig` (peft 0.21.2), so a config written here is
read by `peft.PeftModel.from_pretrained` and a config written by peft is read here:

    LoraConfig(r=64, lora_alpha=16, lora_dropout=0.1, bias="none", task_type="CAUSAL_LM")  # the tutorial's

`to_dict()` / `save()` write every field peft writes (41 keys, sorted, indent 2). `from_dict()` / `load()`
accept any file peft writes, including older ones that lack newer optional fields and newer ones whose added
fields are null, false or empty (peft 0.22's `astra_config`: kept and written back), and raise `ValueError`
naming the fields when a required field is missing (`REQUIRED_FIELDS`) or an unknown field is set, and naming
the option when a file asks for a peft feature this package does not implement (DoRA, LoftQ, ...).

Fields that matter here:
    r               rank of the update (int > 0)
    lora_alpha      scale numerator: scaling = lora_alpha / r   (lora_alpha / sqrt(r) with use_rslora)
    lora_dropout    dropout probability on the LoRA branch input
    target_modules  list of module-name suffixes, a regex (full match on the module path), "all-linear",
                    or None = the default for the model type (Llama: q_proj, v_proj)
    exclude_modules same forms as target_modules (not "all-linear"); matched modules are skipped
    bias            "none" | "all" (every bias trainable) | "lora_only" (biases of LoRA-wrapped layers)
    lora_bias       lora_B gets a trainable bias (zero-initialized)
    modules_to_save modules trained in full and saved in the adapter file (e.g. ["lm_head"])
    rank_pattern, alpha_pattern   {pattern: value}: per-module r / lora_alpha (pattern matches a suffix)
    init_lora_weights  True: A kaiming-uniform(a=sqrt 5), B = 0;  "gaussian": A ~ N(0, 1/r), B = 0;
                       False: A and B random (the adapter is not a no-op; for tests)
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from nf4 import atomic_write_text

#: peft's version whose adapter_config.json format this module writes.
PEFT_FORMAT_VERSION = "0.21.2"
#: Fields that every adapter_config.json must carry (every peft version writes them).
REQUIRED_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules")
#: Default target modules by `config.model_type`, as peft's table has them.
DEFAULT_TARGET_MODULES = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
}
ALL_LINEAR = "all-linear"
BIAS_OPTIONS = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    # --- fields this package implements ---
    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    lora_bias: bool = False
    task_type: Optional[str] = None
    peft_type: str = "LORA"
    base_model_name_or_path: Optional[str] = None
    revision: Optional[str] = None
    inference_mode: bool = False
    peft_version: Optional[str] = None
    auto_mapping: Optional[dict] = None
    # --- fields peft writes that select features not implemented here (must keep their defaults) ---
    fan_in_fan_out: bool = False
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    megatron_config: Optional[dict] = None
    megatron_core: Optional[str] = "megatron.core"
    trainable_token_indices: Optional[Any] = None
    loftq_config: dict = field(default_factory=dict)
    eva_config: Optional[dict] = None
    corda_config: Optional[dict] = None
    lora_ga_config: Optional[dict] = None
    use_dora: bool = False
    velora_config: Optional[dict] = None
    alora_invocation_tokens: Optional[list[int]] = None
    use_qalora: bool = False
    qalora_group_size: int = 16
    monteclora_config: Optional[dict] = None
    layer_replication: Optional[list] = None
    target_parameters: Optional[list[str]] = None
    use_bdlora: Optional[Any] = None
    arrow_config: Optional[dict] = None
    kasa_config: Optional[dict] = None
    ensure_weight_tying: bool = False

    # Options whose non-default value this package cannot honour. (name -> default)
    _UNSUPPORTED = {
        "fan_in_fan_out": False, "layers_to_transform": None, "layers_pattern": None, "megatron_config": None,
        "trainable_token_indices": None, "use_dora": False, "velora_config": None,
        "alora_invocation_tokens": None, "use_qalora": False, "monteclora_config": None,
        "layer_replication": None, "target_parameters": None, "use_bdlora": None, "arrow_config": None,
        "kasa_config": None,
    }

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive integer, got {self.r!r}")
        if not self.lora_alpha or self.lora_alpha <= 0:
            raise ValueError(f"LoraConfig.lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_OPTIONS:
            raise ValueError(f"LoraConfig.bias must be one of {BIAS_OPTIONS}, got {self.bias!r}")
        if str(self.peft_type).upper() != "LORA":
            raise ValueError(f"LoraConfig.peft_type must be 'LORA', got {self.peft_type!r}")
        self.peft_type = "LORA"
        for name, value in list(self.rank_pattern.items()):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"LoraConfig.rank_pattern[{name!r}] must be a positive integer, got {value!r}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = list(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = list(self.exclude_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        bad = [k for k, default in self._UNSUPPORTED.items() if getattr(self, k) not in (default, [], {})]
        if bad:
            raise ValueError("LoraConfig: options not supported by this package: "
                             + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))
        if self.init_lora_weights not in (True, False, "gaussian"):
            # other peft initializations (pissa, olora, loftq, eva, ...) only matter before training; refuse
            # them at construction time, but a loaded file's trained weights make them irrelevant (from_dict).
            raise ValueError(f"LoraConfig.init_lora_weights={self.init_lora_weights!r} is not supported "
                             "(True, False or 'gaussian')")

    # ---------------------------------------------------------------- per-module values
    def rank_for(self, module_name: str) -> int:
        """r for the module at `module_name`, after `rank_pattern` (peft's get_pattern_key rule)."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """lora_alpha for the module at `module_name`, after `alpha_pattern`."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    # ---------------------------------------------------------------- json
    def to_dict(self) -> dict:
        """Every field peft writes, with the values peft writes at save time (inference_mode=True)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(getattr(self, "_extra", {}))    # a newer peft's null fields read from a file, written back
        d["inference_mode"] = True
        d["peft_version"] = self.peft_version or PEFT_FORMAT_VERSION
        if isinstance(d["target_modules"], (set, tuple)):
            d["target_modules"] = list(d["target_modules"])
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "adapter_config") -> "LoraConfig":
        """Build from a dict as found in an adapter_config.json; `source` names it in errors."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names - {"runtime_config"})
        # a newer peft's fields at an "off" value (None, False, empty) select nothing: kept and written back;
        # any other value asks for something this package does not know
        extra = {k: d[k] for k in unknown if d[k] is None or d[k] is False or d[k] in ({}, [], "")}
        unknown = [k for k in unknown if k not in extra]
        missing = [k for k in REQUIRED_FIELDS if k not in d]
        problems = []
        if missing:
            problems.append(f"missing required field(s) {missing}")
        if unknown:
            problems.append(f"unknown field(s) {unknown} (set to {[d[k] for k in unknown]}; a newer peft's "
                            f"fields are accepted only when null, false or empty)")
        if problems:
            raise ValueError(f"{source}: " + "; ".join(problems)
                             + f" (a peft {PEFT_FORMAT_VERSION} LoRA adapter_config has fields {sorted(names)})")
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("init_lora_weights") not in (None, True, False, "gaussian"):
            kwargs["init_lora_weights"] = True  # the trained weights are loaded anyway
        if kwargs.get("loftq_config") is None:
            kwargs["loftq_config"] = {}
        for k in ("rank_pattern", "alpha_pattern"):
            if kwargs.get(k) is None:
                kwargs[k] = {}
        try:
            cfg = cls(**kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None
        cfg._extra = extra
        return cfg

    def save(self, directory: str) -> str:
        """Write `directory/adapter_config.json` atomically (temp file + rename); returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "adapter_config.json")
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str) -> "LoraConfig":
        """Read an adapter_config.json (or the directory holding one)."""
        if os.path.isdir(path):
            path = os.path.join(path, "adapter_config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no adapter_config.json at {path}")
        with open(path) as fh:
            try:
                d = json.load(fh)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
        return cls.from_dict(d, source=path)


def _pattern_key(patterns: dict, module_name: str) -> Optional[str]:
    """The first pattern p of `patterns` with re.match(rf"(.*\\.)?({p})$", module_name), else None."""
    import re

    for p in patterns:
        if re.match(rf"(.*\.)?({p})$", module_name):
            return p
    return None
