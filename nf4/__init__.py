"""NF4 / FP4 blockwise 4-bit quantization with double quantization, bit for bit as bitsandbytes on CUDA.

    quantize_4bit / dequantize_4bit      the blockwise math (nf4/blockwise.py)
    double_quantize / double_dequantize  8-bit scales of the scales (nf4/double_quant.py)
    QuantizedWeight4bit                  one quantized weight: codes, scales, shape, dtype (nf4/quantized_weight.py)
    to_bnb_state_dict / from_bnb_state_dict, save_quantized / load_quantized   bitsandbytes' file form
"""
from .blockwise import dequantize_4bit, quantize_4bit, reciprocal_f32
from .double_quant import DoubleQuantState, double_dequantize, double_quantize, dynamic_map
from .quantized_weight import QuantizedWeight4bit
from .serialization import (atomic_save_safetensors, atomic_write_text, copy_side_files, from_bnb_state_dict, load_quantized,
                            save_quantized, split_bnb_state_dict, to_bnb_state_dict)
from .tables import FP4_TABLE, NF4_TABLE, code_table, nf4_table_from_quantiles

__all__ = [
    "quantize_4bit", "dequantize_4bit", "reciprocal_f32", "DoubleQuantState", "double_quantize",
    "double_dequantize", "dynamic_map", "QuantizedWeight4bit", "to_bnb_state_dict", "from_bnb_state_dict",
    "split_bnb_state_dict", "save_quantized", "load_quantized", "atomic_save_safetensors", "atomic_write_text", "copy_side_files",
    "NF4_TABLE",
    "FP4_TABLE", "code_table", "nf4_table_from_quantiles",
]
