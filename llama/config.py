"""Model arguments of a Llama-architecture checkpoint, read from its ``config.json``.

Field names are the ones of Hugging Face's ``LlamaConfig`` (``hidden_size``, ``num_key_value_heads``, ...), so a
``config.json`` maps onto :class:`ModelArgs` one to one. Derived sizes:

    head_dim        = hidden_size // num_attention_heads      (unless config.json states it)
    n_rep           = num_attention_heads // num_key_value_heads   (GQA group size; 1 = multi-head attention)

``ModelArgs.from_name`` builds the sizes of well-known checkpoints (random-weight models for benchmarks and tests).
What this package does not implement (rope scaling, other architectures, other activations) is refused with a
``ValueError`` that names the field, instead of silently computing something else.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
SUPPORTED_ROPE_TYPES = ("default",)


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None -> num_attention_heads (multi-head attention)
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    # config.json keys this package does not use, kept so that save_model writes them back unchanged
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; config.json must then state head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu', the SwiGLU MLP)")

    @property
    def n_rep(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    # ------------------------------------------------------------------ config.json
    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config") -> "ModelArgs":
        """Build from the dict of a Hugging Face ``config.json``; ``source`` names the file in errors."""
        cfg = dict(cfg)
        archs = cfg.get("architectures")
        model_type = cfg.get("model_type")
        if archs:
            bad = [a for a in archs if a not in SUPPORTED_ARCHITECTURES]
            if bad:
                raise ValueError(
                    f"{source}: architecture {bad[0]!r} is not supported; this package implements "
                    f"{', '.join(SUPPORTED_ARCHITECTURES)}"
                )
        elif model_type != "llama":
            raise ValueError(f"{source}: model_type {model_type!r} is not supported (expected 'llama')")

        # rope: transformers <5 writes rope_theta + rope_scaling, transformers 5 writes rope_parameters
        rope = cfg.pop("rope_parameters", None) or {}
        scaling = cfg.pop("rope_scaling", None)
        for r in (rope, scaling or {}):
            rope_type = r.get("rope_type", r.get("type", "default"))
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise ValueError(
                    f"{source}: rope scaling {rope_type!r} is not supported (only plain RoPE: "
                    f"rope_scaling null or rope_type 'default')"
                )
        if "rope_theta" in rope and "rope_theta" not in cfg:
            cfg["rope_theta"] = rope["rope_theta"]
        if "dtype" in cfg and "torch_dtype" not in cfg:
            cfg["torch_dtype"] = cfg.pop("dtype")
        if cfg.get("pretraining_tp", 1) != 1:
            raise ValueError(f"{source}: pretraining_tp {cfg['pretraining_tp']} is not supported (only 1)")

        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in cfg.items() if k in names}
        extra = {k: v for k, v in cfg.items() if k not in names}
        return cls(**known, extra=extra)

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelArgs":
        """Read ``config.json`` (a file, or a directory that holds one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(cfg, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict that transformers' ``LlamaConfig`` reads back to the same model."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        d = {**self.extra, **d}
        d["architectures"] = ["LlamaForCausalLM"]
        d["model_type"] = "llama"
        d["rope_scaling"] = None
        if d["torch_dtype"] is None:
            del d["torch_dtype"]
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    # ------------------------------------------------------------------ named sizes
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> "ModelArgs":
        """Sizes of a known checkpoint, e.g. ``ModelArgs.from_name("llama-2-7b")``; ``overrides`` replace fields."""
        key = name.lower().split("/")[-1]
        if key not in NAMED_SIZES:
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(sorted(NAMED_SIZES))}")
        return cls(**{**NAMED_SIZES[key], **overrides})


_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
               bos_token_id=1, eos_token_id=2)
NAMED_SIZES: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32),
    "llama-2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                        num_attention_heads=40, num_key_value_heads=40),
    "llama-2-70b": dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8),
    "tinyllama-1.1b": dict(_LLAMA2, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2),
    # tiny sizes for tests: a forward pass takes milliseconds on a CPU
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "tiny-mha": dict(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
}
NAMED_SIZES["llama-2-7b-chat"] = NAMED_SIZES["llama-2-7b"]
NAMED_SIZES["llama-2-13b-chat"] = NAMED_SIZES["llama-2-13b"]
NAMED_SIZES["llama-2-70b-chat"] = NAMED_SIZES["llama-2-70b"]
