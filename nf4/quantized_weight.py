"""QuantizedWeight4bit: one weight matrix in NF4/FP4, optionally with double-quantized scales.

Memory per parameter: 4 bits of code + the scales. At blocksize 64:
    plain:          4 + 32/64                 = 4.5   bits
    double-quant:   4 + 8/64 + 32/(64 * 256)  = 4.127 bits   (+ a 256-entry map and one offset per tensor)

It serializes to exactly the state-dict form of bitsandbytes' `Linear4bit` (see nf4/serialization.py),
so a checkpoint quantized by bitsandbytes loads here and one saved here loads there.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from .blockwise import FLOAT_DTYPES, check_quant_args, dequantize_4bit, quantize_4bit
from .double_quant import DoubleQuantState, double_dequantize, double_quantize


@dataclass
class QuantizedWeight4bit:
    """A tensor of `shape` stored as 4-bit codes with one scale (absmax) per `blocksize` elements.

    packed:     uint8 ((n + 1) // 2, 1), two codes per byte, the first in the high nibble
    absmax:     float32 (ceil(n / blocksize),), or None when the scales are double-quantized
    nested:     DoubleQuantState holding the 8-bit scales, or None
    shape:      the original shape;  dtype: the original dtype (what dequantize() returns by default)
    blocksize:  32..4096, a power of two;  quant_type: "nf4" or "fp4"
    """
    packed: torch.Tensor
    absmax: Optional[torch.Tensor]
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    nested: Optional[DoubleQuantState] = None

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        check_quant_args(self.blocksize, self.quant_type)
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"QuantizedWeight4bit: dtype must be float32, float16 or bfloat16, got {self.dtype}")
        n = math.prod(self.shape)
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (n + 1) // 2:
            raise ValueError(f"QuantizedWeight4bit: packed codes must be uint8 with {(n + 1) // 2} elements for "
                             f"shape {tuple(self.shape)}, got {self.packed.dtype} with {self.packed.numel()}")
        if (self.absmax is None) == (self.nested is None):
            raise ValueError("QuantizedWeight4bit: give exactly one of absmax and nested (double-quantized) scales")
        n_blocks = self.n_blocks
        scales = self.absmax if self.absmax is not None else self.nested.q
        if scales.numel() != n_blocks:
            raise ValueError(f"QuantizedWeight4bit: expected {n_blocks} scales for shape {tuple(self.shape)} and "
                             f"blocksize {self.blocksize}, got {scales.numel()}")

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_tensor(cls, w: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4",
                    double_quant: bool = False) -> "QuantizedWeight4bit":
        """Quantize w (fp32/fp16/bf16, any shape) blockwise with the pure-torch reference (on w's device).
        kernels.quantize_weight does the same with the Triton kernels on CUDA."""
        packed, absmax = quantize_4bit(w, blocksize, quant_type)
        nested = double_quantize(absmax) if double_quant else None
        return cls(packed, None if double_quant else absmax, w.shape, w.dtype, blocksize, quant_type, nested)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def double_quant(self) -> bool:
        return self.nested is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def scales(self) -> torch.Tensor:
        """The float32 absmax per block (restored from the 8-bit form when double-quantized)."""
        return self.absmax if self.nested is None else double_dequantize(self.nested)

    def nbytes(self) -> int:
        """Bytes of storage: codes, scales and (double quant) the second-level state."""
        total = self.packed.numel()
        if self.nested is None:
            total += self.absmax.numel() * 4
        else:
            total += self.nested.q.numel() + self.nested.absmax2.numel() * 4 + self.nested.code.numel() * 4 + 4
        return total

    def bits_per_parameter(self, include_tables: bool = False) -> float:
        """4 + scale bits per element: 4.5 at blocksize 64, 4.127 with double quantization.
        The per-tensor constants (256-entry map, offset) are left out unless include_tables."""
        bits = self.packed.numel() * 8
        if self.nested is None:
            bits += self.absmax.numel() * 32
        else:
            bits += self.nested.q.numel() * 8 + self.nested.absmax2.numel() * 32
            if include_tables:
                bits += self.nested.code.numel() * 32 + 32
        return bits / self.numel

    # ---- use ----------------------------------------------------------------------------------
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """table[code] * absmax, in `dtype` (default: the original dtype), shaped like the original."""
        dtype = self.dtype if dtype is None else dtype
        return dequantize_4bit(self.packed, self.scales(), self.shape, self.blocksize, self.quant_type, dtype)

    def to(self, device) -> "QuantizedWeight4bit":
        """The same codes and scales on `device` (never changes their dtypes)."""
        device = torch.device(device)
        return QuantizedWeight4bit(
            self.packed.to(device), None if self.absmax is None else self.absmax.to(device),
            self.shape, self.dtype, self.blocksize, self.quant_type,
            None if self.nested is None else self.nested.to(device))

    def cuda(self) -> "QuantizedWeight4bit":
        return self.to("cuda")

    def cpu(self) -> "QuantizedWeight4bit":
        return self.to("cpu")

    # ---- serialization (bitsandbytes Linear4bit form) -----------------------------------------
    def to_bnb_state_dict(self, prefix: str = "weight") -> dict:
        from .serialization import to_bnb_state_dict
        return to_bnb_state_dict(self, prefix)

    @classmethod
    def from_bnb_state_dict(cls, state_dict: dict, prefix: str = "weight") -> "QuantizedWeight4bit":
        from .serialization import from_bnb_state_dict
        return from_bnb_state_dict(state_dict, prefix)

    def save(self, path: str, prefix: str = "weight") -> None:
        from .serialization import save_quantized
        save_quantized({prefix: self}, path)

    @classmethod
    def load(cls, path: str, prefix: str = "weight", device="cpu") -> "QuantizedWeight4bit":
        from .serialization import load_quantized
        return load_quantized(path, device=device)[prefix]

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (f"QuantizedWeight4bit({self.quant_type}, shape={tuple(self.shape)}, dtype={self.dtype}, "
                f"blocksize={self.blocksize}{dq}, {self.bits_per_parameter():.3f} bits/param, device={self.device})")

