"""4-bit quantisation the QLoRA way, built step by step in NumPy (CuPy by one switch).

Read in this order:

* :mod:`minilora.quant.nf4`       - the code tables (NF4, FP4, int4) and whole-tensor
                                    ``quantize_nf4`` / ``dequantize_nf4`` (and fp4, int4);
* :mod:`minilora.quant.checks`    - input checks (block size, code table, float32 input);
* :mod:`minilora.quant.blockwise` - the steps: absmax per block, scale, nearest code;
* :mod:`minilora.quant.packing`   - two 4-bit codes per byte, and back;
* :mod:`minilora.quant.kernel`    - steps 3 + 4 fused into one CuPy kernel (GPU only);
* :mod:`minilora.quant.double`    - double quantisation of the absmax values, bits per parameter;
* :mod:`minilora.quant.state`     - ``QuantState`` and its safetensors + JSON file format.

Chapter: chapters/06-nf4-step-by-step.ipynb
"""
from minilora.quant.blockwise import (
                                      absmax_per_block,
                                      dequantize_blockwise,
                                      dequantize_packed,
                                      midpoints,
                                      nearest_code,
                                      quantize_blockwise,
                                      scale_to_unit,
)
from minilora.quant.checks import QuantError
from minilora.quant.double import (
                                      DOUBLE_QUANT_BLOCKSIZE,
                                      DYNAMIC_MAP,
                                      bits_per_param,
                                      create_dynamic_map,
                                      double_dequantize,
                                      double_quantize,
                                      measured_bits_per_param,
)
from minilora.quant.nf4 import (
                                      FP4_CODE,
                                      INT4_CODE,
                                      NF4_CODE,
                                      create_normal_map,
                                      dequantize_4bit,
                                      dequantize_fp4,
                                      dequantize_int4,
                                      dequantize_nf4,
                                      get_code,
                                      int4_symmetric_code,
                                      quantize_4bit,
                                      quantize_fp4,
                                      quantize_int4,
                                      quantize_nf4,
)
from minilora.quant.packing import pack_nibbles, unpack_nibbles
from minilora.quant.state import QuantState

__all__ = [
    "NF4_CODE", "FP4_CODE", "INT4_CODE", "create_normal_map", "int4_symmetric_code", "get_code",
    "quantize_4bit", "dequantize_4bit", "quantize_nf4", "dequantize_nf4", "quantize_fp4",
    "dequantize_fp4", "quantize_int4", "dequantize_int4",
    "absmax_per_block", "scale_to_unit", "midpoints", "nearest_code", "pack_nibbles",
    "unpack_nibbles", "quantize_blockwise", "dequantize_blockwise", "dequantize_packed",
    "DYNAMIC_MAP", "DOUBLE_QUANT_BLOCKSIZE", "create_dynamic_map", "double_quantize",
    "double_dequantize", "bits_per_param", "measured_bits_per_param",
    "QuantState", "QuantError",
]
