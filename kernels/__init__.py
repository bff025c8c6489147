"""Triton kernels for NF4/FP4 4-bit weights, with one public function per operation.

    dequantize_4bit / dequantize_weight    4-bit codes -> fp32/fp16/bf16           (kernels/dequantize.py)
    quantize_4bit / double_quantize        bit-exact with nf4 (and bitsandbytes)   (kernels/quantize.py)
    quantize_weight                        dense weight -> nf4.QuantizedWeight4bit
    nf4_matmul / nf4_matmul_t              y = x @ W.T (+ bias), grad_x = g @ W    (kernels/nf4_matmul.py)
    nf4_linear, NF4Linear                  autograd Function and nn.Module         (kernels/nf4_linear.py)
    rms_norm, apply_rope, swiglu           fused Llama ops, hand-written backward  (kernels/rms_norm.py, rope.py, swiglu.py)
    chunked_cross_entropy                  LM-head loss without full fp32 logits   (kernels/cross_entropy.py)
    adamw_step_, adamw_step_multi_         bitsandbytes' AdamW update              (kernels/adamw.py)
    gather_rows                            embedding rows from a pinned host table (kernels/gather.py)
    prefetch.ENABLED / prefetch.join       the next NF4 weight dequantized on a    (kernels/prefetch.py)
                                           side stream beside the current GEMM

Dispatch: CUDA tensors run Triton; CPU tensors run the pure-torch reference in nf4/. Tests run the Triton
kernels on the CPU with TRITON_INTERPRET=1.
"""
from .dequantize import dequantize_4bit, dequantize_4bit_triton, dequantize_weight
from .nf4_linear import NF4Linear, NF4LinearFunction, nf4_linear
from .nf4_matmul import nf4_matmul, nf4_matmul_dequant, nf4_matmul_fused, nf4_matmul_t, nf4_matmul_t_fused
from .adamw import adamw_step_, adamw_step_multi_, adamw_update_
from .cross_entropy import chunked_cross_entropy
from .gather import gather_rows
from .rms_norm import rms_norm
from .rope import apply_rope
from .swiglu import swiglu
from .quantize import double_quantize, double_quantize_triton, quantize_4bit, quantize_4bit_triton, quantize_weight

__all__ = [
    "dequantize_4bit", "dequantize_4bit_triton", "dequantize_weight", "quantize_4bit", "quantize_4bit_triton",
    "double_quantize", "double_quantize_triton", "quantize_weight", "nf4_matmul", "nf4_matmul_t",
    "nf4_matmul_fused", "nf4_matmul_t_fused", "nf4_matmul_dequant", "nf4_linear", "NF4Linear",
    "NF4LinearFunction", "rms_norm", "apply_rope", "swiglu", "chunked_cross_entropy", "adamw_step_",
    "adamw_step_multi_", "adamw_update_", "gather_rows",
]
