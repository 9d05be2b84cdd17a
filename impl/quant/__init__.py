"""Low-precision formats and layers: NVFP4 (E2M1 + E4M3 block scales), FP8, quantized linears
and the NVFP4 KV cache."""
