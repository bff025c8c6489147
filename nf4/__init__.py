"""NF4 / FP4 blockwise 4-bit quantization with double quantization, bit for bit as bitsandbytes on CUDA."""
from .blockwise import dequantize_4bit, quantize_4bit
from .double_quant import DoubleQuantState, double_dequantize, double_quantize, dynamic_map
from .tables import FP4_TABLE, NF4_TABLE, code_table, nf4_table_from_quantiles
