"""8-bit KV caches (lesson 07): ``kv_quant`` (codes and scales, the INT8/FP8 paged cache; the math is
``kernels.quant``), ``kv_quality`` (what quantization does to the model)."""
